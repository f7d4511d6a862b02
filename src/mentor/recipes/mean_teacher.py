"""``mean_teacher``: an exponential moving average of the student teaches it on another view of each batch.

Tarvainen & Valpola 2017, "Mean teachers are better role models", https://arxiv.org/abs/1703.01780.

    loss = CE(student(view_s(x_labelled)), y) + w(step) * consistency(student(view_s(x)), EMA(view_t(x)))

The teacher is ``teachers.EMA`` of the student, its decay warmed up as in the paper (``EMAWarmup``: the first
averages are true means) and updated by the loop once per optimiser step, parameters and floating-point buffers
alike. Teacher and student see *different* draws of the augmentation (view 0 and view 1 of each item, seeded by
``(seed, step, item, view)``), so the consistency compares two views through two models: USB's Mean Teacher fed the
same weak view to both sides and therefore trained as plain supervised learning; here ``views`` can only be the same
if the caller passes an identity augmentation on purpose. The consistency weight ramps up with the paper's sigmoid
schedule (``schedules.RampUp``). The consistency covers every item (labelled ones too, as in the paper) unless
``unlabelled_only``.
"""

from __future__ import annotations

from functools import partial
from typing import cast

from mentor import losses, teachers
from mentor.method import Method, Term
from mentor.schedules import EMAWarmup, RampUp
from mentor.views import Kind, Views, strong, weak


def mean_teacher(
    weight: float = 30.0,
    rampup_steps: int = 1000,
    decay: float = 0.99,
    consistency: str = "mse",
    kind: str = "signal",
    student_view: str = "weak",
    unlabelled_only: bool = False,
) -> Method:
    """Mean Teacher.

    Args:
        weight: Final weight of the consistency term (softmax MSE averages over classes, so it is large: USB uses
            50 with the same MSE).
        rampup_steps: Steps of the sigmoid ramp-up of the consistency weight (``exp(-5 (1 - t)^2)``).
        decay: EMA decay after the warm-up ``min(1 - 1 / (step + 2), decay)``.
        consistency: ``"mse"`` (squared distance of the softmax outputs, the paper's choice) or ``"kl"``.
        kind: ``"signal"`` or ``"image"``: which built-in augmentations (:mod:`mentor.views`).
        student_view: ``"weak"`` (the paper: both sides get the same kind of noise, drawn independently) or
            ``"strong"``.
        unlabelled_only: Consistency on the unlabelled items only (USB's choice) instead of all items.
    """
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if rampup_steps < 0:
        raise ValueError(f"rampup_steps must be >= 0, got {rampup_steps}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if consistency not in ("mse", "kl"):
        raise ValueError(f"consistency must be 'mse' or 'kl', got {consistency!r}")
    if kind not in ("signal", "image"):
        raise ValueError(f"kind must be 'signal' or 'image', got {kind!r}")
    if student_view not in ("weak", "strong"):
        raise ValueError(f"student_view must be 'weak' or 'strong', got {student_view!r}")
    loss = losses.softmax_mse if consistency == "mse" else losses.kl_div
    return Method(
        name="mean_teacher",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("consistency", loss, target="teacher.logits", items="unlabelled" if unlabelled_only else "all",
                 weight=RampUp(weight, rampup_steps)),
        ),
        teacher=partial(teachers.EMA, decay=EMAWarmup(decay)),
        views=Views(teacher=weak(cast(Kind, kind)),
                    student=weak(cast(Kind, kind)) if student_view == "weak" else strong(cast(Kind, kind))),
        description="EMA of the student teaches it on another view: CE + ramped consistency (Tarvainen & Valpola 2017)",
    )
