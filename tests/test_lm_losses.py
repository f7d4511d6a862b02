"""Tests of mentor.lm.losses (token-level KD, chunked) and mentor.lm.vocab.

Every loss is checked against a dense float64 numpy computation written from the definitions here (not through
mentor.losses); the chunked path is checked against the dense path in value and gradient; memory is measured with
the PyTorch profiler's allocation events. These tests need only torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from mentor.lm import losses as lm_losses
from mentor.lm.losses import DIVERGENCES, count_targets, divergence, target_mask, token_kd, token_kd_from_logits
from mentor.lm.vocab import shared_vocab_size

# ------------------------------------------------------------------------------------------------ float64 reference


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def np_token_value(
    name: str, s: np.ndarray, t: np.ndarray, temperature: float, beta: float, alpha: float
) -> np.ndarray:
    """Per-token divergence ``[N]`` from the definitions, in float64."""
    p_s, p_t = np_softmax(s / temperature), np_softmax(t / temperature)
    if name == "forward_kl":
        v = np_kl(p_t, p_s)
    elif name == "reverse_kl":
        v = np_kl(p_s, p_t)
    elif name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        v = beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)
    elif name == "skew_forward_kl":
        v = np_kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    elif name == "skew_reverse_kl":
        v = np_kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    else:
        v = 0.5 * np.abs(p_t - p_s).sum(axis=-1)
    return v * temperature**2


def reference(name, s_logits, t_logits, labels, *, temperature, beta, alpha, num_items=None) -> float:
    """Dense float64 token KD: shift, select labels != -100, sum per-token values, divide."""
    s = s_logits.detach().double().numpy()[:, :-1]
    t = t_logits.detach().double().numpy()[:, :-1]
    keep = labels.numpy()[:, 1:] != -100
    per = np_token_value(name, s[keep], t[keep], temperature, beta, alpha)
    n = max(int(keep.sum()), 1) if num_items is None else num_items
    return float(per.sum() / n)


HPARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def make_div(name: str, temperature: float = 1.0):
    return divergence(name, temperature=temperature, **HPARAMS.get(name, {}))


def setup(seed: int = 0, B: int = 3, T: int = 13, Ds: int = 8, Dt: int = 12, V: int = 40, Vt: int | None = None,
          dtype: torch.dtype = torch.float32):
    """Random hidden states, heads and labels with masked prompt and padding positions."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Ds, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(B, T, Dt, generator=g, dtype=dtype)
    s_head = nn.Linear(Ds, V, dtype=dtype)
    t_head = nn.Linear(Dt, V if Vt is None else Vt, dtype=dtype)
    with torch.no_grad():
        for p in (*s_head.parameters(), *t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # a prompt
    if B > 2:
        labels[1, -4:] = -100  # padding
        labels[2, 3] = -100
    return hs, s_head, ht, t_head, labels


def grads(loss: Tensor, *tensors: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors))


# ------------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_matches_float64_reference(name: str, temperature: float) -> None:
    hs, s_head, ht, t_head, labels = setup(1)
    div = make_div(name, temperature)
    hp = {"beta": 0.3, "alpha": 0.2}
    want = reference(name, s_head(hs), t_head(ht), labels, temperature=temperature, **hp)
    dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, divergence=div)
    chunked = token_kd(hs, s_head, ht, t_head, labels, divergence=div, chunk_size=7)
    assert want > 0
    assert dense.item() == pytest.approx(want, rel=1e-5)
    assert chunked.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
