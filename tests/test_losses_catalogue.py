"""Tests of the classic-catalogue losses in mentor.losses (DKD, DIST, RKD, attention transfer, similarity
preserving, CKA, FitNets hints, cosine embedding, smooth-L1).

Each loss is checked against a float64 numpy reference written from the paper's definition (no torch in the
references; loops where the definition is a loop), on hand-worked examples, and on properties.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mentor import losses

# ----------------------------------------------------------------------------------------------------------------
# float64 numpy references, from the papers' definitions
# ----------------------------------------------------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two 1-D distributions, 0 * log 0 = 0."""
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0))


def np_reduce(per_item: np.ndarray, mask: np.ndarray | None = None, num_items: float | None = None) -> float:
    keep = np.ones(per_item.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    total = float(per_item[keep].sum()) if keep.any() else 0.0
    n = max(int(keep.sum()), 1) if num_items is None else float(num_items)
    return total / n


def np_smooth_l1(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """0.5 x^2 / beta for |x| < beta, else |x| - 0.5 beta (elementwise)."""
    a = np.abs(x)
    return np.where(a < beta, 0.5 * x * x / beta, a - 0.5 * beta)


def ref_dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0) -> float:
    num_classes = s.shape[-1]
    s, t, y = s.reshape(-1, num_classes), t.reshape(-1, num_classes), np.asarray(y).reshape(-1)
    per_item = []
    for i in range(s.shape[0]):
        p_s, p_t = np_softmax(s[i] / temperature), np_softmax(t[i] / temperature)
        g = int(y[i])
        rest = [c for c in range(num_classes) if c != g]
        b_s = np.array([p_s[g], p_s[rest].sum()])  # (target, non-target) probabilities
        b_t = np.array([p_t[g], p_t[rest].sum()])
        tckd = np_kl(b_t, b_s)
        nckd = np_kl(np_softmax(t[i, rest] / temperature), np_softmax(s[i, rest] / temperature))
        per_item.append(alpha * tckd + beta * nckd)
    return temperature**2 * float(np.mean(per_item))


def np_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(math.sqrt((a * a).sum() * (b * b).sum()), 1e-8))


def ref_dist(s, t, beta=1.0, gamma=1.0, temperature=1.0) -> float:
    num_classes = s.shape[-1]
    p_s = np_softmax(s.reshape(-1, num_classes) / temperature)
    p_t = np_softmax(t.reshape(-1, num_classes) / temperature)
    inter = 1.0 - np.mean([np_pearson(p_s[i], p_t[i]) for i in range(p_s.shape[0])])
    intra = 1.0 - np.mean([np_pearson(p_s[:, c], p_t[:, c]) for c in range(num_classes)])
    return temperature**2 * (beta * inter + gamma * intra)


def np_rkd_psi_d(e: np.ndarray) -> np.ndarray:
    e = e.reshape(e.shape[0], -1)
    n = e.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                d[i, j] = max(float(np.linalg.norm(e[i] - e[j])), 1e-6)
    mu = d.sum() / (n * (n - 1))
    return d / mu


def ref_rkd_distance(s, t) -> float:
    return float(np_smooth_l1(np_rkd_psi_d(s) - np_rkd_psi_d(t)).mean())


def np_rkd_psi_a(e: np.ndarray) -> np.ndarray:
    e = e.reshape(e.shape[0], -1)
    n = e.shape[0]
    cos = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                u, v = e[i] - e[j], e[k] - e[j]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                if nu > 0 and nv > 0:  # a repeated index is a zero vector: cosine 0
                    cos[i, j, k] = float(u @ v) / (nu * nv)
    return cos


def ref_rkd_angle(s, t) -> float:
    return float(np_smooth_l1(np_rkd_psi_a(s) - np_rkd_psi_a(t)).mean())


