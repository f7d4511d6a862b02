"""Target transforms: small objects that turn teacher outputs into what a loss term compares against.

A transform is called as ``transform(tensor) -> tensor``. Transforms with state (a running centre, an adaptive
threshold) expose an explicit ``update(...)`` that the training loop calls after the optimiser step; nothing
changes state inside ``__call__``.

**Weighting** of unlabelled items (semi-supervised self-training: FixMatch and its successors) works on the
teacher's probabilities ``[B, C]`` of the weak view. ``weighting(probs)`` returns per-item weights ``[B]`` (float;
0/1 for thresholds, in ``[0, 1]`` for SoftMatch) and never changes state; :func:`pseudo_labels` (the arg-max) is
the hard target. ``weighting.update(probs, index)`` updates the statistics; under DDP the loop gathers ``probs``
(and ``index``) from every process first (``accelerator.gather``), so that every process holds the same
statistics. To follow the papers, the loop calls ``update`` with the batch and then ``weighting(probs)`` on it:
the thresholds of step ``t`` include batch ``t``. ``state_dict()`` holds tensors only (checkpointed as
safetensors). The unsupervised-weight ramp-up is :class:`mentor.schedules.RampUp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "HardLabel",
    "Softmax",
    "TopK",
    "Weighting",
    "pseudo_labels",
    "FixedThreshold",
    "FlexMatch",
    "FreeMatch",
    "SoftMatch",
    "DualThreshold",
    "DualSplit",
    "UniformAlignment",
]


@dataclass(frozen=True)
class HardLabel:
    """The teacher's arg-max class: logits ``[..., C]`` -> integer labels ``[...]``."""

    def __call__(self, logits: Tensor) -> Tensor:
        return logits.argmax(dim=-1)


