"""``transfer_kd``: the student matches the teacher's softened outputs on a transfer set, with no labels.

Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531 (distillation on a transfer set). Train it on
unlabelled data (the MNIST-1D transfer set: ``data.train: transfer``); labelled items, if any, are treated the same.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def transfer_kd(temperature: float = 4.0) -> Method:
    """Soft targets only: ``T^2 * KL(p_teacher^T || p_student^T)`` over every item.

    Args:
        temperature: Softmax temperature ``T`` (> 0).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return Method(
        name="transfer_kd",
        terms=(Term("kd", losses.kl_div, target="teacher.logits", kwargs={"temperature": temperature}),),
        description="teacher's softened logits on an unlabelled transfer set, no labels (Hinton et al. 2015)",
    )
