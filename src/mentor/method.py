"""A :class:`Method` is data: which teacher it needs, which terms it sums, with which weights.

A :class:`Term` names the student output it trains (``student``, a key of the student's output dict, usually
``"logits"``), the target it compares against (``target``: ``"teacher.<key>"`` for a teacher output, ``"label"``
for the dataset label, or ``"detached.<key>"`` for a student output with its gradient stopped), an optional
target transform (see :mod:`mentor.targets`), the loss function from
:mod:`mentor.losses` with its keyword arguments, which items it counts (``"all"``, or ``"labelled"`` for a term that
needs labels) and its weight schedule. The step's loss is ``sum_i w_i(step) * term_i``.

**Semi-supervised parts.** A :class:`Method` can also say how its teacher is built from the student
(``teacher``: an EMA of it, or the student itself), which views the teacher and the student see of each batch
(``views``, see :mod:`mentor.views`), and a term can weigh its items by the teacher's confidence
(:class:`Weigh`, with a weighting object of :mod:`mentor.targets`). A term with ``items="unlabelled"`` covers the
unlabelled items only (FixMatch's unsupervised loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mentor.schedules import Product, Schedule, as_schedule

__all__ = ["BatchContext", "Feature", "Term", "Method", "Weigh", "compute_terms"]

Items = Literal["all", "labelled", "unlabelled"]
ITEMS = ("all", "labelled", "unlabelled")


@dataclass(frozen=True)
class Weigh:
    """Per-item weights of a term from the teacher's confidence (FixMatch and its successors).

    For each micro-batch the loop takes ``probs = softmax(source)`` (float32, ``[B, C]``) of the items the term
    covers; once per optimiser step, before any weight of that step is computed (as the papers do), it calls
    ``weighting.update(probs, index)`` with the probabilities of every micro-batch and process of the step
    (gathered in global-batch order) and ``index`` the items' positions among the covered items of the training
    data (``0..N-1``; for ``items="unlabelled"`` in a semi-supervised run, the position in the unlabelled pool).
    The term's ``mask`` is then ``weighting(probs)``: float weights, 0 on the items it does not cover. The
    weighting's state is checkpointed (``weighting.safetensors``) so a resumed run continues it exactly.

    Attributes:
        make: ``make(num_classes, num_items) -> weighting``, a fresh object of :mod:`mentor.targets`
            (:class:`~mentor.targets.FixedThreshold`, :class:`~mentor.targets.FlexMatch`, ...) for each run, so
            that a method reused for several runs shares no state between them.
        source: The teacher output the probabilities come from.
        align: Optional ``align(num_classes) -> transform`` with ``update`` (:class:`~mentor.targets.
            UniformAlignment`): the probabilities are updated into and mapped through it before the weighting,
            and the term's target, where it is ``source``, becomes the aligned distribution (as log-probabilities,
            so :class:`~mentor.targets.HardLabel` gives the aligned arg-max), as SoftMatch does.
    """

    make: Callable[[int, int], Any]
    source: str = "teacher.logits"
    align: Callable[[int], Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.make):
            raise TypeError(f"Weigh.make must be a function (num_classes, num_items) -> weighting, got {self.make!r}")
        if not self.source.startswith("teacher.") or self.source == "teacher.":
            raise ValueError(f"Weigh.source must be 'teacher.<key>', got {self.source!r}")
Reduction = Literal["items", "batch"]


@dataclass(frozen=True)
class Term:
    """One weighted loss term.

    Attributes:
        name: Name in metrics and reports (``"ce"``, ``"kd"``).
        loss: A function from :mod:`mentor.losses`, called as ``loss(student, target, mask=..., num_items=...,
            **kwargs)``.
        student: Key of the student's output dict.
        target: ``"teacher.<key>"``, ``"label"``, or ``"detached.<key>"``: a student output of the same forward
            with its gradient stopped (online distillation: Deep Mutual Learning's peers learn from each other's
            detached predictions without a second forward, see :mod:`mentor.recipes.dml`).
        transform: Optional target transform applied to the target first.
        kwargs: Keyword arguments of the loss (temperature, ...).
        items: ``"all"``, ``"labelled"`` or ``"unlabelled"``: which items of a batch the term covers; it is
            normalised by the number of such items in the whole (accumulated, all-process) batch. A ``"labelled"``
            term with ``target="label"`` relies on its loss dropping negative labels (as ``losses.cross_entropy``
            does).
        weight: Weight schedule (a number is a constant).
        extra: More keyword arguments of the loss taken from the outputs: ``{argument: source}`` with source
            ``"label"``, ``"teacher.<key>"``, ``"detached.<key>"`` or a student output key (``dkd`` takes
            ``{"target": "label"}``), or ``"weighting.<key>"``: the term's weighting's per-item ``weights`` or
            ``mask`` (weight > 0) of the micro-batch, or a tensor of its ``state_dict()`` (FreeMatch's fairness term
            reads ``"weighting.class_probs"``); the target may name such a source too.
        reduction: ``"items"`` (the default): the loss takes ``mask`` and ``num_items`` and is normalised over the
            whole accumulated batch. ``"batch"``: a loss over a batch as a whole (relational losses, DIST, DKD) that
            takes neither; it is computed on each micro-batch (on the covered items only) and weighted by the
            micro-batch's share of the covered items, so the accumulated value is the item-weighted mean over
            micro-batches. For relational losses this is not the value on one large batch: relations between
            items of different micro-batches (or processes) are not seen.
        weighting: Per-item weights from the teacher's confidence (:class:`Weigh`), or the name of another term
            whose weighting (the same object, updated once per step) this term reads: its ``mask`` is the weights
            (``"items"`` reduction) and its ``"weighting.<key>"`` sources come from it.
        shared: Keyword arguments of the loss taken from the outputs **as they are**: ``{argument: source}`` with
            the sources of ``extra`` but ``"weighting."``. Unlike the student output, the target and ``extra``,
            they are never selected per item or position: what a loss needs whole, such as a language model's
            output layer (the chunked LM terms take ``{"student_head": "head", "teacher_head": "teacher.head"}``,
            see :func:`mentor.lm.losses.chunked_loss`).
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
    weighting: Weigh | str | None = None
    shared: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", as_schedule(self.weight))
        if self.items not in ITEMS:
            raise ValueError(f"term {self.name!r}: items must be 'all', 'labelled' or 'unlabelled', got {self.items!r}")
        if self.weighting is not None and not isinstance(self.weighting, (Weigh, str)):
            raise TypeError(f"term {self.name!r}: weighting must be a Weigh or the name of another term with one, "
                            f"got {self.weighting!r}")
        if self.reduction not in ("items", "batch"):
            raise ValueError(f"term {self.name!r}: reduction must be 'items' or 'batch', got {self.reduction!r}")
        if any(not source for source in self.extra.values()):
            raise ValueError(f"term {self.name!r}: extra maps an argument to an empty output key: {dict(self.extra)}")
        if any(not isinstance(source, str) or not source or source.startswith("weighting.")
               or source in ("teacher.", "detached.") for source in self.shared.values()):
            raise ValueError(f"term {self.name!r}: shared maps arguments to 'label', 'teacher.<key>', "
                             f"'detached.<key>' or a student output key, got {dict(self.shared)}")
        if set(self.shared) & set(self.extra):
            raise ValueError(f"term {self.name!r}: arguments {sorted(set(self.shared) & set(self.extra))} are in "
                             "both extra and shared: expected each in one of them")
        if self.target != "label" and not self.target.startswith(("teacher.", "detached.", "weighting.")):
            raise ValueError(f"term {self.name!r}: target must be 'label', 'teacher.<key>' or 'detached.<key>', "
                             f"got {self.target!r}")
        if any(s.startswith("weighting.") for s in (self.target, *self.extra.values())) and self.weighting is None:
            raise ValueError(f"term {self.name!r} reads a 'weighting.' source but has no weighting")
        if any(s in ("teacher.", "detached.") for s in (self.target, *self.extra.values())):
            raise ValueError(f"term {self.name!r}: a 'teacher.' or 'detached.' source needs an output key after "
                             f"the dot, got target {self.target!r} and extra {dict(self.extra)}")

    def weight_at(self, step: int) -> float:
        """The term's weight at ``step``."""
        weight = self.weight
        return float(weight(step)) if callable(weight) else float(weight)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every output the term reads besides its student output: the target, ``extra`` and ``shared``."""
        return (self.target, *self.extra.values(), *self.shared.values())

    @property
    def uses_teacher(self) -> bool:
        return any(s.startswith("teacher.") for s in self.sources)

    @property
    def uses_labels(self) -> bool:
        return self.items == "labelled" or "label" in self.sources

    @property
    def weigh(self) -> Weigh | None:
        """The term's own :class:`Weigh` (``None`` without one, or when it reads another term's)."""
        return self.weighting if isinstance(self.weighting, Weigh) else None


@dataclass(frozen=True)
class Feature:
    """An intermediate feature that terms compare: tapped from a student module and a teacher module.

    The loop captures both with :class:`mentor.taps.Taps` and adds them to the outputs as ``"feat.<name>"`` (student)
    and ``"teacher.feat.<name>"`` (teacher), so a term compares them with ``student="feat.<name>"``,
    ``target="teacher.feat.<name>"``. With a ``projector`` (``"linear"``, ``"conv1x1"``, ``"mlp"``) the student
    feature is first mapped to the teacher's shape by a projector that trains with the student and is left out of
    the exported student.

    With ``teacher=None`` nothing is tapped in the teacher: the projector maps the student feature into the
    *logit space* (the shape of the student's ``"logits"``), so that a term compares ``"feat.<name>"`` with
    ``"teacher.logits"`` (One-for-All KD's per-stage branches, kind ``"head"``), or to an explicit ``shape``
    (a target that is not a teacher module's output, such as a cached teacher's).

    Attributes:
        name: Name of the feature pair.
        student: Module path in the student (as in ``named_modules()``), e.g. ``"features.2"``.
        teacher: Module path in the teacher, e.g. ``"conv3"``; ``None``: the logit space (needs a projector).
        projector: Projector kind (see :data:`mentor.taps.PROJECTOR_KINDS`), or ``None`` to compare the raw
            student feature.
        inputs: Capture the modules' inputs instead of their outputs.
        hidden: Hidden width of an ``"mlp"`` or ``"head"`` projector (``None``: the projector's default).
        shape: With ``teacher=None``, the projector's output shape without the batch dimension (``None``: the
            shape of the student's logits).
    """

    name: str
    student: str
    teacher: str | None
    projector: str | None = None
    inputs: bool = False
    hidden: int | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.shape is not None and self.teacher is not None:
            raise ValueError(f"feature {self.name!r}: shape={self.shape!r} applies only without a teacher module "
                             f"(the teacher's feature {self.teacher!r} gives the shape)")
        if self.teacher is None and self.projector is None:
            raise ValueError(
                f"feature {self.name!r} has no teacher module, so its projector maps it into the logit space; "
                "expected a projector kind (for example 'head'), got None"
            )
        if self.hidden is not None and self.projector not in ("mlp", "head"):
            raise ValueError(f"feature {self.name!r}: hidden={self.hidden!r} applies to projector 'mlp' or 'head', "
                             f"not {self.projector!r}")


@dataclass(frozen=True)
class BatchContext:
    """What a :attr:`Method.batch_hook` gets besides the micro-batch.

    Attributes:
        student: The student (unwrapped, not the data-parallel wrapper), in training mode; a hook that runs it
            puts it in eval mode for the time it needs (as :func:`mentor.lm.generate.sample` does).
        teacher: The run's teacher (``None`` without one).
        step: The optimiser step (counting from 0).
        micro: The micro-batch's number within the step on this process (``0 .. grad_accum - 1``).
        rank: The process's rank.
        seed: The run seed.
        world: The number of processes. ``micro * world + rank`` numbers the step's micro-batches globally, in
            the loop's order: the same chunk of the global batch has the same number whether ``grad_accum * world``
            micro-batches run in one process or are spread over several.
    """

    student: Any
    teacher: Any
    step: int
    micro: int
    rank: int
    seed: int
    world: int = 1

    @property
    def chunk(self) -> int:
        """The micro-batch's number among all micro-batches of the step, over all processes."""
        return self.micro * self.world + self.rank


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
        teacher: How to build the teacher from the student when ``fit`` is given none: ``teacher(student) ->
            teacher`` (``teachers.EMA`` for Mean Teacher, ``teachers.Self`` for FixMatch).
        views: The teacher's and the student's augmentation of each batch (:class:`mentor.views.Views`), seeded per
            item by ``(run seed, epoch, item index, view)``; ``None``: both see the batch as it is.
        supervised_view: What the student sees of *labelled* items: ``"student"`` (its own view, as Mean Teacher)
            or ``"teacher"`` (the teacher's view: FixMatch's weakly augmented labelled batch).
        batch_hook: Replaces a micro-batch before the teacher's and the student's forwards:
            ``batch_hook(x, y, context) -> (x, y)`` with a :class:`BatchContext`, called under ``torch.no_grad()``
            for every micro-batch of a step before any forward of that step, so the terms' normalisers count the
            replaced labels (on-policy language-model distillation: the student's own samples, see
            :class:`mentor.lm.loop.OnPolicy`). It must depend only on its arguments (seeded by step, micro-batch
            and rank), so a resumed run replaces the same batches.
    """

    name: str
    terms: tuple[Term, ...]
    generations: int = 1
    description: str = ""
    features: tuple[Feature, ...] = ()
    teacher: Callable[[Any], Any] | None = None
    views: Any = None
    supervised_view: Literal["student", "teacher"] = "student"
    batch_hook: Callable[[Tensor, Tensor, BatchContext], tuple[Tensor, Tensor]] | None = None

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
        if self.supervised_view not in ("student", "teacher"):
            raise ValueError(f"method {self.name!r}: supervised_view must be 'student' or 'teacher', "
                             f"got {self.supervised_view!r}")
        for t in self.terms:
            if isinstance(t.weighting, str):
                owner = next((o for o in self.terms if o.name == t.weighting), None)
                if owner is None or owner.weigh is None:
                    raise ValueError(f"method {self.name!r}: term {t.name!r} reads the weighting of term "
                                     f"{t.weighting!r}, which {'has none' if owner else 'does not exist'}")

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
        if other.batch_hook is not None and other.batch_hook != self.batch_hook:
            raise ValueError(f"method {other.name!r} replaces its batches (batch_hook, on-policy samples), so it can "
                             f"only be the main method, not added to {self.name!r}")
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
        return dataclasses.replace(self, name=f"{self.name}+{other.name}", terms=self.terms + added,
                                   features=tuple(features.values()))

    def with_terms(self, *extra: Term) -> Method:
        """A copy with more terms."""
        return dataclasses.replace(self, terms=self.terms + extra)


def term_mask(term: Term, labels: Tensor) -> Tensor | None:
    """The items a term covers in a batch with ``labels`` (``None``: all).

    A term whose target is the label itself gets no mask: the unlabelled marker is in the target, and a loss
    against labels drops negative labels by contract (see :func:`mentor.losses.cross_entropy`). Any negative label
    means "no target" (:data:`~mentor.data.UNLABELLED` for items, ``-100`` for the positions of sequence labels
    ``[B, T]``, whose mask is then per position).
    """
    if term.items == "unlabelled":
        return labels < 0
    if term.items != "labelled" or term.target == "label":
        return None
    return labels >= 0


def _weighting_owner(method: Method, term: Term) -> Term | None:
    """The term whose :class:`Weigh` ``term`` uses (itself, another term named by it, or ``None``)."""
    if isinstance(term.weighting, str):
        return next(t for t in method.terms if t.name == term.weighting)
    return term if term.weighting is not None else None


def _source(
    term: Term, source: str, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor] | None, labels: Tensor,
    weighting: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The tensor a term's target or extra argument names: the labels, a teacher output, a student output, or a
    detached student output (``"detached.<key>"``: the same tensor as the student's ``<key>``, gradient stopped)."""
    if source == "label":
        return labels
    if source.startswith("weighting."):
        key = source.split(".", 1)[1]
        if weighting is None or key not in weighting:
            raise KeyError(f"term {term.name!r} needs {source!r}; its weighting has "
                           f"{sorted(weighting) if weighting is not None else 'nothing (none was computed)'}")
        return weighting[key]
    if source.startswith("detached."):
        key = source.split(".", 1)[1]
        if key not in student:
            raise KeyError(f"term {term.name!r} needs student output {key!r} (for {source!r}); have {sorted(student)}")
        return student[key].detach()
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


def _positions(value: Tensor, keep: Tensor) -> Tensor:
    """``value[keep]`` for a tensor indexed by the positions ``keep`` (``[B, T, ...]``); anything else as it is."""
    if isinstance(value, Tensor) and value.shape[: keep.dim()] == keep.shape:
        return value[keep]
    return value


def compute_terms(
    method: Method,
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor] | None,
    labels: Tensor,
    step: int,
    num_items: Mapping[str, float] | None = None,
    weighting: Mapping[str, Mapping[str, Tensor]] | None = None,
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
        weighting: For each term with its own :class:`Weigh`, by term name: ``"weights"`` ``[B]`` (float, this
            batch's weights), ``"mask"`` ``[B]`` (weights > 0), optionally ``"aligned"`` ``[B, C]`` (the aligned
            log-probabilities) and the weighting's state tensors. Terms with a weighting use ``weights`` (times
            their item mask) as their ``mask``.

    Returns:
        ``(total, {term name: value})``.
    """
    total: Tensor | None = None
    values: dict[str, Tensor] = {}
    labelled: Tensor | None = None
    for term in method.terms:
        if term.student not in student:
            raise KeyError(f"term {term.name!r} needs student output {term.student!r}; have {sorted(student)}")
        owner = _weighting_owner(method, term) if term.weighting is not None else None
        weighed = None
        if owner is not None:
            if weighting is None or owner.name not in weighting:
                raise ValueError(f"term {term.name!r} is weighted by term {owner.name!r}'s weighting, but no "
                                 "weights were computed for it (the training loop computes them)")
            weighed = weighting[owner.name]
        assert owner is None or owner.weigh is not None
        if weighed is not None and "aligned" in weighed and term.target == owner.weigh.source:  # type: ignore[union-attr]
            target = weighed["aligned"]
        else:
            target = _source(term, term.target, student, teacher, labels, weighed)
        if term.transform is not None:
            target = term.transform(target)
        extra = {arg: _source(term, src, student, teacher, labels, weighed) for arg, src in term.extra.items()}
        shared = {arg: _source(term, src, student, teacher, labels) for arg, src in term.shared.items()}
        n = None if num_items is None else num_items[term.name]
        if term.reduction == "items":
            mask = term_mask(term, labels)
            if weighed is not None:
                w = weighed["weights"]
                mask = w if mask is None else torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
            if labels.dim() > 1 and weighed is None and term.items == "labelled":
                # Sequences: the loss over the target positions only. The same sum as with the mask (a boolean
                # mask drops items exactly), without computing it at the positions it would drop.
                keep = labels >= 0
                value = term.loss(*(_positions(v, keep) for v in (student[term.student], target)), num_items=n,
                                  **{k: _positions(v, keep) for k, v in extra.items()}, **shared, **term.kwargs)
            else:
                value = term.loss(student[term.student], target, mask=mask, num_items=n, **extra, **shared,
                                  **term.kwargs)
        else:
            inputs = {"_s": student[term.student], "_t": target, **extra}
            covered = labels.shape[0]
            if term.items != "all":
                labelled = labels >= 0 if labelled is None else labelled
                keep = labelled if term.items == "labelled" else ~labelled
                covered = int(keep.sum())
                per_item = {"_s", *(k for k, src in term.extra.items()
                                    if src not in {f"weighting.{key}" for key in (weighed or {})}
                                    or src in ("weighting.weights", "weighting.mask"))}
                if not term.target.startswith("weighting.") or term.target in ("weighting.weights", "weighting.mask"):
                    per_item.add("_t")
                inputs = {k: v[keep] if k in per_item else v for k, v in inputs.items()}
            if covered == 0:
                value = student[term.student].sum() * 0.0  # nothing to compare here: no contribution, graph kept
            else:
                value = term.loss(inputs.pop("_s"), inputs.pop("_t"), **inputs, **shared, **term.kwargs)
                if n is not None and covered != n:  # a share of 1 is the common case: no extra autograd node
                    value = value * (covered / n)
        values[term.name] = value
        weight = term.weight_at(step)
        weighted = value if weight == 1.0 else weight * value
        total = weighted if total is None else total + weighted
    assert total is not None
    return total, values
