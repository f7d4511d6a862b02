"""Teachers: where targets come from.

Every teacher has ``targets(inputs) -> dict[str, Tensor]`` (at least ``"logits"``), computed without gradients.
A teacher with state (:class:`EMA`) has an explicit ``update(student, step)`` that the loop calls after each
optimiser step, and ``state_dict`` / ``load_state_dict`` for checkpoints. A teacher is never put in the optimiser
and never wrapped for data parallelism: the loop hands only the student to Accelerate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable as CallableT
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mentor.schedules import Schedule, as_schedule

__all__ = ["Teacher", "Frozen", "Self", "Ensemble", "Router", "EMA", "Callable", "Cached", "PseudoLabels", "as_outputs",
           "dense_from_topk", "mix", "confidence_weights"]

Outputs = dict[str, Tensor]


def as_outputs(value: Tensor | Mapping[str, Tensor]) -> Outputs:
    """A model's output as a dict: a bare tensor becomes ``{"logits": tensor}``. A mapping must hold ``"logits"``,
    or ``"hidden"`` (a language model's training forward for chunked terms, :class:`mentor.lm.models.HiddenHead`)."""
    if isinstance(value, Tensor):
        return {"logits": value}
    if isinstance(value, Mapping) and ("logits" in value or "hidden" in value):
        return dict(value)
    if hasattr(value, "logits"):  # Hugging Face model outputs
        return {"logits": value.logits}
    raise TypeError(f"expected a tensor or a mapping with 'logits', got {type(value).__name__} (a mapping of a "
                    "language model's training forward may hold 'hidden' instead)")


@runtime_checkable
class Teacher(Protocol):
    """What the loop needs from a teacher."""

    def targets(self, inputs: Tensor) -> Outputs: ...

    def to(self, device: torch.device | str) -> Any: ...


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Frozen:
    """A fixed model in eval mode whose parameters never take gradients.

    Args:
        model: The teacher network.
        input_transform: Optional function applied to the inputs first (for example a re-normalisation when the
            teacher was trained on differently scaled inputs).
        num_classes: Keep only the first ``num_classes`` logits: a language model whose output layer was padded
            with extra rows beyond the shared vocabulary (e.g. 520 rows for 512 tokens) is truncated to the shared
            range. ``None`` keeps every output; a teacher with fewer outputs is an error.
    """

    def __init__(self, model: nn.Module, input_transform: CallableT[[Tensor], Tensor] | None = None,
                 num_classes: int | None = None) -> None:
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"Frozen num_classes must be an integer >= 1 or None, got {num_classes!r}")
        self.model = _freeze(model)
        self.input_transform = input_transform
        self.num_classes = num_classes

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        if self.model.training:  # something called .train() on it: a frozen teacher stays in eval mode
            self.model.eval()
        x = self.input_transform(inputs) if self.input_transform is not None else inputs
        out = as_outputs(self.model(x))
        if self.num_classes is not None:
            logits = out["logits"]
            if logits.shape[-1] < self.num_classes:
                raise ValueError(f"the teacher has {logits.shape[-1]} outputs, fewer than num_classes = "
                                 f"{self.num_classes}: only extra (padded) outputs can be cut off")
            out["logits"] = logits[..., : self.num_classes]
        return out

    def to(self, device: torch.device | str) -> Frozen:
        self.model.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


class Self:
    """The student itself, with gradients stopped: its own (detached) predictions are the targets.

    Args:
        student: The student module (unwrapped).
    """

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        return {k: v.detach() for k, v in as_outputs(self.student(inputs)).items()}

    def to(self, device: torch.device | str) -> Self:
        return self


COMBINE_BY = ("fixed", "max_prob", "entropy", "router")
"""How :class:`Ensemble` weighs its members: fixed weights, per item by confidence, or by a learned router."""


def mix(members: Tensor, weights: Tensor, combine: str = "probs") -> Tensor:
    """The weighted mixture of member logits.

    Args:
        members: ``[B, T, C]`` logits of ``T`` teachers.
        weights: ``[B, T]`` (per item) or ``[T]`` non-negative weights summing to 1 over ``T``.
        combine: ``"probs"``: ``log sum_t w_t softmax(z_t)`` (log-probabilities of the mixture, valid logits);
            ``"logits"``: ``sum_t w_t z_t``.

    Returns:
        ``[B, C]``. Gradients flow into ``weights`` (a router's) and ``members`` alike.
    """
    w = weights if weights.dim() == 2 else weights.unsqueeze(0).expand(members.shape[0], -1)
    if combine == "logits":
        return (w.unsqueeze(-1) * members).sum(dim=1)
    return torch.logsumexp(torch.log_softmax(members, dim=-1) + w.log().unsqueeze(-1), dim=1)


