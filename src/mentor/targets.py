"""Target transforms: small objects that turn teacher outputs into what a loss term compares against.

A transform is called as ``transform(tensor) -> tensor``. Transforms with state (a running centre, an adaptive
threshold) expose an explicit ``update(...)`` that the training loop calls after the optimiser step; nothing
changes state inside ``__call__``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HardLabel", "Softmax", "TopK"]


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
