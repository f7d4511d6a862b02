"""``ltd``: Low Temperature Distillation, separate teacher and student temperatures.

Chen et al. 2021, "LTD: Low Temperature Distillation for Robust Adversarial Training",
https://arxiv.org/abs/2111.02331. The teacher is softened with a low temperature ``T_t`` and the student with its own
fixed ``T_s``; the KD term is ``T_s^2 * KL(softmax(t / T_t) || softmax(s / T_s))``.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def ltd(teacher_temperature: float = 0.5, student_temperature: float = 1.0, alpha: float = 0.9) -> Method:
    """Labels plus KD with distinct temperatures.

    Args:
        teacher_temperature: ``T_t`` (> 0), usually below 1.
        student_temperature: ``T_s`` (> 0).
        alpha: Weight of the KD term in ``[0, 1]`` (the cross-entropy gets ``1 - alpha``), as in ``hinton_kd``.
    """
    for name, value in (("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    return Method(
        name="ltd",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled", weight=1.0 - alpha),
            Term("kd", losses.kl_div, target="teacher.logits", weight=alpha,
                 kwargs={"temperature": student_temperature, "teacher_temperature": teacher_temperature}),
        ),
        description="KD with separate (low) teacher and student temperatures (Chen et al. 2021)",
    )
