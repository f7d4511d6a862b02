"""Taps: named intermediate features of a model, captured with forward hooks; projectors to the teacher's width.

A :class:`Taps` reads the output (or the input) of named submodules while the model runs, without changing the
model's code. Names are those of ``dict(model.named_modules())``, for example ``"conv2"`` or ``"features.3"``::

    taps = Taps(student, ["features.1", "features.3"])
    with taps:                       # registers the hooks; leaving the block removes them, also on an exception
        logits = student(x)
        feats = taps.pop()           # {"features.1": [B, 100], "features.3": [B, 100]}, in the order of the names

For long-lived use (the training loop attaches once per fit) call :meth:`Taps.attach` and :meth:`Taps.remove`.

**What is captured.** A module's output; with ``inputs=True`` its first positional tensor argument (its first
tensor keyword argument when it has no positional one), read just before the module runs. Where the output is a
tuple or list (``nn.GRU``, ``nn.MultiheadAttention``), the first tensor in it is taken; where it is a mapping
(Hugging Face model outputs), its first tensor value. Captured tensors are not detached: on the student side they
keep their autograd graph, so a loss on them trains the student. On the teacher side they are captured inside the
teacher's ``torch.no_grad()`` (:class:`mentor.teachers.Frozen` and the others run the teacher without gradients),
so they carry no graph and need no ``detach``.

**When.** :meth:`Taps.pop` returns the features of the model's most recent forward since the last ``pop`` and clears
them. Each forward of the tapped model discards the captures of an earlier forward that were not popped, so a name
that did not run in the latest forward is an error, never a stale tensor from an evaluation pass. A module that runs
more than once in one forward (a shared activation, a weight-tied block) is an error at ``pop``: one name holds one
tensor, so tap a module that runs once. A captured tensor that later operations modify in place (a following
``ReLU(inplace=True)``) is an error at ``pop`` as well; ``clone=True`` copies each capture so that it keeps its
values (at the cost of one more copy of each feature). Calling submodules by hand while the hooks are attached
captures too. Under activation checkpointing the recomputation in ``backward`` fires the hooks again: ``pop``
before ``backward``.

**Wrapped models.** Names are accepted with or without the prefixes that wrappers add: ``"module."``
(``DistributedDataParallel``, Accelerate) and ``"_orig_mod."`` (``torch.compile``), on the wrapper and on the
plain model alike.

**Projectors.** :func:`build_projector` makes a :class:`Projector` that maps a student feature to the teacher's
shape: ``"linear"`` (on the last dimension), ``"conv1x1"`` (channels of ``[C, L]``, ``[C, H, W]`` or
``[C, D, H, W]`` maps; spatial sizes must already agree), ``"mlp"`` (Linear-ReLU-Linear) or ``"head"`` (a small
classifier head into a vector such as the logits: global average pooling of a feature map, between an MLP's two
layers). :class:`Projectors` holds one per tapped name. Projectors are a module of their own, kept outside the
student: the training loop puts their parameters into the optimiser next to the student's (and, under data
parallelism, prepares them with the student so that their gradients are averaged too), saves them in its
checkpoints for an exact resume, and leaves them out of the exported ``student.safetensors``, which therefore loads
into the plain student architecture.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["WRAPPER_PREFIXES", "PROJECTOR_KINDS", "Taps", "feature_shapes", "Projector", "build_projector",
           "Projectors", "FeaturePairs"]

WRAPPER_PREFIXES: tuple[str, ...] = ("module", "_orig_mod")
"""Leading name components that wrappers add (DDP / Accelerate: ``module``; ``torch.compile``: ``_orig_mod``)."""

PROJECTOR_KINDS: tuple[str, ...] = ("linear", "conv1x1", "mlp", "head")
"""Kinds accepted by :func:`build_projector`."""

_LIST_ALL_UP_TO = 20  # an unknown name lists every valid name when the model has at most this many


# ------------------------------------------------------------------------------------------------------ names


def _canonical(name: str) -> str:
    """``name`` without leading wrapper components: ``"module._orig_mod.conv1"`` -> ``"conv1"``."""
    parts = name.split(".") if name else []
    while parts and parts[0] in WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(parts)


def _unknown_name_message(name: str, model: nn.Module, canonical_names: Sequence[str]) -> str:
    valid = [n for n in canonical_names if n]
    head = f"Taps: {type(model).__name__} has no submodule named {name!r}"
    if not valid:
        return f"{head}; it has no submodules at all (tap a model that contains layers)"
    if len(valid) <= _LIST_ALL_UP_TO:
        listing = f"valid names: {', '.join(repr(n) for n in valid)}"
    else:
        close = difflib.get_close_matches(_canonical(name), valid, n=5, cutoff=0.5)
        if close:
            listing = f"closest matches: {', '.join(repr(n) for n in close)}"
        else:
            listing = f"no close match; the first names are {', '.join(repr(n) for n in valid[:8])}"
        listing += f" ({len(valid)} names in all: see dict(model.named_modules()))"
    return f"{head}; {listing}. A leading 'module.' or '_orig_mod.' (DDP / torch.compile wrappers) is optional"


def _resolve_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Map each requested name to the name of a submodule of ``model``, allowing wrapper prefixes either way."""
    modules = dict(model.named_modules())
    by_canonical: dict[str, str] = {}
    for actual in modules:
        by_canonical.setdefault(_canonical(actual), actual)
    resolved: dict[str, str] = {}
    claimed: dict[str, str] = {}  # actual name -> the requested name that resolved to it
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Taps: module names must be strings, got {name!r} ({type(name).__name__})")
        actual = name if name in modules else by_canonical.get(_canonical(name))
        if actual is None:
            raise ValueError(_unknown_name_message(name, model, list(by_canonical)))
        if actual in claimed:
            raise ValueError(
                f"Taps: names {claimed[actual]!r} and {name!r} both name the submodule {actual!r}; "
                "expected each module once"
            )
        claimed[actual] = name
        resolved[name] = actual
    return resolved


