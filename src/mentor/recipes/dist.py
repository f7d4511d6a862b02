"""``dist``: DIST, distillation by the correlation of predictions within items and across the batch.

Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher", https://arxiv.org/abs/2205.10536. Loss:
``CE + weight * T^2 * (beta * inter + gamma * intra)`` where the inter-class term is ``1 - mean Pearson`` over each
item's class probabilities and the intra-class term ``1 - mean Pearson`` over each class's probabilities across the
batch (see :func:`mentor.losses.dist`).
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def dist(beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, weight: float = 1.0) -> Method:
    """Cross-entropy plus DIST.

    Args:
        beta: Weight of the inter-class (per item) relation (>= 0).
        gamma: Weight of the intra-class (per class, across the batch) relation (>= 0).
        temperature: Softmax temperature (> 0); the paper uses 1 on ImageNet and 4 on CIFAR.
        weight: Weight of the DIST term (>= 0).
    """
    for name, value in (("beta", beta), ("gamma", gamma), ("weight", weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return Method(
        name="dist",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("dist", losses.dist, target="teacher.logits", reduction="batch", weight=weight,
                 kwargs={"beta": beta, "gamma": gamma, "temperature": temperature}),
        ),
        description="labels + Pearson correlation of predictions within items and across the batch (Huang et al. 2022)",
    )
