"""``dkd``: Decoupled Knowledge Distillation, target-class and non-target-class KD weighted separately.

Zhao et al. 2022, "Decoupled Knowledge Distillation", https://arxiv.org/abs/2203.08679. Loss:
``CE + ramp(step) * (alpha * TCKD + beta * NCKD)`` (see :func:`mentor.losses.dkd`); DKD needs labels, so it covers
the labelled items. The paper warms the DKD weight up linearly (over 20 epochs on CIFAR); ``warmup_steps`` does that.

The defaults are the paper's CIFAR-100 ones; the paper sets ``beta`` per teacher-student pair (1 to 8 on CIFAR-100,
0.5 on ImageNet). On MNIST-1D's 10 classes ``beta=8`` hurt: held-out tuning picked ``temperature=1`` with ``beta``
1 or 2 (``bench/catalogue_tuned.py``, results in ``bench/RESULTS.md``). Tune ``beta`` for a new pair.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term
from mentor.schedules import Linear


def dkd(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_steps: int = 0) -> Method:
    """Cross-entropy plus decoupled KD.

    Args:
        alpha: Weight of the target-class term TCKD (>= 0).
        beta: Weight of the non-target-class term NCKD (>= 0).
        temperature: Softmax temperature (> 0).
        warmup_steps: Linear warm-up of the DKD term's weight from 0 to 1 over this many steps (0: none).
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return Method(
        name="dkd",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("dkd", losses.dkd, target="teacher.logits", items="labelled", reduction="batch",
                 extra={"target": "label"}, kwargs={"alpha": alpha, "beta": beta, "temperature": temperature},
                 weight=Linear(0.0, 1.0, warmup_steps) if warmup_steps else 1.0),
        ),
        description="labels + target-class and non-target-class KD weighted apart (Zhao et al. 2022)",
    )