def ref_attention(s, t, p=2.0) -> float:
    def q(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return float(((q(s) - q(t)) ** 2).sum(axis=1).mean())


def ref_sp(s, t) -> float:
    def g(f: np.ndarray) -> np.ndarray:
        q = f.reshape(f.shape[0], -1)
        gram = q @ q.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    b = s.shape[0]
    return float(np.linalg.norm(g(s) - g(t), "fro") ** 2 / b**2)


def ref_cka(x, y) -> float:
    """CKA through HSIC with the centring matrix H = I - 11^T / n (Kornblith et al., Eq. 2-4)."""
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def ref_hint_mse(s, t, mask=None, num_items=None) -> float:
    per_item = ((s - t) ** 2).reshape(s.shape[0], -1).sum(axis=1)
    return np_reduce(per_item, mask, num_items)


def ref_cosine(s, t, mask=None, num_items=None) -> float:
    dot = (s * t).sum(axis=-1)
    ns = np.maximum(np.linalg.norm(s, axis=-1), 1e-8)
    nt = np.maximum(np.linalg.norm(t, axis=-1), 1e-8)
    return np_reduce(1.0 - dot / (ns * nt), mask, num_items)


def ref_smooth_l1(s, t, beta=1.0, mask=None, num_items=None) -> float:
    return np_reduce(np_smooth_l1(s - t, beta).sum(axis=-1), mask, num_items)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def make(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_labels(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 500))


def make_mask(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(*shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


def assert_matches(actual: torch.Tensor, expected: float, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert actual.dim() == 0, f"expected a scalar, got shape {tuple(actual.shape)}"
    value = float(actual.detach())
    assert math.isclose(value, float(expected), rel_tol=rtol, abs_tol=atol), (value, expected)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _grad(x: torch.Tensor) -> torch.Tensor:
    assert x.grad is not None, "no gradient reached the input"
    return x.grad


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(make(n, n, seed=seed))
    return q


# Every catalogue loss as a call over a (student, teacher) pair of tensors; "shape" gives the student and teacher
# shapes of a typical call (the teacher may be wider), "dkd" draws its labels from the teacher's arg-max.
Call = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _dkd_call(s: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
    return losses.dkd(s, t, t.detach().argmax(dim=-1), **kw)


CATALOGUE: dict[str, tuple[Call, tuple[int, ...], tuple[int, ...]]] = {
    "dkd": (lambda s, t: _dkd_call(s, t, temperature=2.0), (6, 5), (6, 5)),
    "dist": (lambda s, t: losses.dist(s, t, temperature=2.0, gamma=0.5), (6, 5), (6, 5)),
    "rkd_distance": (losses.rkd_distance, (6, 4), (6, 7)),
    "rkd_angle": (losses.rkd_angle, (5, 4), (5, 7)),
    "attention_transfer": (losses.attention_transfer, (3, 2, 4, 4), (3, 5, 4, 4)),
    "similarity_preserving": (losses.similarity_preserving, (5, 2, 3), (5, 7)),
    "cka_loss": (losses.cka_loss, (7, 4), (7, 3)),
    "linear_cka": (losses.linear_cka, (7, 4), (7, 3)),
    "hint_mse": (losses.hint_mse, (4, 3, 2), (4, 3, 2)),
    "cosine_embedding": (losses.cosine_embedding, (2, 3, 5), (2, 3, 5)),
    "smooth_l1": (lambda s, t: losses.smooth_l1(s, t, beta=0.5), (4, 5), (4, 5)),
}
NAMES = list(CATALOGUE)
# Losses that vanish when the teacher input equals the student input (cka_loss: 1 - CKA(x, x) = 0).
ZERO_AT_EQUALITY = [n for n in NAMES if n != "linear_cka"]


def _inputs(name: str, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    _, s_shape, t_shape = CATALOGUE[name]
    scale = 2.0 if name in ("dkd", "dist") else 1.0
    return make(*s_shape, seed=seed, scale=scale, dtype=dtype), make(*t_shape, seed=seed + 1, scale=scale, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (7, 10), (2, 3, 6)])
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.7)])
def test_dkd_matches_reference(shape, alpha, beta, temperature) -> None:
    s, t = make(*shape, seed=1, scale=2.0), make(*shape, seed=2, scale=2.0)
    y = make_labels(math.prod(shape[:-1]), shape[-1], seed=3).reshape(shape[:-1])
    out = losses.dkd(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    assert_matches(out, ref_dkd(_np(s), _np(t), y.numpy(), alpha=alpha, beta=beta, temperature=temperature))


def test_dkd_tckd_by_hand_three_classes() -> None:
    # alpha = 1, beta = 0: only TCKD. Student logits (1, 2, 0), teacher (2, 0, 1), target 0, T = 1.
    s = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    z_s = math.e + math.e**2 + 1.0
    z_t = math.e**2 + 1.0 + math.e
    ps, pt = math.e / z_s, math.e**2 / z_t  # target-class probabilities
    tckd = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    out = losses.dkd(s, t, torch.tensor([0]), alpha=1.0, beta=0.0, temperature=1.0)
    assert_matches(out, tckd)
    # and at T = 2 the same by hand, scaled by T^2 = 4
    ps2 = math.exp(0.5) / (math.exp(0.5) + math.exp(1.0) + 1.0)
    pt2 = math.exp(1.0) / (math.exp(1.0) + 1.0 + math.exp(0.5))
    tckd2 = pt2 * math.log(pt2 / ps2) + (1 - pt2) * math.log((1 - pt2) / (1 - ps2))
    assert_matches(losses.dkd(s, t, torch.tensor([0]), alpha=1.0, beta=0.0, temperature=2.0), 4.0 * tckd2)


def test_dkd_nckd_by_hand_three_classes() -> None:
    # alpha = 0, beta = 1: only NCKD, over the two non-target classes (1, 2) renormalised.
    s = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    qs = [math.e**2 / (math.e**2 + 1.0), 1.0 / (math.e**2 + 1.0)]
    qt = [1.0 / (1.0 + math.e), math.e / (1.0 + math.e)]
    nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs, strict=True))
    assert_matches(losses.dkd(s, t, torch.tensor([0]), alpha=0.0, beta=1.0, temperature=1.0), nckd)


def test_dkd_decomposes_classic_kd() -> None:
    # The paper's Eq. 7: KD = TCKD + (1 - p_target of the teacher) * NCKD, item by item.
    s, t = make(5, 6, seed=4, scale=2.0), make(5, 6, seed=5, scale=2.0)
    y = make_labels(5, 6, seed=6)
    temperature = 1.7
    p_t = torch.softmax(t / temperature, dim=-1)
    for i in range(5):
        beta = 1.0 - float(p_t[i, y[i]])
        out = losses.dkd(s[i : i + 1], t[i : i + 1], y[i : i + 1], alpha=1.0, beta=beta, temperature=temperature)
        assert_matches(out, float(losses.kl_div(s[i : i + 1], t[i : i + 1], temperature=temperature)), rtol=1e-9)


def test_dkd_two_classes_has_no_nckd() -> None:
    s, t = make(4, 2, seed=7), make(4, 2, seed=8)
    y = make_labels(4, 2, seed=9)
    only_t = losses.dkd(s, t, y, alpha=1.0, beta=0.0)
    assert_matches(losses.dkd(s, t, y, alpha=1.0, beta=5.0), float(only_t))
    assert_matches(losses.dkd(s, t, y, alpha=1.0, beta=0.0), float(losses.kl_div(s, t, temperature=4.0)))


# ----------------------------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (9, 12), (2, 3, 5)])
@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (0.0, 1.0, 0.5)])
def test_dist_matches_reference(shape, beta, gamma, temperature) -> None:
    s, t = make(*shape, seed=10, scale=2.0), make(*shape, seed=11, scale=2.0)
    out = losses.dist(s, t, beta=beta, gamma=gamma, temperature=temperature)
    assert_matches(out, ref_dist(_np(s), _np(t), beta=beta, gamma=gamma, temperature=temperature))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dist_row_and_column_pearson_match_numpy_corrcoef(temperature) -> None:
    s, t = make(8, 6, seed=12, scale=2.0), make(8, 6, seed=13, scale=2.0)
    p_s, p_t = np_softmax(_np(s) / temperature), np_softmax(_np(t) / temperature)
    rows = np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(8)])
    cols = np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(6)])
    t2 = temperature**2
    assert_matches(losses.dist(s, t, beta=1.0, gamma=0.0, temperature=temperature), t2 * (1 - rows), rtol=1e-9)
    assert_matches(losses.dist(s, t, beta=0.0, gamma=1.0, temperature=temperature), t2 * (1 - cols), rtol=1e-9)
    both = losses.dist(s, t, beta=0.3, gamma=2.0, temperature=temperature)
    assert_matches(both, t2 * (0.3 * (1 - rows) + 2.0 * (1 - cols)), rtol=1e-9)