def confidence_weights(members: Tensor, by: str) -> Tensor:
    """Per-item teacher weights from each teacher's confidence in its own prediction.

    ``"max_prob"``: ``w_{i,t} = m_{i,t} / sum_u m_{i,u}`` with ``m_{i,t}`` teacher ``t``'s largest class probability
    on item ``i``. ``"entropy"``: ``w_{i,t} = softmax_t(-H_{i,t})`` with ``H_{i,t}`` the entropy (in nats) of
    teacher ``t``'s prediction on item ``i``: a teacher 1 nat surer than another gets ``e`` times its weight.

    Args:
        members: ``[B, T, C]`` logits of ``T`` teachers.
        by: ``"max_prob"`` or ``"entropy"``.

    Returns:
        ``[B, T]`` weights, non-negative, summing to 1 over ``T`` for every item.
    """
    log_p = torch.log_softmax(members if members.dtype == torch.float64 else members.float(), dim=-1)
    if by == "max_prob":
        top = log_p.max(dim=-1).values.exp()
        return top / top.sum(dim=1, keepdim=True)
    if by == "entropy":
        from mentor.losses import entropy

        return torch.softmax(-entropy(members.to(log_p.dtype)), dim=1)
    raise ValueError(f"confidence weighting must be 'max_prob' or 'entropy', got {by!r}")


class Router(nn.Module):
    """A small learned router: per-item weights over ``T`` teachers from the student's input.

    ``x [B, ...] -> flatten -> Linear(in_features, hidden) -> ReLU -> Linear(hidden, T) -> softmax`` gives
    ``[B, T]`` weights that sum to 1 for every item. The last layer starts at zero, so the router starts as the
    plain average. It is not part of the teacher and not part of the student: the loop puts its parameters in the
    student's optimiser, checkpoints them with the teacher state of the :class:`Ensemble` that holds it, and
    ``mentor train`` saves them as ``router.safetensors`` beside (never inside) the exported student.

    What trains it is the term on ``"route.logits"`` (see :func:`mentor.recipes.multi_teacher.multi_teacher`,
    ``router=True``): the cross-entropy of the routed mixture with the label, so the router learns which teacher
    to trust on which kind of item. The student's distillation target ``"teacher.logits"`` is the same mixture
    without gradient, so distillation never moves the router (which would otherwise learn to pick whichever
    teacher the student already matches).

    Args:
        in_features: Size of one flattened input item.
        num_teachers: ``T`` (>= 2).
        hidden: Hidden width.
        combine: ``"probs"`` or ``"logits"``: what the mixture averages (as :class:`Ensemble`).
    """

    def __init__(self, in_features: int, num_teachers: int, hidden: int = 64, combine: str = "probs") -> None:
        super().__init__()
        if num_teachers < 2:
            raise ValueError(f"a router chooses among at least 2 teachers, got {num_teachers}")
        if combine not in ("probs", "logits"):
            raise ValueError(f"Router combine must be 'probs' or 'logits', got {combine!r}")
        self.num_teachers = num_teachers
        self.combine = combine
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_teachers))
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def weights(self, inputs: Tensor) -> Tensor:
        """``[B, ...] -> [B, T]`` weights (softmax over teachers)."""
        return torch.softmax(self.net(inputs.float()), dim=-1)

    def forward(self, inputs: Tensor, members: Tensor) -> dict[str, Tensor]:
        """The routed mixture with gradients into the router: ``{"route.logits": [B, C], "route.weights": [B, T]}``.

        Args:
            inputs: ``[B, ...]`` the student's input.
            members: ``[B, T, C]`` the teachers' logits (the ensemble's ``"members"`` output; detached here).
        """
        if members.shape[1] != self.num_teachers:
            raise ValueError(f"the router was built for {self.num_teachers} teachers, got {members.shape[1]}")
        w = self.weights(inputs)
        return {"route.logits": mix(members.detach().float(), w, self.combine), "route.weights": w}


