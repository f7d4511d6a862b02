"""Tests of per-token weights in token KD, sparse (top-k) token KD from cached teacher outputs, ATKD-style
uncertainty weights and the ULD distance. References are float64 numpy computations written here from the
definitions, or hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor import losses
from mentor.lm.losses import (
    divergence,
    target_mask,
    token_kd,
    token_kd_from_logits,
    token_kd_topk,
    token_kd_topk_from_logits,
)
from mentor.lm.weighting import teacher_token_uncertainty, token_uncertainty, uncertainty_weights


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def setup(seed: int = 0, B: int = 3, T: int = 11, Ds: int = 8, Dt: int = 12, V: int = 30,
          dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Ds, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(B, T, Dt, generator=g, dtype=dtype)
    s_head, t_head = nn.Linear(Ds, V, dtype=dtype), nn.Linear(Dt, V, dtype=dtype)
    with torch.no_grad():
        for p in (*s_head.parameters(), *t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return hs, s_head, ht, t_head, labels


def selected(x: Tensor, labels: Tensor) -> np.ndarray:
    """Rows of ``x`` [B, T, ...] at the shifted target positions, as float64 numpy."""
    return x.detach().double()[:, :-1][target_mask(labels)].numpy()


# ------------------------------------------------------------------------------------------- weighted token KD


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_weighted_token_kd_is_the_weighted_sum_over_num_items(name: str) -> None:
    hs, s_head, ht, t_head, labels = setup(1)
    g = torch.Generator().manual_seed(9)
    w_full = torch.rand(labels.shape, generator=g) * 2
    w_full[0, 6] = 0.0  # a zero weight drops the token
    div = divergence(name, temperature=1.5, **({"beta": 0.4} if name == "jsd" else {}))
    s = np_softmax(selected(s_head(hs), labels) / 1.5)
    t = np_softmax(selected(t_head(ht), labels) / 1.5)
    if name == "forward_kl":
        per = (t * np.log(t / s)).sum(-1)
    elif name == "reverse_kl":
        per = (s * np.log(s / t)).sum(-1)
    elif name == "jsd":
        m = 0.4 * t + 0.6 * s
        per = 0.4 * (t * np.log(t / m)).sum(-1) + 0.6 * (s * np.log(s / m)).sum(-1)
    else:
        per = 0.5 * np.abs(t - s).sum(-1)
    w = w_full.double()[:, 1:][target_mask(labels)].numpy()
    n = int(target_mask(labels).sum())
    want = 1.5**2 * float((w * per).sum()) / 17.0
    chunked = token_kd(hs, s_head, ht, t_head, labels, divergence=div, token_weights=w_full, num_items=17,
                       chunk_size=4)
    dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, divergence=div, token_weights=w_full,
                                 num_items=17)
    assert chunked.item() == pytest.approx(want, rel=1e-5)
    assert dense.item() == pytest.approx(want, rel=1e-5)
    # default normaliser: the target count (a weighted sum / N, not a weighted mean)
    flat = torch.from_numpy(w).float()
    default = token_kd(hs, s_head, ht, t_head, labels, divergence=div, token_weights=flat, chunk_size=5)
    assert default.item() == pytest.approx(1.5**2 * float((w * per).sum()) / n, rel=1e-5)
    # gradients of the chunked weighted loss equal the dense ones
    params = (hs, s_head.weight, s_head.bias)
    g_chunk = torch.autograd.grad(chunked, params)
    g_dense = torch.autograd.grad(dense, params)
    for a, b in zip(g_chunk, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unit_weights_change_nothing_and_bad_weights_are_refused() -> None:
    hs, s_head, ht, t_head, labels = setup(2)
    plain = token_kd(hs, s_head, ht, t_head, labels, chunk_size=3)
    ones = token_kd(hs, s_head, ht, t_head, labels, chunk_size=3, token_weights=torch.ones(labels.shape))
    torch.testing.assert_close(plain, ones)
    with pytest.raises(ValueError, match="token_weights must be"):
        token_kd(hs, s_head, ht, t_head, labels, token_weights=torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        token_kd(hs, s_head, ht, t_head, labels, token_weights=-torch.ones(labels.shape))


# ------------------------------------------------------------------------------------------------- top-k token KD


def topk_of(teacher_logits: Tensor, k: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """What mentor.cache stores per position: top-k log-probabilities (normalised over all classes) + indices."""
    values, indices = F.log_softmax(teacher_logits.double(), dim=-1).topk(k, dim=-1)
    return values.to(dtype), indices.to(torch.int16)


@pytest.mark.parametrize("tail", ["rest", "renormalize"])
def test_topk_token_kd_matches_a_float64_bucket_reference(tail: str) -> None:
    hs, s_head, ht, t_head, labels = setup(3, dtype=torch.float64)
    k = 5
    t_logits = t_head(ht).detach()
    values, indices = topk_of(t_logits, k, torch.float64)
    s = np_softmax(selected(s_head(hs), labels))
    t = np_softmax(selected(t_logits, labels))
    idx = selected(indices.long(), labels).astype(int)
    p_top = np.take_along_axis(t, idx, -1)
    q_top = np.take_along_axis(s, idx, -1)
    if tail == "rest":
        p = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
        q = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
        per = (p * np.log(p / q)).sum(-1)
    else:
        p = p_top / p_top.sum(-1, keepdims=True)
        per = (p * np.log(p / q_top)).sum(-1)
    want = float(per.sum()) / len(per)
    got = token_kd_topk(hs, s_head, values, indices, labels, tail=tail, chunk_size=4)
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_topk_chunked_equals_unchunked_value_and_gradients(chunk_size: int) -> None:
    hs, s_head, ht, t_head, labels = setup(4)
    values, indices = topk_of(t_head(ht).detach(), 6, torch.float16)  # fp16 values as the cache stores them
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    params = (hs, s_head.weight, s_head.bias)
    dense = token_kd_topk_from_logits(s_head(hs), values, indices, labels, temperature=2.0, num_items=20,
                                      token_weights=w)
    chunked = token_kd_topk(hs, s_head, values, indices, labels, temperature=2.0, num_items=20, token_weights=w,
                            chunk_size=chunk_size)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(dense, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", ["rest", "renormalize"])
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_forward_kl(tail: str) -> None:
    hs, s_head, ht, t_head, labels = setup(5, dtype=torch.float64)
    V = s_head.out_features
    values, indices = topk_of(t_head(ht).detach(), V, torch.float64)
    got = token_kd_topk(hs, s_head, values, indices, labels, tail=tail, temperature=1.0, chunk_size=3)
    dense = token_kd(hs, s_head, ht, t_head, labels, divergence="forward_kl", chunk_size=3)
    assert got.item() == pytest.approx(dense.item(), rel=1e-10)
    g1 = torch.autograd.grad(got, (hs, s_head.weight))
    g2 = torch.autograd.grad(dense, (hs, s_head.weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # and equals mentor.losses.kl_div on the selected positions (one formula, reused)
    mask = target_mask(labels)
    kl = losses.kl_div(s_head(hs)[:, :-1][mask], t_head(ht)[:, :-1][mask])
    assert got.item() == pytest.approx(kl.item(), rel=1e-10)


def test_topk_all_masked_gives_zero_and_bad_inputs_are_refused() -> None:
    hs, s_head, ht, t_head, labels = setup(6)
    values, indices = topk_of(t_head(ht).detach(), 4)
    none = torch.full_like(labels, -100)
    loss = token_kd_topk(hs, s_head, values, indices, none)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, hs)
    assert not g.isnan().any() and g.abs().sum() == 0
    small = labels.clamp(max=19).masked_fill(labels == -100, -100)  # targets inside [0, 20), indices up to 29
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, 20\).*got indices in \[0, 29\]"):
        token_kd_topk(hs, s_head, values, indices, small, vocab_size=20)
    with pytest.raises(ValueError, match=r"must match labels"):
        token_kd_topk(hs, s_head, values[:, :-1], indices[:, :-1], labels)


def test_topk_padded_student_rows_are_truncated() -> None:
    hs, s_head, ht, t_head, labels = setup(7)
    V = s_head.out_features
    values, indices = topk_of(t_head(ht).detach(), 5)
    padded = nn.Linear(s_head.in_features, V + 3)
    with torch.no_grad():
        padded.weight[:V] = s_head.weight
        padded.bias[:V] = s_head.bias
    a = token_kd_topk(hs, padded, values, indices, labels, vocab_size=V)
    b = token_kd_topk(hs, s_head, values, indices, labels)
    torch.testing.assert_close(a, b)
    (gw,) = torch.autograd.grad(a, padded.weight)
    assert gw[V:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- ATKD-style weights


def test_token_uncertainty_by_hand() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    z = p.log()
    u = token_uncertainty(z, torch.tensor([1, 0]), measure="target")
    torch.testing.assert_close(u, torch.tensor([0.8, 2 / 3], dtype=torch.float64))
    h = token_uncertainty(z, measure="entropy")
    want0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    torch.testing.assert_close(h, torch.tensor([want0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the target token ids"):
        token_uncertainty(z, measure="target")


def test_hard_easy_weights_by_hand() -> None:
    u = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.5])
    # n = 5, hard = ceil(0.4 * 5) = 2 tokens of largest u: index 1 (0.9), then index 2 (0.5, earlier than 4)
    w = uncertainty_weights(u, rule="hard_easy", hard_fraction=0.4, easy_weight=0.25)
    hard, easy = 0.75 * 5 / 2, 0.25 * 5 / 3
    torch.testing.assert_close(w, torch.tensor([easy, hard, hard, easy, easy]))
    assert w.mean().item() == pytest.approx(1.0)
    # sum w_i d_i / N = easy_weight * mean_easy + (1 - easy_weight) * mean_hard
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (w * d).sum().item() / 5 == pytest.approx(0.25 * (1 + 4 + 5) / 3 + 0.75 * (2 + 3) / 2)
    torch.testing.assert_close(uncertainty_weights(u, rule="proportional"), u / u.mean())
    assert torch.equal(uncertainty_weights(torch.zeros(3), rule="proportional"), torch.ones(3))
    assert torch.equal(uncertainty_weights(u, hard_fraction=1.0), torch.ones(5))


def test_teacher_token_uncertainty_matches_dense_and_feeds_token_kd() -> None:
    hs, s_head, ht, t_head, labels = setup(8)
    mask = target_mask(labels)
    dense = token_uncertainty(t_head(ht)[:, :-1][mask], labels[:, 1:][mask], measure="target")
    chunked = teacher_token_uncertainty(ht, t_head, labels, measure="target", chunk_size=4)
    torch.testing.assert_close(chunked, dense)
    w = uncertainty_weights(chunked)
    got = token_kd(hs, s_head, ht, t_head, labels, token_weights=w, chunk_size=4)
    want = token_kd_from_logits(s_head(hs), t_head(ht), labels, token_weights=w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ ULD


def np_uld(s: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
    width = max(ps.shape[-1], pt.shape[-1])
    a = -np.sort(-ps, axis=-1)
    b = -np.sort(-pt, axis=-1)
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
    b = np.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, width - b.shape[-1])])
    return np.abs(a - b).sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_distance_matches_numpy(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, 29, generator=g, dtype=torch.float64)
    per = np_uld(s.detach().numpy(), t.numpy(), temperature)
    got = losses.uld_distance(s, t, temperature=temperature)
    assert got.item() == pytest.approx(per.sum() / 20, rel=1e-12)
    mask = torch.rand(4, 5, generator=g) > 0.3
    got_m = losses.uld_distance(s, t, temperature=temperature, mask=mask, num_items=7)
    assert got_m.item() == pytest.approx(per[mask.numpy()].sum() / 7, rel=1e-12)
    (grad,) = torch.autograd.grad(got, s)
    assert grad.isfinite().all() and grad.abs().sum() > 0
    # same vocabulary, same distribution: zero; a permuted teacher vocabulary: still zero
    assert losses.uld_distance(t, t[..., torch.randperm(29, generator=g)]).item() == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="leading"):
        losses.uld_distance(s, t[:3])