# ----------------------------------------------------------------------------------------------------- capture


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None


def _version(tensor: Tensor) -> int:
    """The tensor's in-place version counter (inference tensors have none: -1)."""
    return -1 if tensor.is_inference() else int(tensor._version)


class Taps:
    """Capture the outputs (or inputs) of named submodules of ``model`` during its forward.

    Construction only checks the names; hooks exist while the object is entered as a context manager or between
    :meth:`attach` and :meth:`remove`.

    Args:
        model: The model to read from (a plain module, or one wrapped by DDP / Accelerate / ``torch.compile``).
        names: Submodule names, as in ``dict(model.named_modules())``; a leading ``"module."`` / ``"_orig_mod."``
            may be present or absent. The features come back under these names, in this order.
        inputs: Capture each module's first positional tensor argument (its first tensor keyword argument when it
            has no positional one) instead of its output.
        clone: Store a copy of each capture, so that in-place operations later in the forward cannot change it.

    Raises:
        ValueError: A name is not a submodule of ``model`` (the message lists the valid names, or the closest ones),
            two names denote one module, or ``names`` is empty.
        TypeError: ``names`` is a single string rather than a sequence of strings.

    Attributes:
        names: The requested names, in order.
        resolved: Requested name -> the submodule's name in ``model`` (they differ where a wrapper prefix was
            added or dropped).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, inputs: bool = False, clone: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Taps: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            raise TypeError(f"Taps: names must be a sequence of module names, got the single string {names!r} "
                            f"(write [{names!r}])")
        names = list(names)
        if not names:
            raise ValueError("Taps: names is empty; expected at least one module name")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Taps: names repeat {duplicates}; expected each name once")
        self.model = model
        self.names: tuple[str, ...] = tuple(names)
        self.inputs = bool(inputs)
        self.clone = bool(clone)
        self.resolved: dict[str, str] = _resolve_names(model, names)
        all_modules = dict(model.named_modules())
        self._modules: dict[str, nn.Module] = {n: all_modules[self.resolved[n]] for n in self.names}
        self._handles: list[RemovableHandle] = []
        self._captured: dict[str, tuple[Tensor, int]] = {}
        self._calls: dict[str, int] = {}
        self.paused = False  # hooks registered but capturing nothing (FeaturePairs.hold between steps)

    # -- hooks --------------------------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def _reset(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the root: a new forward of the model drops captures of an earlier one."""
        if not self.paused:
            self.clear()

    def _store(self, name: str, tensor: Tensor) -> None:
        if self.clone:
            tensor = tensor.clone()
        self._captured[name] = (tensor, _version(tensor))
        self._calls[name] = self._calls.get(name, 0) + 1

    def _output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.paused:
                return
            tensor = _first_tensor(output)
            if tensor is None:
                raise TypeError(
                    f"Taps: the output of module {self.resolved[name]!r} is {type(output).__name__}, which holds no "
                    "tensor; expected a tensor, or a tuple / list / mapping that contains one"
                )
            self._store(name, tensor)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.paused:
                return
            tensor = _first_tensor(args)
            if tensor is None:
                tensor = _first_tensor(list(kwargs.values()))
            if tensor is None:
                raise TypeError(
                    f"Taps: module {self.resolved[name]!r} was called without a tensor argument (positional "
                    f"{[type(a).__name__ for a in args]}, keywords {list(kwargs)}); inputs=True needs one"
                )
            self._store(name, tensor)

        return hook

    def attach(self) -> Taps:
        """Register the hooks (one per name, plus one on the model that starts each forward afresh).

        Idempotent: attaching an attached ``Taps`` does nothing. Returns ``self``.
        """
        if self.attached:
            return self
        self.clear()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset, prepend=True))
            for name in self.names:
                module = self._modules[name]
                if self.inputs:
                    handle = module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(self._output_hook(name))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook. Idempotent. Features captured and not yet popped stay available to :meth:`pop`."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> Taps:
        if self.attached:
            raise RuntimeError(
                "Taps: already attached with attach(); use either the context manager or attach()/remove(), "
                "not both (leaving the block would remove the hooks attach() registered)"
            )
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    # -- results ------------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop every capture (and the references to its tensors)."""
        self._captured.clear()
        self._calls.clear()

    def pop(self) -> dict[str, Tensor]:
        """The features of the latest forward since the last ``pop``, in the order of :attr:`names`; then clear.

        Returns:
            Name -> ``[B, ...]`` tensor, exactly as the module produced (or received) it: not detached, not copied
            unless ``clone=True``.

        Raises:
            RuntimeError: A name did not run since the last ``pop`` (the message names it and says whether the
                hooks were attached), ran more than once in the forward, or was modified in place after capture.
        """
        captured, calls = dict(self._captured), dict(self._calls)
        self.clear()
        missing = [n for n in self.names if n not in captured]
        if missing:
            shown = ", ".join(repr(n) if n == self.resolved[n] else f"{n!r} (module {self.resolved[n]!r})"
                              for n in missing)
            if not captured and not self.attached:
                why = "the taps are not attached: run the forward inside `with taps:` or after taps.attach()"
            else:
                why = ("these modules did not run in the latest forward of the model (a branch that was not taken, "
                       "or a module the forward never calls)")
            got = ", ".join(repr(n) for n in captured) or "none"
            raise RuntimeError(f"Taps.pop: no feature captured for {shown} since the last pop (captured: {got}); "
                               f"{why}")
        repeated = {n: c for n, c in calls.items() if c > 1}
        if repeated:
            shown = ", ".join(f"{n!r} ran {c} times" for n, c in repeated.items())
            raise RuntimeError(
                f"Taps.pop: {shown} in one forward; a tap holds one tensor per name, so tap a module that runs "
                "once (for a shared activation, the layer before it or the block around it)"
            )
        changed = [n for n in self.names if captured[n][1] >= 0 and _version(captured[n][0]) != captured[n][1]]
        if changed:
            raise RuntimeError(
                f"Taps.pop: the features of {', '.join(repr(n) for n in changed)} were modified in place after "
                "they were captured (for example by a following ReLU(inplace=True)), so they no longer hold the "
                "module's values; pass clone=True to Taps, or tap another module"
            )
        return {n: captured[n][0] for n in self.names}

    def __repr__(self) -> str:
        what = "inputs" if self.inputs else "outputs"
        state = "attached" if self.attached else "detached"
        return f"Taps({type(self.model).__name__}, {list(self.names)}, {what}, {state})"


