"""``fixmatch``: the student's confident predictions on a weak view are the targets of its strong view.

Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
https://arxiv.org/abs/2001.07685.

    loss = CE(student(weak(x_l)), y)
           + lambda_u * sum_{unlabelled b} 1[max_c p_b >= tau] * CE(student(strong(x_b)), argmax p_b) / (mu B)

with ``p_b = softmax(student(weak(x_b)))`` computed without gradient (``teachers.Self``). The labelled items are
seen in the weak view (``supervised_view="teacher"``), the unlabelled ones by the teacher in the weak view and by
the student in the strong one. The unsupervised term covers the unlabelled items and is normalised by their count
(``items="unlabelled"``), masked by a :class:`~mentor.targets.FixedThreshold`. FlexMatch, FreeMatch and SoftMatch
(their own recipes) are this method with another weighting: :func:`pseudo_label_method` builds all four.
"""

from __future__ import annotations

from typing import cast

from mentor import losses, teachers
from mentor.method import Method, Term, Weigh
from mentor.targets import FixedThreshold, HardLabel
from mentor.views import Kind, Views, strong, weak


def pseudo_label_method(name: str, weigh: Weigh, lambda_u: float, kind: str, magnitude: float, description: str,
                        extra: tuple[Term, ...] = ()) -> Method:
    """The FixMatch family: labelled CE on the weak view plus the weighted pseudo-label CE on the strong view.

    Args:
        name: Recipe name.
        weigh: How the unlabelled items are weighed (the only difference between the family's members).
        lambda_u: Weight of the unsupervised term.
        kind: ``"signal"`` or ``"image"`` augmentations.
        magnitude: RandAugment magnitude of the strong view, in ``[0, 1]``.
        description: One line for ``mentor recipes``.
        extra: More terms (FreeMatch's fairness term).
    """
    if not lambda_u >= 0:
        raise ValueError(f"lambda_u must be >= 0, got {lambda_u}")
    if kind not in ("signal", "image"):
        raise ValueError(f"kind must be 'signal' or 'image', got {kind!r}")
    if not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
    return Method(
        name=name,
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("unsup", losses.cross_entropy, target="teacher.logits", transform=HardLabel(), items="unlabelled",
                 weighting=weigh, weight=lambda_u),
            *extra,
        ),
        teacher=teachers.Self,
        views=Views(teacher=weak(cast(Kind, kind)), student=strong(cast(Kind, kind), magnitude=magnitude)),
        supervised_view="teacher",
        description=description,
    )


def fixmatch(tau: float = 0.95, lambda_u: float = 1.0, kind: str = "signal", magnitude: float = 0.5) -> Method:
    """FixMatch.

    Args:
        tau: Confidence threshold in ``[0, 1]``.
        lambda_u: Weight of the unsupervised term.
        kind: ``"signal"`` or ``"image"`` augmentations (:mod:`mentor.views`).
        magnitude: RandAugment magnitude of the strong view.
    """
    FixedThreshold(tau)  # checks tau
    return pseudo_label_method(
        "fixmatch", Weigh(lambda num_classes, num_items: FixedThreshold(tau)), lambda_u, kind, magnitude,
        "pseudo-labels of the weak view above a fixed threshold train the strong view (Sohn et al. 2020)")