class Ensemble:
    """Several teachers combined (multi-teacher distillation).

    The target ``"logits"`` is the weighted mean of the members' probabilities (``combine="probs"``, returned as
    log-probabilities, which are valid logits) or of their logits (``combine="logits"``). The weights are, by
    ``by``:

    * ``"fixed"``: ``weights`` (normalised to sum 1; equal weights by default: the average);
    * ``"max_prob"`` / ``"entropy"``: per item, from each teacher's confidence (see :func:`confidence_weights`);
    * ``"router"``: per item, from a learned :class:`Router` on the input (``router=...``).

    The outputs also hold ``"members"`` (``[B, T, C]`` float32, each teacher's logits) and ``"weights"``
    (``[B, T]``, the weights used). With a router, the loop adds the router's differentiable output to the
    student's outputs (``"route.logits"``, ``"route.weights"``), its parameters join the optimiser, and
    :meth:`state_dict` (the teacher state that checkpoints hold) is the router's.

    Args:
        teachers: The members.
        weights: With ``by="fixed"``: one non-negative weight per member; equal weights by default.
        combine: ``"probs"`` or ``"logits"``.
        by: ``"fixed"``, ``"max_prob"``, ``"entropy"`` or ``"router"``.
        router: The :class:`Router` (``by="router"`` only); its ``combine`` must be this ensemble's.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        weights: Sequence[float] | None = None,
        combine: str = "probs",
        by: str = "fixed",
        router: Router | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("Ensemble needs at least one teacher")
        w = [1.0] * len(teachers) if weights is None else [float(x) for x in weights]
        if len(w) != len(teachers):
            raise ValueError(f"Ensemble got {len(teachers)} teachers but {len(w)} weights")
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"Ensemble weights must be >= 0 with a positive sum, got {w}")
        if combine not in ("probs", "logits"):
            raise ValueError(f"Ensemble combine must be 'probs' or 'logits', got {combine!r}")
        if by not in COMBINE_BY:
            raise ValueError(f"Ensemble by must be one of {', '.join(COMBINE_BY)}, got {by!r}")
        if weights is not None and by != "fixed":
            raise ValueError(f"Ensemble weights apply to by='fixed' only, got by={by!r} with weights {list(weights)}")
        if (router is not None) != (by == "router"):
            raise ValueError("Ensemble by='router' needs router=Router(...), and a router needs by='router'; got "
                             f"by={by!r} and router={type(router).__name__}")
        if router is not None:
            if router.num_teachers != len(teachers):
                raise ValueError(f"the router was built for {router.num_teachers} teachers, the ensemble has "
                                 f"{len(teachers)}")
            if router.combine != combine:
                raise ValueError(f"the router mixes {router.combine!r}, the ensemble {combine!r}: expected the same")
        self.teachers = list(teachers)
        self.weights = [x / sum(w) for x in w]
        self.combine = combine
        self.by = by
        self.router = router

    def member_logits(self, inputs: Tensor) -> Tensor:
        """``[B, T, C]`` float32: every member's logits, without gradients."""
        with torch.no_grad():
            return torch.stack([t.targets(inputs)["logits"].float() for t in self.teachers], dim=1)

    @torch.no_grad()
    def item_weights(self, inputs: Tensor, members: Tensor) -> Tensor:
        """``[B, T]`` weights of each member on each item (sum 1 over members)."""
        if self.by == "fixed":
            fixed = torch.tensor(self.weights, dtype=members.dtype, device=members.device)
            return fixed.unsqueeze(0).expand(members.shape[0], -1)
        if self.by == "router":
            assert self.router is not None
            return self.router.weights(inputs)
        return confidence_weights(members, self.by)

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        members = self.member_logits(inputs)
        weights = self.item_weights(inputs, members)
        return {"logits": mix(members, weights, self.combine), "members": members, "weights": weights}

    def parameters(self) -> list[nn.Parameter]:
        """The members' parameters (frozen); a router's are not among them: they train with the student."""
        return [p for t in self.teachers for p in (t.parameters() if hasattr(t, "parameters") else [])]

    def state_dict(self) -> dict[str, Tensor]:
        """The router's state (empty without one): what a checkpoint stores of the ensemble."""
        return dict(self.router.state_dict()) if self.router is not None else {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if self.router is not None:
            self.router.load_state_dict(state)
        elif state:
            raise ValueError(f"this ensemble has no router, but the state holds {sorted(state)[:5]}")

    def to(self, device: torch.device | str) -> Ensemble:
        for t in self.teachers:
            t.to(device)
        if self.router is not None:
            self.router.to(device)
        return self


class EMA:
    """An exponential moving average of the student (mean teacher, Tarvainen & Valpola 2017,
    https://arxiv.org/abs/1703.01780).

    ``update(student, step)`` sets ``ema = d * ema + (1 - d) * student`` with ``d = decay(step)``. Floating-point
    buffers are averaged the same way when ``buffers=True`` and copied otherwise; integer buffers are always copied.

    Args:
        student: The student to copy and follow.
        decay: A number or a schedule of the decay.
    """

    def __init__(self, student: nn.Module, decay: float | Schedule = 0.999, buffers: bool = True) -> None:
        self.model = _freeze(copy.deepcopy(student))
        self.decay = as_schedule(decay)
        self.buffers = buffers

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        return as_outputs(self.model(inputs))

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        d = float(self.decay(step))
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"EMA decay at step {step} is {d}, expected a value in [0, 1]")
        for ema_p, p in zip(self.model.parameters(), student.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), student.buffers(), strict=True):
            if self.buffers and ema_b.is_floating_point():
                ema_b.lerp_(b.detach().to(ema_b.dtype), 1.0 - d)
            else:
                ema_b.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    def to(self, device: torch.device | str) -> EMA:
        self.model.to(device)
        return self


