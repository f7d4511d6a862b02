"""``noisy_student``: self-training with a noised student that becomes the next teacher.

Xie, Luong, Hovy & Le 2020, "Self-training with Noisy Student improves ImageNet classification",
https://arxiv.org/abs/1911.04252. Each generation:

1. the teacher labels every training item once, in eval mode, on the **clean** input (soft pseudo-labels: its
   probabilities at ``temperature``; or hard: its arg-max); items with a label keep their label;
2. a student of equal or larger size trains on labelled plus pseudo-labelled items **under noise**: its input is
   augmented (:func:`mentor.views.weak` ``("signal")`` by default, or the paper's RandAugment-style
   :func:`mentor.views.strong`, seeded per item and epoch, applied to the student's input only) and its own dropout
   is active (a student spec with ``dropout``);
3. the student becomes the teacher of the next generation, with exactly its weights.

The stored targets make this an ordinary run of the loop: the teacher is a :class:`mentor.teachers.PseudoLabels`
(read by item index, like a teacher cache; its ``student_inputs`` gives the student its noised view), and the one
term is ``KL(target || p_student)``, which equals the cross-entropy for one-hot targets.

``mentor train`` runs all generations of ``recipe: {name: noisy_student, args: {generations: 3}}`` in one command:
``gen0/`` (only without a configured teacher: a ``supervised`` model of the student's architecture trained on the
labelled items alone, for as many steps as one generation takes, which is the first teacher), then ``gen1/`` ...
``gen<N>/``, each a full run directory with its report and ``pseudo_labels.safetensors`` (the targets it trained
on), and ``result.json`` above them listing every generation. Generation 1's teacher is the configured teacher if
there is one. The paper's data filtering and class balancing of pseudo-labels are not done here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mentor import losses
from mentor.method import Method, Term
from mentor.teachers import PseudoLabels

__all__ = ["noisy_student", "pseudo_label_teacher", "AUGMENTS"]

AUGMENTS = ("weak", "strong", "none")
"""The student's input noise presets: :func:`mentor.views.strong` / :func:`mentor.views.weak` of a 1-D signal, or
none (dropout alone)."""


def noisy_student(
    generations: int = 3,
    hard: bool = False,
    temperature: float = 1.0,
    augment: str = "weak",
    magnitude: float = 0.5,
    ops: int = 2,
) -> Method:
    """Self-training over ``generations`` generations (``mentor train`` builds the teachers, see the module).

    Args:
        generations: Number of student generations (>= 1).
        hard: Hard (arg-max) pseudo-labels instead of soft ones.
        temperature: Temperature of the soft pseudo-labels (> 0); the student's KL runs at temperature 1.
        augment: The student's input noise: ``"weak"`` (the default), ``"strong"`` (the paper's RandAugment) or
            ``"none"``. On MNIST-1D (``bench/online.py``, 400 labels) the strong signal view (RandAugment plus
            cutout of a quarter of a 40-step signal) makes generations 2 and 3 worse than generation 1, while the
            weak view (shift and scaling) improves every generation.
        magnitude: Magnitude of the strong augmentation's RandAugment ops, in ``[0, 1]``.
        ops: RandAugment ops per item of the strong augmentation (>= 1).
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
    if ops < 1:
        raise ValueError(f"ops must be >= 1, got {ops}")
    return Method(
        name="noisy_student",
        terms=(Term("pseudo", losses.kl_div, target="teacher.logits"),),
        generations=generations,
        description="self-training: teacher pseudo-labels clean inputs, a noised student becomes the next teacher "
                    "(Xie et al. 2020)",
    )


def student_noise(augment: str = "weak", magnitude: float = 0.5, ops: int = 2,
                  kind: str = "signal") -> Callable[[Tensor, Tensor], Tensor] | None:
    """The student's input augmentation of a preset (``None`` for ``"none"``)."""
    from mentor import views

    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "none":
        return None
    if augment == "weak":
        return views.weak(kind)  # type: ignore[arg-type]
    return views.strong(kind, n=ops, magnitude=magnitude)  # type: ignore[arg-type]


def pseudo_label_teacher(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    hard: bool = False,
    temperature: float = 1.0,
    augment: str = "weak",
    magnitude: float = 0.5,
    ops: int = 2,
    seed: int = 0,
    kind: str = "signal",
) -> PseudoLabels:
    """One generation's teacher: ``model``'s pseudo-labels of the clean ``inputs`` ``[N, ...]`` (labelled items
    keep ``labels``), with the student's noise preset; the arguments are those of :func:`noisy_student`."""
    return PseudoLabels.from_model(model, inputs, labels, hard=hard, temperature=temperature,
                                   augment=student_noise(augment, magnitude, ops, kind), seed=seed)
