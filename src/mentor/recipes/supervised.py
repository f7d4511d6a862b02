"""``supervised``: plain cross-entropy on labels, no teacher. The baseline, and how a teacher is trained."""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def supervised(label_smoothing: float = 0.0) -> Method:
    """Cross-entropy on the labelled items.

    Args:
        label_smoothing: Label smoothing ``e`` in ``[0, 1]``.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return Method(
        name="supervised",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled",
                 kwargs={"label_smoothing": label_smoothing}),
        ),
        description="cross-entropy on labels, no teacher (the baseline; also trains teachers)",
    )