def test_dist_bounds_and_perfect_anticorrelation() -> None:
    s, t = make(6, 5, seed=14, scale=3.0), make(6, 5, seed=15, scale=3.0)
    value = float(losses.dist(s, t, beta=1.0, gamma=1.0))
    assert 0.0 < value <= 4.0
    # two classes: the student's probabilities are the teacher's mirrored, so every row and column correlates -1
    t2 = make(4, 2, seed=16)
    assert_matches(losses.dist(t2.flip(-1), t2, beta=1.0, gamma=1.0), 4.0, rtol=1e-9)


def test_dist_batch_of_one_gives_constant_column_term() -> None:
    s = make(1, 5, seed=17).requires_grad_(True)
    t = make(1, 5, seed=18)
    out = losses.dist(s, t, beta=0.0, gamma=1.0, temperature=2.0)
    assert_matches(out, 4.0)  # zero variance over a batch of one: correlation 0
    out.backward()
    assert torch.isfinite(_grad(s)).all() and float(_grad(s).abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_shape,t_shape", [((5, 3), (5, 3)), ((6, 4), (6, 9)), ((4, 2, 3), (4, 5)), ((2, 3), (2, 1))])
def test_rkd_distance_matches_reference(s_shape, t_shape) -> None:
    s, t = make(*s_shape, seed=20), make(*t_shape, seed=21)
    assert_matches(losses.rkd_distance(s, t), ref_rkd_distance(_np(s), _np(t)))


@pytest.mark.parametrize("s_shape,t_shape", [((4, 3), (4, 3)), ((5, 2), (5, 6)), ((3, 2, 2), (3, 5))])
def test_rkd_angle_matches_reference(s_shape, t_shape) -> None:
    s, t = make(*s_shape, seed=22), make(*t_shape, seed=23)
    assert_matches(losses.rkd_angle(s, t), ref_rkd_angle(_np(s), _np(t)))


def test_rkd_large_differences_use_the_linear_part() -> None:
    # a batch with one far outlier in the student: some normalised distances differ by more than 1
    s, t = make(6, 3, seed=24), make(6, 3, seed=25)
    s[0] += 30.0
    psi_s, psi_t = np_rkd_psi_d(_np(s)), np_rkd_psi_d(_np(t))
    assert np.abs(psi_s - psi_t).max() > 1.0
    assert_matches(losses.rkd_distance(s, t), ref_rkd_distance(_np(s), _np(t)))


@pytest.mark.parametrize("fn", [losses.rkd_distance, losses.rkd_angle], ids=["distance", "angle"])
def test_rkd_invariant_to_scale_translation_rotation(fn) -> None:
    s, t = make(6, 4, seed=26), make(6, 5, seed=27)
    base = float(fn(s, t))
    assert_matches(fn(3.0 * s, 0.2 * t), base, rtol=1e-9)
    assert_matches(fn(s + 5.0, t - 2.0), base, rtol=1e-9)
    assert_matches(fn(s @ _orthogonal(4, 28), t @ _orthogonal(5, 29)), base, rtol=1e-9)


def test_rkd_distance_hand_worked() -> None:
    # Student: three points on a line at 0, 1, 2 -> distances 1, 1, 2 (mean over i != j: 4/3).
    # Teacher: an equilateral triangle -> all distances equal, psi = 1 off the diagonal.
    s = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    # psi_s off-diagonal: 0.75 (four entries), 1.5 (two entries); differences -0.25 and 0.5
    expected = (4 * 0.5 * 0.25**2 + 2 * 0.5 * 0.5**2) / 9
    assert_matches(losses.rkd_distance(s, t), expected)


def test_rkd_angle_hand_worked() -> None:
    # Student: a right isoceles triangle (angles 90, 45, 45 degrees); teacher: equilateral (all 60 degrees).
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    # 6 ordered triples with distinct indices; at the right-angle vertex cos 0 (2 triples), elsewhere cos 45
    # (4 triples); the teacher has cos 60 = 0.5 everywhere.
    c45 = math.sqrt(0.5)
    expected = (2 * 0.5 * 0.5**2 + 4 * 0.5 * (c45 - 0.5) ** 2) / 27
    assert_matches(losses.rkd_angle(s, t), expected)


@pytest.mark.parametrize("fn", [losses.rkd_distance, losses.rkd_angle], ids=["distance", "angle"])
def test_rkd_teacher_gets_no_gradient_and_duplicates_are_finite(fn) -> None:
    base = make(4, 3, seed=30, dtype=torch.float32)
    s = torch.cat([base, base[:2]]).requires_grad_(True)  # two duplicate pairs
    t = make(6, 5, seed=31, dtype=torch.float32).requires_grad_(True)
    t_dup = torch.cat([t[:3], t[:3]])  # the teacher has duplicates too
    out = fn(s, t_dup)
    assert math.isfinite(float(out.detach()))
    out.backward()
    assert torch.isfinite(_grad(s)).all()
    assert t.grad is None
    # all embeddings equal: every distance/angle is 0 on the student side; still finite
    same = base[:1].repeat(5, 1).requires_grad_(True)
    out2 = fn(same, make(5, 2, seed=32, dtype=torch.float32))
    out2.backward()
    assert math.isfinite(float(out2.detach())) and torch.isfinite(_grad(same)).all()


def test_rkd_distance_duplicates_match_reference() -> None:
    base = make(4, 3, seed=33)
    s = torch.cat([base, base[1:2]])
    t = make(5, 4, seed=34)
    assert_matches(losses.rkd_distance(s, t), ref_rkd_distance(_np(s), _np(t)))
    assert_matches(losses.rkd_angle(s, t), ref_rkd_angle(_np(s), _np(t)))


def test_rkd_tiny_batches_are_zero() -> None:
    one_s, one_t = make(1, 3, seed=35), make(1, 4, seed=36)
    assert float(losses.rkd_distance(one_s, one_t)) == 0.0
    assert float(losses.rkd_angle(one_s, one_t)) == 0.0
    # two points: the only non-zero cosines are those of (i, j, i), 1 on both sides
    assert abs(float(losses.rkd_angle(make(2, 3, seed=37), make(2, 4, seed=38)))) < 1e-15


# ----------------------------------------------------------------------------------------------------------------
# attention transfer, similarity preserving, CKA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s_shape,t_shape", [((3, 2, 4, 4), (3, 5, 4, 4)), ((2, 3, 7), (2, 3, 7)), ((2, 2, 3, 2, 2), (2, 1, 3, 2, 2))]
)
@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_attention_transfer_matches_reference(s_shape, t_shape, p) -> None:
    s, t = make(*s_shape, seed=40), make(*t_shape, seed=41)
    assert_matches(losses.attention_transfer(s, t, p=p), ref_attention(_np(s), _np(t), p=p))