class Callable:
    """Any function of the inputs: ``fn(inputs) -> logits`` or a dict with ``"logits"`` (an LLM annotator, a
    rule, a model behind an API). Its result is detached.

    Args:
        fn: The function.
    """

    def __init__(self, fn: CallableT[[Tensor], Tensor | Mapping[str, Tensor]]) -> None:
        self.fn = fn

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        return {k: v.detach() for k, v in as_outputs(self.fn(inputs)).items()}

    def to(self, device: torch.device | str) -> Callable:
        return self


def dense_from_topk(values: Tensor, indices: Tensor, num_classes: int, tail: str = "rest") -> Tensor:
    """Full-width log-probabilities ``[..., C]`` from a top-k teacher (``values``/``indices`` ``[..., k]``).

    ``tail="renormalize"`` leaves the dropped classes at ``-inf`` (a valid logit: probability 0, the kept ones
    renormalised); ``tail="rest"`` spreads the dropped mass ``1 - sum(exp(values))`` evenly over the dropped
    classes. This dense form serves losses that need a full distribution; :func:`mentor.losses.sparse_kl_div`
    treats the tail as one bucket instead (see :func:`mentor.cache.use_sparse_targets`).
    """
    if tail not in ("rest", "renormalize"):
        raise ValueError(f"tail must be 'rest' or 'renormalize', got {tail!r}")
    k = values.shape[-1]
    values = values.float()
    if tail == "rest" and k < num_classes:
        rest = (1.0 - values.exp().sum(dim=-1, keepdim=True)).clamp(min=0.0)
        fill = (rest / (num_classes - k)).log()
        dense = fill.expand(*values.shape[:-1], num_classes).clone()
    else:
        dense = values.new_full((*values.shape[:-1], num_classes), float("-inf"))
    return dense.scatter(-1, indices.long(), values)