@dataclass(frozen=True)
class Softmax:
    """Probabilities ``softmax(logits / temperature)`` in float32: ``[..., C] -> [..., C]``."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __call__(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest logits of each item and set the rest to ``-inf`` (their probability becomes 0)."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def __call__(self, logits: Tensor) -> Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# Weighting of unlabelled items: confidence thresholds and soft weights with explicit update
# ----------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Weighting(Protocol):
    """What the loop needs from a weighting: weights ``[B]`` from probabilities ``[B, C]``, an explicit
    ``update`` and a tensor-only state."""

    def __call__(self, probs: Tensor) -> Tensor: ...

    def update(self, probs: Tensor, index: Tensor | None = None) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None: ...


def pseudo_labels(probs: Tensor) -> Tensor:
    """The hard pseudo-label of each item: the arg-max class, int64 ``[B]`` from probabilities ``[B, C]``."""
    return probs.argmax(dim=-1)


def _as_probs(probs: Tensor, num_classes: int | None = None, name: str = "probs") -> Tensor:
    """Probabilities ``[B, C]`` checked, half precision upcast to float32."""
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a tensor [B, C] of probabilities, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{name} must have shape [B, C], got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating-point probabilities, got dtype {probs.dtype}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"{name} has {probs.shape[1]} classes, expected num_classes={num_classes}")
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _load_state(owner: str, have: dict[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checked copies of ``state`` with the keys, shapes and dtypes of ``have``."""
    if set(state) != set(have):
        raise ValueError(f"{owner}.load_state_dict: expected keys {sorted(have)}, got {sorted(state)}")
    out = {}
    for key, current in have.items():
        value = state[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(current.shape):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{owner}.load_state_dict: {key!r} must have shape {tuple(current.shape)}, got {shape}")
        out[key] = value.detach().to(dtype=current.dtype, device=current.device).clone()
    return out


def _mask_weights(keep: Tensor, probs: Tensor) -> Tensor:
    return keep.to(probs.dtype)


class _Stateless:
    """The update/state part of a weighting that keeps no state: ``update`` only checks its input, the state is
    empty (and loading a non-empty one is an error naming the class)."""

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        _as_probs(probs)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        _load_state(type(self).__name__, {}, state)


@dataclass(frozen=True)
class FixedThreshold(_Stateless):
    """Weight 1 where the teacher's confidence ``max_c p_c >= tau``, else 0 (FixMatch, Sohn et al. 2020,
    https://arxiv.org/abs/2001.07685). Stateless: ``update`` does nothing.

    Attributes:
        tau: The threshold in ``[0, 1]``.
    """

    tau: float = 0.95

    def __post_init__(self) -> None:
        _check_unit_interval("tau", self.tau)

    def __call__(self, probs: Tensor) -> Tensor:
        """Weights ``[B]`` from probabilities ``[B, C]``."""
        probs = _as_probs(probs)
        return _mask_weights(probs.amax(dim=-1) >= self.tau, probs)


class DualSplit(NamedTuple):
    """The two sets of :class:`DualThreshold`.

    Attributes:
        hard: bool ``[B]``: confidence ``>= high``: train on the hard pseudo-label.
        soft: bool ``[B]``: ``low <= `` confidence ``< high``: train on the soft target (the probabilities).
        labels: int64 ``[B]``: the arg-max pseudo-labels.
    """

    hard: Tensor
    soft: Tensor
    labels: Tensor


@dataclass(frozen=True)
class DualThreshold(_Stateless):
    """Two thresholds (HSSDA, Liu et al. 2023, https://arxiv.org/abs/2304.01464): items whose confidence is at
    least ``high`` get their hard pseudo-label, items between ``low`` and ``high`` a soft target, items below
    ``low`` nothing. ``weights(probs)`` is 1 for both kept sets; :meth:`split` tells them apart, so that one term
    uses ``mask=hard`` with :func:`pseudo_labels` and another ``mask=soft`` with the probabilities. Stateless.

    Attributes:
        high: Upper threshold.
        low: Lower threshold, ``0 <= low <= high <= 1``.
    """

    high: float = 0.95
    low: float = 0.7

    def __post_init__(self) -> None:
        _check_unit_interval("high", self.high)
        _check_unit_interval("low", self.low)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")

    def split(self, probs: Tensor) -> DualSplit:
        """The hard set, the soft set and the pseudo-labels of probabilities ``[B, C]``."""
        conf, labels = _as_probs(probs).max(dim=-1)
        hard = conf >= self.high
        return DualSplit(hard, (conf >= self.low) & ~hard, labels)

    def __call__(self, probs: Tensor) -> Tensor:
        """Weights ``[B]``: 1 where the confidence is at least ``low``."""
        probs = _as_probs(probs)
        return _mask_weights(probs.amax(dim=-1) >= self.low, probs)


_MAPPINGS = ("convex", "linear", "concave")


class FlexMatch:
    """Class-adaptive thresholds by curriculum pseudo-labelling (FlexMatch, Zhang et al. 2021,
    https://arxiv.org/abs/2110.08263).

    The object remembers, for each unlabelled item ``n`` of an index space ``0..N-1``, the class of its last
    prediction whose confidence exceeded ``tau`` (``-1``: none yet). With ``sigma(c)`` the number of items
    remembered as class ``c``, the learning effect is

        ``beta(c) = sigma(c) / max(max_c' sigma(c'), N - sum_c' sigma(c'))``   (``warmup=True``)
        ``beta(c) = sigma(c) / max_c' sigma(c')``                           (``warmup=False``; 0 while all are 0)

    and the threshold of class ``c`` is ``T(c) = M(beta(c)) * tau`` with ``M(x) = x / (2 - x)`` (``"convex"``, the
    paper's default), ``x`` (``"linear"``) or ``log2(1 + x)`` (``"concave"``). An item's weight is 1 where its
    confidence ``>= T(its arg-max class)``. At the start every ``beta`` is 0, so every threshold is 0: FlexMatch
    starts by using all pseudo-labels and raises the thresholds as classes are learnt.

    USB's implementation keeps the previous thresholds when the most common memory value covers all ``N`` items;
    here the formula above is applied as written.

    Args:
        tau: Upper threshold in ``[0, 1]``.
        num_classes: Number of classes ``C``.
        num_items: Size ``N`` of the index space of the unlabelled items that ``update`` receives.
        warmup: Threshold warm-up (count the items not yet confidently predicted).
        mapping: ``"convex"``, ``"linear"`` or ``"concave"``.
    """

    def __init__(
        self,
        tau: float = 0.95,
        *,
        num_classes: int,
        num_items: int,
        warmup: bool = True,
        mapping: str = "convex",
    ) -> None:
        self.tau = _check_unit_interval("tau", tau)
        self.num_classes = _check_count("num_classes", num_classes)
        self.num_items = _check_count("num_items", num_items)
        if mapping not in _MAPPINGS:
            raise ValueError(f"mapping must be one of {_MAPPINGS}, got {mapping!r}")
        self.warmup = bool(warmup)
        self.mapping = mapping
        self.memory = torch.full((num_items,), -1, dtype=torch.int64)
        self._thresholds = self._compute_thresholds()

    def _map(self, beta: Tensor) -> Tensor:
        if self.mapping == "convex":
            return beta / (2.0 - beta)
        if self.mapping == "concave":
            return torch.log1p(beta) / math.log(2.0)
        return beta

    def learning_effect(self) -> Tensor:
        """``beta`` ``[C]`` (float32) from the current memory."""
        counts = torch.bincount(self.memory[self.memory >= 0], minlength=self.num_classes).to(torch.float32)
        denom = counts.max()
        if self.warmup:
            denom = torch.maximum(denom, self.num_items - counts.sum())
        return counts / denom if float(denom) > 0 else torch.zeros_like(counts)

    def _compute_thresholds(self) -> Tensor:
        return self._map(self.learning_effect()) * self.tau

    def thresholds(self) -> Tensor:
        """The class thresholds ``T`` ``[C]`` (float32)."""
        return self._thresholds.clone()

    def __call__(self, probs: Tensor) -> Tensor:
        """Weights ``[B]`` from probabilities ``[B, C]``."""
        probs = _as_probs(probs, self.num_classes)
        conf, labels = probs.max(dim=-1)
        thresholds = self._thresholds.to(device=probs.device, dtype=probs.dtype)
        return _mask_weights(conf >= thresholds[labels], probs)

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        """Remember the class of each item whose confidence exceeds ``tau``; recompute the thresholds.

        Args:
            probs: ``[B, C]``, gathered from every process under DDP.
            index: int ``[B]`` in ``0..num_items-1`` (required), gathered like ``probs``; the indices in one call
                should be distinct (with duplicates, which of them is remembered is unspecified).
        """
        probs = _as_probs(probs, self.num_classes)
        if index is None:
            raise ValueError("FlexMatch.update needs index: the item indices [B] of probs")
        if index.dim() != 1 or index.shape[0] != probs.shape[0] or index.is_floating_point():
            raise ValueError(
                f"index must be an integer tensor [B] matching probs {tuple(probs.shape)}, got "
                f"{tuple(index.shape)} of dtype {index.dtype}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_items):
            raise ValueError(
                f"index values must be in 0..{self.num_items - 1} (num_items={self.num_items}), got "
                f"{int(index.min())}..{int(index.max())}"
            )
        if self.memory.device != probs.device:
            self.to(probs.device)
        conf, labels = probs.max(dim=-1)
        selected = conf > self.tau
        self.memory[index.to(probs.device).long()[selected]] = labels[selected]
        self._thresholds = self._compute_thresholds()

    def state_dict(self) -> dict[str, Tensor]:
        return {"memory": self.memory.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        loaded = _load_state("FlexMatch", self.state_dict(), state)
        memory = loaded["memory"]
        if memory.numel() and (int(memory.min()) < -1 or int(memory.max()) >= self.num_classes):
            raise ValueError(f"FlexMatch.load_state_dict: 'memory' values must be in -1..{self.num_classes - 1}")
        self.memory = memory
        self._thresholds = self._compute_thresholds()

    def to(self, device: torch.device | str) -> FlexMatch:
        self.memory = self.memory.to(device)
        self._thresholds = self._thresholds.to(device)
        return self


def _check_momentum(momentum: float) -> float:
    return _check_unit_interval("momentum", momentum)


class FreeMatch:
    """Self-adaptive thresholds (FreeMatch, Wang et al. 2023, https://arxiv.org/abs/2205.07246).

    With momentum ``m`` and the batch's confidences ``q_b = max_c p_bc``, ``update`` sets

        global threshold ``tau = m * tau + (1 - m) * mean_b q_b``
        class probabilities ``p~(c) = m * p~(c) + (1 - m) * mean_b p_bc``
        label histogram ``h~(c) = m * h~(c) + (1 - m) * (share of the batch whose arg-max is c)``

    all starting at ``1 / C``. The threshold of class ``c`` is ``tau * p~(c) / max_c' p~(c')``; an item's weight is 1
    where its confidence ``>=`` the threshold of its arg-max class. ``p~`` and ``h~`` also feed the self-adaptive
    fairness loss (:func:`mentor.losses.freematch_fairness`).

    Args:
        num_classes: Number of classes ``C``.
        momentum: EMA momentum ``m`` in ``[0, 1]``.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        self.num_classes = _check_count("num_classes", num_classes)
        self.momentum = _check_momentum(momentum)
        self.global_threshold = torch.tensor(1.0 / num_classes)
        self.class_probs = torch.full((num_classes,), 1.0 / num_classes)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes)

    def thresholds(self) -> Tensor:
        """The class thresholds ``[C]`` (float32)."""
        return self.global_threshold * self.class_probs / self.class_probs.max()

    def __call__(self, probs: Tensor) -> Tensor:
        """Weights ``[B]`` from probabilities ``[B, C]``."""
        probs = _as_probs(probs, self.num_classes)
        conf, labels = probs.max(dim=-1)
        thresholds = self.thresholds().to(device=probs.device, dtype=probs.dtype)
        return _mask_weights(conf >= thresholds[labels], probs)

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        """One EMA step with the batch ``probs`` ``[B, C]`` (gathered from every process under DDP); an empty
        batch changes nothing. ``index`` is not used."""
        probs = _as_probs(probs, self.num_classes)
        if probs.shape[0] == 0:
            return
        if self.class_probs.device != probs.device:
            self.to(probs.device)
        m = self.momentum
        p = probs.float()
        conf, labels = p.max(dim=-1)
        hist = torch.bincount(labels, minlength=self.num_classes).float() / labels.shape[0]
        self.global_threshold = m * self.global_threshold + (1.0 - m) * conf.mean()
        self.class_probs = m * self.class_probs + (1.0 - m) * p.mean(dim=0)
        self.label_hist = m * self.label_hist + (1.0 - m) * hist

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "global_threshold": self.global_threshold.clone(),
            "class_probs": self.class_probs.clone(),
            "label_hist": self.label_hist.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        loaded = _load_state("FreeMatch", self.state_dict(), state)
        self.global_threshold = loaded["global_threshold"]
        self.class_probs = loaded["class_probs"]
        self.label_hist = loaded["label_hist"]

    def to(self, device: torch.device | str) -> FreeMatch:
        self.global_threshold = self.global_threshold.to(device)
        self.class_probs = self.class_probs.to(device)
        self.label_hist = self.label_hist.to(device)
        return self


class SoftMatch:
    """Truncated Gaussian weights (SoftMatch, Chen et al. 2023, https://arxiv.org/abs/2301.10921).

    ``update`` keeps EMAs of the mean and the (unbiased) variance of the batch's confidences ``q_b = max_c p_bc``:
    ``mu = m * mu + (1 - m) * mean_b q_b``, ``var = m * var + (1 - m) * var_b q_b`` (starting at ``1 / C`` and 1).
    An item's weight is

        ``exp(-(q - mu)^2 / (2 var / n_sigma^2))`` where ``q < mu``, else 1,

    i.e. a Gaussian of standard deviation ``sqrt(var) / n_sigma`` truncated at its mean (USB's parametrisation,
    ``n_sigma=2``). SoftMatch also aligns the probabilities to a uniform class distribution first: see
    :class:`UniformAlignment`.

    Args:
        num_classes: Number of classes ``C``.
        momentum: EMA momentum ``m`` in ``[0, 1]``.
        n_sigma: Width divisor (> 0).
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, n_sigma: float = 2.0) -> None:
        self.num_classes = _check_count("num_classes", num_classes)
        self.momentum = _check_momentum(momentum)
        if isinstance(n_sigma, bool) or not isinstance(n_sigma, (int, float)) or not (
            n_sigma > 0 and math.isfinite(n_sigma)
        ):
            raise ValueError(f"n_sigma must be a finite number > 0, got {n_sigma!r}")
        self.n_sigma = float(n_sigma)
        self.mean = torch.tensor(1.0 / num_classes)
        self.var = torch.tensor(1.0)

    def __call__(self, probs: Tensor) -> Tensor:
        """Weights in ``[0, 1]``, shape ``[B]``, from probabilities ``[B, C]``."""
        probs = _as_probs(probs, self.num_classes)
        conf = probs.amax(dim=-1)
        mean = self.mean.to(device=probs.device, dtype=probs.dtype)
        var = self.var.to(device=probs.device, dtype=probs.dtype)
        below = (conf - mean).clamp(max=0.0)
        return torch.exp(-(below**2) * (self.n_sigma**2) / (2.0 * var))

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        """One EMA step with the batch ``probs`` ``[B, C]`` (gathered from every process under DDP; at least 2
        items for the unbiased variance; an empty batch changes nothing). ``index`` is not used."""
        probs = _as_probs(probs, self.num_classes)
        if probs.shape[0] == 0:
            return
        if probs.shape[0] < 2:
            raise ValueError("SoftMatch.update needs at least 2 items (the unbiased variance of 1 item is undefined)")
        if self.mean.device != probs.device:
            self.to(probs.device)
        m = self.momentum
        conf = probs.float().amax(dim=-1)
        self.mean = m * self.mean + (1.0 - m) * conf.mean()
        self.var = m * self.var + (1.0 - m) * conf.var(correction=1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        loaded = _load_state("SoftMatch", self.state_dict(), state)
        if float(loaded["var"]) <= 0:
            raise ValueError(f"SoftMatch.load_state_dict: 'var' must be > 0, got {float(loaded['var'])}")
        self.mean, self.var = loaded["mean"], loaded["var"]

    def to(self, device: torch.device | str) -> SoftMatch:
        self.mean = self.mean.to(device)
        self.var = self.var.to(device)
        return self


class UniformAlignment:
    """Uniform distribution alignment (SoftMatch, https://arxiv.org/abs/2301.10921; after ReMixMatch's
    distribution alignment): ``p' = normalise(p / p~)`` with ``p~`` the EMA of the mean prediction,
    ``p~ = m * p~ + (1 - m) * mean_b p_b`` (from ``1 / C``), which pushes the average prediction towards uniform.
    A target transform: ``__call__(probs) -> probs [B, C]``; ``update`` is explicit (call it before ``__call__``
    on the same batch to follow the paper).

    Args:
        num_classes: Number of classes ``C``.
        momentum: EMA momentum ``m`` in ``[0, 1]``.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        self.num_classes = _check_count("num_classes", num_classes)
        self.momentum = _check_momentum(momentum)
        self.class_probs = torch.full((num_classes,), 1.0 / num_classes)

    def __call__(self, probs: Tensor) -> Tensor:
        probs = _as_probs(probs, self.num_classes)
        aligned = probs / self.class_probs.to(device=probs.device, dtype=probs.dtype).clamp(min=1e-12)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        probs = _as_probs(probs, self.num_classes)
        if probs.shape[0] == 0:
            return
        if self.class_probs.device != probs.device:
            self.to(probs.device)
        m = self.momentum
        self.class_probs = m * self.class_probs + (1.0 - m) * probs.float().mean(dim=0)

    def state_dict(self) -> dict[str, Tensor]:
        return {"class_probs": self.class_probs.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.class_probs = _load_state("UniformAlignment", self.state_dict(), state)["class_probs"]

    def to(self, device: torch.device | str) -> UniformAlignment:
        self.class_probs = self.class_probs.to(device)
        return self
