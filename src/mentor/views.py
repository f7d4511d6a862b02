"""Views: seeded augmentations, so that a batch can give the teacher one view and the student another.

**Per-item augmentations** are pure functions of ``(item, per-item seed)``::

    aug(x: Tensor[B, ...], seeds: Tensor[B] int64) -> Tensor[B, ...]

Item ``i`` with seed ``s`` gives the same output whichever batch it is in, at whatever position, whatever the batch
size, and whatever the state of the global random number generators (which are neither read nor advanced). This
is what an augmentation-consistent teacher cache needs: store an item's seed, and the student can later rebuild
exactly the input that the teacher saw. The random draws come from a counter-based generator keyed by the seed
(SplitMix64, see :func:`derive_seeds` and :func:`uniform`), computed for the whole batch at once in uint64 NumPy
arithmetic on the CPU; no Python loop runs over items (except in :class:`PerItemTransform`).

Bit-identical outputs hold on one device type and dtype: the integer draws are identical everywhere, but float
functions (``log``, ``cos`` in the noise) may differ in the last bit between a CPU and a GPU.

**Shapes.** ``[B, L]`` and ``[B, C, L]`` are 1-D signals (augmented along ``L``, the same for every channel);
``[B, C, H, W]`` are images (augmented over ``H, W``). Sizes given as an ``int`` count positions; sizes given as a
``float`` are fractions of the length (of ``min(H, W)`` for images).

**Batch-level mixing.** :func:`mixup` and :func:`cutmix` mix items of a batch with each other, so they cannot be
per-item functions. They take one integer seed for the batch and return the mixed inputs with the permutation and
the mixing weight, so that a loss can mix the targets the same way (:func:`mix_targets`).

**Views.** :class:`Views` pairs a teacher augmentation with a student augmentation; each item's seed comes from
:func:`item_seeds` ``(index, epoch, seed, view)``, so a resumed run reproduces the same views.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Augmentation",
    "splitmix64",
    "derive_seeds",
    "item_seeds",
    "batch_seed",
    "uniform",
    "randint",
    "Identity",
    "GaussianNoise",
    "Shift",
    "Scale",
    "Flip",
    "Cutout",
    "RandomMask",
    "Compose",
    "RandomChoice",
    "RandAugment",
    "signal_ops",
    "image_ops",
    "weak",
    "strong",
    "PRESETS",
    "preset",
    "Views",
    "PerItemTransform",
    "Mixed",
    "mixup",
    "cutmix",
    "mix_targets",
]

Kind = Literal["signal", "image"]


@runtime_checkable
class Augmentation(Protocol):
    """A per-item augmentation: ``aug(x [B, ...], seeds [B] int64) -> [B, ...]``, a pure function of each item and
    its seed."""

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------------------------------------------
# Counter-based random numbers from integer seeds (SplitMix64)
#
# The integer work runs in NumPy on uint64 arrays, where arithmetic wraps modulo 2^64 by definition and right shifts
# are logical (torch's int64 would overflow a signed type and shift arithmetically). It runs on the CPU whatever the
# device of the data, so the draws are the same everywhere; only the resulting parameters or uniforms are copied to
# the data's device. Seeds are best kept on the CPU (seeds on a GPU are copied back, which waits for the GPU).
# ----------------------------------------------------------------------------------------------------------------

_M64 = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd, 2^64 / golden ratio)
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_STREAM_TAG = 0x5851F42D4C957F2D
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_RANDINT = 2**24


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014, https://doi.org/10.1145/2714064.2660195), a
    bijection of uint64, on a uint64 array of at least one dimension."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
    return z ^ (z >> np.uint64(31))


def _mix64_int(v: int) -> int:
    """:func:`_mix64` of one Python integer (for constants)."""
    v &= _M64
    v = ((v ^ (v >> 30)) * _MUL1) & _M64
    v = ((v ^ (v >> 27)) * _MUL2) & _M64
    return v ^ (v >> 31)


def _word(value: int, name: str) -> int:
    """A Python integer within int64, as its two's-complement uint64 value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value & _M64


