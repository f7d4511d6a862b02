"""``freematch``: FixMatch with self-adaptive thresholds and the self-adaptive fairness term.

Wang et al. 2023, "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning",
https://arxiv.org/abs/2205.07246. The weighting is :class:`mentor.targets.FreeMatch` (a global threshold and
class-wise modulation, EMAs of the teacher's confidence updated once per step before masking); the fairness term
:func:`mentor.losses.freematch_fairness` reads that weighting's running class probabilities and histogram and its
mask of confident items (``"weighting.<key>"`` sources of the term that shares the ``"unsup"`` weighting). It is a
batch-level term over the unlabelled items of each micro-batch.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term, Weigh
from mentor.recipes.fixmatch import pseudo_label_method
from mentor.targets import FreeMatch


def freematch(lambda_u: float = 1.0, lambda_f: float = 0.01, momentum: float = 0.999, kind: str = "signal",
              magnitude: float = 0.5) -> Method:
    """FreeMatch.

    Args:
        lambda_u: Weight of the unsupervised term.
        lambda_f: Weight of the fairness term (USB's ``ent_loss_ratio``; 0 drops the term).
        momentum: EMA momentum of the thresholds' statistics.
        kind: ``"signal"`` or ``"image"`` augmentations.
        magnitude: RandAugment magnitude of the strong view.
    """
    FreeMatch(1, momentum)  # checks momentum
    if not lambda_f >= 0:
        raise ValueError(f"lambda_f must be >= 0, got {lambda_f}")
    fairness = Term("fairness", losses.freematch_fairness, target="weighting.class_probs", items="unlabelled",
                    extra={"label_hist": "weighting.label_hist", "mask": "weighting.mask"}, reduction="batch",
                    weighting="unsup", weight=lambda_f)
    return pseudo_label_method(
        "freematch", Weigh(lambda num_classes, num_items: FreeMatch(num_classes, momentum)), lambda_u, kind,
        magnitude, "FixMatch with self-adaptive thresholds and fairness (Wang et al. 2023)",
        (fairness,) if lambda_f > 0 else ())
