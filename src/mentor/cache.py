"""Teacher outputs computed once: a compressed, sharded, verifiable cache.

A cache is a directory::

    manifest.json            format version, fingerprints, what is stored, shards with sizes and sha256
    plan.json                what the build was asked for (a resumed or parallel build must match it)
    shard-00000.bin          raw little-endian arrays, one after another (64-byte aligned)
    shard-00000.json         that shard's layout, byte count and sha256, written after the .bin is complete
    ...

Per item (and per view, see below) it stores the teacher's ``k`` largest **log-probabilities** (full-distribution
normalised, float16 or bfloat16) with their class indices (uint8 / uint16 where the class count fits, else int32);
because the values are normalised over all classes, the mass of the dropped classes is ``1 - sum(exp(values))``
and nothing else is needed to account for it (see :func:`mentor.losses.sparse_kl_div`). Named teacher features
(from :class:`mentor.taps.Taps`) are stored in float16. Items may have leading position dimensions (a sequence
model's ``[L, V]`` logits are stored as ``[L, k]``).

**Safe to interrupt.** A shard is written to a temporary name and renamed when complete; its ``.json`` sidecar is
written (atomically) after that, and only a shard with both files counts as done. A killed build rerun with the same
plan skips the finished shards and gives the same bytes as an uninterrupted build. The manifest is written last.

**Several processes.** Process ``rank`` of ``world`` builds shards ``rank, rank + world, ...``. Each process, after
its last shard, writes the manifest if every shard's sidecar is present; the last process to finish always sees all
of them, so no collective is needed (``accelerate launch -m mentor cache build ...`` or ``--num-processes``).

**Views (augmentation-consistent caching, CED).** With ``num_views = V`` and an augmentation ``augment(x, seeds)``
(a per-item seeded function, see :mod:`mentor.views`), view ``v`` of item ``i`` is ``augment(x_i, seed[i, v])``;
the seeds are stored, so the student can see exactly the input the teacher saw (Ke et al. 2023, "CED: Consistent
ensemble distillation for audio tagging", https://arxiv.org/abs/2308.11957).

**Reading.** :class:`TeacherCache` memory-maps the shards (reopened in each process, so DataLoader workers and
DDP ranks are fine) and returns the rows of any item indices; :class:`mentor.teachers.Cached` makes it a teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mentor import atomic

__all__ = [
    "FORMAT",
    "VERSION",
    "CacheError",
    "CacheSpec",
    "TeacherCache",
    "build",
    "fingerprint_data",
    "fingerprint_model",
    "info",
    "item_seeds",
    "verify",
]

FORMAT = "mentor-teacher-cache"
VERSION = 1
_ALIGN = 64


class CacheError(ValueError):
    """A cache that is missing, damaged, or does not belong to this run."""


# -- fingerprints ---------------------------------------------------------------------------------------------------


def fingerprint_model(model: nn.Module) -> str:
    """sha256 of a model's class and its weights and buffers (names, dtypes, shapes, bytes, in name order).

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    kind = type(model)
    h.update(f"{kind.__module__}.{kind.__qualname__}|".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_raw_bytes(t))
    return "sha256:" + h.hexdigest()