def test_attention_transfer_hand_worked_sum_over_positions() -> None:
    # one item, one channel, two positions: maps (1, 0) and (0, 1) are orthonormal -> squared distance 2
    s = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.0, 3.0]]], dtype=torch.float64)
    assert_matches(losses.attention_transfer(s, t), 2.0)
    # (1, 1) vs (1, 0) with p = 2: unit maps (1/sqrt2, 1/sqrt2) and (1, 0): (1/sqrt2 - 1)^2 + 1/2 = 2 - sqrt2
    s2 = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    t2 = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64)
    assert_matches(losses.attention_transfer(s2, t2), 2.0 - math.sqrt(2.0))


def test_attention_transfer_scale_invariant_and_bounded() -> None:
    s, t = make(4, 3, 5, 5, seed=42), make(4, 6, 5, 5, seed=43)
    base = float(losses.attention_transfer(s, t))
    assert 0.0 < base <= 2.0
    assert_matches(losses.attention_transfer(7.0 * s, -0.1 * t), base, rtol=1e-9)


def test_attention_transfer_zero_feature_map_is_finite() -> None:
    s = make(2, 3, 4, 4, seed=44)
    s[0] = 0.0
    s.requires_grad_(True)
    t = make(2, 3, 4, 4, seed=45)
    out = losses.attention_transfer(s, t)
    assert_matches(out, ref_attention(_np(s), _np(t)))
    out.backward()
    assert torch.isfinite(_grad(s)).all()