def _as_seeds(seeds: Tensor, batch: int | None = None) -> Tensor:
    """Checked seeds: an int64 CPU tensor ``[B]``."""
    if not isinstance(seeds, Tensor):
        raise TypeError(f"seeds must be an int64 tensor of shape [B], got {type(seeds).__name__}")
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise TypeError(f"seeds must be an integer tensor, got dtype {seeds.dtype}")
    if seeds.dim() != 1:
        raise ValueError(f"seeds must have shape [B], got {tuple(seeds.shape)}")
    if batch is not None and seeds.shape[0] != batch:
        raise ValueError(f"seeds has {seeds.shape[0]} entries but the batch has {batch} items")
    return seeds.detach().to(device="cpu", dtype=torch.int64)


def _u64(seeds: Tensor) -> np.ndarray:
    """The seeds' bits as a uint64 array (no copy for a contiguous CPU tensor)."""
    return np.ascontiguousarray(seeds.numpy()).view(np.uint64)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's output function applied element-wise: an int64 tensor ``[N]`` to an int64 tensor ``[N]``, the
    values read as uint64 bits (so results may be negative). Exposed for tests and for reference."""
    return torch.from_numpy(_mix64(_u64(_as_seeds(x))).view(np.int64).copy())


def derive_seeds(seeds: Tensor, *words: int) -> Tensor:
    """New seeds from seeds and integers, a SplitMix64 hash chain (all arithmetic modulo 2^64)::

        h_0 = mix(s + gamma);   h_k = mix((h_{k-1} xor w_k) + gamma);   result = h_n read as int64

    with ``mix`` SplitMix64's output function and ``gamma = 0x9E3779B97F4A7C15``.

    Args:
        seeds: Integer tensor ``[B]`` (on the CPU preferably).
        *words: Python integers within int64.

    Returns:
        int64 CPU tensor ``[B]``.
    """
    seeds = _as_seeds(seeds)
    gamma = np.uint64(_GAMMA)
    h = _mix64(_u64(seeds) + gamma)
    for i, w in enumerate(words):
        h = _mix64((h ^ np.uint64(_word(w, f"word {i}"))) + gamma)
    return torch.from_numpy(h.view(np.int64))


def item_seeds(index: Tensor, epoch: int, seed: int, view: int) -> Tensor:
    """The seed of each item's view: ``derive_seeds(index, seed, epoch, view)``.

    The same ``(run seed, epoch, item index, view id)`` always gives the same seed, so a resumed run (or a cache
    that stores these seeds) reproduces every view. ``view`` tells the views of one item apart (0 for the teacher,
    1 for the student in :class:`Views`; a cache may number its stored views ``0..K-1`` and use a ``seed`` of its
    own).

    Args:
        index: Integer tensor ``[B]`` of dataset indices.
        epoch: The epoch (or any draw counter).
        seed: The run seed.
        view: The view id.

    Returns:
        int64 CPU tensor ``[B]``.
    """
    return derive_seeds(index, seed, epoch, view)


def batch_seed(seed: int, *counters: int) -> int:
    """One integer seed for a batch-level operation (:func:`mixup`, :func:`cutmix`), e.g.
    ``batch_seed(run_seed, epoch, batch, micro_batch, rank)``: ``derive_seeds`` of ``seed`` with ``counters``."""
    _word(seed, "seed")
    return int(derive_seeds(torch.tensor([int(seed)], dtype=torch.int64), *counters)[0])


def _bits(seeds: Tensor, stream: int, count: int) -> np.ndarray:
    """uint64 ``[B, count]``: the first ``count`` outputs of a SplitMix64 generator per item, its state started at
    ``key = mix((s xor mix(stream + tag)) + gamma)``: ``out_j = mix(key + (j + 1) * gamma)``. A bijection of ``j``
    for each item, so the draws of one item never repeat."""
    gamma = np.uint64(_GAMMA)
    key = _mix64((_u64(seeds) ^ np.uint64(_mix64_int(stream + _STREAM_TAG))) + gamma)
    steps = np.arange(1, count + 1, dtype=np.uint64) * gamma
    return _mix64(key[:, None] + steps[None, :])


def _uniform_np(seeds: Tensor, stream: int, count: int) -> np.ndarray:
    # 23 bits: (b + 0.5) then fits float32's 24-bit significand exactly, and 1 - 2^-24 is the largest value
    return ((_bits(seeds, stream, count) >> np.uint64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(2**-23)


def uniform(seeds: Tensor, stream: int, count: int = 1) -> Tensor:
    """Uniform draws ``(b + 0.5) / 2^23`` in the open interval ``(0, 1)``, ``b`` the top 23 bits of a draw, exact in
    float32.

    Args:
        seeds: int64 ``[B]``.
        stream: Which stream of draws (different random quantities of one operation use different streams).
        count: Draws per item.

    Returns:
        float32 CPU tensor ``[B, count]``; row ``i`` depends only on ``seeds[i]`` and ``stream`` (the first ``n``
        draws of a longer request equal a request of ``n``).
    """
    return torch.from_numpy(_uniform_np(_as_seeds(seeds), stream, count))


def randint(seeds: Tensor, stream: int, high: int, count: int = 1) -> Tensor:
    """Integers uniform on ``0..high-1`` (``1 <= high <= 2^24``) from the top 24 bits, in exact integer arithmetic
    (``floor(bits24 * high / 2^24)``): int64 CPU tensor ``[B, count]``."""
    if isinstance(high, bool) or not isinstance(high, int) or not 1 <= high <= _MAX_RANDINT:
        raise ValueError(f"high must be an integer in [1, 2^24], got {high!r}")
    top = _bits(_as_seeds(seeds), stream, count) >> np.uint64(40)
    return torch.from_numpy(((top * np.uint64(high)) >> np.uint64(24)).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Per-item augmentations
# ----------------------------------------------------------------------------------------------------------------


def _check_input(x: Tensor, seeds: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"x must be a batch of 1-D signals [B, L] / [B, C, L] or of images [B, C, H, W], got shape "
            f"{tuple(x.shape)}"
        )
    return _as_seeds(seeds, x.shape[0])


def _float_input(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} needs floating-point inputs, got dtype {x.dtype}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _extent(size: int | float, length: int) -> int:
    """A size in positions: an int as is, a float as a fraction of ``length`` (rounded); at most ``length``."""
    n = int(size) if isinstance(size, int) else round(float(size) * length)
    return min(n, length)


def _check_size(name: str, size: int | float) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"{name} must be an int (positions) or a float (fraction of the length), got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"{name} must be >= 0 positions, got {size}")
    elif not 0.0 <= size <= 1.0:
        raise ValueError(f"{name} as a fraction of the length must be in [0, 1], got {size}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _per_item(v: Tensor, x: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ...]`` broadcastable against ``x``."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Identity:
    """The input unchanged (no copy)."""

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        _check_input(x, seeds)
        return x


@dataclass(frozen=True)
class GaussianNoise:
    """Add ``N(0, std^2)`` noise to every element.

    Standard normals come from the Box-Muller transform of two per-element uniform streams.

    Attributes:
        std: Noise standard deviation (>= 0).
        relative: If true, the standard deviation is ``std`` times the item's own standard deviation over all its
            elements. The standard deviation is computed in float64 and rounded to float32, so it does not depend
            on the batch for float32 and lower-precision inputs; for float64 inputs the last bit may depend on how
            a multi-threaded reduction splits the row.
    """

    std: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (self.std >= 0 and math.isfinite(self.std)):
            raise ValueError(f"std must be a finite number >= 0, got {self.std}")

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        _float_input("GaussianNoise", x)
        if self.std == 0 or x.numel() == 0:
            return x
        dtype = _compute_dtype(x)
        b, n = x.shape[0], x[0].numel()
        flat = x.reshape(b, n).to(dtype)
        u1 = uniform(seeds, 0, n).to(device=x.device, dtype=dtype)
        u2 = uniform(seeds, 1, n).to(device=x.device, dtype=dtype)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
        if self.relative:
            scale = (flat.to(torch.float64).std(dim=1, correction=0) * self.std).to(dtype)[:, None]
            out = flat + z * scale
        else:
            out = flat + z * self.std
        return out.reshape(x.shape).to(x.dtype)


def _gather_shift(x: Tensor, shift: Tensor, dim: int, circular: bool) -> Tensor:
    """``out[..., i, ...] = x[..., i - shift, ...]`` along ``dim`` (negative), per item; zeros outside when not
    circular."""
    length = x.shape[dim]
    idx = torch.arange(length, device=x.device)[None, :] - shift[:, None]  # [B, length]
    valid = (idx >= 0) & (idx < length)
    idx = idx.remainder(length)
    view = [x.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = length
    out = x.gather(dim, idx.reshape(view).expand(x.shape))
    if not circular:
        out = torch.where(valid.reshape(view), out, torch.zeros((), dtype=x.dtype, device=x.device))
    return out


@dataclass(frozen=True)
class Shift:
    """Shift each item by a random integer amount ``s`` uniform on ``-m..m`` (``m = max_shift``): along ``L`` for
    signals, independently along ``H`` and ``W`` for images (a translation). ``out[i] = x[i - s]``.

    Attributes:
        max_shift: ``m`` in positions (int) or as a fraction of the length (float in [0, 1]).
        mode: ``"circular"`` (roll: what leaves one end enters at the other) or ``"zeros"`` (zero padding).
    """

    max_shift: int | float
    mode: Literal["circular", "zeros"] = "circular"

    def __post_init__(self) -> None:
        _check_size("max_shift", self.max_shift)
        if self.mode not in ("circular", "zeros"):
            raise ValueError(f"mode must be 'circular' or 'zeros', got {self.mode!r}")

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        circular = self.mode == "circular"
        dims = (-2, -1) if x.dim() == 4 else (-1,)
        for stream, dim in enumerate(dims):
            m = _extent(self.max_shift, x.shape[dim])
            if m == 0:
                continue
            shift = randint(seeds, stream, 2 * m + 1)[:, 0].to(x.device) - m
            x = _gather_shift(x, shift, dim, circular)
        return x


@dataclass(frozen=True)
class Scale:
    """Multiply each item by a factor uniform on ``[low, high]`` (amplitude scaling; brightness for images)."""

    low: float = 0.8
    high: float = 1.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"Scale needs finite low <= high, got low={self.low}, high={self.high}")

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        _float_input("Scale", x)
        dtype = _compute_dtype(x)
        factor = self.low + (self.high - self.low) * uniform(seeds, 0)[:, 0].to(device=x.device, dtype=dtype)
        return (x.to(dtype) * _per_item(factor, x)).to(x.dtype)


@dataclass(frozen=True)
class Flip:
    """Reverse the last axis with probability ``p`` (a horizontal flip for images, time reversal for signals)."""

    p: float = 0.5

    def __post_init__(self) -> None:
        _check_prob("p", self.p)

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        flip = (uniform(seeds, 0)[:, 0] < self.p).to(x.device)
        return torch.where(_per_item(flip, x), x.flip(-1), x)


def _positions_mask_1d(start: Tensor, size: int, length: int) -> Tensor:
    pos = torch.arange(length, device=start.device)[None, :]
    return (pos >= start[:, None]) & (pos < start[:, None] + size)  # [B, L]


def _fill(x: Tensor, mask: Tensor, value: float) -> Tensor:
    """``x`` with ``value`` where ``mask`` (``[B, L]`` for signals, ``[B, H, W]`` for images) is true, on every
    channel."""
    m = mask[:, None] if x.dim() >= 3 else mask
    return torch.where(m, torch.full((), value, dtype=x.dtype, device=x.device), x)


@dataclass(frozen=True)
class Cutout:
    """Set one contiguous span (signals) or square patch (images) of side ``size`` to ``value`` on every channel
    (DeVries & Taylor 2017, https://arxiv.org/abs/1708.04552). The span lies wholly inside the item, its start
    uniform over the valid positions, so exactly ``size`` positions (``size^2`` pixels) are cut.

    Attributes:
        size: Side in positions (int) or as a fraction of the length / of ``min(H, W)`` (float in [0, 1]).
        value: Fill value.
    """

    size: int | float
    value: float = 0.0

    def __post_init__(self) -> None:
        _check_size("size", self.size)

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        if x.dim() == 4:
            h, w = x.shape[-2:]
            s = _extent(self.size, min(h, w))
            if s == 0:
                return x
            y0 = randint(seeds, 0, h - s + 1)[:, 0].to(x.device)
            x0 = randint(seeds, 1, w - s + 1)[:, 0].to(x.device)
            mask = _positions_mask_1d(y0, s, h)[:, :, None] & _positions_mask_1d(x0, s, w)[:, None, :]
        else:
            length = x.shape[-1]
            s = _extent(self.size, length)
            if s == 0:
                return x
            mask = _positions_mask_1d(randint(seeds, 0, length - s + 1)[:, 0].to(x.device), s, length)
        return _fill(x, mask, self.value)


@dataclass(frozen=True)
class RandomMask:
    """Set ``round(fraction * P)`` randomly chosen positions to ``value`` on every channel, where ``P`` is the
    length ``L`` of a signal or the ``H * W`` pixels of an image: exactly that many per item.

    Attributes:
        fraction: Fraction of positions masked, in [0, 1].
        value: Fill value.
    """

    fraction: float
    value: float = 0.0

    def __post_init__(self) -> None:
        _check_prob("fraction", self.fraction)

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        spatial = x.shape[-2:] if x.dim() == 4 else x.shape[-1:]
        positions = math.prod(spatial)
        k = round(self.fraction * positions)
        if k == 0:
            return x
        chosen = np.ones((x.shape[0], positions), dtype=bool)
        if k < positions:
            # the k smallest keys of each item; keys are distinct within an item, so the set is unique
            keys = _bits(seeds, 0, positions)
            smallest = np.argpartition(keys, k - 1, axis=1)[:, :k]
            chosen[:] = False
            np.put_along_axis(chosen, smallest, True, axis=1)
        mask = torch.from_numpy(chosen).to(x.device)
        return _fill(x, mask.reshape(x.shape[0], *spatial), self.value)


def _as_ops(ops: Sequence[Augmentation], name: str) -> tuple[Augmentation, ...]:
    ops = tuple(ops)
    if not ops:
        raise ValueError(f"{name} needs at least one augmentation")
    for op in ops:
        if not callable(op):
            raise TypeError(f"{name}: {op!r} is not an augmentation (a callable aug(x, seeds))")
    return ops


@dataclass(frozen=True)
class Compose:
    """Apply ``ops`` in order; op ``k`` gets the seeds ``derive_seeds(seeds, k)``, so the ops draw independently."""

    ops: Sequence[Augmentation]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _as_ops(self.ops, "Compose"))

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        for k, op in enumerate(self.ops):
            x = op(x, derive_seeds(seeds, k))
        return x


@dataclass(frozen=True)
class RandomChoice:
    """Apply one op per item, chosen uniformly at random (or with ``weights``) from ``ops``.

    Each op runs once on the sub-batch of items that chose it, with seeds ``derive_seeds(seeds, 1, k)``; the choice
    uses ``derive_seeds(seeds, 0)``. Ops must keep the item shape.
    """

    ops: Sequence[Augmentation]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _as_ops(self.ops, "RandomChoice"))
        if self.weights is not None:
            w = tuple(float(v) for v in self.weights)
            if len(w) != len(self.ops):
                raise ValueError(f"weights has {len(w)} entries for {len(self.ops)} ops")
            if any(not (v >= 0 and math.isfinite(v)) for v in w) or sum(w) <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w}")
            object.__setattr__(self, "weights", w)

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        if self.weights is None:
            choice = randint(derive_seeds(seeds, 0), 0, len(self.ops))[:, 0]
        else:
            edges = torch.tensor(self.weights, dtype=torch.float64).cumsum(0)
            u = uniform(derive_seeds(seeds, 0), 0)[:, 0].to(torch.float64) * edges[-1]
            choice = torch.searchsorted(edges, u, right=True).clamp(max=len(self.ops) - 1)
        out = x.clone()
        for k, op in enumerate(self.ops):
            chosen = choice == k
            if bool(chosen.any()):
                on_device = chosen.to(x.device)
                out[on_device] = op(x[on_device], derive_seeds(seeds[chosen], 1, k))
        return out


@dataclass(frozen=True)
class RandAugment:
    """RandAugment-style pipeline (Cubuk et al. 2020, https://arxiv.org/abs/1909.13719): ``n`` ops applied in
    sequence, each chosen per item uniformly from ``ops`` (with replacement); the magnitude is fixed in the ops
    (see :func:`signal_ops`, :func:`image_ops`). Slot ``j`` is a :class:`RandomChoice` with seeds
    ``derive_seeds(seeds, j)``."""

    ops: Sequence[Augmentation]
    n: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _as_ops(self.ops, "RandAugment"))
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _check_input(x, seeds)
        choice = RandomChoice(self.ops)
        for j in range(self.n):
            x = choice(x, derive_seeds(seeds, j))
        return x


def _check_magnitude(magnitude: float) -> None:
    if not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")


def signal_ops(magnitude: float = 0.5) -> tuple[Augmentation, ...]:
    """The op pool for 1-D signals at ``magnitude`` ``M`` in [0, 1]: identity, noise (``0.3 M`` of the item's std),
    circular shift (up to ``0.25 M`` of the length), amplitude scaling (``1 -+ 0.5 M``), cutout (``0.3 M`` of the
    length) and random masking (``0.3 M`` of the positions)."""
    _check_magnitude(magnitude)
    m = float(magnitude)
    return (
        Identity(),
        GaussianNoise(0.3 * m, relative=True),
        Shift(0.25 * m),
        Scale(1.0 - 0.5 * m, 1.0 + 0.5 * m),
        Cutout(0.3 * m),
        RandomMask(0.3 * m),
    )


def image_ops(magnitude: float = 0.5) -> tuple[Augmentation, ...]:
    """The op pool for images at ``magnitude`` ``M`` in [0, 1]: identity, horizontal flip, noise (``0.2 M`` of the
    item's std), translation with zero padding (up to ``0.3 M`` of the side), brightness scaling (``1 -+ 0.5 M``),
    cutout (``0.4 M`` of the side) and random pixel masking (``0.3 M`` of the pixels)."""
    _check_magnitude(magnitude)
    m = float(magnitude)
    return (
        Identity(),
        Flip(1.0),
        GaussianNoise(0.2 * m, relative=True),
        Shift(0.3 * m, mode="zeros"),
        Scale(1.0 - 0.5 * m, 1.0 + 0.5 * m),
        Cutout(0.4 * m),
        RandomMask(0.3 * m),
    )


def _check_kind(kind: str) -> None:
    if kind not in ("signal", "image"):
        raise ValueError(f"kind must be 'signal' or 'image', got {kind!r}")


def weak(kind: Kind) -> Compose:
    """The weak view (FixMatch's flip-and-shift, Sohn et al. 2020, https://arxiv.org/abs/2001.07685).

    ``"signal"``: circular shift up to 10% of the length, then amplitude scaling in ``[0.9, 1.1]``.
    ``"image"``: horizontal flip with probability 0.5, then translation up to 12.5% of the side with zero padding.
    """
    _check_kind(kind)
    if kind == "signal":
        return Compose((Shift(0.1), Scale(0.9, 1.1)))
    return Compose((Flip(0.5), Shift(0.125, mode="zeros")))


def strong(kind: Kind, n: int = 2, magnitude: float = 0.5) -> Compose:
    """The strong view: the weak view, then :class:`RandAugment` with ``n`` ops of ``magnitude`` from
    :func:`signal_ops` / :func:`image_ops`, then a cutout of a quarter of the length / side (FixMatch's
    RandAugment + Cutout)."""
    _check_kind(kind)
    ops = signal_ops(magnitude) if kind == "signal" else image_ops(magnitude)
    return Compose((*weak(kind).ops, RandAugment(ops, n), Cutout(0.25)))


PRESETS = ("weak", "strong", "weak_image", "strong_image")


def preset(name: str) -> Compose:
    """An augmentation by the preset name configs use: ``"weak"`` / ``"strong"`` (1-D signals, as MNIST-1D) or
    ``"weak_image"`` / ``"strong_image"`` (:func:`weak` and :func:`strong` with their defaults)."""
    if name not in PRESETS:
        raise ValueError(f"augmentation preset {name!r}: expected one of {', '.join(PRESETS)}")
    strength, _, kind = name.partition("_")
    return (weak if strength == "weak" else strong)("image" if kind else "signal")


# ----------------------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Views:
    """The teacher's and the student's augmentation of a batch.

    Item ``i`` of view ``v`` (``TEACHER = 0``, ``STUDENT = 1``) is augmented with the seed
    ``item_seeds(index[i], epoch, seed, v)``.

    Example::

        views = Views(teacher=weak("signal"), student=strong("signal"))
        x_t, x_s = views(x, index, epoch=epoch, seed=run_seed)
    """

    teacher: Augmentation = field(default_factory=Identity)
    student: Augmentation = field(default_factory=Identity)

    TEACHER = 0
    STUDENT = 1

    def view(self, which: int, x: Tensor, index: Tensor, epoch: int, seed: int) -> Tensor:
        """One view (``which`` = :attr:`TEACHER` or :attr:`STUDENT`) of ``x`` ``[B, ...]`` for items ``index``
        ``[B]``."""
        if which not in (self.TEACHER, self.STUDENT):
            raise ValueError(f"which must be Views.TEACHER (0) or Views.STUDENT (1), got {which!r}")
        aug = self.teacher if which == self.TEACHER else self.student
        if isinstance(aug, Identity):
            return x
        return aug(x, item_seeds(_as_seeds(index, x.shape[0]), epoch, seed, which))

    def __call__(self, x: Tensor, index: Tensor, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(teacher view, student view)`` of ``x`` ``[B, ...]`` for dataset indices ``index`` ``[B]``."""
        return (self.view(self.TEACHER, x, index, epoch, seed), self.view(self.STUDENT, x, index, epoch, seed))


# ----------------------------------------------------------------------------------------------------------------
# Third-party per-image transforms (torchvision, timm)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerItemTransform:
    """Adapt a per-item transform that draws from the global random generators (a ``torchvision.transforms.v2``
    transform on tensors, a timm transform) to the seeded ``aug(x, seeds)`` contract.

    Items are processed one at a time (a loop, unlike the built-in ops). For each item the CPU torch generator
    (and, for inputs on a GPU, that GPU's generator), Python's ``random`` and NumPy's global generator are seeded
    with the item's seed; all of them are restored afterwards, so the caller's random state is left as it was.
    The transform must take one item ``x[i]`` (``[C, H, W]``) and return a tensor; all outputs must share a shape.

    Attributes:
        transform: The per-item transform.
    """

    transform: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        if not callable(self.transform):
            raise TypeError(f"transform must be callable, got {self.transform!r}")

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        seeds = _as_seeds(seeds, x.shape[0])
        if x.shape[0] == 0:
            return x
        cuda = x.device.type == "cuda"
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if cuda else []
        py_state = random.getstate()
        np_state = np.random.get_state()
        outs: list[Tensor] = []
        try:
            with torch.random.fork_rng(devices=devices):
                for i, signed in enumerate(seeds.tolist()):
                    s = signed & _M64
                    torch.default_generator.manual_seed(s)
                    if cuda:
                        with torch.cuda.device(devices[0]):
                            torch.cuda.manual_seed(s)
                    random.seed(s)
                    np.random.seed(s % 2**32)
                    out = self.transform(x[i])
                    if not isinstance(out, Tensor):
                        raise TypeError(f"the transform must return a tensor, got {type(out).__name__}")
                    outs.append(out)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise ValueError(f"the transform returned items of different shapes {sorted(shapes)}; they must agree")
        return torch.stack(outs)


# ----------------------------------------------------------------------------------------------------------------
# Batch-level mixing
# ----------------------------------------------------------------------------------------------------------------


class Mixed(NamedTuple):
    """A batch mixed with a permutation of itself.

    Attributes:
        inputs: Mixed inputs ``[B, ...]``.
        perm: int64 ``[B]``: item ``i`` was mixed with item ``perm[i]``.
        lam: Weight of each item's own content, the same for the whole batch (for :func:`cutmix`, the exact
            fraction of positions kept). Targets mix as ``lam * t + (1 - lam) * t[perm]``.
    """

    inputs: Tensor
    perm: Tensor
    lam: float


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def _batch_draws(x: Tensor, alpha: float, seed: int) -> tuple[random.Random, Tensor, float]:
    _check_alpha(alpha)
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"x must be [B, L], [B, C, L] or [B, C, H, W], got shape {tuple(x.shape)}")
    unsigned = _word(seed, "seed")
    rng = random.Random(unsigned)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(unsigned)).to(x.device)
    return rng, perm, rng.betavariate(alpha, alpha)


def mixup(x: Tensor, *, alpha: float = 1.0, seed: int) -> Mixed:
    """Mixup (Zhang et al. 2018, https://arxiv.org/abs/1710.09412): ``lam * x + (1 - lam) * x[perm]`` with one
    ``lam ~ Beta(alpha, alpha)`` and one random permutation for the whole batch. **Batch-level**: an item's output
    depends on the other items, so this is not a per-item augmentation; ``seed`` fixes ``lam`` and ``perm``.

    Args:
        x: Floating-point ``[B, ...]``.
        alpha: Beta parameter (> 0).
        seed: Integer seed of this batch's draws (see :func:`batch_seed`).

    Returns:
        :class:`Mixed`.
    """
    _float_input("mixup", x)
    _, perm, lam = _batch_draws(x, alpha, seed)
    return Mixed(lam * x + (1.0 - lam) * x[perm], perm, lam)


def cutmix(x: Tensor, *, alpha: float = 1.0, seed: int) -> Mixed:
    """CutMix (Yun et al. 2019, https://arxiv.org/abs/1905.04899): one box (a span for signals) taken from
    ``x[perm]`` and pasted into every item. The box covers a fraction ``1 - lam0`` (``lam0 ~ Beta(alpha, alpha)``),
    its centre uniform, clipped at the borders; the returned ``lam`` is the fraction actually kept. **Batch-level**
    (see :func:`mixup`).

    Args:
        x: ``[B, ...]``.
        alpha: Beta parameter (> 0).
        seed: Integer seed of this batch's draws.

    Returns:
        :class:`Mixed`.
    """
    rng, perm, lam0 = _batch_draws(x, alpha, seed)
    cut = math.sqrt(1.0 - lam0) if x.dim() == 4 else 1.0 - lam0
    sizes = x.shape[-2:] if x.dim() == 4 else x.shape[-1:]
    lo_hi = []
    for n in sizes:
        half = round(cut * n) / 2
        centre = rng.random() * n
        lo_hi.append((max(0, round(centre - half)), min(n, round(centre + half))))
    mask = torch.ones((), dtype=torch.bool, device=x.device)
    for d, ((lo, hi), n) in enumerate(zip(lo_hi, sizes, strict=True)):
        pos = torch.arange(n, device=x.device)
        inside = (pos >= lo) & (pos < hi)
        shape = [1] * len(sizes)
        shape[d] = n
        mask = mask & inside.reshape(shape)
    cut_area = math.prod(hi - lo for lo, hi in lo_hi)
    lam = 1.0 - cut_area / math.prod(sizes)
    return Mixed(torch.where(mask, x[perm], x), perm, lam)


def mix_targets(targets: Tensor, mixed: Mixed, num_classes: int | None = None) -> Tensor:
    """Targets mixed like the inputs: ``lam * t + (1 - lam) * t[perm]``.

    Args:
        targets: Probabilities or any float targets ``[B, ...]``, or integer labels ``[B]`` (then one-hot encoded
            with ``num_classes``; a cross-entropy against the result equals ``lam * CE(y) + (1 - lam) *
            CE(y[perm])``).
        mixed: The :class:`Mixed` returned by :func:`mixup` / :func:`cutmix`.
        num_classes: Number of classes for integer labels.

    Returns:
        Float tensor ``[B, ...]`` (``[B, num_classes]`` for labels).
    """
    if targets.shape[0] != mixed.perm.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} items but the mixed batch has {mixed.perm.shape[0]}")
    if not targets.is_floating_point():
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes (>= 1) is needed to mix integer labels, got {num_classes!r}")
        if targets.dim() != 1 or bool(((targets < 0) | (targets >= num_classes)).any()):
            raise ValueError(f"integer labels must be [B] in 0..{num_classes - 1} (no unlabelled markers)")
        targets = torch.nn.functional.one_hot(targets, num_classes).to(torch.float32)
    perm = mixed.perm.to(targets.device)
    return mixed.lam * targets + (1.0 - mixed.lam) * targets[perm]