def fingerprint_data(x: Tensor) -> str:
    """sha256 of a dataset's inputs (dtype, shape, bytes): ``"sha256:<hex>"``. Labels are not part of it."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_raw_bytes(t))  # one call on the tensor's own memory: no copy, and hashlib releases the GIL meanwhile
    return "sha256:" + h.hexdigest()


def _raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a view of its memory (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


def item_seeds(index: Tensor | np.ndarray, num_views: int, seed: int) -> np.ndarray:
    """The augmentation seed of view ``v`` of item ``i``: ``[len(index), num_views]`` int64.

    A splitmix64 hash of ``(seed, i, v)``, so a seed depends on nothing but the item, the view and the build seed.
    """
    i = np.asarray(index, dtype=np.uint64).reshape(-1, 1)
    v = np.arange(num_views, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + i * np.uint64(0xBF58476D1CE4E5B9)
             + v * np.uint64(0x94D049BB133111EB) + np.uint64(0x632BE59BD9B4E019))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)  # non-negative int64


# -- what a build stores --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """What a cache build stores.

    Attributes:
        k: Top-k classes kept per item (``None``: all classes).
        values_dtype: ``"float16"`` or ``"bfloat16"`` for the log-probabilities.
        features: Teacher module names whose outputs are stored (float16).
        feature_inputs: Store the modules' inputs instead of their outputs.
        outputs: Keys of the teacher's output dict stored besides the logits (floating ones in float16, integer
            ones as they are: e.g. the uint8 ``"codes"`` of :class:`mentor.mvq.QuantizedTeacher`).
        num_views: Views per item (more than 1 needs an augmentation).
        shard_size: Items per shard (a killed build resumes from the last complete shard). 8192 by default:
            on the 50k MNIST-1D set (12 bytes per item) build/bare forward throughput measured 0.88 at 4096,
            0.92 at 8192 and 0.93 at 16384 (fewer files and hand-offs to the writer thread).
        batch_size: Items per teacher forward.
        seed: Seed of the view seeds (see :func:`item_seeds`).
    """

    k: int | None = None
    values_dtype: str = "float16"
    features: tuple[str, ...] = ()
    feature_inputs: bool = False
    outputs: tuple[str, ...] = ()
    num_views: int = 1
    shard_size: int = 8192
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if "logits" in self.outputs:
            raise ValueError("cache outputs: 'logits' are always stored (as top-k); list other output keys only")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"cache k must be an integer >= 1 or null (all classes), got {self.k!r}")
        if self.values_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"cache values_dtype must be 'float16' or 'bfloat16', got {self.values_dtype!r}")
        for key in ("num_views", "shard_size", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cache {key} must be an integer >= 1, got {value!r}")


def _indices_dtype(num_classes: int) -> np.dtype[Any]:
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass
class _Array:
    dtype: str  # numpy dtype name; "bfloat16" is stored as its 16-bit pattern
    shape: tuple[int, ...]  # per item
    offset: int = 0

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.uint16) if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def nbytes(self, n: int) -> int:
        return int(np.prod((n, *self.shape), dtype=np.int64)) * self.np_dtype.itemsize


def _layout(arrays: Mapping[str, _Array], n: int) -> tuple[dict[str, _Array], int]:
    """Offsets of each array for a shard of ``n`` items, and the shard's byte count."""
    out: dict[str, _Array] = {}
    offset = 0
    for name, a in arrays.items():
        out[name] = _Array(a.dtype, a.shape, offset)
        offset += a.nbytes(n)
        offset = -(-offset // _ALIGN) * _ALIGN
    return out, offset


# -- build ----------------------------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _teacher_outputs(
    model: nn.Module, x: Tensor, features: Sequence[str], feature_inputs: bool, outputs: Sequence[str] = ()
) -> tuple[Tensor, dict[str, Tensor]]:
    """The teacher's logits, and its tapped features (``"feat.<module>"``) and extra outputs (``"out.<key>"``)."""
    from mentor.taps import Taps
    from mentor.teachers import as_outputs

    with Taps(model, list(features), inputs=feature_inputs) if features else _nothing() as taps:
        out = as_outputs(model(x))
        feats = {f"feat.{k}": v for k, v in taps.pop().items()} if taps is not None else {}
    missing = [key for key in outputs if key not in out]
    if missing:
        raise ValueError(f"cache outputs {missing} are not among the teacher's outputs {sorted(out)}")
    feats.update({f"out.{key}": out[key] for key in outputs})
    return out["logits"], feats


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _plan(
    spec: CacheSpec, model: nn.Module, x: Tensor, teacher_spec: Mapping[str, Any] | None,
    dataset_spec: Mapping[str, Any] | None, augment: Callable[[Tensor, Tensor], Tensor] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Everything a build writes except the shards: checked against an existing build before resuming it.

    The dataset's fingerprint is left ``None``: :func:`build` fills it in (on its writer thread, where it can).
    """
    if spec.num_views > 1 and augment is None:
        raise ValueError(f"cache num_views = {spec.num_views} needs an augmentation (augment=...), got none")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cache build: the dataset is empty")
    with torch.no_grad():
        logits, feats = _teacher_outputs(model, x[:1].to(device), spec.features, spec.feature_inputs, spec.outputs)
    num_classes = int(logits.shape[-1])
    k = num_classes if spec.k is None else spec.k
    if k > num_classes:
        raise ValueError(f"cache k = {k} is more than the teacher's {num_classes} classes")
    positions = tuple(int(d) for d in logits.shape[1:-1])
    arrays: dict[str, _Array] = {
        "values": _Array(spec.values_dtype, (spec.num_views, *positions, k)),
        "indices": _Array(_indices_dtype(num_classes).name, (spec.num_views, *positions, k)),
    }
    if augment is not None:
        arrays["seeds"] = _Array("int64", (spec.num_views,))
    for name, f in feats.items():  # floating features in fp16; integer outputs (MVQ codes) as they are
        dtype = "float16" if f.dtype.is_floating_point else str(f.dtype).removeprefix("torch.")
        arrays[name] = _Array(dtype, (spec.num_views, *(int(d) for d in f.shape[1:])))
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"fingerprint": fingerprint_model(model), "spec": dict(teacher_spec or {})},
        "dataset": {"fingerprint": None, "num_items": n, "spec": dict(dataset_spec or {})},
        "stored": {
            "logits": {"k": k, "num_classes": num_classes, "positions": list(positions),
                       "values": "log_probs", "values_dtype": spec.values_dtype,
                       "indices_dtype": arrays["indices"].dtype},
            "features": {name[5:]: {"shape": list(a.shape[1:]), "dtype": "float16", "inputs": spec.feature_inputs}
                         for name, a in arrays.items() if name.startswith("feat.")},
            "outputs": {name[4:]: {"shape": list(a.shape[1:]), "dtype": a.dtype}
                        for name, a in arrays.items() if name.startswith("out.")},
            "views": {"num_views": spec.num_views, "augmentation": _describe(augment),
                      "seed": spec.seed},
        },
        "spec": asdict(spec),
        "shard_size": spec.shard_size,
        "num_shards": -(-n // spec.shard_size),
        "arrays": {name: {"dtype": a.dtype, "shape": list(a.shape)} for name, a in arrays.items()},
    }


def _describe(fn: object) -> str | None:
    """A name for an augmentation that is the same in every process (no memory addresses)."""
    if fn is None:
        return None
    text = repr(fn)
    if " at 0x" not in text:
        return text
    kind = fn if callable(fn) and hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', type(fn).__name__)}"


def _arrays_of(plan: Mapping[str, Any]) -> dict[str, _Array]:
    return {name: _Array(a["dtype"], tuple(a["shape"])) for name, a in plan["arrays"].items()}


_DEFER_BYTES = 64 << 20  # raw logits of a shard up to this size are reduced to top-k by the writer thread


def _topk(logits: Tensor, k: int, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The k largest log-probabilities and their classes: the k largest logits minus the log-partition (without
    writing the full log-softmax). With ``out``, the values are written there (converted to its dtype)."""
    logits = logits if logits.dtype == torch.float32 else logits.float()
    top, indices = logits.topk(k, dim=-1) if k < logits.shape[-1] else logits.sort(-1, descending=True)
    return torch.sub(top, _log_partition(logits), out=out), indices


_EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number


def _log_partition(logits: Tensor) -> Tensor:
    """``logits.logsumexp(-1, keepdim=True)`` for float32 logits, about five times faster on a trained teacher's.

    torch's vectorised ``exp`` takes a slow path for arguments below about -87.3 (subnormal or zero results), and
    a confident teacher puts many classes there (the MNIST-1D CNN: 12% of all class logits are more than 87 below
    their row's maximum). Such logits are raised to the row maximum minus 87 first, and torch's ``logsumexp``
    (which subtracts the maximum itself, unchanged by this) takes the rest. Each raised term is then about 1.6e-38
    instead of its true value (under 1.2e-38), beside the row maximum's exp(0) = 1 in the same sum: far below
    float32's resolution (6e-8 at 1), so the result is torch's own to the last bit in practice (checked on the
    50000 items of bench/cache.py and in the tests). An infinite or NaN maximum makes the bound infinite or NaN,
    and torch's own handling of such rows applies unchanged.
    """
    return logits.clamp(min=logits.amax(dim=-1, keepdim=True).add_(_EXP_FLOOR)).logsumexp(dim=-1, keepdim=True)


def _forward_shard(
    model: nn.Module, x: Tensor, start: int, stop: int, plan: Mapping[str, Any], spec: CacheSpec,
    augment: Callable[[Tensor, Tensor], Tensor] | None, device: torch.device,
) -> dict[str, Any]:
    """The teacher's outputs on one shard's items, batch by batch, kept as they come: the raw logits, which
    :func:`_shard_bytes` reduces to top-k on the writer thread while the teacher goes on, or (where a shard's raw
    logits would be large) the top-k already taken. Nothing is copied or converted here, between two forwards."""
    from mentor.teachers import as_outputs

    arrays = _arrays_of(plan)
    k, num_classes = plan["stored"]["logits"]["k"], plan["stored"]["logits"]["num_classes"]
    n, views = stop - start, spec.num_views
    positions = int(np.prod(plan["stored"]["logits"]["positions"], dtype=np.int64))
    defer = n * views * positions * num_classes * 4 <= _DEFER_BYTES
    seeds = item_seeds(np.arange(start, stop), views, spec.seed) if augment is not None else None
    parts: dict[str, list[list[Tensor]]] = {name: [[] for _ in range(views)] for name in arrays if name != "seeds"}
    parts["logits"] = [[] for _ in range(views)]
    plain = not spec.features and not spec.outputs
    with torch.no_grad():
        for lo in range(0, n, spec.batch_size):
            hi = min(lo + spec.batch_size, n)
            xb = x[start + lo : start + hi]
            xb = xb if xb.device == device else xb.to(device)  # each torch call here gives the GIL up
            for v in range(views):
                xv = xb if augment is None else augment(xb, torch.from_numpy(seeds[lo:hi, v]).to(device))  # type: ignore[index]
                feats: dict[str, Tensor] = {}
                if plain:  # the common case: the forward and nothing else
                    out = model(xv)
                    logits = out if isinstance(out, Tensor) else as_outputs(out)["logits"]
                else:
                    logits, feats = _teacher_outputs(model, xv, spec.features, spec.feature_inputs, spec.outputs)
                if defer:
                    parts["logits"][v].append(logits.detach() if logits.requires_grad else logits)
                else:
                    values, indices = _topk(logits, k)
                    parts["values"][v].append(values)
                    parts["indices"][v].append(indices)
                for name, f in feats.items():
                    parts[name][v].append(f.detach())
    return {"parts": parts, "seeds": seeds, "k": k, "n": n}


def _shard_bytes(shard: Mapping[str, Any], arrays: Mapping[str, _Array]) -> tuple[np.ndarray, dict[str, _Array]]:
    """One shard's file contents from :func:`_forward_shard`'s outputs, and its layout.

    One zeroed buffer (so the alignment padding is zero) into which the outputs are converted in place (into
    little-endian views, by ``Tensor.copy_`` or ``out=``: no intermediate arrays); deferred logits are reduced to
    top-k here, one call per shard and view. Few torch calls: this runs on the writer thread, and each call gives
    the GIL up and takes it back, which costs the teacher's thread whenever it wants the GIL at that moment.
    """
    n = shard["n"]
    layout, size = _layout(arrays, n)
    buf = np.zeros(size, dtype=np.uint8)
    dest: dict[str, list[Tensor]] = {}  # per array, per view: [n, ...] views of buf (made by numpy, not torch)
    for name, a in layout.items():
        whole = buf[a.offset : a.offset + a.nbytes(n)].view(a.np_dtype).reshape(n, *a.shape)
        per_view = [whole] if name == "seeds" else [whole[:, v] for v in range(a.shape[0])]
        dest[name] = [torch.from_numpy(t).view(torch.bfloat16) if a.dtype == "bfloat16" else torch.from_numpy(t)
                      for t in per_view]
    if shard["seeds"] is not None:
        dest["seeds"][0].copy_(torch.from_numpy(shard["seeds"]))
    parts = shard["parts"]
    for v, chunks in enumerate(parts["logits"]):
        if chunks:
            logits = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            target = dest["values"][v]
            if logits.shape[:-1] != target.shape[:-1]:
                raise ValueError(f"cache build: the teacher's logits have shape {tuple(logits.shape)} on this shard; "
                                 f"the plan (from the first item) expects {(*target.shape[:-1], '<classes>')}")
            if logits.device == target.device:
                _, indices = _topk(logits, shard["k"], out=target)
            else:  # a GPU teacher: top-k there, then one copy (with the conversion) of k values per item
                values, indices = _topk(logits, shard["k"])
                target.copy_(values)
            _put(dest, "indices", 0, v, indices)
    for name, per_view in parts.items():
        if name != "logits":
            for v, chunks in enumerate(per_view):
                lo = 0
                for chunk in chunks:
                    lo = _put(dest, name, lo, v, chunk)
    if sys.byteorder != "little":  # shards are little-endian
        for a in layout.values():
            buf[a.offset : a.offset + a.nbytes(n)].view(a.np_dtype).byteswap(inplace=True)
    return buf, layout


def _put(dest: Mapping[str, Sequence[Tensor]], name: str, lo: int, view: int, chunk: Tensor) -> int:
    """Convert ``chunk`` (one batch of ``name``, view ``view``) into rows ``lo:`` of ``dest``; returns the next
    row."""
    hi = lo + len(chunk)
    target = dest[name][view]
    target = target if lo == 0 and hi == len(target) else target[lo:hi]
    if target.shape != chunk.shape:
        raise ValueError(f"cache build: the teacher's {name!r} has shape {tuple(chunk.shape)} in this batch; the "
                         f"plan (from the first item) expects {tuple(target.shape)}")
    target.copy_(chunk)
    return hi


def _assemble_and_write(root: Path, i: int, start: int, stop: int, shard: Mapping[str, Any],
                        arrays: Mapping[str, _Array]) -> dict[str, Any]:
    with torch.no_grad():
        buf, layout = _shard_bytes(shard, arrays)
    return _write_shard(root, i, start, stop, buf, layout)


def _write_shard(root: Path, i: int, start: int, stop: int, buf: np.ndarray,
                 layout: Mapping[str, _Array]) -> dict[str, Any]:
    name = _shard_name(i)
    digest = hashlib.sha256(buf.data).hexdigest()  # one call: hashlib releases the GIL for it, as the write does
    atomic.write_bytes(root / f"{name}.bin", buf.data)
    sidecar = {"index": i, "file": f"{name}.bin", "start": start, "stop": stop, "bytes": int(buf.nbytes),
               "sha256": digest, "arrays": {k: {"dtype": a.dtype, "shape": list(a.shape), "offset": a.offset}
                                            for k, a in layout.items()}}
    atomic.write_text(root / f"{name}.json", json.dumps(sidecar))  # one line: json's C encoder (indent is Python)
    return sidecar


def _done_shard(root: Path, i: int) -> dict[str, Any] | None:
    side, data = root / f"{_shard_name(i)}.json", root / f"{_shard_name(i)}.bin"
    if not side.is_file() or not data.is_file():
        return None
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return sidecar if data.stat().st_size == sidecar.get("bytes") else None


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [f"{path}: existing {a!r}, requested {b!r}"]


def build(
    model: nn.Module,
    x: Tensor,
    out: str | Path,
    *,
    spec: CacheSpec | None = None,
    teacher_spec: Mapping[str, Any] | None = None,
    dataset_spec: Mapping[str, Any] | None = None,
    augment: Callable[[Tensor, Tensor], Tensor] | None = None,
    rank: int = 0,
    world: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> Path | None:
    """Run ``model`` once over ``x`` and write (or finish) a cache in ``out``.

    Args:
        model: The teacher (put in eval mode here; never trained).
        x: The dataset's inputs ``[N, ...]``, in item order.
        out: Cache directory.
        spec: What to store (default: all classes, float16, one view).
        teacher_spec: How the teacher is built, stored in the manifest for information (the fingerprint is of the
            model's class and weights).
        dataset_spec: How the dataset is made, stored in the manifest.
        augment: ``augment(x [B, ...], seeds [B] int64) -> [B, ...]`` for views (see :mod:`mentor.views`).
        rank: This process's index among ``world`` builders (each builds shards ``rank::world``).
        world: Number of builders.
        device: Where the teacher runs.
        progress: Show a progress bar.
        overwrite: Delete an existing cache in ``out`` whose plan differs, instead of refusing.

    Returns:
        The manifest path if the cache is complete after this process's part, else ``None`` (another process
        still builds shards).

    Raises:
        CacheError: ``out`` holds a cache or partial build with a different plan (and ``overwrite`` is false).
    """
    from tqdm.auto import tqdm

    spec = spec or CacheSpec()
    if not 0 <= rank < world:
        raise ValueError(f"cache build rank must be in [0, {world}), got {rank}")
    model.eval()
    device = torch.device(device)
    model.to(device)
    root = Path(out)
    plan = json.loads(json.dumps(_plan(spec, model, x, teacher_spec, dataset_spec, augment, device)))  # as stored
    n, size, arrays = int(x.shape[0]), spec.shard_size, _arrays_of(plan)
    with ThreadPoolExecutor(max_workers=1) as writer:
        # The writer thread takes the data's fingerprint (sha256 over all inputs) and then, for shard i, the top-k,
        # the conversions, the checksum and the files, while this thread runs the teacher on shard i + 1. At most
        # one shard is pending; the writer's errors surface here.
        pending: list[Future[Any]] = []
        if _resuming(root, overwrite):  # the plan must match before anything is skipped or written
            plan["dataset"]["fingerprint"] = fingerprint_data(x)
            _claim(root, plan, overwrite, write=rank == 0)
        else:  # a new cache: the plan is written (before any shard) once its fingerprint is known
            pending.append(writer.submit(_fingerprint_and_claim, root, plan, x, overwrite))
        mine = [i for i in range(plan["num_shards"]) if i % world == rank]
        todo = [i for i in mine if _done_shard(root, i) is None]
        bar = tqdm(total=sum(min((i + 1) * size, n) - i * size for i in mine), disable=not progress, unit="item",
                   desc=f"cache {root.name}" + (f" [{rank}/{world}]" if world > 1 else ""), dynamic_ncols=True)
        bar.update(sum(min((i + 1) * size, n) - i * size for i in mine if i not in todo))
        written: dict[int, dict[str, Any]] = {}
        for j, i in enumerate(todo):
            start, stop = i * size, min((i + 1) * size, n)
            shard = _forward_shard(model, x, start, stop, plan, spec, augment, device)
            for future in pending:  # the fingerprint and plan, or the previous shard
                if (sidecar := future.result()) is not None:
                    written[sidecar["index"]] = sidecar
            pending = []
            if j < len(todo) - 1:
                pending.append(writer.submit(_assemble_and_write, root, i, start, stop, shard, arrays))
            else:  # the last shard: nothing is left to overlap with, so no hand-off
                written[i] = _assemble_and_write(root, i, start, stop, shard, arrays)
            bar.update(stop - start)
        for future in pending:
            future.result()
    bar.close()
    return _finalize(root, plan, written)


_TEMPORARY = re.compile(r"\.(plan\.json|manifest\.json|shard-\d+\.(bin|json))\..*\.tmp")


def _resuming(root: Path, overwrite: bool) -> bool:
    """Whether ``root`` holds a plan (a build to resume or join); refuses a directory with other files in it."""
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if "plan.json" in names:
        return True
    others = [name for name in names if not _TEMPORARY.fullmatch(name)]  # a killed builder's temporaries are ours
    if others and not overwrite:
        raise CacheError(f"{str(root)!r} is not empty and holds no cache plan ({others[:5]}); expected an empty or "
                         "new directory")
    return False


def _claim(root: Path, plan: Mapping[str, Any], overwrite: bool, write: bool) -> None:
    """Check ``plan`` against the one in ``root`` (if any: a different one is refused, or deleted with its shards
    when ``overwrite``), then write it if ``write`` or if there was none."""
    plan_path = root / "plan.json"
    if plan_path.is_file():
        existing = json.loads(plan_path.read_text())
        if existing != plan:
            if not overwrite:
                raise CacheError(
                    f"{str(root)!r} holds a cache built with a different plan; differences:\n  "
                    + "\n  ".join(_diff(existing, plan)) + "\nuse another directory, or overwrite=True "
                    "(--overwrite) to delete it"
                )
            for f in root.iterdir():
                if f.name.startswith(("shard-", ".shard-", "manifest.json", "plan.json")):
                    f.unlink()
    if write or not plan_path.is_file():
        atomic.write_text(plan_path, json.dumps(plan, indent=1, sort_keys=True))


def _fingerprint_and_claim(root: Path, plan: dict[str, Any], x: Tensor, overwrite: bool) -> None:
    """A new cache's first step on the writer thread: the data's fingerprint into ``plan``, then ``plan.json``
    (checked against one that another builder may have written meanwhile)."""
    plan["dataset"]["fingerprint"] = fingerprint_data(x)
    _claim(root, plan, overwrite, write=True)


def finalize(root: str | Path) -> Path | None:
    """Write ``manifest.json`` if every shard of the plan is complete; return its path (else ``None``)."""
    root = Path(root)
    return _finalize(root, json.loads((root / "plan.json").read_text()), {})


def _finalize(root: Path, plan: Mapping[str, Any], written: Mapping[int, dict[str, Any]]) -> Path | None:
    """:func:`finalize` with the plan at hand, where the sidecars in ``written`` (shards this process has just
    written) are not read back from disk."""
    shards = []
    for i in range(plan["num_shards"]):
        sidecar = written.get(i) or _done_shard(root, i)
        if sidecar is None:
            return None
        shards.append(sidecar)
    manifest = {**plan, "shards": shards, "bytes": sum(s["bytes"] for s in shards)}
    path = root / "manifest.json"
    atomic.write_text(path, json.dumps(manifest, indent=1, sort_keys=True))
    for stale in root.glob(".shard-*.tmp"):  # temporaries of killed builds; every shard is complete now
        stale.unlink(missing_ok=True)
    return path


# -- verify / info --------------------------------------------------------------------------------------------------


def _manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        partial = (" (a partial build: rerun `mentor cache build` to finish it)"
                   if (root / "plan.json").is_file() else "")
        raise CacheError(f"{str(root)!r} is not a finished teacher cache: no manifest.json{partial}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{str(path)!r} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{str(path)!r} is not a mentor teacher cache (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{str(path)!r} has format version {manifest.get('version')!r}; this mentor reads "
                         f"version {VERSION}: rebuild the cache")
    return manifest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(root: str | Path) -> list[str]:
    """Check every shard's size and sha256 against the manifest; returns the problems (empty: intact)."""
    root = Path(root)
    manifest = _manifest(root)
    problems = []
    for s in manifest["shards"]:
        path = root / s["file"]
        if not path.is_file():
            problems.append(f"{s['file']}: missing")
        elif path.stat().st_size != s["bytes"]:
            problems.append(f"{s['file']}: {path.stat().st_size} bytes, manifest says {s['bytes']}")
        elif _sha256_file(path) != s["sha256"]:
            problems.append(f"{s['file']}: sha256 does not match the manifest (the file is damaged)")
    return problems


def info(root: str | Path) -> dict[str, Any]:
    """A summary of a cache: item count, what is stored, sizes and bytes per item."""
    manifest = _manifest(Path(root))
    n = manifest["dataset"]["num_items"]
    logits = manifest["stored"]["logits"]
    positions = int(np.prod(logits["positions"], dtype=np.int64)) if logits["positions"] else 1
    views = manifest["stored"]["views"]["num_views"]
    arrays = _arrays_of(manifest)
    logit_bytes = sum(arrays[a].nbytes(1) for a in ("values", "indices"))
    return {
        "path": str(root),
        "items": n,
        "shards": len(manifest["shards"]),
        "bytes": manifest["bytes"],
        "bytes_per_item": manifest["bytes"] / n,
        "logit_bytes_per_item": logit_bytes,
        "logit_bytes_per_position": logit_bytes / (positions * views),
        "k": logits["k"],
        "num_classes": logits["num_classes"],
        "positions": logits["positions"],
        "values_dtype": logits["values_dtype"],
        "indices_dtype": logits["indices_dtype"],
        "features": manifest["stored"]["features"],
        "views": manifest["stored"]["views"],
        "teacher": manifest["teacher"],
        "dataset": manifest["dataset"],
    }


# -- read -----------------------------------------------------------------------------------------------------------


@dataclass
class TeacherCache:
    """A finished cache, memory-mapped for random access by item index.

    Args:
        path: The cache directory.
        check: Verify every shard's sha256 on opening (a damaged shard is a :class:`CacheError` before any
            training starts).
        count_reads: Keep a per-item count of reads in :attr:`reads` (for tests and diagnostics).
        in_memory: Read the whole cache into memory at opening (one array per stored name, so a batch is one
            gather instead of one per shard). ``None``: when the cache is at most 512 MiB. Forked DataLoader
            workers share these pages; larger caches stay memory-mapped.
    """

    path: str | Path
    check: bool = True
    count_reads: bool = False
    in_memory: bool | None = None
    manifest: dict[str, Any] = field(init=False)
    reads: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.manifest = _manifest(self.path)
        if self.check:
            problems = verify(self.path)
            if problems:
                raise CacheError(f"teacher cache {str(self.path)!r} is damaged:\n  " + "\n  ".join(problems)
                                 + "\nrebuild it with `mentor cache build`")
        self._arrays = _arrays_of(self.manifest)
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._pid = -1
        self._whole: dict[str, np.ndarray] | None = None
        if self.in_memory or (self.in_memory is None and self.manifest["bytes"] <= 512 << 20):
            shards = [self._shard(i) for i in range(len(self.manifest["shards"]))]
            # converted once to what get() returns (float32 values and features, int64 indices), so a batch is a
            # gather and nothing else
            self._whole = {name: self._tensor(name, np.concatenate([s[name] for s in shards])).numpy()
                           for name in self._arrays}
            self._maps = {}
        if self.count_reads:
            self.reads = np.zeros(len(self), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.manifest["dataset"]["num_items"])

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.manifest["teacher"]["fingerprint"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.manifest["dataset"]["fingerprint"])

    @property
    def num_views(self) -> int:
        return int(self.manifest["stored"]["views"]["num_views"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["stored"]["logits"]["num_classes"])

    @property
    def k(self) -> int:
        return int(self.manifest["stored"]["logits"]["k"])

    def check_matches(self, *, teacher: str | None = None, dataset: str | None = None) -> None:
        """Raise :class:`CacheError` naming both fingerprints if the run's teacher or dataset differs."""
        if teacher is not None and teacher != self.teacher_fingerprint:
            raise CacheError(f"teacher cache {str(self.path)!r} was built for another teacher: cache teacher "
                             f"fingerprint {self.teacher_fingerprint}, this run's teacher {teacher}")
        if dataset is not None and dataset != self.dataset_fingerprint:
            raise CacheError(f"teacher cache {str(self.path)!r} was built for another dataset: cache dataset "
                             f"fingerprint {self.dataset_fingerprint}, this run's dataset {dataset}")

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():  # a forked worker or another rank: map the files afresh
            self._maps, self._pid = {}, os.getpid()
        maps = self._maps.get(i)
        if maps is None:
            s = self.manifest["shards"][i]
            n = s["stop"] - s["start"]
            raw = np.memmap(self.path / s["file"], dtype=np.uint8, mode="r")  # type: ignore[arg-type]
            maps = {}
            for name, a in s["arrays"].items():
                arr = _Array(a["dtype"], tuple(a["shape"]), a["offset"])
                maps[name] = raw[arr.offset : arr.offset + arr.nbytes(n)].view(arr.np_dtype.newbyteorder("<"))
                maps[name] = maps[name].reshape(n, *arr.shape)
            self._maps[i] = maps
        return maps

    def get(self, index: Tensor | np.ndarray, view: Tensor | np.ndarray | None = None,
            names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The stored rows of items ``index`` (``[B]``), for views ``view`` (``[B]``; default view 0).

        Returns:
            ``{"values": [B, *positions, k], "indices": [B, *positions, k] (int64), "seeds": [B] (if stored),
            "feat.<module>": [B, ...], "out.<key>": [B, ...]}``; values and floating arrays as float32, integer
            outputs in their stored dtype.
        """
        idx = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"teacher cache has {n} items; index out of range: {idx[(idx < 0) | (idx >= n)][:5]}")
        v = (np.zeros_like(idx) if view is None
             else np.asarray(view.cpu() if isinstance(view, Tensor) else view, dtype=np.int64).reshape(-1))
        if v.size and (v.min() < 0 or v.max() >= self.num_views):
            raise IndexError(f"teacher cache has {self.num_views} views; got view {int(v.max())}")
        if self.reads is not None:
            np.add.at(self.reads, idx, 1)
        wanted = [a for a in self._arrays if names is None or a in names]
        if self._whole is not None:
            return {name: torch.from_numpy(self._whole[name][idx, v]) for name in wanted}
        size = self.manifest["shard_size"]
        shard_of = idx // size
        out = {name: np.empty((idx.size, *self._arrays[name].shape[1:]), dtype=self._arrays[name].np_dtype)
               for name in wanted}
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            maps = self._shard(int(s))
            local = idx[sel] - int(s) * size
            for name in wanted:
                out[name][sel] = maps[name][local, v[sel]]
        return {name: self._tensor(name, arr) for name, arr in out.items()}

    def _tensor(self, name: str, arr: np.ndarray) -> Tensor:
        dtype = self._arrays[name].dtype
        if dtype == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
        t = torch.from_numpy(arr)
        if name == "indices":
            return t.long()
        return t.float() if t.dtype in (torch.float16,) else t


# -- methods on a cached teacher ------------------------------------------------------------------------------------


def use_sparse_targets(method: Any, tail: str = "rest") -> Any:
    """``method`` with its forward-KL terms on the teacher's logits computed from the cached top-k directly.

    Each term ``kl_div(student logits, teacher.logits, temperature=T)`` (no transform, no other arguments)
    becomes ``sparse_kl_div(student logits, teacher.topk_values, teacher_indices=teacher.topk_indices, tail=tail,
    temperature=T)``: with ``tail="rest"`` the dropped classes form one bucket (which the dense reconstruction
    cannot express); with ``"renormalize"`` the value equals the dense one. Other terms are kept as they are and
    read the dense ``"logits"`` of :class:`mentor.teachers.Cached`.

    The chunked LM terms (:func:`mentor.lm.losses.chunked_loss` against ``"teacher.hidden"``, see
    :mod:`mentor.recipes.lm_kd`) are rewritten the same way and stay chunked: a plain ``kl_div`` one reads the
    top-k (``loss=sparse_kl_div``), any other divergence the dense ``"teacher.logits"`` rows, chunk by chunk; only
    the student's output layer remains a ``shared`` argument.
    """
    from dataclasses import replace

    from mentor import losses
    from mentor.lm.losses import chunked_loss
    from mentor.lm.weighting import uncertainty_weighted
    from mentor.method import Method

    if tail not in ("rest", "renormalize"):
        raise ValueError(f"tail must be 'rest' or 'renormalize', got {tail!r}")
    terms = []
    for term in method.terms:
        if term.loss is uncertainty_weighted:
            raise ValueError(f"term {term.name!r} weights tokens by the teacher's uncertainty (token_weighting), "
                             "which needs the teacher's full distribution; a top-k cache does not hold it: use the "
                             "teacher network, or token_weighting=None")
        if (term.loss is losses.kl_div and term.target == "teacher.logits" and term.transform is None
                and not term.extra and set(term.kwargs) <= {"temperature"}):
            term = replace(term, loss=losses.sparse_kl_div, target="teacher.topk_values",
                           extra={"teacher_indices": "teacher.topk_indices"}, kwargs={**term.kwargs, "tail": tail})
        elif (term.loss is chunked_loss and term.target == "teacher.hidden"
              and term.transform is None and not term.extra):
            shared = {k: v for k, v in term.shared.items() if k != "teacher_head"}
            if term.kwargs.get("loss") is losses.kl_div and set(term.kwargs) <= {"loss", "temperature", "chunk_size",
                                                                                  "vocab_size"}:
                term = replace(term, target="teacher.topk_values", extra={"teacher_indices": "teacher.topk_indices"},
                               shared=shared, kwargs={**term.kwargs, "loss": losses.sparse_kl_div, "tail": tail})
            else:
                term = replace(term, target="teacher.logits", shared=shared)
        terms.append(term)
    assert isinstance(method, Method)
    return replace(method, terms=tuple(terms))