@pytest.mark.parametrize("s_shape,t_shape", [((5, 3), (5, 3)), ((6, 2, 4), (6, 9)), ((3, 4, 2, 2), (3, 1))])
def test_similarity_preserving_matches_reference(s_shape, t_shape) -> None:
    s, t = make(*s_shape, seed=46), make(*t_shape, seed=47)
    assert_matches(losses.similarity_preserving(s, t), ref_sp(_np(s), _np(t)))


def test_similarity_preserving_hand_worked_and_scale_invariant() -> None:
    # student items orthogonal: G_s = diag(1, 4) -> rows (1, 0), (0, 1); teacher items equal: all entries 1/sqrt2
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 4
    assert_matches(losses.similarity_preserving(s, t), expected)
    assert_matches(losses.similarity_preserving(5.0 * s, 0.3 * t), expected)


@pytest.mark.parametrize(
    "x_shape,y_shape", [((10, 3), (10, 4)), ((4, 6), (4, 9)), ((8, 2, 3), (8, 5)), ((30, 2), (30, 2))]
)
def test_linear_cka_matches_reference(x_shape, y_shape) -> None:
    # covers both computation routes: batch >= Dx + Dy (feature form) and batch < Dx + Dy (Gram form)
    x, y = make(*x_shape, seed=48), make(*y_shape, seed=49)
    expected = ref_cka(_np(x), _np(y))
    assert_matches(losses.linear_cka(x, y), expected, rtol=1e-9)
    assert_matches(losses.cka_loss(x, y), 1.0 - expected, rtol=1e-9)
    assert 0.0 <= expected <= 1.0


@pytest.mark.parametrize("shape", [(12, 4), (5, 8)])
def test_linear_cka_properties(shape) -> None:
    x = make(*shape, seed=50)
    y = make(shape[0], 3, seed=51)
    assert_matches(losses.linear_cka(x, x), 1.0, rtol=1e-12)
    assert_matches(losses.linear_cka(x, -4.0 * x @ _orthogonal(shape[1], 52)), 1.0, rtol=1e-12)
    base = float(losses.linear_cka(x, y))
    assert 0.0 <= base < 1.0
    assert_matches(losses.linear_cka(y, x), base, rtol=1e-12)  # symmetric
    assert_matches(losses.linear_cka(2.5 * x, 0.01 * y), base, rtol=1e-10)  # isotropic scaling
    assert_matches(losses.linear_cka(x @ _orthogonal(shape[1], 53), y @ _orthogonal(3, 54)), base, rtol=1e-10)
    assert_matches(losses.linear_cka(x + 3.0, y - 1.0), base, rtol=1e-10)  # columns are centred
    assert float(losses.cka_loss(x, x)) == pytest.approx(0.0, abs=1e-12)


def test_linear_cka_constant_side_is_zero_with_finite_gradient() -> None:
    x = torch.ones(6, 3, dtype=torch.float64, requires_grad=True)
    out = losses.linear_cka(x, make(6, 2, seed=55))
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.isfinite(_grad(x)).all()


# ----------------------------------------------------------------------------------------------------------------
# hint_mse, cosine_embedding, smooth_l1: the per-item feature losses with mask / num_items
# ----------------------------------------------------------------------------------------------------------------