def test_chunked_equals_unchunked_value_and_gradients(name: str, chunk_size: int) -> None:
    hs, s_head, ht, t_head, labels = setup(2)
    div = make_div(name, 2.0)
    params = (hs, s_head.weight, s_head.bias)
    dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, divergence=div)
    chunked = token_kd(hs, s_head, ht, t_head, labels, divergence=div, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(chunked, *params), grads(dense, *params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_float64_tight() -> None:
    hs, s_head, ht, t_head, labels = setup(3, dtype=torch.float64)
    div = make_div("jsd", 1.5)
    params = (hs, s_head.weight, s_head.bias)
    dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, divergence=div)
    chunked = token_kd(hs, s_head, ht, t_head, labels, divergence=div, chunk_size=3)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(chunked, *params), grads(dense, *params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bfloat16_inputs_compute_in_float32() -> None:
    hs, s_head, ht, t_head, labels = setup(17)
    want = token_kd(hs, s_head, ht, t_head, labels, divergence="jsd")
    hs16 = hs.detach().bfloat16().requires_grad_()
    got = token_kd(hs16, s_head.bfloat16(), ht.bfloat16(), t_head.bfloat16(), labels, divergence="jsd", chunk_size=4)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=3e-2)
    (g,) = grads(got, hs16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_gradient_flows_through_a_network_into_hidden_states() -> None:
    # The hidden states come from a layer: the gradient must reach its parameters exactly as the dense path's.
    hs, s_head, ht, t_head, labels = setup(4)
    body = nn.Linear(8, 8)
    div = make_div("reverse_kl")
    dense = token_kd_from_logits(s_head(body(hs)), t_head(ht), labels, divergence=div)
    chunked = token_kd(body(hs), s_head, ht, t_head, labels, divergence=div, chunk_size=4)
    for got, want in zip(grads(chunked, *body.parameters()), grads(dense, *body.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_accumulation_with_global_normaliser_equals_one_batch(name: str) -> None:
    hs, s_head, ht, t_head, labels = setup(5, B=4)
    div = make_div(name, 2.0)
    params = (s_head.weight, s_head.bias)
    # micro-batches of unequal target counts: rows 0..0 and 1..3
    parts = [slice(0, 1), slice(1, 4)]
    total = sum(count_targets(labels[p]) for p in parts)
    assert total == count_targets(labels) and count_targets(labels[parts[0]]) != count_targets(labels[parts[1]])
    acc_loss = torch.zeros(())
    acc_grads = [torch.zeros_like(p) for p in params]
    for p in parts:
        loss = token_kd(hs[p], s_head, ht[p], t_head, labels[p], divergence=div, num_items=total, chunk_size=6)
        acc_loss = acc_loss + loss.detach()
        for a, g in zip(acc_grads, grads(loss, *params), strict=True):
            a += g
    big = token_kd(hs, s_head, ht, t_head, labels, divergence=div, chunk_size=6)
    torch.testing.assert_close(acc_loss, big.detach(), rtol=1e-6, atol=1e-7)
    for a, g in zip(acc_grads, grads(big, *params), strict=True):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-6)
    # The mean of per-micro-batch means (the bug this normaliser prevents) differs.
    naive = sum(token_kd(hs[p], s_head, ht[p], t_head, labels[p], divergence=div) for p in parts) / 2
    assert abs(float(naive.detach()) - float(big.detach())) > 1e-4


def test_num_items_tensor_and_number_agree() -> None:
    hs, s_head, ht, t_head, labels = setup(6)
    a = token_kd(hs, s_head, ht, t_head, labels, num_items=50)
    b = token_kd(hs, s_head, ht, t_head, labels, num_items=torch.tensor(50.0))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_items"):
        token_kd(hs, s_head, ht, t_head, labels, num_items=0)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients() -> None:
    hs, s_head, ht, t_head, labels = setup(7)
    labels = torch.full_like(labels, -100)
    for div in DIVERGENCES:
        loss = token_kd(hs, s_head, ht, t_head, labels, divergence=div)
        dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, divergence=div)
        assert loss.item() == 0.0 and dense.item() == 0.0
        for g in grads(loss, hs, s_head.weight, s_head.bias):
            assert torch.isfinite(g).all() and not g.any()


def test_shift_selects_next_token_positions() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert target_mask(labels).tolist() == [[False, True, True, False]]
    assert target_mask(labels, shift=False).tolist() == [[False, False, True, True, False]]
    assert count_targets(labels) == 2
    # shift=False compares the logits at the labelled positions themselves
    hs, s_head, ht, t_head, _ = setup(8, B=1, T=5)
    div = make_div("forward_kl")
    unshifted = token_kd(hs, s_head, ht, t_head, labels, shift=False, divergence=div)
    pos = torch.tensor([2, 3])
    want = div(s_head(hs[0, pos]), t_head(ht[0, pos]))
    torch.testing.assert_close(unshifted, want)


def test_teacher_never_receives_gradients() -> None:
    hs, s_head, ht, t_head, labels = setup(9)
    ht = ht.clone().requires_grad_()
    loss = token_kd(hs, s_head, ht, t_head, labels, chunk_size=4)
    loss.backward()
    assert ht.grad is None
    assert all(p.grad is None for p in t_head.parameters())
    assert s_head.weight.grad is not None and hs.grad is not None


def test_teacher_head_as_tensor_or_callable_matches_linear() -> None:
    hs, s_head, ht, t_head, labels = setup(10)
    a = token_kd(hs, s_head, ht, t_head, labels)
    no_bias = nn.Linear(12, 40, bias=False)
    with torch.no_grad():
        no_bias.weight.copy_(t_head.weight)
    b = token_kd(hs, s_head, ht, lambda h: no_bias(h) + t_head.bias, labels)
    torch.testing.assert_close(a, b)
    c = token_kd(hs, s_head.weight, ht, no_bias.weight, labels)
    d = token_kd_from_logits(F.linear(hs, s_head.weight), no_bias(ht), labels)
    torch.testing.assert_close(c, d)


def test_no_grad_path_gives_the_same_value() -> None:
    hs, s_head, ht, t_head, labels = setup(11)
    with_grad = token_kd(hs, s_head, ht, t_head, labels, divergence="jsd", chunk_size=5)
    with torch.no_grad():
        without = token_kd(hs, s_head, ht, t_head, labels, divergence="jsd", chunk_size=5)
    assert not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without)


# ----------------------------------------------------------------------------------------------------- vocabularies


def test_mismatched_vocabularies_are_refused_naming_both_sizes() -> None:
    hs, s_head, ht, t_head, labels = setup(12, V=512, Vt=520)
    with pytest.raises(ValueError, match=r"student has 512 logits but teacher has 520"):
        token_kd(hs, s_head, ht, t_head, labels)
    with pytest.raises(ValueError, match=r"512.*520"):
        token_kd_from_logits(s_head(hs), t_head(ht), labels)
    with pytest.raises(ValueError, match=r"student has 512 logits, fewer than vocab_size=515"):
        token_kd(hs, s_head, ht, t_head, labels, vocab_size=515)
    assert shared_vocab_size(64, 64) == 64
    with pytest.raises(ValueError, match="positive integer"):
        shared_vocab_size(64, 64, 0)


def test_padded_teacher_rows_are_truncated_to_the_shared_range() -> None:
    hs, s_head, ht, t_head, labels = setup(13, V=512, Vt=520)
    params = (hs, s_head.weight, s_head.bias)
    div = make_div("jsd", 2.0)
    got = token_kd(hs, s_head, ht, t_head, labels, vocab_size=512, divergence=div, chunk_size=8)
    dense = token_kd_from_logits(s_head(hs), t_head(ht), labels, vocab_size=512, divergence=div)
    # the definition: the teacher's softmax over its first 512 logits only
    manual = token_kd_from_logits(s_head(hs), t_head(ht)[..., :512], labels, divergence=div)
    want = reference("jsd", s_head(hs), t_head(ht)[..., :512], labels, temperature=2.0, beta=0.3, alpha=0.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(dense, manual)
    for a, b in zip(grads(got, *params), grads(manual, *params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_student_rows_get_no_kd_gradient() -> None:
    hs, s_head, ht, t_head, labels = setup(14, V=48, Vt=40)
    labels = labels.clamp(max=39)
    loss = token_kd(hs, s_head, ht, t_head, labels, vocab_size=40)
    g_w, g_b = grads(loss, s_head.weight, s_head.bias)
    assert not g_w[40:].any() and not g_b[40:].any() and g_w[:40].any()


def test_target_ids_outside_the_vocabulary_are_refused() -> None:
    hs, s_head, ht, t_head, labels = setup(15)
    labels[1, 2] = 40
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        token_kd(hs, s_head, ht, t_head, labels)


def test_bad_arguments_are_refused_with_the_value() -> None:
    hs, s_head, ht, t_head, labels = setup(16)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence("kl")
    with pytest.raises(ValueError, match="beta is a parameter of 'jsd' only"):
        divergence("forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="alpha"):
        divergence("skew_forward_kl", alpha=1.0)
    with pytest.raises(ValueError, match="temperature"):
        divergence("tvd", temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_kd(hs, s_head, ht, t_head, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"must match labels"):
        token_kd(hs, s_head, ht, t_head, labels[:, :-1])
    with pytest.raises(ValueError, match=r"student head weight must be \[V, 8\]"):
        token_kd(hs, t_head, ht, t_head, labels)


# ----------------------------------------------------------------------------------------------------------- memory


def peak_bytes(fn) -> int:
    """Peak bytes live on the CPU allocator while ``fn`` runs (allocated minus freed since the start), from the
    profiler's raw allocation events (each allocation and free, with its own timestamp)."""
    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - a torch without the profiler's event tree
        pytest.skip("this torch build has no profiler event tree (torch._C._profiler._EventType)")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _memory_case(T: int, *, chunked: bool, V: int, D: int = 16, chunk: int = 32):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, T, D, generator=g, requires_grad=True)
    ht = torch.randn(2, T, D, generator=g)
    ws = torch.randn(V, D, generator=g, requires_grad=True)
    wt = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (2, T), generator=g)

    def run() -> None:
        if chunked:
            loss = token_kd(hs, ws, ht, wt, labels, divergence="jsd", chunk_size=chunk)
        else:
            loss = token_kd_from_logits(hs @ ws.t(), ht @ wt.t(), labels, divergence="jsd")
        loss.backward()

    return run


def test_chunked_loss_never_materialises_full_logits() -> None:
    V, chunk, T = 2048, 32, 512
    n_tokens = 2 * (T - 1)
    full_logits = n_tokens * V  # elements of one model's [tokens, vocab] logits
    for chunked in (True, False):
        mode = LargestTensor()
        with mode:
            _memory_case(T, chunked=chunked, V=V, chunk=chunk)()
        if chunked:
            # generalized_jsd stacks two [chunk, V] blocks for its logsumexp; nothing scales with the tokens
            assert mode.largest <= 2 * chunk * V < full_logits / 4, mode.largest
        else:
            assert mode.largest >= full_logits  # the check can fail: the dense path does materialise them


def test_chunked_peak_memory_is_bounded_by_the_chunk_not_the_sequence() -> None:
    V, D, chunk = 2048, 16, 32
    block = chunk * V * 4  # one [chunk, V] float32 block
    logits = 2 * 1024 * V * 4  # one model's float32 logits at T = 1025
    short = peak_bytes(_memory_case(129, chunked=True, V=V, D=D, chunk=chunk))
    long = peak_bytes(_memory_case(1025, chunked=True, V=V, D=D, chunk=chunk))
    dense = peak_bytes(_memory_case(1025, chunked=False, V=V, D=D, chunk=chunk))
    # The measurement sees the dense path's logits (both models', plus the loss's intermediates).
    assert dense >= 2 * logits, (dense, logits)
    # Chunked: what grows with the tokens is only hidden-width data (gathered states and their gradients), about
    # 3 rows of D floats per token; allow 6.
    assert long - short < 6 * D * 4 * 2 * (1025 - 129), (short, long)
    # The rest is a fixed number of [chunk, V] blocks (generalized_jsd needs about 17 live at its backward), the
    # weight gradient, and those hidden-width rows: far below the dense path.
    assert long < 24 * block + 2 * V * D * 4 + 6 * D * 4 * 2 * 1025, (long, block)
    assert long * 20 < dense, (long, dense)


def test_divergences_are_the_mentor_losses_functions() -> None:
    # No second copy of a formula: every named divergence is a functools.partial of a mentor.losses function.
    from mentor import losses

    funcs = {divergence(n).func for n in DIVERGENCES}  # type: ignore[attr-defined]
    assert funcs == {losses.kl_div, losses.generalized_jsd, losses.skew_kl, losses.tvd}
    assert lm_losses.losses is losses