def feature_shapes(
    model: nn.Module, names: Sequence[str], example: Tensor, *, inputs: bool = False
) -> dict[str, torch.Size]:
    """Shapes of the tapped features, from one dry forward of ``example``.

    The forward runs under ``torch.no_grad()`` in eval mode; afterwards every submodule's train/eval flag is
    restored to what it was (a mix of both included), and no hook is left behind.

    Args:
        model: The model.
        names: Submodule names, as for :class:`Taps`.
        example: A batch the model accepts, ``[B, ...]`` with ``B >= 1`` (for example ``data.x[:2]``).
        inputs: Shapes of the modules' inputs instead of their outputs.

    Returns:
        Name -> the feature's shape without the batch dimension, in the order of ``names``.

    Raises:
        ValueError: A name is unknown (see :class:`Taps`), the model cannot run on ``example``, or a feature has no
            batch dimension.
    """
    taps = Taps(model, names, inputs=inputs)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with taps, torch.no_grad():
            try:
                model(example)
            except Exception as err:
                raise ValueError(
                    f"feature_shapes: {type(model).__name__} cannot run on an example of shape "
                    f"{tuple(example.shape)}: {err}"
                ) from err
        features = taps.pop()
    finally:
        for module, flag in flags:
            module.training = flag
    scalars = [n for n, t in features.items() if t.dim() == 0]
    if scalars:
        raise ValueError(f"feature_shapes: the features of {scalars} are scalars; expected a batch dimension first")
    return {n: t.shape[1:] for n, t in features.items()}


