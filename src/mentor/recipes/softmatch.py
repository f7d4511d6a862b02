"""``softmatch``: FixMatch with truncated-Gaussian soft weights and uniform distribution alignment.

Chen et al. 2023, "SoftMatch: Addressing the Quantity-Quality Trade-off in Semi-supervised Learning",
https://arxiv.org/abs/2301.10921. The teacher's weak-view probabilities are first aligned to a uniform class
distribution (:class:`mentor.targets.UniformAlignment`), then weighed by :class:`mentor.targets.SoftMatch` (weights
in ``[0, 1]``, passed to the loss as a float ``mask``); the hard pseudo-label is the arg-max of the aligned
probabilities. Both statistics are updated once per step before the weights are computed, as in USB.
"""

from __future__ import annotations

from mentor.method import Method, Weigh
from mentor.recipes.fixmatch import pseudo_label_method
from mentor.targets import SoftMatch, UniformAlignment


def softmatch(lambda_u: float = 1.0, momentum: float = 0.999, n_sigma: float = 2.0, align: bool = True,
              kind: str = "signal", magnitude: float = 0.5) -> Method:
    """SoftMatch.

    Args:
        lambda_u: Weight of the unsupervised term.
        momentum: EMA momentum of the confidence statistics (and of the alignment).
        n_sigma: Width divisor of the Gaussian (USB: 2).
        align: Uniform distribution alignment first.
        kind: ``"signal"`` or ``"image"`` augmentations.
        magnitude: RandAugment magnitude of the strong view.
    """
    SoftMatch(1, momentum, n_sigma)  # checks the arguments

    def aligner(num_classes: int) -> UniformAlignment:
        return UniformAlignment(num_classes, momentum)

    weigh = Weigh(lambda num_classes, num_items: SoftMatch(num_classes, momentum, n_sigma),
                  align=aligner if align else None)
    return pseudo_label_method("softmatch", weigh, lambda_u, kind, magnitude,
                               "FixMatch with soft Gaussian weights and uniform alignment (Chen et al. 2023)")