# (name, torch call, reference, shape): the reference takes (s, t, mask=, num_items=)
ItemLoss = tuple[str, Callable[..., torch.Tensor], Callable[..., float], tuple[int, ...]]
ITEM_LOSSES: list[ItemLoss] = [
    ("hint_mse", losses.hint_mse, ref_hint_mse, (7, 3, 2, 2)),
    ("cosine_embedding", losses.cosine_embedding, ref_cosine, (7, 5)),
    (
        "smooth_l1",
        lambda s, t, **kw: losses.smooth_l1(s, t, beta=0.7, **kw),
        lambda s, t, **kw: ref_smooth_l1(s, t, beta=0.7, **kw),
        (7, 5),
    ),
]
ITEM_IDS = [x[0] for x in ITEM_LOSSES]


@pytest.mark.parametrize("name,fn,ref,shape", ITEM_LOSSES, ids=ITEM_IDS)
def test_item_loss_matches_reference(name, fn, ref, shape) -> None:
    s, t = make(*shape, seed=60, scale=1.5), make(*shape, seed=61, scale=1.5)
    assert_matches(fn(s, t), ref(_np(s), _np(t)))
    mask = make_mask(shape[0], seed=62)
    assert_matches(fn(s, t, mask=mask), ref(_np(s), _np(t), mask=mask.numpy()))
    assert_matches(fn(s, t, num_items=11), ref(_np(s), _np(t), num_items=11))
    assert_matches(fn(s, t, mask=mask, num_items=2.5), ref(_np(s), _np(t), mask=mask.numpy(), num_items=2.5))
    assert_matches(fn(s, t, num_items=torch.tensor(9)), ref(_np(s), _np(t), num_items=9))
    nothing = torch.zeros(shape[0], dtype=torch.bool)
    assert float(fn(s, t, mask=nothing)) == 0.0


@pytest.mark.parametrize("name", ["cosine_embedding", "smooth_l1"])
def test_item_loss_leading_dims_are_items(name) -> None:
    fn = getattr(losses, name)
    s, t = make(3, 4, 5, seed=63), make(3, 4, 5, seed=64)
    mask = make_mask(3, 4, seed=65)
    ref = ref_cosine if name == "cosine_embedding" else ref_smooth_l1
    out = fn(s, t, mask=mask)
    assert_matches(out, ref(_np(s), _np(t), mask=mask.numpy()))
    assert_matches(out, float(fn(s.reshape(12, 5), t.reshape(12, 5), mask=mask.reshape(12))))


@pytest.mark.parametrize("name,fn,ref,shape", ITEM_LOSSES, ids=ITEM_IDS)
def test_micro_batches_with_total_num_items_equal_full_batch(name, fn, ref, shape) -> None:
    big = (13, *shape[1:])
    # scaled so that the losses are of order 1, where float32 resolves 1e-6
    s_full = make(*big, seed=66, scale=0.25, dtype=torch.float32)
    t_full = make(*big, seed=67, scale=0.25, dtype=torch.float32)
    mask = make_mask(13, seed=68)
    total_items = int(mask.sum())

    s1 = s_full.clone().requires_grad_(True)
    full = fn(s1, t_full, mask=mask)
    full.backward()

    s2 = s_full.clone().requires_grad_(True)
    acc = torch.zeros((), dtype=torch.float32)
    for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 13)):  # uneven micro-batches, one of a single item
        part = fn(s2[lo:hi], t_full[lo:hi], mask=mask[lo:hi], num_items=total_items)
        part.backward()
        acc = acc + part.detach()
    assert abs(float(acc) - float(full.detach())) < 1e-6
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
    # without a mask, the same with num_items = the whole batch's item count
    parts = [float(fn(s_full[lo:hi], t_full[lo:hi], num_items=13)) for lo, hi in ((0, 5), (5, 6), (6, 13))]
    assert abs(sum(parts) - float(fn(s_full, t_full))) < 1e-6


def test_hint_mse_hand_worked() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.zeros(2, 2, dtype=torch.float64)
    assert_matches(losses.hint_mse(s, t), (1 + 4 + 9 + 16) / 2)  # sum over features, mean over items
    assert_matches(losses.hint_mse(s, t, mask=torch.tensor([False, True])), 25.0)
    assert_matches(losses.hint_mse(s, t, num_items=10), 3.0)
    assert_matches(losses.hint_mse(torch.tensor([1.0, 3.0]), torch.zeros(2)), 5.0)  # 1-D: one number per item


def test_cosine_embedding_hand_worked() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # 1 - 0, 1 - 1/sqrt2, and a zero vector reads as cosine 0
    assert_matches(losses.cosine_embedding(s, t), (1.0 + (1.0 - 1 / math.sqrt(2)) + 1.0) / 3)
    assert_matches(losses.cosine_embedding(s[:2], -t[:2]), (1.0 + (1.0 + 1 / math.sqrt(2))) / 2)


def test_smooth_l1_hand_worked() -> None:
    s = torch.tensor([[0.5, 2.0], [0.0, -3.0]], dtype=torch.float64)
    t = torch.zeros(2, 2, dtype=torch.float64)
    # beta = 1: (0.125 + 1.5) and (0 + 2.5); beta = 2: (0.0625 + 1.0) and (0 + 2.0)
    assert_matches(losses.smooth_l1(s, t), (1.625 + 2.5) / 2)
    assert_matches(losses.smooth_l1(s, t, beta=2.0), (1.0625 + 2.0) / 2)


