"""Sparse (top-k) teacher losses against a float64 numpy computation and the dense ``kl_div``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mentor import losses


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _topk(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(teacher, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    return values, indices


def _reference(s: np.ndarray, t: np.ndarray, k: int, tail: str, temp: float, kind: str) -> float:
    """Per-row loop from the definitions: buckets, then KL or CE, times T^2, mean over rows."""
    total = 0.0
    for srow, trow in zip(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), strict=True):
        lp_full = _np_log_softmax(trow)
        top = np.argsort(-lp_full, kind="stable")[:k]
        q_full = np.exp(_np_log_softmax(srow / temp))
        if tail == "renormalize":
            w = np.exp(lp_full[top] / temp)
            p = w / w.sum()
            q = q_full[top]
        else:
            m = max(1.0 - np.exp(lp_full[top]).sum(), 0.0)
            w = np.concatenate([np.exp(lp_full[top] / temp), [m ** (1.0 / temp)]])
            p = w / w.sum()
            rest = np.ones_like(q_full, dtype=bool)
            rest[top] = False
            q = np.concatenate([q_full[top], [q_full[rest].sum()]])
        keep = p > 0
        if kind == "kl":
            total += float((p[keep] * (np.log(p[keep]) - np.log(q[keep]))).sum())
        else:
            total += float(-(p[keep] * np.log(q[keep])).sum())
    rows = s.reshape(-1, s.shape[-1]).shape[0]
    return temp**2 * total / rows


@pytest.mark.parametrize("tail", ["rest", "renormalize"])
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_sparse_against_numpy(tail: str, k: int, temp: float, kind: str) -> None:
    g = torch.Generator().manual_seed(k * 13 + int(temp * 10))
    s = torch.randn(4, 3, 10, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 3, 10, generator=g, dtype=torch.float64) * 3
    values, indices = _topk(t, k)
    fn = losses.sparse_kl_div if kind == "kl" else losses.sparse_soft_cross_entropy
    got = fn(s, values, indices, tail=tail, temperature=temp)
    want = _reference(s.numpy(), t.numpy(), k, tail, temp, kind)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("tail", ["rest", "renormalize"])
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_full_k_equals_dense_kl(tail: str, temp: float) -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(32, 10, generator=g, requires_grad=True)
    t = torch.randn(32, 10, generator=g) * 2
    values, indices = _topk(t, 10)
    sparse = losses.sparse_kl_div(s, values.half(), indices.to(torch.int32), tail=tail, temperature=temp)
    dense = losses.kl_div(s, torch.log_softmax(t, -1).half().float(), temperature=temp)
    assert abs(sparse.item() - dense.item()) < 1e-6
    (gs,) = torch.autograd.grad(sparse, s)
    s2 = s.detach().clone().requires_grad_(True)
    (gd,) = torch.autograd.grad(losses.kl_div(s2, torch.log_softmax(t, -1).half().float(), temperature=temp), s2)
    assert torch.isfinite(gs).all()
    assert torch.allclose(gs, gd, atol=1e-6)


def test_renormalize_equals_dense_kl_with_masked_teacher() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(16, 12, generator=g, dtype=torch.float64)
    t = torch.randn(16, 12, generator=g, dtype=torch.float64)
    values, indices = _topk(t, 4)
    masked = torch.full_like(t, float("-inf")).scatter(-1, indices, values)
    want = losses.kl_div(s, masked, temperature=2.0)
    got = losses.sparse_kl_div(s, values, indices, tail="renormalize", temperature=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_rest_bucket_never_nan_or_inf() -> None:
    # A confident student that gives the teacher's tail almost nothing, a teacher whose stored fp16 values sum to
    # more than 1, an extreme temperature, a bf16 student: the value and gradient stay finite.
    s = torch.tensor([[60.0, 50.0, -60.0, -60.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    values = torch.tensor([[-0.0001, -9.0], [-0.6, -0.7]]).half()  # first row sums to > 1 after rounding
    indices = torch.tensor([[0, 1], [2, 3]], dtype=torch.int16)
    for temp in (0.05, 1.0, 20.0):
        for fn in (losses.sparse_kl_div, losses.sparse_soft_cross_entropy):
            out = fn(s, values, indices, tail="rest", temperature=temp)
            (grad,) = torch.autograd.grad(out, s)
            assert torch.isfinite(out) and torch.isfinite(grad).all()
    out = losses.sparse_kl_div(s.detach().bfloat16(), values, indices.long(), tail="rest")
    assert torch.isfinite(out)


def test_mask_and_num_items() -> None:
    g = torch.Generator().manual_seed(9)
    s = torch.randn(6, 8, generator=g, dtype=torch.float64)
    t = torch.randn(6, 8, generator=g, dtype=torch.float64)
    values, indices = _topk(t, 3)
    mask = torch.tensor([True, False, True, True, False, True])
    got = losses.sparse_kl_div(s, values, indices, mask=mask, num_items=10)
    per_row = [losses.sparse_kl_div(s[i : i + 1], values[i : i + 1], indices[i : i + 1]).item() for i in range(6)]
    assert got.item() == pytest.approx(sum(v for v, m in zip(per_row, mask, strict=True) if m) / 10, rel=1e-12)


def test_sparse_bad_input() -> None:
    s = torch.randn(4, 10)
    values, indices = _topk(torch.randn(4, 10), 3)
    with pytest.raises(ValueError, match="tail"):
        losses.sparse_kl_div(s, values, indices, tail="drop")
    with pytest.raises(ValueError, match="same shape"):
        losses.sparse_kl_div(s, values, indices[:, :2])
    with pytest.raises(ValueError, match="integer"):
        losses.sparse_kl_div(s, values, indices.float())
    with pytest.raises(ValueError, match="leading"):
        losses.sparse_kl_div(s[:3], values, indices)
    with pytest.raises(ValueError, match="temperature"):
        losses.sparse_kl_div(s, values, indices, temperature=0.0)
