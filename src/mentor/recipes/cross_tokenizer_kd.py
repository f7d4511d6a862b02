"""``cross_tokenizer_kd``: distil a causal LM into a student with **another tokenizer**.

The teacher is a :class:`mentor.lm.cross.CrossTokenizer`: it decodes the student's rows to text, re-tokenizes them
with its own tokenizer, and returns its outputs at the student's positions (alignment through character offsets;
the rule and a worked example are in :mod:`mentor.lm.cross`). Two terms, each over the target tokens of the data
(label >= 0) and divided by the number of target tokens in the whole optimiser step:

* ``"uld"`` (weight ``uld_weight``): Universal Logit Distillation (Boizard et al. 2024,
  https://arxiv.org/abs/2402.12030), :func:`mentor.losses.uld_distance`, between the student's logits and the
  teacher's aligned logits, at the target positions where a teacher position is aligned (``teacher.aligned`` as
  the mask; a target without one adds 0). Sorted probabilities, so the two vocabularies need no mapping.
* ``"ce"`` (weight ``ce_weight``): the student's cross-entropy on the data's tokens, weighted per token by the
  teacher-guided weights of VocAgnoLM (Shin et al. 2025, https://arxiv.org/abs/2503.19123;
  :func:`mentor.lm.align.guided_cross_entropy`): per sequence, among the target tokens that some teacher token
  overlaps, the share ``select`` with the largest excess loss ``l_student - l_teacher`` gets weight 1, the rest 0
  (``select = 1``: every overlapped target token). ``aggregate`` says how the losses of several teacher tokens
  overlapping one student token combine (``max`` or ``mean``).

    loss = uld_weight * T^2 * sum_aligned sum_r |p_s,(r) - p_t,(r)| / N  +  ce_weight * sum_i w_i CE_i / N

From Python (both tokenizers trained locally here; any two fast tokenizers work)::

    from mentor import recipes, train
    from mentor.lm import data, loop, models
    from mentor.lm.cross import CrossTokenizer

    student_tok, teacher_tok = data.tokenizer(384), data.tokenizer(512)
    train_set, test_set = loop.lm_task_data("arithmetic", num_train=2000, vocab_size=384)  # the student's ids
    teacher = CrossTokenizer(teacher_net, teacher_tok, student_tok)   # teacher_net: an LM over teacher_tok's ids
    student = models.tiny_llama(2, 128, len(student_tok))
    train.fit(student, recipes.cross_tokenizer_kd(), train_set, teacher=teacher, eval_data=test_set,
              max_steps=500, batch_size=64)

From a config: ``recipe: {name: cross_tokenizer_kd}`` with ``teacher.run`` (a language-model run: its
``data.vocab_size`` names its tokenizer) or ``teacher.checkpoint`` plus ``teacher.tokenizer`` (see
``configs/lm_arithmetic_cross_tokenizer.yaml``). Without this recipe a teacher with another vocabulary size is
refused, naming both sizes.
"""

from __future__ import annotations

from mentor import losses
from mentor.lm.align import guided_cross_entropy
from mentor.method import Method, Term

__all__ = ["cross_tokenizer_kd"]


def cross_tokenizer_kd(
    uld_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
    select: float = 0.6,
    aggregate: str = "max",
) -> Method:
    """KD from a teacher with another tokenizer: ULD on aligned positions plus teacher-guided cross-entropy.

    Args:
        uld_weight: Weight of the ULD term (0: none).
        ce_weight: Weight of the teacher-guided cross-entropy (0: none).
        temperature: Softmax temperature of both models in ULD (the term is scaled by ``T^2``).
        select: Share of each sequence's overlapped target tokens that the cross-entropy keeps, by largest excess
            loss, in ``(0, 1]``.
        aggregate: ``"max"`` or ``"mean"``: the teacher's loss of a student token overlapping several teacher
            tokens.

    Returns:
        The method; its teacher must be a :class:`mentor.lm.cross.CrossTokenizer`.
    """
    for name, value in (("uld_weight", uld_weight), ("ce_weight", ce_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if uld_weight == 0 and ce_weight == 0:
        raise ValueError("uld_weight and ce_weight are both 0: expected at least one term with a positive weight")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(select, bool) or not isinstance(select, (int, float)) or not 0 < select <= 1:
        raise ValueError(f"select must be in (0, 1], got {select!r}")
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    terms = []
    if uld_weight > 0:
        terms.append(Term("uld", losses.uld_distance, target="teacher.logits", items="labelled",
                          weight=float(uld_weight), kwargs={"temperature": float(temperature)},
                          extra={"mask": "teacher.aligned"}))
    if ce_weight > 0:
        loss_key = "teacher.token_loss" if aggregate == "max" else "teacher.token_loss_mean"
        terms.append(Term("ce", guided_cross_entropy, target="label", items="labelled", weight=float(ce_weight),
                          kwargs={"select": float(select)},
                          extra={"teacher_loss": loss_key, "covered": "teacher.covered",
                                 "sequence": "teacher.sequence"}))
    return Method(
        name="cross_tokenizer_kd",
        terms=tuple(terms),
        description="causal LM, teacher with another tokenizer: ULD on offset-aligned positions + "
                    "teacher-guided CE (VocAgnoLM)",
    )