# -------------------------------------------------------------------------------------------------- projectors


def _as_shape(value: Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise TypeError(f"{what} must be a sequence of sizes like (64,) or (32, 8, 8), got {value!r}")
    shape = tuple(value)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(
            f"{what} must be a non-empty sequence of positive integers (the feature's shape without the batch "
            f"dimension), got {value!r}"
        )
    return shape


_CONVS: dict[int, type[nn.Module]] = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}
_POOLS: dict[int, type[nn.Module]] = {2: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool2d, 4: nn.AdaptiveAvgPool3d}


class Projector(nn.Module):
    """A learnable map from a student feature ``[B, *student_shape]`` to ``[B, *teacher_shape]``.

    Kinds:

    - ``"linear"``: ``nn.Linear`` on the last dimension; every other dimension must agree
      (``[D_s] -> [D_t]``, ``[L, D_s] -> [L, D_t]``).
    - ``"conv1x1"``: a kernel-1 convolution over channels, for ``[C, L]`` (Conv1d), ``[C, H, W]`` (Conv2d) or
      ``[C, D, H, W]`` (Conv3d) maps; the spatial sizes must agree.
    - ``"mlp"``: Linear-ReLU-Linear on the last dimension, ``hidden`` units (default ``max(D_s, D_t)``).
    - ``"head"``: a small classifier head from any feature to a vector ``[K]`` (e.g. logits): for a ``[D]``
      feature Linear-ReLU-Linear; for a ``[C, *spatial]`` map a kernel-1 convolution to ``hidden`` channels,
      ReLU, global average pooling, then Linear to ``K`` (``hidden`` defaults to ``max(C, K)``). The per-stage
      branches of One-for-All KD (Hao et al. 2023, https://arxiv.org/abs/2310.19444) in their simplest form.

    Args:
        kind: One of :data:`PROJECTOR_KINDS`.
        student_shape: The student feature's shape without the batch dimension.
        teacher_shape: The teacher feature's shape without the batch dimension.
        hidden: Hidden width of ``"mlp"`` and ``"head"``; not accepted by the other kinds.

    Raises:
        ValueError: An unknown kind (the message lists the valid ones), or shapes the kind cannot map (naming both).

    Attributes:
        kind, student_shape, teacher_shape: As given (shapes as tuples).
        net: The underlying module.
    """

    def __init__(
        self, kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int], *, hidden: int | None = None
    ) -> None:
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector kind {kind!r} is not one of {', '.join(repr(k) for k in PROJECTOR_KINDS)}")
        s = _as_shape(student_shape, "student_shape")
        t = _as_shape(teacher_shape, "teacher_shape")
        if hidden is not None and kind not in ("mlp", "head"):
            raise ValueError(f"hidden={hidden!r} applies only to projector kind 'mlp' or 'head', not {kind!r}")
        self.kind, self.student_shape, self.teacher_shape = kind, s, t
        self.net: nn.Module
        if kind == "head":
            if len(t) != 1:
                raise ValueError(f"projector 'head' maps a feature to a vector [K] (such as logits), got teacher "
                                 f"shape {t}; use 'linear', 'conv1x1' or 'mlp' for feature maps")
            if len(s) != 1 and len(s) not in _CONVS:
                raise ValueError(f"projector 'head' maps [D], [C, L], [C, H, W] or [C, D, H, W] features, got "
                                 f"student shape {s}")
            width = max(s[0], t[0]) if hidden is None else hidden
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(f"hidden must be a positive integer or None, got {hidden!r}")
            if len(s) == 1:
                self.net = nn.Sequential(nn.Linear(s[0], width), nn.ReLU(), nn.Linear(width, t[0]))
            else:
                self.net = nn.Sequential(_CONVS[len(s)](s[0], width, kernel_size=1), nn.ReLU(), _POOLS[len(s)](1),
                                         nn.Flatten(), nn.Linear(width, t[0]))
            return
        if kind == "conv1x1":
            if len(s) not in _CONVS:
                raise ValueError(
                    f"projector 'conv1x1' maps [C, L], [C, H, W] or [C, D, H, W] features, got student shape {s}; "
                    "use 'linear' or 'mlp' for [D] features"
                )
            if len(t) != len(s) or t[1:] != s[1:]:
                raise ValueError(
                    f"projector 'conv1x1' maps channels only: the spatial sizes must agree, got student shape {s} "
                    f"and teacher shape {t} (expected teacher shape [C_t, {', '.join(map(str, s[1:]))}]); tap "
                    "layers of equal resolution"
                )
            self.net = _CONVS[len(s)](s[0], t[0], kernel_size=1)
            return
        if t[:-1] != s[:-1]:
            raise ValueError(
                f"projector {kind!r} maps the last dimension only: the other dimensions must agree, got student "
                f"shape {s} and teacher shape {t}; flatten the features first or use 'conv1x1' for channel maps"
            )
        if kind == "linear":
            self.net = nn.Linear(s[-1], t[-1])
            return
        width = max(s[-1], t[-1]) if hidden is None else hidden
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"hidden must be a positive integer or None, got {hidden!r}")
        self.net = nn.Sequential(nn.Linear(s[-1], width), nn.ReLU(), nn.Linear(width, t[-1]))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, *student_shape] -> [B, *teacher_shape]``."""
        if tuple(x.shape[1:]) != self.student_shape:
            raise ValueError(
                f"projector {self.kind!r} expects features of shape [B, {', '.join(map(str, self.student_shape))}], "
                f"got {tuple(x.shape)}"
            )
        return self.net(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, student_shape={self.student_shape}, teacher_shape={self.teacher_shape}"


def build_projector(
    kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int], *, hidden: int | None = None
) -> nn.Module:
    """A :class:`Projector` of ``kind`` from ``student_shape`` to ``teacher_shape`` (both without the batch dim).

    Args:
        kind: ``"linear"``, ``"conv1x1"``, ``"mlp"`` or ``"head"`` (see :class:`Projector`).
        student_shape: Student feature shape, e.g. ``(25, 5)``.
        teacher_shape: Teacher feature shape, e.g. ``(64, 5)``.
        hidden: Hidden width for ``"mlp"`` / ``"head"`` (default ``max`` of the two widths).

    Returns:
        The projector, on the CPU in float32, trainable.
    """
    return Projector(kind, student_shape, teacher_shape, hidden=hidden)


def _key(name: str) -> str:
    """A tap name as a submodule key (``nn.Module`` names cannot contain dots)."""
    return name.replace(".", "__")


class Projectors(nn.Module):
    """One projector per tapped student feature, kept outside the student (see the module notes on export).

    Indexed by tap name (dots allowed: ``projectors["features.3"]``); in the state dict the dots of a name become
    ``"__"`` (``maps.features__3.net.weight``).

    Args:
        projectors: Tap name -> projector module.
    """

    def __init__(self, projectors: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.maps = nn.ModuleDict()
        self._names: dict[str, str] = {}  # tap name -> key in self.maps
        for name, module in (projectors or {}).items():
            self.add(name, module)

    @classmethod
    def from_shapes(
        cls, specs: Mapping[str, tuple[str, Sequence[int], Sequence[int]]], *, hidden: int | None = None
    ) -> Projectors:
        """Build projectors from ``{name: (kind, student_shape, teacher_shape)}``.

        Args:
            specs: Per tap name, the kind and the two shapes without the batch dimension (for example from
                :func:`feature_shapes` of the student and of the teacher).
            hidden: Hidden width for the ``"mlp"`` entries (default per entry: ``max`` of the two widths).
        """
        built: dict[str, nn.Module] = {}
        for name, spec in specs.items():
            if not isinstance(spec, (tuple, list)) or len(spec) != 3:
                raise ValueError(f"projector spec for {name!r} must be (kind, student_shape, teacher_shape), "
                                 f"got {spec!r}")
            kind, s, t = spec
            try:
                built[name] = build_projector(kind, s, t, hidden=hidden if kind in ("mlp", "head") else None)
            except (TypeError, ValueError) as err:
                raise type(err)(f"projector for {name!r}: {err}") from err
        return cls(built)

    def add(self, name: str, module: nn.Module) -> None:
        """Add the projector of tap ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a projector needs a non-empty tap name, got {name!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"projector for {name!r} must be a torch.nn.Module, got {type(module).__name__}")
        key = _key(name)
        if name in self._names or key in self.maps:
            raise ValueError(f"a projector for {name!r} (key {key!r}) already exists; expected each name once")
        self.maps[key] = module
        self._names[name] = key

    @property
    def names(self) -> tuple[str, ...]:
        """Tap names, in insertion order."""
        return tuple(self._names)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self._names:
            raise KeyError(f"no projector for {name!r}; projectors exist for {list(self._names)}")
        return self.maps[self._names[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Project the features that have a projector; pass the others through unchanged.

        Args:
            features: Tap name -> ``[B, ...]`` student feature (for example :meth:`Taps.pop`'s result).

        Returns:
            The same names in the same order, projected to the teacher's shape where a projector exists.

        Raises:
            KeyError: A projector's name is missing from ``features``.
        """
        missing = [n for n in self._names if n not in features]
        if missing:
            raise KeyError(f"features lack {missing}, which have projectors; got features {list(features)}")
        return {n: self.maps[self._names[n]](f) if n in self._names else f for n, f in features.items()}


# --------------------------------------------------------------------------------------------- feature pairs


class FeaturePairs:
    """The intermediate features a method compares (its :class:`mentor.method.Feature` list), ready for the loop.

    Holds the student's and the teacher's :class:`Taps` (one per side and per ``inputs`` flag) and builds the
    projectors from the shapes of one dry batch. During a step, :meth:`capture` attaches the hooks around the two
    forwards only (evaluation passes capture nothing), and :meth:`merge` adds ``"feat.<name>"`` to the student's and
    the teacher's output dicts, the student side through its projector where the feature has one. A feature
    without a teacher module (``teacher=None``) is projected into the logit space (the shape of the student's
    ``"logits"`` on ``example``), or to its explicit ``shape``, and adds nothing to the teacher's dict.

    Args:
        features: The method's features.
        student: The plain (unwrapped) student.
        teacher: The teacher network (for example ``Frozen.model``); ``None`` when no feature names a teacher module,
            or when the teacher's features come with its outputs (a teacher cache, see ``teacher_features``).
        example: A batch both accept, ``[B, ...]`` (a couple of training items).
        teacher_features: Shapes (without the batch dimension) of teacher features that arrive in the teacher's
            output dict as ``"feat.<module>"`` instead of being tapped, keyed by ``(module, inputs)``; used for
            the features whose module is listed here when ``teacher`` is ``None``.

    Attributes:
        projectors: One projector per feature that names a kind (possibly empty); a module of its own, to be
            optimised with the student and left out of the exported student.
    """

    def __init__(
        self, features: Sequence[Any], student: nn.Module, teacher: nn.Module | None, example: Tensor,
        teacher_features: Mapping[tuple[str, bool], torch.Size] | None = None,
    ) -> None:
        if not features:
            raise ValueError("FeaturePairs needs at least one feature")
        self.features = tuple(features)
        given = dict(teacher_features or {}) if teacher is None else {}
        missing = [f.teacher for f in self.features if f.teacher is not None and (f.teacher, f.inputs) not in given]
        if teacher is None and missing:
            have = ", ".join(f"{m} ({'inputs' if i else 'outputs'})" for m, i in given) or "none"
            raise ValueError(f"FeaturePairs: features that tap teacher modules {missing} need the teacher network "
                             f"or stored teacher features (stored: {have})")
        self._taps: list[tuple[str, Taps]] = []  # (side, taps)
        shapes: dict[tuple[str, str, bool], torch.Size] = {}
        for side, model in (("student", student), ("teacher", teacher)):
            for flag in (False, True):
                names = list(dict.fromkeys(getattr(f, side) for f in self.features
                                           if f.inputs == flag and getattr(f, side) is not None))
                if not names or model is None:
                    continue
                device = next(iter(model.parameters()), torch.empty(0)).device
                try:
                    self._taps.append((side, Taps(model, names, inputs=flag)))
                    found = feature_shapes(model, names, example.to(device), inputs=flag)
                except ValueError as err:
                    raise ValueError(f"{side} feature: {err}") from None
                shapes.update({(side, n, flag): s for n, s in found.items()})
        shapes.update({("teacher", n, flag): torch.Size(s) for (n, flag), s in given.items()})
        unshaped = [f for f in self.features if f.teacher is None and getattr(f, "shape", None) is None]
        logits = _logits_shape(student, example) if unshaped else None

        def target(f: Any) -> torch.Size:
            if f.teacher is not None:
                return shapes[("teacher", f.teacher, f.inputs)]
            shape = getattr(f, "shape", None)
            return torch.Size(shape) if shape is not None else logits  # type: ignore[return-value]

        self.shapes = {f.name: (shapes[("student", f.student, f.inputs)], target(f)) for f in self.features}
        built: dict[str, nn.Module] = {}
        for f in self.features:
            if f.projector is None:
                continue
            try:
                built[f.name] = build_projector(f.projector, *self.shapes[f.name], hidden=getattr(f, "hidden", None))
            except (TypeError, ValueError) as err:
                raise type(err)(f"projector for {f.name!r}: {err}") from err
        self.projectors = Projectors(built)
        self._finalizer: Any = None  # weakref.finalize of hold(), or None

    def capture(self) -> _Attached:
        """A context manager that attaches every hook and removes them on exit (also on an exception).

        Between :meth:`hold` and :meth:`release` the hooks stay registered and the context manager only switches
        them on and off: registering and removing a dozen hooks every step costs a visible share of a small
        model's step (about 0.05 ms of a 3 ms step).
        """
        return _Attached([taps for _, taps in self._taps])

    def hold(self) -> None:
        """Register every hook now, paused (capturing nothing) outside :meth:`capture`, until :meth:`release`.

        The training loop holds the hooks for a whole run. Should the run end in an exception before it releases
        them, they are removed when this object is garbage-collected.
        """
        taps = [t for _, t in self._taps]
        for t in taps:
            t.paused = True
            t.attach()
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _release, taps)

    def release(self) -> None:
        """Remove the hooks :meth:`hold` registered. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def merge(
        self, student_out: dict[str, Tensor], teacher_out: dict[str, Tensor], projectors: nn.Module | None = None
    ) -> None:
        """Pop the captures of the last forwards into ``student_out`` / ``teacher_out`` as ``"feat.<name>"``.

        Args:
            student_out: The student's output dict (updated in place).
            teacher_out: The teacher's output dict (updated in place).
            projectors: The projectors module to apply (the prepared, possibly DDP-wrapped one); default
                :attr:`projectors`.
        """
        captured: dict[tuple[str, str, bool], Tensor] = {}
        for side, taps in self._taps:
            captured.update({(side, n, taps.inputs): t for n, t in taps.pop().items()})
        raw = {f.name: captured[("student", f.student, f.inputs)] for f in self.features}
        to_project = {n: raw[n] for n in self.projectors.names}
        projected = (projectors or self.projectors)(to_project) if to_project else {}
        for f in self.features:
            student_out[f"feat.{f.name}"] = projected.get(f.name, raw[f.name])
            if f.teacher is not None:
                key = ("teacher", f.teacher, f.inputs)
                # a tapped teacher feature, or one that came with the teacher's outputs (a teacher cache)
                teacher_out[f"feat.{f.name}"] = captured[key] if key in captured else teacher_out[f"feat.{f.teacher}"]


def _logits_shape(model: nn.Module, example: Tensor) -> torch.Size:
    """The shape (without the batch dimension) of ``model``'s ``"logits"`` on ``example``, from one eval forward."""
    from mentor.teachers import as_outputs

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            device = next(iter(model.parameters()), torch.empty(0)).device
            logits = as_outputs(model(example.to(device)))["logits"]
    finally:
        for module, flag in flags:
            module.training = flag
    return logits.shape[1:]


def _release(taps: Sequence[Taps]) -> None:
    for t in taps:
        t.remove()
        t.paused = False


class _Attached:
    """Attach the taps for one block (or, when :meth:`FeaturePairs.hold` registered them, un-pause them)."""

    def __init__(self, taps: Sequence[Taps]) -> None:
        self.taps = taps
        self.held: list[bool] = []

    def __enter__(self) -> None:
        self.held = [t.attached and t.paused for t in self.taps]
        for t, held in zip(self.taps, self.held, strict=True):
            if held:
                t.clear()
                t.paused = False
            else:
                t.attach()

    def __exit__(self, *args: object) -> None:
        for t, held in zip(self.taps, self.held, strict=True):
            if held:
                t.paused = True
            else:
                t.remove()