class Cached:
    """Teacher outputs read from a :mod:`mentor.cache` instead of computed: a drop-in teacher for any recipe.

    The loop passes each micro-batch's item indices (``needs_index``). Outputs: ``"logits"`` (full-width
    log-probabilities rebuilt by :func:`dense_from_topk` with ``tail``), ``"topk_values"`` / ``"topk_indices"`` (for
    the sparse losses) and ``"feat.<module>"`` for stored features. With several stored views, each item's view in
    an epoch is a hash of ``(epoch, item)``, and :meth:`student_inputs` applies that view's stored augmentation
    seed, so the student sees exactly the input the teacher saw (CED).

    Args:
        cache: A :class:`mentor.cache.TeacherCache` or its directory (opened with checksum verification).
        tail: ``"rest"`` or ``"renormalize"``: how the dense ``"logits"`` treat the classes outside the top-k.
        augment: The augmentation the views were built with (``augment(x, seeds)``); needed for several views.
        dense: Also return the dense ``"logits"`` (``False`` saves their construction when every term reads the
            top-k directly, as after :func:`mentor.cache.use_sparse_targets` with plain KD recipes).
    """

    needs_index = True

    def __init__(self, cache: Any, *, tail: str = "rest",
                 augment: CallableT[[Tensor, Tensor], Tensor] | None = None, dense: bool = True) -> None:
        from mentor.cache import TeacherCache

        if tail not in ("rest", "renormalize"):
            raise ValueError(f"Cached tail must be 'rest' or 'renormalize', got {tail!r}")
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.tail = tail
        if self.cache.num_views > 1 and augment is None:
            raise ValueError(f"the cache at {str(self.cache.path)!r} holds {self.cache.num_views} augmented views; "
                             "Cached needs the augmentation they were built with (augment=...)")
        self.augment = augment
        self.dense = dense
        self._checked: tuple[Tensor, int] | None = None
        self.device = torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return self.cache.num_classes

    def feature_shapes(self) -> dict[tuple[str, bool], torch.Size]:
        """The stored features: ``{(module, inputs): shape without the batch dimension}``."""
        return {(name, bool(f["inputs"])): torch.Size(f["shape"])
                for name, f in self.cache.manifest["stored"]["features"].items()}

    def check_data(self, inputs: Tensor) -> None:
        """Refuse a dataset other than the one the cache was built on (both fingerprints in the message)."""
        from mentor.cache import fingerprint_data

        if inputs.shape[0] != len(self.cache):
            raise ValueError(f"the teacher cache at {str(self.cache.path)!r} holds {len(self.cache)} items but the "
                             f"training data has {inputs.shape[0]}: it was built for another dataset")
        # run() and fit() both check the same tensor before training: hash it once. The tensor itself is kept, so
        # an equal identity cannot be a new tensor at a reused address; the version counter catches in-place edits.
        if self._checked is None or self._checked[0] is not inputs or self._checked[1] != inputs._version:
            self.cache.check_matches(dataset=fingerprint_data(inputs))
            self._checked = (inputs, inputs._version)

    def views(self, index: Tensor, epoch: int) -> Tensor:
        """The view of each item in ``epoch``: ``[B]`` int64 (all 0 with one view)."""
        v = self.cache.num_views
        if v == 1:
            return torch.zeros(index.shape[0], dtype=torch.long)
        from mentor.cache import item_seeds

        return torch.from_numpy(item_seeds(index.cpu().numpy(), 1, 0x5EED + int(epoch))[:, 0] % v)

    def student_inputs(self, inputs: Tensor, index: Tensor, epoch: int = 0) -> Tensor:
        """``inputs`` as the teacher saw them in this epoch's view (unchanged without stored views)."""
        if self.augment is None or "seeds" not in self.cache.manifest["arrays"]:
            return inputs
        seeds = self.cache.get(index, self.views(index, epoch), names=["seeds"])["seeds"]
        return self.augment(inputs, seeds.to(inputs.device))

    @torch.no_grad()
    def targets(self, inputs: Tensor, index: Tensor | None = None, epoch: int = 0) -> Outputs:
        if index is None:
            raise ValueError("a Cached teacher reads by item index: call targets(inputs, index=...)")
        rows = self.cache.get(index, self.views(index, epoch))
        values, indices = rows.pop("values"), rows.pop("indices")
        rows.pop("seeds", None)
        rows = {k.removeprefix("out."): v for k, v in rows.items()}  # stored teacher outputs under their own keys
        out = {"topk_values": values, "topk_indices": indices, **rows}
        if self.dense:
            out["logits"] = dense_from_topk(values, indices, self.cache.num_classes, self.tail)
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()} if self.device.type != "cpu" else out

    def to(self, device: torch.device | str) -> Cached:
        self.device = torch.device(device)
        return self


