"""A :class:`Method` is data: which teacher it needs, which terms it sums, with which weights.

A :class:`Term` names the student output it trains (``student``, a key of the student's output dict, usually
``"logits"``), the target it compares against (``target``: ``"teacher.<key>"`` for a teacher output or ``"label"``
for the dataset label), an optional target transform (see :mod:`mentor.targets`), the loss function from
:mod:`mentor.losses` with its keyword arguments, which items it counts (``"all"``, or ``"labelled"`` for a term that
needs labels) and its weight schedule. The step's loss is ``sum_i w_i(step) * term_i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from mentor.data import UNLABELLED
from mentor.schedules import Product, Schedule, as_schedule

__all__ = ["Feature", "Term", "Method", "compute_terms"]

Items = Literal["all", "labelled"]
Reduction = Literal["items", "batch"]


@dataclass(frozen=True)
class Term:
    """One weighted loss term.

    Attributes:
        name: Name in metrics and reports (``"ce"``, ``"kd"``).
        loss: A function from :mod:`mentor.losses`, called as ``loss(student, target, mask=..., num_items=...,
            **kwargs)``.
        student: Key of the student's output dict.
        target: ``"teacher.<key>"`` or ``"label"``.
        transform: Optional target transform applied to the target first.
        kwargs: Keyword arguments of the loss (temperature, ...).
        items: ``"all"`` or ``"labelled"``: which items of a batch the term covers; it is normalised by the number of
            such items in the whole (accumulated, all-process) batch. A ``"labelled"`` term with ``target="label"``
            relies on its loss dropping negative labels (as ``losses.cross_entropy`` does).
        weight: Weight schedule (a number is a constant).
        extra: More keyword arguments of the loss taken from the outputs: ``{argument: source}`` with source
            ``"label"``, ``"teacher.<key>"`` or a student output key (``dkd`` takes ``{"target": "label"}``).
        reduction: ``"items"`` (the default): the loss takes ``mask`` and ``num_items`` and is normalised over the
            whole accumulated batch. ``"batch"``: a loss over a batch as a whole (relational losses, DIST, DKD) that
            takes neither; it is computed on each micro-batch (on the covered items only) and weighted by the
            micro-batch's share of the covered items, so the accumulated value is the item-weighted mean over
            micro-batches. For relational losses this is not the value on one large batch: relations between
            items of different micro-batches (or processes) are not seen.
    """

    name: str
    loss: Callable[..., Tensor]
    student: str = "logits"
    target: str = "teacher.logits"
    transform: Callable[[Tensor], Tensor] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    items: Items = "all"
    weight: Schedule | float = 1.0
    extra: Mapping[str, str] = field(default_factory=dict)
    reduction: Reduction = "items"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", as_schedule(self.weight))
        if self.items not in ("all", "labelled"):
            raise ValueError(f"term {self.name!r}: items must be 'all' or 'labelled', got {self.items!r}")
        if self.reduction not in ("items", "batch"):
            raise ValueError(f"term {self.name!r}: reduction must be 'items' or 'batch', got {self.reduction!r}")
        if any(not source for source in self.extra.values()):
            raise ValueError(f"term {self.name!r}: extra maps an argument to an empty output key: {dict(self.extra)}")
        if self.target != "label" and not self.target.startswith("teacher."):
            raise ValueError(f"term {self.name!r}: target must be 'label' or 'teacher.<key>', got {self.target!r}")

    def weight_at(self, step: int) -> float:
        """The term's weight at ``step``."""
        weight = self.weight
        return float(weight(step)) if callable(weight) else float(weight)

    @property
    def uses_teacher(self) -> bool:
        return any(s.startswith("teacher.") for s in (self.target, *self.extra.values()))

    @property
    def uses_labels(self) -> bool:
        return self.items == "labelled" or "label" in (self.target, *self.extra.values())


@dataclass(frozen=True)
class Feature:
    """An intermediate feature that terms compare: tapped from a student module and a teacher module.

    The loop captures both with :class:`mentor.taps.Taps` and adds them to the outputs as ``"feat.<name>"`` (student)
    and ``"teacher.feat.<name>"`` (teacher), so a term compares them with ``student="feat.<name>"``,
    ``target="teacher.feat.<name>"``. With a ``projector`` (``"linear"``, ``"conv1x1"``, ``"mlp"``) the student
    feature is first mapped to the teacher's shape by a projector that trains with the student and is left out of
    the exported student.

    Attributes:
        name: Name of the feature pair.
        student: Module path in the student (as in ``named_modules()``), e.g. ``"features.2"``.
        teacher: Module path in the teacher, e.g. ``"conv3"``.
        projector: Projector kind, or ``None`` to compare the raw student feature.
        inputs: Capture the modules' inputs instead of their outputs.
    """

    name: str
    student: str
    teacher: str
    projector: str | None = None
    inputs: bool = False


