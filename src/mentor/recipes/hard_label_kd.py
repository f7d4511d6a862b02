"""``hard_label_kd``: the teacher's arg-max on each item is the label (pseudo-labelling a transfer set)."""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term
from mentor.targets import HardLabel


def hard_label_kd(label_smoothing: float = 0.0) -> Method:
    """Cross-entropy against the teacher's predicted class; dataset labels are ignored.

    Args:
        label_smoothing: Label smoothing of the cross-entropy.
    """
    return Method(
        name="hard_label_kd",
        terms=(
            Term("ce_teacher", losses.cross_entropy, target="teacher.logits", transform=HardLabel(),
                 kwargs={"label_smoothing": label_smoothing}),
        ),
        description="cross-entropy on the teacher's arg-max labels (hard pseudo-labels), no dataset labels",
    )
