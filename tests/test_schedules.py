"""Tests of mentor.schedules against values worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest

from mentor.schedules import Constant, Cosine, Linear, RampUp, Schedule, Step, as_schedule


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Constant
# ----------------------------------------------------------------------------------------------------------------


def test_constant() -> None:
    c = Constant(2.5)
    assert [c(s) for s in (0, 1, 17, 10**9)] == [2.5, 2.5, 2.5, 2.5]
    out = Constant(3)(0)
    assert out == 3.0 and type(out) is float


# ----------------------------------------------------------------------------------------------------------------
# Linear: start + (end - start) * min(max(step, 0), steps) / steps
# ----------------------------------------------------------------------------------------------------------------


def test_linear_hand_values() -> None:
    # from 1 to 3 over 4 steps: +0.5 per step, then 3
    sched = Linear(1.0, 3.0, 4)
    assert [sched(s) for s in (0, 1, 2, 3, 4, 5, 100)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0]
    assert sched(-5) == 1.0  # before the start: clamped to start


def test_linear_decreasing() -> None:
    sched = Linear(1.0, 0.0, 10)
    assert sched(5) == approx(0.5)
    assert sched(7) == approx(0.3)
    assert sched(10) == 0.0
    assert sched(11) == 0.0


def test_linear_needs_positive_steps() -> None:
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"Linear schedule needs steps > 0, got {bad}"):
            Linear(0.0, 1.0, bad)


# ----------------------------------------------------------------------------------------------------------------
# Cosine: end + (start - end) * (1 + cos(pi * t)) / 2
# ----------------------------------------------------------------------------------------------------------------


def test_cosine_hand_values() -> None:
    # from 1 to 0 over 4 steps:
    #   step 1: (1 + cos(pi/4)) / 2  = (1 + 0.70710678) / 2 = 0.85355339
    #   step 2: (1 + cos(pi/2)) / 2  = 0.5
    #   step 3: (1 + cos(3pi/4)) / 2 = (1 - 0.70710678) / 2 = 0.14644661
    sched = Cosine(1.0, 0.0, 4)
    assert sched(0) == approx(1.0)
    assert sched(1) == pytest.approx(0.85355339, abs=1e-8)
    assert sched(2) == approx(0.5)
    assert sched(3) == pytest.approx(0.14644661, abs=1e-8)
    assert sched(4) == approx(0.0)
    assert sched(40) == approx(0.0)
    assert sched(-2) == approx(1.0)


def test_cosine_increasing_like_a_teacher_momentum() -> None:
    # DINO-style teacher momentum 0.996 -> 1 over 100 steps; half way: 1 - 0.004 / 2 = 0.998
    sched = Cosine(0.996, 1.0, 100)
    assert sched(0) == approx(0.996)
    assert sched(50) == approx(0.998)
    assert sched(100) == approx(1.0)
    values = [sched(s) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_cosine_needs_positive_steps() -> None:
    with pytest.raises(ValueError, match=r"Cosine schedule needs steps > 0, got 0"):
        Cosine(1.0, 0.0, 0)


# ----------------------------------------------------------------------------------------------------------------
# RampUp: value * exp(-5 (1 - t)^2), t = step / steps, then value
# ----------------------------------------------------------------------------------------------------------------


def test_ramp_up_hand_values() -> None:
    sched = RampUp(2.0, 10)
    assert sched(0) == approx(2.0 * math.exp(-5.0))
    assert sched(0) == pytest.approx(0.0134758940, abs=1e-10)  # 2 * e^-5
    assert sched(5) == pytest.approx(0.5730095937, abs=1e-10)  # 2 * e^(-5 * 0.25) = 2 * e^-1.25
    assert sched(9) == pytest.approx(1.9024588490, abs=1e-10)  # 2 * e^(-5 * 0.01) = 2 * e^-0.05
    assert sched(10) == 2.0
    assert sched(1000) == 2.0
    assert sched(-4) == approx(2.0 * math.exp(-5.0))  # before the start: t clamped to 0
    values = [sched(s) for s in range(11)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_ramp_up_zero_steps_is_constant() -> None:
    sched = RampUp(3.0, 0)
    assert [sched(s) for s in (0, 1, 50)] == [3.0, 3.0, 3.0]


def test_ramp_up_rejects_negative_steps() -> None:
    with pytest.raises(ValueError, match=r"RampUp schedule needs steps >= 0, got -1"):
        RampUp(1.0, -1)


# ----------------------------------------------------------------------------------------------------------------
# Step: values[i] from boundaries[i - 1] (inclusive) to boundaries[i]
# ----------------------------------------------------------------------------------------------------------------


def test_step_hand_values() -> None:
    sched = Step((10, 20), (1.0, 0.1, 0.01))
    steps = (0, 9, 10, 19, 20, 21, 10**6)
    assert [sched(s) for s in steps] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert sched(-1) == 1.0


def test_step_without_boundaries_is_constant() -> None:
    sched = Step((), (5.0,))
    assert [sched(s) for s in (0, 100)] == [5.0, 5.0]


def test_step_returns_floats() -> None:
    out = Step((2,), (1, 2))(3)
    assert out == 2.0 and type(out) is float


def test_step_errors() -> None:
    with pytest.raises(ValueError, match=r"len\(values\) == len\(boundaries\) \+ 1, got 2 values and 2 boundaries"):
        Step((10, 20), (1.0, 0.1))
    with pytest.raises(ValueError, match=r"boundaries must be increasing, got \(20, 10\)"):
        Step((20, 10), (1.0, 0.1, 0.01))


# ----------------------------------------------------------------------------------------------------------------
# as_schedule and the Schedule protocol
# ----------------------------------------------------------------------------------------------------------------


def test_as_schedule_numbers_become_constants() -> None:
    for number in (0.5, 3, 0):
        sched = as_schedule(number)
        assert sched == Constant(float(number))
        assert sched(0) == float(number) and sched(12345) == float(number)
        assert type(sched(7)) is float


def test_as_schedule_returns_schedules_and_callables_as_is() -> None:
    lin = Linear(0.0, 1.0, 10)
    assert as_schedule(lin) is lin

    def halve(step: int) -> float:
        return step / 2

    assert as_schedule(halve) is halve
    assert as_schedule(halve)(6) == 3.0


def test_as_schedule_errors() -> None:
    for bad in (True, False):
        with pytest.raises(TypeError, match=rf"expected a number or a schedule, got {bad}"):
            as_schedule(bad)
    for bad in ("0.5", None, [1.0]):
        with pytest.raises(TypeError, match="expected a number or a schedule"):
            as_schedule(bad)  # type: ignore[arg-type]


def test_schedules_are_plain_data() -> None:
    # immutable, comparable and hashable, so a Method holding them stays plain data
    assert Linear(0.0, 1.0, 10) == Linear(0.0, 1.0, 10)
    assert Linear(0.0, 1.0, 10) != Linear(0.0, 1.0, 11)
    assert Cosine(1.0, 0.0, 5) == Cosine(1.0, 0.0, 5)
    assert RampUp(1.0, 5) == RampUp(1.0, 5)
    assert Step((1,), (1.0, 2.0)) == Step((1,), (1.0, 2.0))
    assert len({Constant(1.0), Constant(1.0), Linear(0.0, 1.0, 3)}) == 2
    with pytest.raises(AttributeError):
        Linear(0.0, 1.0, 10).steps = 3  # type: ignore[misc]
    for sched in (Constant(1.0), Linear(0.0, 1.0, 2), Cosine(0.0, 1.0, 2), RampUp(1.0, 2), Step((), (1.0,))):
        assert isinstance(sched, Schedule)


def test_step_equal_boundaries_are_rejected() -> None:
    # With equal boundaries the value between them could never be reached.
    with pytest.raises(ValueError, match=r"boundaries must be increasing, got \(10, 10\)"):
        Step((10, 10), (1.0, 0.1, 0.01))