@dataclass(frozen=True)
class Method:
    """A teacher-student method.

    Attributes:
        name: The recipe name.
        terms: The loss terms.
        generations: Born-again style training: with ``n > 1`` the student of generation ``k`` is the teacher of
            generation ``k + 1`` (generation 1 learns from the given teacher, or from labels alone if there is none).
        description: One line for ``mentor recipes``.
        features: Intermediate features the terms use (see :class:`Feature`).
    """

    name: str
    terms: tuple[Term, ...]
    generations: int = 1
    description: str = ""
    features: tuple[Feature, ...] = ()

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError(f"method {self.name!r} has no loss terms")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r} has duplicate term names {names}")
        if self.generations < 1:
            raise ValueError(f"method {self.name!r}: generations must be >= 1, got {self.generations}")
        feature_names = [f.name for f in self.features]
        if len(set(feature_names)) != len(feature_names):
            raise ValueError(f"method {self.name!r} has duplicate feature names {feature_names}")

    @property
    def needs_teacher(self) -> bool:
        return any(t.uses_teacher for t in self.terms) or bool(self.features)

    @property
    def needs_labels(self) -> bool:
        return any(t.uses_labels for t in self.terms)

    def plus(self, other: Method, weight: Schedule | float = 1.0) -> Method:
        """This method with ``other``'s terms added (``"dkd + fitnet"``), each weighted by ``weight`` on top of its
        own weight; ``other``'s terms whose names this method already has (its own ``"ce"``, say) are left out, and
        its features join this method's (a feature name used by both must name the same taps)."""
        scale = as_schedule(weight)
        have = {t.name for t in self.terms}
        added = tuple(dataclasses.replace(t, weight=Product(t.weight, scale))  # type: ignore[arg-type]
                      for t in other.terms if t.name not in have)
        features = {f.name: f for f in self.features}
        for f in other.features:
            if f.name in features and features[f.name] != f:
                raise ValueError(f"methods {self.name!r} and {other.name!r} both define feature {f.name!r} "
                                 f"differently: {features[f.name]} vs {f}")
            features.setdefault(f.name, f)
        return Method(f"{self.name}+{other.name}", self.terms + added, self.generations, self.description,
                      tuple(features.values()))

    def with_terms(self, *extra: Term) -> Method:
        """A copy with more terms."""
        return Method(self.name, self.terms + extra, self.generations, self.description, self.features)


def term_mask(term: Term, labels: Tensor) -> Tensor | None:
    """The items a term covers in a batch with ``labels`` (``None``: all).

    A term whose target is the label itself gets no mask: the unlabelled marker is in the target, and a loss
    against labels drops negative labels by contract (see :func:`mentor.losses.cross_entropy`).
    """
    if term.items != "labelled" or term.target == "label":
        return None
    return labels != UNLABELLED


def _source(
    term: Term, source: str, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor] | None, labels: Tensor
) -> Tensor:
    """The tensor a term's target or extra argument names: the labels, a teacher output or a student output."""
    if source == "label":
        return labels
    if source.startswith("teacher."):
        if teacher is None:
            raise ValueError(f"term {term.name!r} needs a teacher, but none was given")
        key = source.split(".", 1)[1]
        if key not in teacher:
            raise KeyError(f"term {term.name!r} needs teacher output {key!r}; have {sorted(teacher)}")
        return teacher[key]
    if source not in student:
        raise KeyError(f"term {term.name!r} needs student output {source!r}; have {sorted(student)}")
    return student[source]


def compute_terms(
    method: Method,
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor] | None,
    labels: Tensor,
    step: int,
    num_items: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total loss and each term's unweighted value.

    Args:
        method: The method.
        student: Student outputs, e.g. ``{"logits": [B, C]}``.
        teacher: Teacher outputs (``None`` when the method needs no teacher).
        labels: ``[B]`` integer labels, :data:`~mentor.data.UNLABELLED` where missing.
        step: Global optimisation step, for the weight schedules.
        num_items: Per-term normaliser (items the term covers in the whole accumulated batch); by default each
            term is a mean over this batch.

    Returns:
        ``(total, {term name: value})``.
    """
    total: Tensor | None = None
    values: dict[str, Tensor] = {}
    labelled: Tensor | None = None
    for term in method.terms:
        if term.student not in student:
            raise KeyError(f"term {term.name!r} needs student output {term.student!r}; have {sorted(student)}")
        target = _source(term, term.target, student, teacher, labels)
        if term.transform is not None:
            target = term.transform(target)
        extra = {arg: _source(term, src, student, teacher, labels) for arg, src in term.extra.items()}
        n = None if num_items is None else num_items[term.name]
        if term.reduction == "items":
            value = term.loss(student[term.student], target, mask=term_mask(term, labels), num_items=n,
                              **extra, **term.kwargs)
        else:
            inputs = {"_s": student[term.student], "_t": target, **extra}
            covered = labels.shape[0]
            if term.items == "labelled":
                labelled = labels != UNLABELLED if labelled is None else labelled
                covered = int(labelled.sum())
                inputs = {k: v[labelled] for k, v in inputs.items()}
            if covered == 0:
                value = student[term.student].sum() * 0.0  # nothing to compare here: no contribution, graph kept
            else:
                value = term.loss(inputs.pop("_s"), inputs.pop("_t"), **inputs, **term.kwargs)
                if n is not None:
                    value = value * (covered / n)
        values[term.name] = value
        weight = term.weight_at(step)
        weighted = value if weight == 1.0 else weight * value
        total = weighted if total is None else total + weighted
    assert total is not None
    return total, values