class PseudoLabels:
    """Targets that a teacher computed once on the clean inputs of a dataset, read by item index (self-training,
    Noisy Student, Xie et al. 2020, https://arxiv.org/abs/1911.04252).

    :meth:`from_model` runs the teacher in eval mode, without gradients and without any augmentation, over every
    item and keeps its log-probabilities at ``temperature`` (soft pseudo-labels) or the log of a one-hot arg-max
    (hard: ``0`` at the class, ``-inf`` elsewhere). Items that carry a label keep it instead (a one-hot), unless
    ``keep_labels=False``: one KL (= cross-entropy) term then trains on labelled and pseudo-labelled items alike.

    The loop reads the targets by item index (``needs_index``), and gives the student the view of
    :meth:`student_inputs`: ``augment(x, seeds)`` with per-item seeds from ``(index, epoch, seed)`` (see
    :mod:`mentor.views`), the noise of Noisy Student applied to the student's input only. Without ``augment`` the
    student sees the clean input.

    Args:
        log_probs: ``[N, C]`` target log-probabilities of every item (``-inf`` allowed).
        augment: The student's input noise (``aug(x [B, ...], seeds [B]) -> [B, ...]``), e.g.
            ``mentor.views.strong("signal")``.
        seed: Seed of the student's views.
    """

    needs_index = True

    def __init__(self, log_probs: Tensor, *, augment: CallableT[[Tensor, Tensor], Tensor] | None = None,
                 seed: int = 0) -> None:
        if log_probs.dim() != 2 or not log_probs.is_floating_point():
            raise ValueError(f"PseudoLabels expects [N, C] float log-probabilities, got shape "
                             f"{tuple(log_probs.shape)} dtype {log_probs.dtype}")
        self.log_probs = log_probs
        self.augment = augment
        self.seed = seed
        self.device = torch.device("cpu")

    @classmethod
    @torch.no_grad()
    def from_model(
        cls,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor | None = None,
        *,
        hard: bool = False,
        temperature: float = 1.0,
        keep_labels: bool = True,
        augment: CallableT[[Tensor, Tensor], Tensor] | None = None,
        seed: int = 0,
        batch_size: int = 1000,
    ) -> PseudoLabels:
        """Label ``inputs`` ``[N, ...]`` with ``model`` on the clean inputs (eval mode; the mode is restored).

        Args:
            model: The teacher.
            inputs: ``[N, ...]`` every training item, clean.
            labels: ``[N]`` labels, ``-1`` where missing (``None``: all missing).
            hard: One-hot arg-max pseudo-labels instead of the teacher's distribution.
            temperature: Softening of the soft pseudo-labels (> 0).
            keep_labels: Labelled items keep their label as a one-hot target.
            augment: See the class.
            seed: See the class.
            batch_size: Items per teacher forward.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            logits = torch.cat([as_outputs(model(inputs[i: i + batch_size].to(device)))["logits"].float().cpu()
                                for i in range(0, inputs.shape[0], batch_size)])
        finally:
            model.train(was_training)
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        if hard:
            log_probs = _log_one_hot(logits.argmax(dim=-1), logits.shape[-1])
        if keep_labels and labels is not None:
            known = labels >= 0
            log_probs[known] = _log_one_hot(labels[known], logits.shape[-1])
        return cls(log_probs, augment=augment, seed=seed)

    def check_data(self, inputs: Tensor) -> None:
        """Refuse a dataset of another size than the one that was labelled."""
        if inputs.shape[0] != self.log_probs.shape[0]:
            raise ValueError(f"the pseudo-labels cover {self.log_probs.shape[0]} items but the training data has "
                             f"{inputs.shape[0]}: they were made for another dataset")

    def student_inputs(self, inputs: Tensor, index: Tensor, epoch: int = 0) -> Tensor:
        """The student's (noised) view of ``inputs`` for items ``index`` in ``epoch``."""
        if self.augment is None:
            return inputs
        from mentor.views import Views, item_seeds

        return self.augment(inputs, item_seeds(index.cpu(), epoch, self.seed, Views.STUDENT).to(inputs.device))

    @torch.no_grad()
    def targets(self, inputs: Tensor, index: Tensor | None = None, epoch: int = 0) -> Outputs:
        if index is None:
            raise ValueError("PseudoLabels reads by item index: call targets(inputs, index=...)")
        return {"logits": self.log_probs[index.cpu()].to(self.device)}

    def to(self, device: torch.device | str) -> PseudoLabels:
        self.device = torch.device(device)
        return self


def _log_one_hot(classes: Tensor, num_classes: int) -> Tensor:
    out = torch.full((classes.shape[0], num_classes), float("-inf"))
    out[torch.arange(classes.shape[0]), classes.long()] = 0.0
    return out
