"""Tests of mentor.losses against float64 numpy references written from the definitions in the docstrings.

The references below never call torch.nn.functional; torch.nn.functional.kl_div / cross_entropy appear only as a
second, separate cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mentor import losses

# ----------------------------------------------------------------------------------------------------------------
# float64 numpy references, from the mathematical definitions
# ----------------------------------------------------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis with 0 * log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def np_reduce(per_item: np.ndarray, mask: np.ndarray | None = None, num_items: float | None = None) -> float:
    keep = np.ones(per_item.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    total = float(per_item[keep].sum()) if keep.any() else 0.0
    n = max(int(keep.sum()), 1) if num_items is None else float(num_items)
    return total / n


def ref_kl_div(s, t, temperature=1.0, teacher_temperature=None, reverse=False, mask=None, num_items=None):
    t_t = temperature if teacher_temperature is None else teacher_temperature
    p_s = np_softmax(s / temperature)
    p_t = np_softmax(t / t_t)
    per_item = np_kl(p_s, p_t) if reverse else np_kl(p_t, p_s)
    return temperature**2 * np_reduce(per_item, mask, num_items)


def ref_jsd(s, t, beta=0.5, temperature=1.0, mask=None, num_items=None):
    p_s = np_softmax(s / temperature)
    p_t = np_softmax(t / temperature)
    m = beta * p_t + (1.0 - beta) * p_s
    per_item = beta * np_kl(p_t, m) + (1.0 - beta) * np_kl(p_s, m)
    return temperature**2 * np_reduce(per_item, mask, num_items)


def ref_skew_kl(s, t, alpha=0.1, reverse=False, temperature=1.0, mask=None, num_items=None):
    p_s = np_softmax(s / temperature)
    p_t = np_softmax(t / temperature)
    p, q = (p_s, p_t) if reverse else (p_t, p_s)
    per_item = np_kl(p, alpha * p + (1.0 - alpha) * q)
    return temperature**2 * np_reduce(per_item, mask, num_items)


def ref_tvd(s, t, temperature=1.0, mask=None, num_items=None):
    p_s = np_softmax(s / temperature)
    p_t = np_softmax(t / temperature)
    per_item = 0.5 * np.abs(p_t - p_s).sum(axis=-1)
    return temperature**2 * np_reduce(per_item, mask, num_items)


def ref_soft_ce(s, q, temperature=1.0, mask=None, num_items=None):
    p_s = np_softmax(s / temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_item = -np.where(q != 0, q * np.log(p_s), 0.0).sum(axis=-1)
    return temperature**2 * np_reduce(per_item, mask, num_items)


def ref_cross_entropy(s, y, label_smoothing=0.0, ignore_index=-100, mask=None, num_items=None):
    num_classes = s.shape[-1]
    y = np.asarray(y)
    labelled = (y != ignore_index) & (y >= 0)
    keep = labelled if mask is None else labelled & np.asarray(mask, dtype=bool)
    onehot = np.zeros(s.shape, dtype=np.float64)
    idx = np.where(labelled, y, 0)
    np.put_along_axis(onehot, idx[..., None], 1.0, axis=-1)
    target = (1.0 - label_smoothing) * onehot + label_smoothing / num_classes
    per_item = -(target * np.log(np_softmax(s))).sum(axis=-1)
    return np_reduce(per_item, keep, num_items)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def make_logits(*shape: int, seed: int = 0, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_mask(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(*shape, generator=g) < 0.6
    mask.view(-1)[0] = True  # at least one kept item
    mask.view(-1)[-1] = False  # at least one dropped item
    return mask


def assert_matches(actual: torch.Tensor, expected: float, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert actual.dim() == 0, f"expected a scalar, got shape {tuple(actual.shape)}"
    value = float(actual.detach())
    assert math.isclose(value, float(expected), rel_tol=rtol, abs_tol=atol), (value, expected)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


# Every loss over a pair of logit tensors: (name, torch call, reference call). Both take (s, t, **common) where
# common holds temperature / mask / num_items.
PairLoss = tuple[str, Callable[..., torch.Tensor], Callable[..., float]]

PAIR_LOSSES: list[PairLoss] = [
    ("kl_forward", lambda s, t, **kw: losses.kl_div(s, t, **kw), lambda s, t, **kw: ref_kl_div(s, t, **kw)),
    (
        "kl_reverse",
        lambda s, t, **kw: losses.kl_div(s, t, reverse=True, **kw),
        lambda s, t, **kw: ref_kl_div(s, t, reverse=True, **kw),
    ),
    (
        "kl_teacher_temperature",
        lambda s, t, **kw: losses.kl_div(s, t, teacher_temperature=0.7, **kw),
        lambda s, t, **kw: ref_kl_div(s, t, teacher_temperature=0.7, **kw),
    ),
    (
        "jsd_0.1",
        lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.1, **kw),
        lambda s, t, **kw: ref_jsd(s, t, beta=0.1, **kw),
    ),
    (
        "jsd_0.5",
        lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.5, **kw),
        lambda s, t, **kw: ref_jsd(s, t, beta=0.5, **kw),
    ),
    (
        "jsd_0.9",
        lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.9, **kw),
        lambda s, t, **kw: ref_jsd(s, t, beta=0.9, **kw),
    ),
    (
        "skew_forward_0.1",
        lambda s, t, **kw: losses.skew_kl(s, t, alpha=0.1, **kw),
        lambda s, t, **kw: ref_skew_kl(s, t, alpha=0.1, **kw),
    ),
    (
        "skew_reverse_0.3",
        lambda s, t, **kw: losses.skew_kl(s, t, alpha=0.3, reverse=True, **kw),
        lambda s, t, **kw: ref_skew_kl(s, t, alpha=0.3, reverse=True, **kw),
    ),
    ("tvd", lambda s, t, **kw: losses.tvd(s, t, **kw), lambda s, t, **kw: ref_tvd(s, t, **kw)),
    (
        "soft_ce",
        lambda s, t, **kw: losses.soft_cross_entropy(s, torch.softmax(t, dim=-1), **kw),
        lambda s, t, **kw: ref_soft_ce(s, np_softmax(t), **kw),
    ),
]
PAIR_IDS = [name for name, _, _ in PAIR_LOSSES]
# Losses that are a divergence: zero exactly when the two distributions are equal.
DIVERGENCES = [x for x in PAIR_LOSSES if x[0] != "soft_ce" and x[0] != "kl_teacher_temperature"]


# ----------------------------------------------------------------------------------------------------------------
# reduce_items
# ----------------------------------------------------------------------------------------------------------------


def test_reduce_items_mean_by_default() -> None:
    per_item = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert_matches(losses.reduce_items(per_item), 3.0)


def test_reduce_items_mask_keeps_true_items() -> None:
    per_item = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    assert_matches(losses.reduce_items(per_item, mask), (1.0 + 3.0) / 2)


def test_reduce_items_num_items_overrides_count() -> None:
    per_item = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    assert_matches(losses.reduce_items(per_item, num_items=8), 12.0 / 8)
    assert_matches(losses.reduce_items(per_item, mask, num_items=10), 4.0 / 10)
    assert_matches(losses.reduce_items(per_item, mask, num_items=2.5), 4.0 / 2.5)
    assert_matches(losses.reduce_items(per_item, mask, num_items=torch.tensor(16)), 4.0 / 16)


def test_reduce_items_integer_mask_is_boolean() -> None:
    per_item = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert_matches(losses.reduce_items(per_item, torch.tensor([1, 0, 1, 0])), 2.0)


def test_reduce_items_leading_dims() -> None:
    per_item = torch.arange(6, dtype=torch.float64).reshape(2, 3)  # [[0, 1, 2], [3, 4, 5]]
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert_matches(losses.reduce_items(per_item, mask), (0 + 1 + 4 + 5) / 4)
    assert losses.reduce_items(per_item).dtype == torch.float64


def test_reduce_items_nothing_kept_is_zero_with_graph() -> None:
    per_item = torch.tensor([1.0, 2.0], requires_grad=True)
    out = losses.reduce_items(per_item, torch.tensor([False, False]))
    assert float(out.detach()) == 0.0
    assert out.requires_grad
    out.backward()
    assert torch.equal(per_item.grad, torch.zeros(2))


def test_reduce_items_masked_non_finite_items_do_not_leak() -> None:
    per_item = torch.tensor([1.0, float("nan"), float("inf"), 3.0], requires_grad=True)
    mask = torch.tensor([True, False, False, True])
    out = losses.reduce_items(per_item, mask)
    assert_matches(out, 2.0)
    out.backward()
    assert torch.equal(per_item.grad, torch.tensor([0.5, 0.0, 0.0, 0.5]))


def test_reduce_items_errors() -> None:
    per_item = torch.ones(4)
    with pytest.raises(ValueError, match=r"mask shape \(3,\) does not match item shape \(4,\)"):
        losses.reduce_items(per_item, torch.ones(3, dtype=torch.bool))
    for bad in (0, -1, -0.5):
        with pytest.raises(ValueError, match=rf"num_items must be > 0, got {bad}"):
            losses.reduce_items(per_item, num_items=bad)


# ----------------------------------------------------------------------------------------------------------------
# hand-worked examples
# ----------------------------------------------------------------------------------------------------------------
#
# One item, two classes. Student logits [0, 0] -> p_s = [1/2, 1/2]. Teacher logits [ln 3, 0] -> p_t = [3/4, 1/4].
#
#   KL(p_t || p_s) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.1308120
#   KL(p_s || p_t) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = -0.5 * 0.4054651 + 0.5 * 0.6931472 = 0.1438410
#   JSD(0.5): m = [5/8, 3/8];  KL(p_t || m) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.1367412 - 0.1013663 = 0.0353749
#                             KL(p_s || m) = 0.5 ln 0.8 + 0.5 ln(4/3)  = -0.1115718 + 0.1438410 = 0.0322693
#             JSD = 0.5 * 0.0353749 + 0.5 * 0.0322693 = 0.0338221
#   skew forward, alpha = 0.5: KL(p_t || 0.5 p_t + 0.5 p_s) = KL(p_t || m) = 0.0353749
#   TVD = 0.5 * (|3/4 - 1/2| + |1/4 - 1/2|) = 0.25
#   soft CE against q = p_t: -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2 = 0.6931472
#   CE, label 0, logits [ln 3, 0]: -ln(3/4) = 0.2876821
#   CE with label smoothing 0.2 over 2 classes: target [0.9, 0.1]: 0.9 * 0.2876821 + 0.1 * ln 4 = 0.3975433
#   kl_div at T = 2 with teacher logits [2 ln 3, 0] (so p_t at T = 2 is again [3/4, 1/4]): 2^2 * 0.1308120 = 0.5232481

HAND_S = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
HAND_T = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)


def test_hand_worked_examples() -> None:
    tol = {"rtol": 0.0, "atol": 5e-7}  # the hand values carry 7 decimals
    assert_matches(losses.kl_div(HAND_S, HAND_T), 0.1308120, **tol)
    assert_matches(losses.kl_div(HAND_S, HAND_T, reverse=True), 0.1438410, **tol)
    assert_matches(losses.generalized_jsd(HAND_S, HAND_T, beta=0.5), 0.0338221, **tol)
    assert_matches(losses.skew_kl(HAND_S, HAND_T, alpha=0.5), 0.0353749, **tol)
    assert_matches(losses.tvd(HAND_S, HAND_T), 0.25, **tol)
    q = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    assert_matches(losses.soft_cross_entropy(HAND_S, q), 0.6931472, **tol)
    assert_matches(losses.cross_entropy(HAND_T, torch.tensor([0])), 0.2876821, **tol)
    assert_matches(losses.cross_entropy(HAND_T, torch.tensor([0]), label_smoothing=0.2), 0.3975433, **tol)
    assert_matches(losses.kl_div(HAND_S, HAND_T * 2, temperature=2.0), 0.5232481, **tol)


def test_hand_worked_mask_and_num_items() -> None:
    # Item A is the example above (KL 0.1308120), item B has equal logits (KL 0).
    s = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    tol = {"rtol": 0.0, "atol": 5e-7}
    assert_matches(losses.kl_div(s, t), 0.1308120 / 2, **tol)
    assert_matches(losses.kl_div(s, t, mask=torch.tensor([True, False])), 0.1308120, **tol)
    assert_matches(losses.kl_div(s, t, mask=torch.tensor([False, True])), 0.0, **tol)
    assert_matches(losses.kl_div(s, t, num_items=4), 0.1308120 / 4, **tol)


# ----------------------------------------------------------------------------------------------------------------
# every logit loss against its numpy reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fn,ref", PAIR_LOSSES, ids=PAIR_IDS)
def test_pair_loss_matches_reference(name, fn, ref) -> None:
    s, t = make_logits(7, 5, seed=1), make_logits(7, 5, seed=2)
    for temperature in (1.0, 0.5, 2.5):
        expected = ref(_np(s), _np(t), temperature=temperature)
        assert_matches(fn(s, t, temperature=temperature), expected)


@pytest.mark.parametrize("name,fn,ref", PAIR_LOSSES, ids=PAIR_IDS)
def test_pair_loss_matches_reference_with_mask_and_num_items(name, fn, ref) -> None:
    s, t = make_logits(9, 4, seed=3), make_logits(9, 4, seed=4)
    mask = make_mask(9, seed=3)
    kept = int(mask.sum())
    assert 0 < kept < 9
    assert_matches(fn(s, t, temperature=2.0, mask=mask), ref(_np(s), _np(t), temperature=2.0, mask=_np(mask)))
    assert_matches(
        fn(s, t, temperature=2.0, mask=mask, num_items=20),
        ref(_np(s), _np(t), temperature=2.0, mask=_np(mask), num_items=20),
    )
    # masked items are excluded: same as dropping them
    assert_matches(fn(s, t, temperature=2.0, mask=mask), float(fn(s[mask], t[mask], temperature=2.0)))
    # num_items replaces the count of kept items
    assert_matches(fn(s, t, mask=mask, num_items=20), float(fn(s, t, mask=mask)) * kept / 20)


@pytest.mark.parametrize("name,fn,ref", DIVERGENCES, ids=[x[0] for x in DIVERGENCES])
def test_divergence_is_zero_for_identical_inputs(name, fn, ref) -> None:
    s = make_logits(6, 5, seed=5)
    for temperature in (1.0, 3.0):
        assert abs(float(fn(s, s.clone(), temperature=temperature))) < 1e-12


@pytest.mark.parametrize("name,fn,ref", DIVERGENCES, ids=[x[0] for x in DIVERGENCES])
def test_divergence_is_positive_for_different_inputs(name, fn, ref) -> None:
    s, t = make_logits(6, 5, seed=6), make_logits(6, 5, seed=7)
    assert float(fn(s, t)) > 1e-3


SCALED_LOSSES = [x for x in PAIR_LOSSES if x[0] != "kl_teacher_temperature"]  # that one: its own test below


@pytest.mark.parametrize("name,fn,ref", SCALED_LOSSES, ids=[x[0] for x in SCALED_LOSSES])
def test_temperature_squared_scaling(name, fn, ref) -> None:
    # loss(s, t, T) == T^2 * loss(s / T, t / T, 1): the distributions are softened by T, the value scaled by T^2.
    s, t = make_logits(5, 6, seed=8), make_logits(5, 6, seed=9)
    for temperature in (0.5, 2.0, 4.0):
        scaled = fn(s, t, temperature=temperature)
        if name == "soft_ce":  # the temperature softens only the student; the target distribution is given as is
            softened = losses.soft_cross_entropy(s / temperature, torch.softmax(t, dim=-1))
        else:
            softened = fn(s / temperature, t / temperature, temperature=1.0)
        assert_matches(scaled, temperature**2 * float(softened))


# ----------------------------------------------------------------------------------------------------------------
# kl_div
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_temperature", [None, 0.5, 1.0, 3.0])
def test_kl_div_teacher_temperature(teacher_temperature) -> None:
    s, t = make_logits(6, 7, seed=10), make_logits(6, 7, seed=11)
    for temperature in (1.0, 4.0):
        for reverse in (False, True):
            out = losses.kl_div(
                s, t, temperature=temperature, teacher_temperature=teacher_temperature, reverse=reverse
            )
            expected = ref_kl_div(_np(s), _np(t), temperature, teacher_temperature, reverse)
            assert_matches(out, expected)


def test_kl_div_teacher_temperature_defaults_to_temperature() -> None:
    s, t = make_logits(6, 7, seed=12), make_logits(6, 7, seed=13)
    a = losses.kl_div(s, t, temperature=3.0)
    b = losses.kl_div(s, t, temperature=3.0, teacher_temperature=3.0)
    assert torch.equal(a, b)
    # The teacher temperature changes only the teacher's distribution; the scale is still the student's T^2.
    c = losses.kl_div(s, t, temperature=3.0, teacher_temperature=1.5)
    assert_matches(c, 9.0 * float(losses.kl_div(s / 3.0, t / 1.5)))


def test_kl_div_reverse_is_forward_with_arguments_swapped() -> None:
    s, t = make_logits(6, 7, seed=14), make_logits(6, 7, seed=15)
    assert_matches(losses.kl_div(s, t, reverse=True, temperature=2.0), float(losses.kl_div(t, s, temperature=2.0)))
    assert abs(float(losses.kl_div(s, t, reverse=True)) - float(losses.kl_div(s, t))) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kl_div_cross_check_with_torch(temperature) -> None:
    s, t = make_logits(8, 6, seed=16), make_logits(8, 6, seed=17)
    log_s = torch.log_softmax(s / temperature, dim=-1)
    log_t = torch.log_softmax(t / temperature, dim=-1)
    forward = temperature**2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    reverse = temperature**2 * F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    assert_matches(losses.kl_div(s, t, temperature=temperature), float(forward))
    assert_matches(losses.kl_div(s, t, temperature=temperature, reverse=True), float(reverse))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_div_gradient_closed_form(temperature) -> None:
    # d/ds of T^2 * mean_i KL(p_t || softmax(s / T)) is T * (p_s - p_t) / N.
    s = make_logits(5, 4, seed=18).requires_grad_(True)
    t = make_logits(5, 4, seed=19)
    losses.kl_div(s, t, temperature=temperature).backward()
    p_s = np_softmax(_np(s) / temperature)
    p_t = np_softmax(_np(t) / temperature)
    np.testing.assert_allclose(_np(s.grad), temperature * (p_s - p_t) / 5, rtol=1e-10, atol=1e-14)


def test_kl_div_with_top_k_teacher_matches_reference() -> None:
    # A teacher whose non-top-k logits are -inf has zero probabilities there; 0 * log 0 counts as 0.
    s = make_logits(4, 6, seed=20)
    t = make_logits(4, 6, seed=21)
    t[:, :3] = float("-inf")
    assert_matches(losses.kl_div(s, t), ref_kl_div(_np(s), _np(t)))
    # the reverse direction puts student mass where the teacher has none: infinite
    assert math.isinf(float(losses.kl_div(s, t, reverse=True)))


# ----------------------------------------------------------------------------------------------------------------
# generalized_jsd
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.25, 0.5, 0.75, 0.99])
def test_generalized_jsd_matches_reference(beta) -> None:
    s, t = make_logits(6, 5, seed=22), make_logits(6, 5, seed=23)
    for temperature in (1.0, 2.0):
        assert_matches(
            losses.generalized_jsd(s, t, beta=beta, temperature=temperature),
            ref_jsd(_np(s), _np(t), beta=beta, temperature=temperature),
        )


def test_generalized_jsd_ends_are_forward_and_reverse_kl_exactly() -> None:
    s, t = make_logits(8, 5, seed=24), make_logits(8, 5, seed=25)
    mask = make_mask(8, seed=24)
    for kw in ({}, {"temperature": 2.0}, {"temperature": 2.0, "mask": mask}, {"mask": mask, "num_items": 11}):
        assert torch.equal(losses.generalized_jsd(s, t, beta=0.0, **kw), losses.kl_div(s, t, **kw))
        assert torch.equal(losses.generalized_jsd(s, t, beta=1.0, **kw), losses.kl_div(s, t, reverse=True, **kw))
    assert_matches(losses.generalized_jsd(s, t, beta=0.0), ref_kl_div(_np(s), _np(t)))
    assert_matches(losses.generalized_jsd(s, t, beta=1.0), ref_kl_div(_np(s), _np(t), reverse=True))


def test_generalized_jsd_half_is_symmetric_and_bounded() -> None:
    s, t = make_logits(8, 5, seed=26, scale=10.0), make_logits(8, 5, seed=27, scale=10.0)
    a = losses.generalized_jsd(s, t, beta=0.5, temperature=1.5)
    b = losses.generalized_jsd(t, s, beta=0.5, temperature=1.5)
    assert_matches(a, float(b))
    # JSD(0.5) <= ln 2 per item, so <= T^2 ln 2 after scaling
    assert 0.0 < float(a) <= 1.5**2 * math.log(2.0)


@pytest.mark.parametrize("beta", [0.2, 0.7])
def test_generalized_jsd_mirror(beta) -> None:
    # swapping student and teacher and beta -> 1 - beta leaves the value unchanged
    s, t = make_logits(6, 5, seed=28), make_logits(6, 5, seed=29)
    assert_matches(losses.generalized_jsd(s, t, beta=beta), float(losses.generalized_jsd(t, s, beta=1.0 - beta)))


# ----------------------------------------------------------------------------------------------------------------
# skew_kl
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_skew_kl_matches_reference(alpha) -> None:
    s, t = make_logits(6, 5, seed=30), make_logits(6, 5, seed=31)
    for reverse in (False, True):
        for temperature in (1.0, 2.0):
            assert_matches(
                losses.skew_kl(s, t, alpha=alpha, reverse=reverse, temperature=temperature),
                ref_skew_kl(_np(s), _np(t), alpha=alpha, reverse=reverse, temperature=temperature),
            )


@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kl_alpha_zero_is_plain_kl(reverse) -> None:
    s, t = make_logits(6, 5, seed=32), make_logits(6, 5, seed=33)
    mask = make_mask(6, seed=32)
    for kw in ({}, {"temperature": 3.0}, {"mask": mask, "num_items": 9}):
        skew = losses.skew_kl(s, t, alpha=0.0, reverse=reverse, **kw)
        plain = losses.kl_div(s, t, reverse=reverse, **kw)
        assert_matches(skew, float(plain), rtol=1e-14, atol=0.0)


def test_skew_kl_is_bounded_and_finite_where_kl_is_not() -> None:
    # KL(p || a p + (1 - a) q) <= -ln a, even when q has zeros where p has mass.
    s = make_logits(4, 6, seed=34)
    t = make_logits(4, 6, seed=35)
    t[:, :3] = float("-inf")
    alpha = 0.2
    out = losses.skew_kl(s, t, alpha=alpha, reverse=True)
    assert math.isfinite(float(out))
    assert 0.0 < float(out) <= -math.log(alpha)
    assert_matches(out, ref_skew_kl(_np(s), _np(t), alpha=alpha, reverse=True))


# ----------------------------------------------------------------------------------------------------------------
# tvd
# ----------------------------------------------------------------------------------------------------------------


def test_tvd_symmetric_and_bounded() -> None:
    s, t = make_logits(6, 5, seed=36, scale=6.0), make_logits(6, 5, seed=37, scale=6.0)
    a = losses.tvd(s, t, temperature=2.0)
    assert_matches(a, float(losses.tvd(t, s, temperature=2.0)))
    assert 0.0 < float(a) <= 4.0
    # disjoint one-hot-like distributions: TVD = 1
    far = torch.tensor([[100.0, -100.0]], dtype=torch.float64)
    assert_matches(losses.tvd(far, -far), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# soft_cross_entropy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_cross_entropy_is_kl_plus_entropy(temperature) -> None:
    # CE(q, p_s) = KL(q || p_s) + H(q), everything scaled by T^2
    s, t = make_logits(6, 5, seed=38), make_logits(6, 5, seed=39)
    q = torch.softmax(t / temperature, dim=-1)
    q_np = np_softmax(_np(t) / temperature)
    entropy = float(-(q_np * np.log(q_np)).sum(axis=-1).mean())
    expected = float(losses.kl_div(s, t, temperature=temperature)) + temperature**2 * entropy
    assert_matches(losses.soft_cross_entropy(s, q, temperature=temperature), expected)
    assert_matches(losses.soft_cross_entropy(s, q, temperature=temperature), ref_soft_ce(_np(s), q_np, temperature))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_cross_entropy_cross_check_with_torch(temperature) -> None:
    s = make_logits(7, 5, seed=40)
    q = torch.softmax(make_logits(7, 5, seed=41), dim=-1)
    expected = temperature**2 * F.cross_entropy(s / temperature, q)
    assert_matches(losses.soft_cross_entropy(s, q, temperature=temperature), float(expected))


def test_soft_cross_entropy_one_hot_target_is_cross_entropy() -> None:
    s = make_logits(7, 5, seed=42)
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    onehot = F.one_hot(y, 5).to(torch.float64)
    assert_matches(losses.soft_cross_entropy(s, onehot), float(losses.cross_entropy(s, y)))


# ----------------------------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5, 1.0])
def test_cross_entropy_matches_reference(label_smoothing) -> None:
    s = make_logits(10, 6, seed=43)
    y = torch.tensor([0, 5, 3, -100, 2, 1, -100, 4, 0, 5])
    out = losses.cross_entropy(s, y, label_smoothing=label_smoothing)
    assert_matches(out, ref_cross_entropy(_np(s), y.numpy(), label_smoothing=label_smoothing))
    # second cross-check: torch's own cross_entropy (mean over non-ignored items)
    expected = F.cross_entropy(s, y, label_smoothing=label_smoothing, ignore_index=-100)
    assert_matches(out, float(expected))


def test_cross_entropy_label_smoothing_one_is_uniform_target() -> None:
    s = make_logits(4, 6, seed=44)
    y = torch.tensor([0, 1, 2, 3])
    uniform = torch.full((4, 6), 1.0 / 6, dtype=torch.float64)
    assert_matches(losses.cross_entropy(s, y, label_smoothing=1.0), float(losses.soft_cross_entropy(s, uniform)))


def test_cross_entropy_ignore_index_and_negative_labels() -> None:
    s = make_logits(8, 5, seed=45)
    # custom ignore_index inside the class range: those items are dropped, not treated as class 2
    y = torch.tensor([0, 2, 4, 2, 1, 3, 2, 0])
    out = losses.cross_entropy(s, y, ignore_index=2)
    assert_matches(out, ref_cross_entropy(_np(s), y.numpy(), ignore_index=2))
    assert_matches(out, float(F.cross_entropy(s, y, ignore_index=2)))
    keep = y != 2
    assert_matches(out, float(losses.cross_entropy(s[keep], y[keep])))
    # any negative label (e.g. UNLABELLED = -1) is dropped too
    y_neg = torch.tensor([0, -1, 4, -1, 1, 3, -7, 0])
    keep = y_neg >= 0
    assert_matches(losses.cross_entropy(s, y_neg), float(losses.cross_entropy(s[keep], y_neg[keep])))
    assert_matches(losses.cross_entropy(s, y_neg), ref_cross_entropy(_np(s), y_neg.numpy()))


def test_cross_entropy_mask_and_num_items() -> None:
    s = make_logits(10, 4, seed=46)
    y = torch.tensor([0, 3, -100, 1, 2, 2, 1, -100, 0, 3])
    mask = make_mask(10, seed=46)
    kept = int((mask & (y >= 0)).sum())
    out = losses.cross_entropy(s, y, label_smoothing=0.1, mask=mask)
    assert_matches(out, ref_cross_entropy(_np(s), y.numpy(), label_smoothing=0.1, mask=_np(mask)))
    out_n = losses.cross_entropy(s, y, label_smoothing=0.1, mask=mask, num_items=25)
    assert_matches(out_n, float(out) * kept / 25)


def test_cross_entropy_nothing_labelled_is_zero() -> None:
    s = make_logits(3, 4, seed=47).requires_grad_(True)
    out = losses.cross_entropy(s, torch.full((3,), -100))
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_cross_entropy_leading_dims() -> None:
    s = make_logits(2, 5, 7, seed=48)
    g = torch.Generator().manual_seed(48)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 1] = -100
    mask = make_mask(2, 5, seed=48)
    out = losses.cross_entropy(s, y, label_smoothing=0.2, mask=mask)
    flat = losses.cross_entropy(s.reshape(-1, 7), y.reshape(-1), label_smoothing=0.2, mask=mask.reshape(-1))
    assert_matches(out, float(flat))
    assert_matches(out, ref_cross_entropy(_np(s), y.numpy(), label_smoothing=0.2, mask=_np(mask)))


def test_cross_entropy_errors() -> None:
    s = make_logits(4, 5, seed=49)
    with pytest.raises(ValueError, match=r"label 7 out of range for 5 classes \(expected 0\.\.4\)"):
        losses.cross_entropy(s, torch.tensor([0, 1, 7, 3]))
    with pytest.raises(ValueError, match=r"label 5 out of range"):
        losses.cross_entropy(s, torch.tensor([0, 5, -100, 3]))
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match logits shape \(4, 5\)"):
        losses.cross_entropy(s, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        losses.cross_entropy(s, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
            losses.cross_entropy(s, torch.tensor([0, 1, 2, 3]), label_smoothing=bad)


# ----------------------------------------------------------------------------------------------------------------
# contract shared by all losses: accumulation, precision, leading dims, gradients, errors
# ----------------------------------------------------------------------------------------------------------------

ALL_LOSSES = [*PAIR_LOSSES, ("cross_entropy", None, None)]


def _call(name, fn, s, t, **kw):
    """Call a loss from PAIR_LOSSES, or cross_entropy with labels derived from ``t`` (arg-max, some ignored)."""
    if name == "cross_entropy":
        kw.pop("temperature", None)
        y = t.argmax(dim=-1)
        y = torch.where(torch.arange(y.numel()).reshape(y.shape) % 4 == 3, torch.full_like(y, -100), y)
        return losses.cross_entropy(s, y, label_smoothing=0.1, **kw)
    return fn(s, t, **kw)


@pytest.mark.parametrize("name,fn,ref", ALL_LOSSES, ids=[x[0] for x in ALL_LOSSES])
def test_micro_batches_with_total_num_items_equal_full_batch(name, fn, ref) -> None:
    # float32, as in training: summing micro-batch losses normalised by the whole batch's item count gives the
    # full-batch mean, and so the same gradient.
    s_full = make_logits(13, 6, seed=50, dtype=torch.float32)
    t_full = make_logits(13, 6, seed=51, dtype=torch.float32)
    mask = make_mask(13, seed=50)
    if name == "cross_entropy":
        labels = t_full.argmax(dim=-1)
        counted = mask & (torch.arange(13) % 4 != 3)
        total_items = int(counted.sum())
    else:
        labels = None
        total_items = int(mask.sum())

    s1 = s_full.clone().requires_grad_(True)
    full = _call(name, fn, s1, t_full, temperature=2.0, mask=mask)
    full.backward()

    s2 = s_full.clone().requires_grad_(True)
    acc = torch.zeros((), dtype=torch.float32)
    for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 13)):  # uneven micro-batches, one of a single item
        if name == "cross_entropy":
            y = labels[lo:hi].clone()
            y[(torch.arange(lo, hi) % 4) == 3] = -100
            part = losses.cross_entropy(s2[lo:hi], y, label_smoothing=0.1, mask=mask[lo:hi], num_items=total_items)
        else:
            part = fn(s2[lo:hi], t_full[lo:hi], temperature=2.0, mask=mask[lo:hi], num_items=total_items)
        part.backward()
        acc = acc + part.detach()
    assert abs(float(acc) - float(full.detach())) < 1e-6
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,fn,ref", ALL_LOSSES, ids=[x[0] for x in ALL_LOSSES])
def test_half_precision_inputs_computed_in_float32(name, fn, ref) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        _check_half_precision(name, fn, ref, dtype)


def _check_half_precision(name, fn, ref, dtype) -> None:
    s = make_logits(6, 5, seed=52, dtype=dtype)
    t = make_logits(6, 5, seed=53, dtype=dtype)
    if name == "soft_ce":  # a half-precision target distribution, compared with the same rounded values in float32
        q = torch.softmax(t.float(), dim=-1).to(dtype)
        out = losses.soft_cross_entropy(s, q, temperature=2.0)
        expected32 = losses.soft_cross_entropy(s.float(), q.float(), temperature=2.0)
        expected64 = ref_soft_ce(_np(s), _np(q), temperature=2.0)
    else:
        out = _call(name, fn, s, t, temperature=2.0)
        expected32 = _call(name, fn, s.float(), t.float(), temperature=2.0)
        expected64 = None if ref is None else ref(_np(s), _np(t), temperature=2.0)
    assert out.dtype == torch.float32
    assert expected32.dtype == torch.float32
    assert abs(float(out) - float(expected32)) <= 1e-6 * max(1.0, abs(float(expected32)))
    if expected64 is not None:  # and the float64 reference of the same rounded values
        assert_matches(out, expected64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,fn,ref", PAIR_LOSSES, ids=PAIR_IDS)
def test_float32_and_float64_keep_their_dtype(name, fn, ref) -> None:
    s, t = make_logits(3, 4, seed=54), make_logits(3, 4, seed=55)
    assert fn(s, t).dtype == torch.float64
    assert fn(s.float(), t.float()).dtype == torch.float32


@pytest.mark.parametrize("name,fn,ref", ALL_LOSSES, ids=[x[0] for x in ALL_LOSSES])
def test_leading_dims_are_items(name, fn, ref) -> None:
    s, t = make_logits(3, 4, 5, seed=56), make_logits(3, 4, 5, seed=57)
    mask = make_mask(3, 4, seed=56)
    out = _call(name, fn, s, t, temperature=1.5, mask=mask)
    if name == "cross_entropy":
        y = t.argmax(dim=-1)
        y = torch.where(torch.arange(12).reshape(3, 4) % 4 == 3, torch.full_like(y, -100), y)
        flat = losses.cross_entropy(s.reshape(12, 5), y.reshape(12), label_smoothing=0.1, mask=mask.reshape(12))
    else:
        flat = fn(s.reshape(12, 5), t.reshape(12, 5), temperature=1.5, mask=mask.reshape(12))
        assert_matches(out, ref(_np(s), _np(t), temperature=1.5, mask=_np(mask)))
    assert_matches(out, float(flat))


@pytest.mark.parametrize("name,fn,ref", ALL_LOSSES, ids=[x[0] for x in ALL_LOSSES])
def test_gradcheck_float64(name, fn, ref) -> None:
    s = make_logits(3, 4, seed=58).requires_grad_(True)
    t = make_logits(3, 4, seed=59)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x: _call(name, fn, x, t, temperature=1.7, mask=mask), (s,))


@pytest.mark.parametrize("name,fn,ref", ALL_LOSSES, ids=[x[0] for x in ALL_LOSSES])
def test_gradients_are_finite(name, fn, ref) -> None:
    for case in ("random", "large_logits", "top_k_teacher", "masked_vocab"):
        _check_gradients_finite(name, fn, case)


def _check_gradients_finite(name, fn, case) -> None:
    s = make_logits(5, 6, seed=60, dtype=torch.float32)
    t = make_logits(5, 6, seed=61, dtype=torch.float32)
    temperature = 1.0
    if case == "large_logits":
        s, t, temperature = s * 50, t * 50, 0.5
    elif case == "top_k_teacher":
        t[:, :2] = float("-inf")
    elif case == "masked_vocab":
        # padded vocabulary entries masked out of both models (language-model distillation)
        s[:, -2:] = float("-inf")
        t[:, -2:] = float("-inf")
    s = s.requires_grad_(True)
    t = t.requires_grad_(True)  # a peer "teacher" may carry a graph; its gradient must not be NaN either
    out = _call(name, fn, s, t, temperature=temperature)
    if not math.isfinite(float(out.detach())):
        # Mathematically infinite, and only these: reverse KL puts student mass where a top-k teacher has none;
        # label smoothing puts target mass on masked vocabulary entries.
        assert (name, case) in {("kl_reverse", "top_k_teacher"), ("cross_entropy", "masked_vocab")}, (name, case)
        return
    out.backward()
    assert torch.isfinite(s.grad).all(), (name, case, s.grad)
    if t.grad is not None:  # cross_entropy only reads the teacher's arg-max
        assert torch.isfinite(t.grad).all(), (name, case, t.grad)


@pytest.mark.parametrize("name,fn,ref", PAIR_LOSSES, ids=PAIR_IDS)
def test_masked_vocab_values_match_reference(name, fn, ref) -> None:
    # entries with -inf in both models contribute nothing (0 * log 0 = 0)
    s, t = make_logits(5, 6, seed=62), make_logits(5, 6, seed=63)
    s[:, -2:] = float("-inf")
    t[:, -2:] = float("-inf")
    expected = fn(s[:, :-2], t[:, :-2], temperature=2.0)
    assert_matches(fn(s, t, temperature=2.0), float(expected))
    assert_matches(fn(s, t, temperature=2.0), ref(_np(s), _np(t), temperature=2.0))


@pytest.mark.parametrize("name,fn,ref", PAIR_LOSSES, ids=PAIR_IDS)
def test_bad_temperature_is_rejected(name, fn, ref) -> None:
    s, t = make_logits(2, 3, seed=64), make_logits(2, 3, seed=65)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {bad!r}"):
            fn(s, t, temperature=bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_bad_teacher_temperature_is_rejected(bad) -> None:
    s, t = make_logits(2, 3, seed=66), make_logits(2, 3, seed=67)
    with pytest.raises(ValueError, match=rf"teacher_temperature must be a finite number > 0, got {bad!r}"):
        losses.kl_div(s, t, teacher_temperature=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan")])
def test_bad_beta_is_rejected(bad) -> None:
    s, t = make_logits(2, 3, seed=68), make_logits(2, 3, seed=69)
    with pytest.raises(ValueError, match=rf"beta must be in \[0, 1\], got {bad!r}"):
        losses.generalized_jsd(s, t, beta=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_alpha_is_rejected(bad) -> None:
    s, t = make_logits(2, 3, seed=70), make_logits(2, 3, seed=71)
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\), got {bad!r}"):
        losses.skew_kl(s, t, alpha=bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: losses.kl_div(s, t),
        lambda s, t: losses.kl_div(s, t, reverse=True),
        lambda s, t: losses.generalized_jsd(s, t, beta=0.5),
        lambda s, t: losses.generalized_jsd(s, t, beta=0.0),
        lambda s, t: losses.generalized_jsd(s, t, beta=1.0),
        lambda s, t: losses.skew_kl(s, t),
        lambda s, t: losses.tvd(s, t),
        lambda s, t: losses.soft_cross_entropy(s, t),
    ],
    ids=["kl", "kl_reverse", "jsd", "jsd_0", "jsd_1", "skew", "tvd", "soft_ce"],
)
def test_shape_mismatch_is_rejected(call) -> None:
    s, t = make_logits(2, 3, seed=72), make_logits(2, 4, seed=73)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 4\)"):
        call(s, t)


def test_integer_logits_are_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point logits"):
        losses.kl_div(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_mask_shape_mismatch_is_rejected() -> None:
    s, t = make_logits(4, 3, seed=74), make_logits(4, 3, seed=75)
    with pytest.raises(ValueError, match="mask shape"):
        losses.kl_div(s, t, mask=torch.ones(3, dtype=torch.bool))


def test_entropy_against_numpy_with_masked_classes() -> None:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(5, 3, 7, generator=g, dtype=torch.float64) * 2
    z[0, 0, :3] = float("-inf")  # masked classes: 0 log 0 = 0
    got = losses.entropy(z, temperature=1.5)
    x = z.numpy() / 1.5
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    assert got.shape == (5, 3) and np.allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    assert losses.entropy(torch.zeros(4, 8)).allclose(torch.full((4,), math.log(8)))
    with pytest.raises(ValueError, match="temperature"):
        losses.entropy(z, temperature=0.0)
