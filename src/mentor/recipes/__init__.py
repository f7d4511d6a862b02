"""Recipes: one readable file per named method, each a function that returns a :class:`~mentor.method.Method`.

:data:`RECIPES` lists them explicitly; nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mentor.method import Method
from mentor.recipes.attention_transfer import attention_transfer
from mentor.recipes.born_again import born_again
from mentor.recipes.cross_tokenizer_kd import cross_tokenizer_kd
from mentor.recipes.dist import dist
from mentor.recipes.dkd import dkd
from mentor.recipes.dml import Cohort, dml
from mentor.recipes.feature_regression import feature_regression
from mentor.recipes.fitnet import fitnet
from mentor.recipes.fixmatch import fixmatch
from mentor.recipes.flexmatch import flexmatch
from mentor.recipes.freematch import freematch
from mentor.recipes.gkd import gkd
from mentor.recipes.hard_label_kd import hard_label_kd
from mentor.recipes.hinton_kd import hinton_kd
from mentor.recipes.lm_kd import lm_kd
from mentor.recipes.ltd import ltd
from mentor.recipes.mean_teacher import mean_teacher
from mentor.recipes.multi_teacher import multi_teacher
from mentor.recipes.noisy_student import noisy_student
from mentor.recipes.ofa import ofa
from mentor.recipes.reverse_kl_on_policy import reverse_kl_on_policy
from mentor.recipes.rkd import rkd
from mentor.recipes.seq_kd import seq_kd
from mentor.recipes.similarity_preserving import similarity_preserving
from mentor.recipes.simkd import simkd, simkd_student
from mentor.recipes.skd import skd
from mentor.recipes.softmatch import softmatch
from mentor.recipes.supervised import supervised
from mentor.recipes.transfer_kd import transfer_kd

__all__ = ["RECIPES", "Cohort", "dml", "multi_teacher", "noisy_student",
           "attention_transfer", "born_again", "build_recipe", "dist", "dkd", "feature_regression",
           "fitnet", "hard_label_kd", "hinton_kd", "ltd", "ofa", "rkd", "similarity_preserving", "simkd",
           "simkd_student", "supervised", "transfer_kd", "mean_teacher", "fixmatch", "flexmatch", "freematch",
           "softmatch", "lm_kd", "seq_kd", "gkd", "skd", "reverse_kl_on_policy",
           "cross_tokenizer_kd"]

RECIPES: Mapping[str, Callable[..., Method]] = {
    "supervised": supervised,
    "hinton_kd": hinton_kd,
    "transfer_kd": transfer_kd,
    "hard_label_kd": hard_label_kd,
    "ltd": ltd,
    "born_again": born_again,
    "fitnet": fitnet,
    "attention_transfer": attention_transfer,
    "rkd": rkd,
    "similarity_preserving": similarity_preserving,
    "dkd": dkd,
    "dist": dist,
    "ofa": ofa,
    "simkd": simkd,
    "feature_regression": feature_regression,
    "dml": dml,
    "multi_teacher": multi_teacher,
    "noisy_student": noisy_student,
    "mean_teacher": mean_teacher,
    "fixmatch": fixmatch,
    "flexmatch": flexmatch,
    "freematch": freematch,
    "softmatch": softmatch,
    "lm_kd": lm_kd,
    "seq_kd": seq_kd,
    "gkd": gkd,
    "skd": skd,
    "reverse_kl_on_policy": reverse_kl_on_policy,
    "cross_tokenizer_kd": cross_tokenizer_kd,  # teacher with another tokenizer: ULD + VocAgnoLM-weighted CE
}


def build_recipe(name: str, args: Mapping[str, object] | None = None) -> Method:
    """The method of recipe ``name`` with keyword ``args``; a clear error for an unknown name or argument."""
    import inspect

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(sorted(RECIPES))}")
    fn = RECIPES[name]
    params = inspect.signature(fn).parameters
    for key, value in (args or {}).items():
        if key not in params:
            raise ValueError(
                f"recipe {name!r} has no argument {key!r}: expected one of {', '.join(params) or '(none)'}"
            )
        annotation = params[key].annotation  # a string under 'from __future__ import annotations'
        wanted = {"float": ((int, float), "a number"), float: ((int, float), "a number"),
                  "int": ((int,), "an integer"), int: ((int,), "an integer")}.get(annotation)
        if wanted is not None and (isinstance(value, bool) or not isinstance(value, wanted[0])):
            raise ValueError(f"recipe {name!r} argument {key!r} = {value!r}: expected {wanted[1]}")
    return fn(**dict(args or {}))
