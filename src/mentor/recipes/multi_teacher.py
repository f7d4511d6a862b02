"""``multi_teacher``: distillation from several frozen teachers combined into one target.

The teachers are combined by :class:`mentor.teachers.Ensemble` (the recipe itself only says what the student
learns from the combination): the plain average of their probabilities (as in You et al. 2017, "Learning from
Multiple Teacher Networks", https://doi.org/10.1145/3097983.3098135), fixed weights, per-item weights from each
teacher's confidence (largest class probability, or entropy: see :func:`mentor.teachers.confidence_weights`), or
per-item weights from a small learned :class:`mentor.teachers.Router` on the student's input.

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(p_mix^T || p_student^T)
           [+ router_weight * CE(mix_router(x), label)]            # with router=True

With a router, ``router=True`` adds the term that trains it: the cross-entropy of the routed mixture
(``"route.logits"``, which the loop computes with gradients into the router only) with the labels of the labelled
items. The distillation target is the same mixture without gradient, so the student's KL never moves the router.

In a config::

    teacher: {runs: [runs/cnn, runs/mlp, runs/gru], combine: router}   # mean | weights | max_prob | entropy | router
    recipe: {name: multi_teacher, args: {temperature: 4.0, alpha: 0.9, router: true}}
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term

__all__ = ["multi_teacher", "router_term"]


def router_term(weight: float = 1.0) -> Term:
    """The term that trains an ensemble's router: CE of the routed mixture ``"route.logits"`` with the label."""
    return Term("router", losses.cross_entropy, student="route.logits", target="label", items="labelled",
                weight=weight)


def multi_teacher(temperature: float = 4.0, alpha: float = 0.9, router: bool = False,
                  router_weight: float = 1.0) -> Method:
    """Labels plus KD from the combined teachers (an :class:`~mentor.teachers.Ensemble` teacher).

    Args:
        temperature: KD temperature (> 0).
        alpha: Weight of the KD term in ``[0, 1]``; the cross-entropy gets ``1 - alpha``.
        router: Add the router's training term (needs an ensemble with ``by="router"``).
        router_weight: Weight of that term (> 0).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    if router and not router_weight > 0:
        raise ValueError(f"router_weight must be > 0, got {router_weight}")
    terms = [
        Term("ce", losses.cross_entropy, target="label", items="labelled", weight=1.0 - alpha),
        Term("kd", losses.kl_div, target="teacher.logits", weight=alpha, kwargs={"temperature": temperature}),
    ]
    if router:
        terms.append(router_term(router_weight))
    return Method(
        name="multi_teacher",
        terms=tuple(terms),
        description="KD from several teachers: average, fixed weights, per-item confidence or a learned router",
    )