# ----------------------------------------------------------------------------------------------------------------
# properties shared by the whole catalogue
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZERO_AT_EQUALITY)
def test_zero_when_teacher_equals_student(name) -> None:
    fn, s_shape, _ = CATALOGUE[name]
    x = make(*s_shape, seed=70, scale=2.0)
    assert abs(float(fn(x, x.clone()))) < 1e-12


@pytest.mark.parametrize("name", ZERO_AT_EQUALITY)
def test_positive_when_teacher_differs(name) -> None:
    fn = CATALOGUE[name][0]
    s, t = _inputs(name, seed=71)
    assert float(fn(s, t)) > 1e-4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(name, dtype) -> None:
    fn = CATALOGUE[name][0]
    s, t = _inputs(name, seed=72, dtype=dtype)
    out = fn(s, t)
    assert out.dtype == torch.float32
    expected = fn(s.float(), t.float())
    assert abs(float(out) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))
    # and the float64 computation of the same rounded values
    assert abs(float(out) - float(fn(s.double(), t.double()))) <= 1e-5 * max(1.0, abs(float(expected)))


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_float64_keep_their_dtype(name) -> None:
    fn = CATALOGUE[name][0]
    s, t = _inputs(name, seed=73)
    assert fn(s, t).dtype == torch.float64
    assert fn(s.float(), t.float()).dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name) -> None:
    fn = CATALOGUE[name][0]
    s, t = _inputs(name, seed=74)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s.requires_grad_(True),))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite(name) -> None:
    fn = CATALOGUE[name][0]
    s, t = _inputs(name, seed=75, dtype=torch.float32)
    cases = {"random": (s, t), "equal": (s, s.clone()) if s.shape == t.shape else (s, t)}
    if name in ("dkd", "dist"):
        cases["large_logits"] = (s * 50, t * 50)
        masked_s, masked_t = s.clone(), t.clone()
        masked_s[:, -1] = float("-inf")  # padded vocabulary entry masked out of both models
        masked_t[:, -1] = float("-inf")
        cases["masked_vocab"] = (masked_s, masked_t)
    else:
        zeros_s, zeros_t = s.clone(), t.clone()
        zeros_s[0] = 0.0
        zeros_t[1] = 0.0
        cases["zero_items"] = (zeros_s, zeros_t)
        dup_s, dup_t = s.clone(), t.clone()
        dup_s[1] = dup_s[0]
        dup_t[-1] = dup_t[0]
        cases["duplicates"] = (dup_s, dup_t)
    for case, (a, b) in cases.items():
        a = a.clone().requires_grad_(True)
        out = fn(a, b)
        assert math.isfinite(float(out.detach())), (name, case)
        out.backward()
        assert torch.isfinite(_grad(a)).all(), (name, case, a.grad)


def test_dkd_high_temperature_limit_is_finite() -> None:
    # at large T the KL terms shrink like 1/T^2, so with the T^2 factor the value tends to a finite limit
    s, t = _inputs("dkd", seed=76)
    values = [float(_dkd_call(s, t, temperature=temp)) for temp in (100.0, 200.0, 400.0)]
    assert all(v > 0 for v in values)
    assert max(values) / min(values) < 1.05


def test_dist_high_temperature_limit_is_pearson_of_logits() -> None:
    # Pearson correlation is scale-free, so DIST does not shrink with T: as T grows, p = softmax(z / T) tends to
    # 1/C * (1 + (z - mean_c z) / T), and dist / T^2 tends to the same loss on the (row-centred) logits.
    s, t = make(6, 5, seed=76), make(6, 5, seed=77)
    temperature = 1e3  # far from 1, yet the variances stay well above the 1e-8 floor of the correlation
    zs, zt = _np(s) - _np(s).mean(axis=1, keepdims=True), _np(t) - _np(t).mean(axis=1, keepdims=True)
    inter = 1 - np.mean([np_pearson(zs[i], zt[i]) for i in range(6)])
    intra = 1 - np.mean([np_pearson(zs[:, c], zt[:, c]) for c in range(5)])
    out = float(losses.dist(s, t, beta=1.0, gamma=0.5, temperature=temperature)) / temperature**2
    assert math.isclose(out, inter + 0.5 * intra, rel_tol=1e-2)
    assert_matches(
        losses.dist(s, t, beta=1.0, gamma=0.5, temperature=temperature),
        ref_dist(_np(s), _np(t), beta=1.0, gamma=0.5, temperature=temperature),
    )


# ----------------------------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------------------------


