"""Schedules: ``f(step) -> float``.

A schedule is any callable from the global optimisation step (0-based) to a float. The classes here are small,
immutable and comparable, so a :class:`mentor.method.Method` that holds them stays plain data. Loss weights,
EMA decays and confidence thresholds all take a schedule; a bare number means a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "RampUp", "Step", "Product", "EMAWarmup", "as_schedule",
           "from_spec"]


@runtime_checkable
class Schedule(Protocol):
    """Anything that maps a step to a float."""

    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class Constant:
    """``value`` at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Linear:
    """Linear from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"Linear schedule needs steps > 0, got {self.steps}")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class Cosine:
    """Half-cosine from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"Cosine schedule needs steps > 0, got {self.steps}")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class RampUp:
    """Sigmoid-shaped ramp ``value * exp(-5 (1 - t)^2)`` over ``steps`` steps (Laine & Aila 2017,
    https://arxiv.org/abs/1610.02242), then ``value``."""

    value: float
    steps: int

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"RampUp schedule needs steps >= 0, got {self.steps}")

    def __call__(self, step: int) -> float:
        if self.steps == 0 or step >= self.steps:
            return float(self.value)
        t = max(step, 0) / self.steps
        return float(self.value) * math.exp(-5.0 * (1.0 - t) ** 2)


@dataclass(frozen=True)
class EMAWarmup:
    """Mean Teacher's EMA decay warm-up: ``min(1 - 1 / (step + 2), value)`` (Tarvainen & Valpola 2017,
    https://arxiv.org/abs/1703.01780, whose ``update_ema_variables`` uses ``min(1 - 1 / (global_step + 1), alpha)``
    with ``global_step`` counted from 1 after the first optimiser step; mentor's ``step`` counts from 0). The
    average starts as a true mean of the first weights (decay 0.5, 0.667, 0.75, ...) and settles at ``value``.
    """

    value: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"EMAWarmup value must be in [0, 1], got {self.value}")

    def __call__(self, step: int) -> float:
        return min(1.0 - 1.0 / (max(step, 0) + 2), float(self.value))


@dataclass(frozen=True)
class Step:
    """Piecewise constant: ``values[i]`` from ``boundaries[i-1]`` (inclusive) to ``boundaries[i]``."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"Step schedule needs len(values) == len(boundaries) + 1, got {len(self.values)} values and "
                f"{len(self.boundaries)} boundaries"
            )
        if any(b >= a for a, b in zip(self.boundaries[1:], self.boundaries, strict=False)):
            raise ValueError(f"Step schedule boundaries must be increasing, got {self.boundaries}")

    def __call__(self, step: int) -> float:
        for boundary, value in zip(self.boundaries, self.values, strict=False):
            if step < boundary:
                return float(value)
        return float(self.values[-1])


def as_schedule(value: float | Schedule) -> Schedule:
    """A number becomes :class:`Constant`; a schedule is returned as is."""
    if isinstance(value, bool):
        raise TypeError(f"expected a number or a schedule, got {value!r}")
    if isinstance(value, (int, float)):
        return Constant(float(value))
    if callable(value):
        return value
    raise TypeError(f"expected a number or a schedule (callable step -> float), got {value!r}")


@dataclass(frozen=True)
class Product:
    """``a(step) * b(step)``: for example a recipe's own term weight times the weight the config gives the recipe."""

    a: Schedule
    b: Schedule

    def __call__(self, step: int) -> float:
        return float(self.a(step)) * float(self.b(step))


_KINDS = {"constant": Constant, "linear": Linear, "cosine": Cosine, "rampup": RampUp, "step": Step,
          "ema_warmup": EMAWarmup}


def from_spec(spec: object) -> Schedule:
    """A schedule from a config value: a number (constant), or a one-key mapping ``{kind: {arguments}}`` with kind
    one of ``constant``, ``linear``, ``cosine``, ``rampup``, ``step``, ``ema_warmup``
    (e.g. ``{linear: {start: 0, end: 1,
    steps: 1000}}``)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(float(spec))
    if isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        if kind not in _KINDS:
            raise ValueError(f"unknown schedule {kind!r}: expected one of {', '.join(_KINDS)}")
        if not isinstance(args, dict):
            raise ValueError(f"schedule {kind!r} needs a mapping of arguments, got {args!r}")
        if kind == "step":
            args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        try:
            return _KINDS[kind](**args)  # type: ignore[no-any-return]
        except TypeError as err:
            raise ValueError(f"schedule {kind!r}: {err}") from None
    raise ValueError(f"a schedule is a number or {{kind: {{arguments}}}}, got {spec!r}")

