"""Teachers: where targets come from.

Every teacher has ``targets(inputs) -> dict[str, Tensor]`` (at least ``"logits"``), computed without gradients.
A teacher with state (:class:`EMA`) has an explicit ``update(student, step)`` that the loop calls after each
optimiser step, and ``state_dict`` / ``load_state_dict`` for checkpoints. A teacher is never put in the optimiser
and never wrapped for data parallelism: the loop hands only the student to Accelerate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable as CallableT
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mentor.schedules import Schedule, as_schedule

__all__ = ["Teacher", "Frozen", "Self", "Ensemble", "EMA", "Callable", "as_outputs"]

Outputs = dict[str, Tensor]


def as_outputs(value: Tensor | Mapping[str, Tensor]) -> Outputs:
    """A model's output as a dict: a bare tensor becomes ``{"logits": tensor}``."""
    if isinstance(value, Tensor):
        return {"logits": value}
    if isinstance(value, Mapping) and "logits" in value:
        return dict(value)
    if hasattr(value, "logits"):  # Hugging Face model outputs
        return {"logits": value.logits}
    raise TypeError(f"expected a tensor or a mapping with 'logits', got {type(value).__name__}")


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
    """

    def __init__(self, model: nn.Module, input_transform: CallableT[[Tensor], Tensor] | None = None) -> None:
        self.model = _freeze(model)
        self.input_transform = input_transform

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        if self.model.training:  # something called .train() on it: a frozen teacher stays in eval mode
            self.model.eval()
        x = self.input_transform(inputs) if self.input_transform is not None else inputs
        return as_outputs(self.model(x))

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


class Ensemble:
    """Several teachers combined: the weighted mean of their probabilities (``combine="probs"``, returned as log
    probabilities, which are valid logits) or of their logits (``combine="logits"``).

    Args:
        teachers: The members.
        weights: One non-negative weight per member (normalised to sum 1); equal weights by default.
        combine: ``"probs"`` or ``"logits"``.
    """

    def __init__(
        self, teachers: Sequence[Teacher], weights: Sequence[float] | None = None, combine: str = "probs"
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
        self.teachers = list(teachers)
        self.weights = [x / sum(w) for x in w]
        self.combine = combine

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Outputs:
        logits = [t.targets(inputs)["logits"].float() for t in self.teachers]
        if self.combine == "logits":
            return {"logits": sum(w * z for w, z in zip(self.weights, logits, strict=True))}  # type: ignore[dict-item]
        log_probs = torch.stack(
            [
                torch.log_softmax(z, dim=-1) + (math.log(w) if w > 0 else float("-inf"))
                for w, z in zip(self.weights, logits, strict=True)
            ]
        )
        return {"logits": torch.logsumexp(log_probs, dim=0)}

    def to(self, device: torch.device | str) -> Ensemble:
        for t in self.teachers:
            t.to(device)
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
