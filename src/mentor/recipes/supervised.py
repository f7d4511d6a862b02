"""``supervised``: plain cross-entropy on labels, no teacher. The baseline, and how a teacher is trained."""

from __future__ import annotations

from mentor import losses, views
from mentor.method import Method, Term

AUGMENTS = ("none", *views.PRESETS)


def supervised(label_smoothing: float = 0.0, augment: str = "none") -> Method:
    """Cross-entropy on the labelled items.

    Args:
        label_smoothing: Label smoothing ``e`` in ``[0, 1]``.
        augment: The student's input augmentation, fresh per item and epoch (seeded, so a resumed run sees the
            same views): ``"none"`` (the default), ``"weak"`` / ``"strong"`` (1-D signals such as MNIST-1D, see
            :func:`mentor.views.weak` and :func:`mentor.views.strong`) or ``"weak_image"`` / ``"strong_image"``.
            A teacher is worth training with it: on MNIST-1D the weak view takes the CNN teacher from about 0.91 to
            about 0.97 test accuracy (``bench/kd_mnist1d.py``).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    return Method(
        name="supervised",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled",
                 kwargs={"label_smoothing": label_smoothing}),
        ),
        views=None if augment == "none" else views.Views(student=views.preset(augment)),
        description="cross-entropy on labels, no teacher (the baseline; also trains teachers)",
    )