def test_dkd_errors() -> None:
    s, t, y = make(4, 5, seed=80), make(4, 5, seed=81), torch.tensor([0, 1, 2, 3])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {bad!r}"):
            losses.dkd(s, t, y, temperature=bad)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got -1\.0"):
        losses.dkd(s, t, y, alpha=-1.0)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got nan"):
        losses.dkd(s, t, y, beta=float("nan"))
    with pytest.raises(ValueError, match=r"same shape, got \(4, 5\) and \(4, 6\)"):
        losses.dkd(s, make(4, 6, seed=82), y)
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match logits shape \(4, 5\)"):
        losses.dkd(s, t, y[:3])
    with pytest.raises(TypeError, match=r"target must hold integer class indices, got torch\.float32"):
        losses.dkd(s, t, y.float())
    with pytest.raises(ValueError, match=r"label 5 out of range for 5 classes \(expected 0\.\.4\)"):
        losses.dkd(s, t, torch.tensor([0, 5, 2, 3]))
    with pytest.raises(ValueError, match=r"label -1 out of range for 5 classes"):
        losses.dkd(s, t, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"at least 2 classes, got shape \(4, 1\)"):
        losses.dkd(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point logits"):
        losses.dkd(y.reshape(2, 2), y.reshape(2, 2), torch.tensor([0, 1]))


def test_dist_errors() -> None:
    s, t = make(4, 5, seed=83), make(4, 5, seed=84)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -2\.0"):
        losses.dist(s, t, temperature=-2.0)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -0\.5"):
        losses.dist(s, t, beta=-0.5)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, got inf"):
        losses.dist(s, t, gamma=float("inf"))
    with pytest.raises(ValueError, match=r"same shape, got \(4, 5\) and \(3, 5\)"):
        losses.dist(s, t[:3])
    with pytest.raises(ValueError, match=r"dist needs logits \[B, C\] with B, C >= 1, got shape \(5,\)"):
        losses.dist(s[0], t[0])


@pytest.mark.parametrize(
    "fn", [losses.rkd_distance, losses.rkd_angle, losses.similarity_preserving, losses.linear_cka, losses.cka_loss]
)
def test_relational_errors(fn) -> None:
    with pytest.raises(ValueError, match=r"same number of items \(dim 0\), got 4 \(shape \(4, 3\)\) and 5"):
        fn(make(4, 3, seed=85), make(5, 3, seed=86))
    with pytest.raises(ValueError, match=r"must have shape \[B, D\] \(extra dimensions are flattened\), got \(4,\)"):
        fn(make(4, seed=87), make(4, 3, seed=88))
    with pytest.raises(TypeError, match=r"must be a floating-point tensor, got dtype torch\.int64"):
        fn(torch.zeros(4, 3, dtype=torch.long), make(4, 3, seed=89))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got list"):
        fn([[1.0, 2.0]], make(1, 2, seed=90))


def test_attention_transfer_errors() -> None:
    s, t = make(2, 3, 4, 4, seed=91), make(2, 5, 4, 4, seed=92)
    with pytest.raises(ValueError, match=r"spatial sizes must match, got \(4, 4\) and \(2, 2\)"):
        losses.attention_transfer(s, make(2, 5, 2, 2, seed=93))
    with pytest.raises(ValueError, match=r"teacher_feat must have shape \[B, C, \.\.\.spatial\], got \(2, 5\)"):
        losses.attention_transfer(s, make(2, 5, seed=94))
    with pytest.raises(ValueError, match=r"same number of items \(dim 0\), got 2"):
        losses.attention_transfer(s, t[:1])
    for bad in (0.5, 0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"p must be a finite number >= 1, got {bad!r}"):
            losses.attention_transfer(s, t, p=bad)


@pytest.mark.parametrize("name,fn,ref,shape", ITEM_LOSSES, ids=ITEM_IDS)
def test_item_loss_errors(name, fn, ref, shape) -> None:
    s = make(*shape, seed=95)
    other = make(*shape[:-1], shape[-1] + 1, seed=96)
    with pytest.raises(ValueError, match=rf"same shape, got {re_shape(s.shape)} and {re_shape(other.shape)}"):
        fn(s, other)
    with pytest.raises(ValueError, match="mask shape"):
        fn(s, s, mask=torch.ones(shape[0] + 1, dtype=torch.bool))
    for bad in (0, -3.0, float("nan")):
        with pytest.raises(ValueError, match=r"num_items must be > 0"):
            fn(s, s, num_items=bad)
    with pytest.raises(TypeError, match=r"must be a floating-point tensor, got dtype torch\.int64"):
        fn(s, torch.zeros(shape, dtype=torch.long))


def re_shape(shape: torch.Size) -> str:
    return re.escape(str(tuple(shape)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_smooth_l1_bad_beta(bad) -> None:
    s = make(3, 4, seed=97)
    with pytest.raises(ValueError, match=rf"beta must be a finite number > 0, got {bad!r}"):
        losses.smooth_l1(s, s, beta=bad)


def test_all_new_losses_are_exported() -> None:
    for name in [*NAMES, "cka_loss"]:
        assert name in losses.__all__
        assert callable(getattr(losses, name))
