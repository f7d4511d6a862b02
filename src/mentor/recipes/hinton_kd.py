"""``hinton_kd``: cross-entropy on labels plus KL to the teacher's softened outputs.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531.

**The alpha convention.** In mentor ``alpha`` is the weight of the *distillation* term:

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(p_teacher^T || p_student^T)

This is the convention of the Hinton paper's "weighted average" and of RepDistiller/mdistiller-style code where a
larger weight means more distillation. torchdistill's ``KDLoss`` uses the opposite one: its ``alpha`` weighs the
hard-label cross-entropy (``alpha * CE + (1 - alpha) * T^2 * KL``). mentor ``alpha=0.9`` is torchdistill
``alpha=0.1``.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def hinton_kd(temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0) -> Method:
    """Classic knowledge distillation on labelled data.

    Args:
        temperature: Softmax temperature ``T`` (> 0) of both teacher and student in the KD term.
        alpha: Weight of the KD term in ``[0, 1]``; the cross-entropy gets ``1 - alpha``.
        label_smoothing: Label smoothing of the cross-entropy term.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    return Method(
        name="hinton_kd",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled", weight=1.0 - alpha,
                 kwargs={"label_smoothing": label_smoothing}),
            Term("kd", losses.kl_div, target="teacher.logits", weight=alpha, kwargs={"temperature": temperature}),
        ),
        description="labels + teacher's softened logits: (1-alpha)*CE + alpha*T^2*KL (Hinton et al. 2015)",
    )
