"""``flexmatch``: FixMatch with class-adaptive thresholds from curriculum pseudo-labelling.

Zhang et al. 2021, "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling",
https://arxiv.org/abs/2110.08263. The same method as :mod:`mentor.recipes.fixmatch` except the weighting:
:class:`mentor.targets.FlexMatch`, whose memory spans the unlabelled items (the loop passes each item's position
in the unlabelled pool, and updates it once per step with the whole step's predictions before masking).
"""

from __future__ import annotations

from mentor.method import Method, Weigh
from mentor.recipes.fixmatch import pseudo_label_method
from mentor.targets import FlexMatch


def flexmatch(tau: float = 0.95, lambda_u: float = 1.0, mapping: str = "convex", warmup: bool = True,
              kind: str = "signal", magnitude: float = 0.5) -> Method:
    """FlexMatch.

    Args:
        tau: Upper threshold in ``[0, 1]``.
        lambda_u: Weight of the unsupervised term.
        mapping: ``"convex"`` (the paper's), ``"linear"`` or ``"concave"``.
        warmup: Threshold warm-up (count the not yet confidently predicted items).
        kind: ``"signal"`` or ``"image"`` augmentations.
        magnitude: RandAugment magnitude of the strong view.
    """
    FlexMatch(tau, num_classes=1, num_items=1, mapping=mapping)  # checks tau and mapping

    def make(num_classes: int, num_items: int) -> FlexMatch:
        return FlexMatch(tau, num_classes=num_classes, num_items=num_items, warmup=warmup, mapping=mapping)

    return pseudo_label_method("flexmatch", Weigh(make), lambda_u, kind, magnitude,
                               "FixMatch with class-adaptive thresholds (Zhang et al. 2021)")
