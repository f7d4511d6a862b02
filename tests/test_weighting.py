"""Tests of the weighting objects in mentor.targets (and FreeMatch's fairness loss in mentor.losses) against
independent NumPy implementations written from the papers' equations, over several update rounds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mentor import losses, targets
from mentor.schedules import RampUp

# ----------------------------------------------------------------------------------------------------------------
# NumPy references, from the papers
# ----------------------------------------------------------------------------------------------------------------


class RefFlexMatch:
    """FlexMatch (arXiv 2110.08263), eqs. 4-7: sigma_t(c) counts items whose latest confident prediction is c."""

    def __init__(self, tau: float, num_classes: int, num_items: int, warmup: bool, mapping: str) -> None:
        self.tau, self.c, self.n, self.warmup, self.mapping = tau, num_classes, num_items, warmup, mapping
        self.hat = [-1] * num_items

    def update(self, probs: np.ndarray, index: np.ndarray) -> None:
        for p, n in zip(probs, index, strict=True):
            if p.max() > self.tau:
                self.hat[int(n)] = int(p.argmax())

    def thresholds(self) -> np.ndarray:
        sigma = np.array([sum(1 for h in self.hat if h == c) for c in range(self.c)], dtype=np.float64)
        unused = sum(1 for h in self.hat if h == -1)
        denom = max(sigma.max(), unused) if self.warmup else sigma.max()
        beta = sigma / denom if denom > 0 else np.zeros(self.c)
        mapped = {"convex": beta / (2 - beta), "linear": beta, "concave": np.log(beta + 1) / np.log(2)}[self.mapping]
        return mapped * self.tau

    def weights(self, probs: np.ndarray) -> np.ndarray:
        t = self.thresholds()
        return np.array([float(p.max() >= t[p.argmax()]) for p in probs])


class RefFreeMatch:
    """FreeMatch (arXiv 2205.07246), eqs. 6-9 and 11."""

    def __init__(self, num_classes: int, m: float) -> None:
        self.m = m
        self.tau = 1.0 / num_classes
        self.p = np.full(num_classes, 1.0 / num_classes)
        self.h = np.full(num_classes, 1.0 / num_classes)

    def update(self, probs: np.ndarray) -> None:
        m = self.m
        self.tau = m * self.tau + (1 - m) * probs.max(axis=1).mean()
        self.p = m * self.p + (1 - m) * probs.mean(axis=0)
        hist = np.bincount(probs.argmax(axis=1), minlength=len(self.p)) / len(probs)
        self.h = m * self.h + (1 - m) * hist

    def thresholds(self) -> np.ndarray:
        return self.tau * self.p / self.p.max()

    def weights(self, probs: np.ndarray) -> np.ndarray:
        t = self.thresholds()
        return (probs.max(axis=1) >= t[probs.argmax(axis=1)]).astype(np.float64)


def ref_fairness(student_logits: np.ndarray, mask: np.ndarray, p_run: np.ndarray, h_run: np.ndarray) -> float:
    z = student_logits[mask]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    hist = np.bincount(probs.argmax(axis=1), minlength=z.shape[1]) / len(z)

    def sumnorm(v: np.ndarray) -> np.ndarray:
        return v / v.sum()

    def inv(v: np.ndarray) -> np.ndarray:
        return np.array([1 / x if x > 0 else 0.0 for x in v])

    a = sumnorm(p_run * inv(h_run))
    b = sumnorm(probs.mean(axis=0) * inv(hist))
    cross_entropy = -(a * np.log(b + 1e-12)).sum()  # H(a, b)
    return float(-cross_entropy)  # L_f = -H(a, b)


class RefSoftMatch:
    """SoftMatch (arXiv 2301.10921), eqs. 7-8, with USB's n_sigma width divisor; and uniform alignment (eq. 10)."""

    def __init__(self, num_classes: int, m: float, n_sigma: float) -> None:
        self.m, self.n_sigma = m, n_sigma
        self.mu, self.var = 1.0 / num_classes, 1.0
        self.p_align = np.full(num_classes, 1.0 / num_classes)

    def update(self, probs: np.ndarray) -> None:
        conf = probs.max(axis=1)
        self.mu = self.m * self.mu + (1 - self.m) * conf.mean()
        self.var = self.m * self.var + (1 - self.m) * conf.var(ddof=1)

    def weights(self, probs: np.ndarray) -> np.ndarray:
        sigma = math.sqrt(self.var) / self.n_sigma
        return np.array([1.0 if q >= self.mu else math.exp(-((q - self.mu) ** 2) / (2 * sigma**2))
                         for q in probs.max(axis=1)])

    def update_align(self, probs: np.ndarray) -> None:
        self.p_align = self.m * self.p_align + (1 - self.m) * probs.mean(axis=0)

    def align(self, probs: np.ndarray) -> np.ndarray:
        u = np.full(probs.shape[1], 1.0 / probs.shape[1])
        q = probs * u / self.p_align
        return q / q.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def batch_probs(rounds: int, b: int, c: int, seed: int) -> list[np.ndarray]:
    """Batches of probabilities that grow sharper over the rounds, with a class imbalance, so thresholds move."""
    rng = np.random.default_rng(seed)
    out = []
    bias = np.linspace(0.0, 1.5, c)
    for r in range(rounds):
        z = rng.normal(size=(b, c)) * (0.5 + 0.4 * r) + bias
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return out


def t32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def assert_weights_match(got: torch.Tensor, want: np.ndarray, conf: np.ndarray, thr: np.ndarray) -> None:
    """Masks agree except for items within float32 rounding of their threshold."""
    assert got.shape == want.shape and got.dtype == torch.float32
    far = np.abs(conf - thr) > 1e-5
    assert far.mean() > 0.95
    np.testing.assert_array_equal(got.numpy()[far], want[far])


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# fixed and dual thresholds
# ----------------------------------------------------------------------------------------------------------------


def test_fixed_threshold_hand_table() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.05, 0.95]])
    w = targets.FixedThreshold(0.8)(probs)
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert targets.pseudo_labels(probs).tolist() == [0, 0, 0, 1]
    assert targets.FixedThreshold()(probs.half()).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_fixed_threshold_matches_reference() -> None:
    for probs in batch_probs(5, 64, 10, seed=0):
        got = targets.FixedThreshold(0.7)(t32(probs))
        np.testing.assert_array_equal(got.numpy(), (probs.max(axis=1) >= 0.7).astype(np.float32))


def test_dual_threshold_split() -> None:
    probs = torch.tensor([[0.97, 0.03], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.02, 0.98]])
    dual = targets.DualThreshold(high=0.95, low=0.65)
    split = dual.split(probs)
    assert split.hard.tolist() == [True, False, False, False, True]
    assert split.soft.tolist() == [False, True, False, True, False]
    assert split.labels.tolist() == [0, 0, 0, 1, 1]
    assert dual(probs).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert not bool((split.hard & split.soft).any())
    dual.update(probs)
    assert dual.state_dict() == {}


# ----------------------------------------------------------------------------------------------------------------
# FlexMatch
# ----------------------------------------------------------------------------------------------------------------


def test_flexmatch_hand_table() -> None:
    flex = targets.FlexMatch(0.6, num_classes=2, num_items=4)
    assert flex.thresholds().tolist() == [0.0, 0.0]  # nothing learnt: every pseudo-label is used
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    flex.update(probs[:3], torch.tensor([0, 1, 2]))
    # memory [0, 0, 1, -1]: sigma = [2, 1], one unused item; beta = [2, 1] / max(2, 1) = [1, 0.5]
    assert flex.memory.tolist() == [0, 0, 1, -1]
    assert torch.allclose(flex.learning_effect(), torch.tensor([1.0, 0.5]))
    expected = torch.tensor([0.6 * 1.0 / (2 - 1.0), 0.6 * 0.5 / (2 - 0.5)])  # [0.6, 0.2]
    assert torch.allclose(flex.thresholds(), expected)
    assert flex(probs).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert flex(torch.tensor([[0.45, 0.55], [0.58, 0.42], [0.85, 0.15]])).tolist() == [1.0, 0.0, 1.0]
    # an unconfident prediction (0.55 <= tau) leaves an item's memory as it was
    flex.update(torch.tensor([[0.55, 0.45], [0.2, 0.8]]), torch.tensor([0, 3]))
    assert flex.memory.tolist() == [0, 0, 1, 1]
    # no warm-up, linear mapping: sigma = [2, 2], beta = [1, 1]
    linear = targets.FlexMatch(0.6, num_classes=2, num_items=4, warmup=False, mapping="linear")
    linear.load_state_dict(flex.state_dict())
    assert torch.allclose(linear.thresholds(), torch.tensor([0.6, 0.6]))


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("mapping", ["convex", "linear", "concave"])
def test_flexmatch_matches_reference_over_rounds(warmup: bool, mapping: str) -> None:
    n, c, b = 200, 6, 40
    flex = targets.FlexMatch(0.9, num_classes=c, num_items=n, warmup=warmup, mapping=mapping)
    ref = RefFlexMatch(0.9, c, n, warmup, mapping)
    rng = np.random.default_rng(1)
    saw_thresholds = set()
    for probs in batch_probs(12, b, c, seed=1):
        index = rng.choice(n, size=b, replace=False)
        flex.update(t32(probs), torch.tensor(index))
        ref.update(probs.astype(np.float32).astype(np.float64), index)
        thr = ref.thresholds()
        np.testing.assert_allclose(flex.thresholds().numpy(), thr, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(flex.memory.numpy(), np.array(ref.hat))
        conf = probs.max(axis=1)
        assert_weights_match(flex(t32(probs)), ref.weights(probs), conf, thr[probs.argmax(axis=1)])
        saw_thresholds.add(tuple(np.round(thr, 4)))
    assert len(saw_thresholds) > 5


# ----------------------------------------------------------------------------------------------------------------
# FreeMatch and its fairness loss
# ----------------------------------------------------------------------------------------------------------------


def test_freematch_matches_reference_over_rounds() -> None:
    c = 5
    free = targets.FreeMatch(c, momentum=0.7)
    ref = RefFreeMatch(c, 0.7)
    assert torch.allclose(free.thresholds(), torch.full((c,), 1 / c))
    for probs in batch_probs(15, 32, c, seed=2):
        free.update(t32(probs))
        ref.update(probs)
        np.testing.assert_allclose(free.thresholds().numpy(), ref.thresholds(), rtol=1e-5)
        np.testing.assert_allclose(free.label_hist.numpy(), ref.h, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(free.class_probs.numpy(), ref.p, rtol=1e-5)
        thr = ref.thresholds()[probs.argmax(axis=1)]
        assert_weights_match(free(t32(probs)), ref.weights(probs), probs.max(axis=1), thr)


def test_freematch_hand_table() -> None:
    free = targets.FreeMatch(2, momentum=0.5)
    free.update(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
    # tau = 0.5 * 0.5 + 0.5 * 0.8 = 0.65; p~ = 0.5 * [0.5, 0.5] + 0.5 * [0.8, 0.2] = [0.65, 0.35]
    assert torch.allclose(free.global_threshold, torch.tensor(0.65))
    assert torch.allclose(free.thresholds(), torch.tensor([0.65, 0.65 * 0.35 / 0.65]))
    assert torch.allclose(free.label_hist, torch.tensor([0.75, 0.25]))
    assert free(torch.tensor([[0.66, 0.34], [0.64, 0.36], [0.4, 0.6]])).tolist() == [1.0, 0.0, 1.0]


def test_freematch_fairness_matches_reference_and_gradient_flows() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(20, 4)) * 2
    mask = rng.random(20) < 0.6
    p_run = np.array([0.4, 0.3, 0.2, 0.1])
    h_run = np.array([0.5, 0.0, 0.3, 0.2])  # an empty class: 1/0 counts as 0
    logits = torch.tensor(z, requires_grad=True)
    got = losses.freematch_fairness(logits, torch.tensor(p_run), torch.tensor(h_run), mask=torch.tensor(mask))
    assert math.isclose(float(got.detach()), ref_fairness(z, mask, p_run, h_run), rel_tol=1e-10, abs_tol=1e-12)
    got.backward()
    assert logits.grad is not None and float(logits.grad[~torch.tensor(mask)].abs().max()) == 0.0
    assert float(logits.grad.abs().max()) > 0
    every = losses.freematch_fairness(torch.tensor(z), torch.tensor(p_run), torch.tensor(h_run))
    assert math.isclose(float(every), ref_fairness(z, np.ones(20, bool), p_run, h_run), rel_tol=1e-10)
    nothing = torch.zeros(20, dtype=torch.bool)
    none = losses.freematch_fairness(logits, torch.tensor(p_run), torch.tensor(h_run), mask=nothing)
    assert float(none.detach()) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="class_probs"):
        losses.freematch_fairness(logits, torch.ones(3), torch.ones(4))


# ----------------------------------------------------------------------------------------------------------------
# SoftMatch and uniform alignment
# ----------------------------------------------------------------------------------------------------------------


def test_softmatch_matches_reference_over_rounds() -> None:
    c = 4
    soft = targets.SoftMatch(c, momentum=0.8, n_sigma=2)
    ref = RefSoftMatch(c, 0.8, 2.0)
    for probs in batch_probs(10, 32, c, seed=4):
        soft.update(t32(probs))
        ref.update(probs)
        assert math.isclose(float(soft.mean), ref.mu, rel_tol=1e-5)
        assert math.isclose(float(soft.var), ref.var, rel_tol=1e-5)
        got = soft(t32(probs))
        assert got.dtype == torch.float32 and float(got.min()) >= 0 and float(got.max()) <= 1
        np.testing.assert_allclose(got.numpy(), ref.weights(probs), rtol=1e-4, atol=1e-6)


def test_softmatch_hand_values() -> None:
    soft = targets.SoftMatch(2, momentum=0.0, n_sigma=1.0)
    soft.update(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))  # mean 0.8, unbiased var 0.02
    w = soft(torch.tensor([[0.95, 0.05], [0.8, 0.2], [0.6, 0.4]]))
    assert torch.allclose(w, torch.tensor([1.0, 1.0, math.exp(-(0.2**2) / (2 * 0.02))]))


def test_uniform_alignment_matches_reference() -> None:
    c = 3
    ua = targets.UniformAlignment(c, momentum=0.9)
    ref = RefSoftMatch(c, 0.9, 2.0)
    for probs in batch_probs(6, 16, c, seed=5):
        ua.update(t32(probs))
        ref.update_align(probs)
        np.testing.assert_allclose(ua(t32(probs)).numpy(), ref.align(probs), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# the common contract: state round trip, no mutation in __call__, bad arguments
# ----------------------------------------------------------------------------------------------------------------


def _all_weightings() -> list[targets.Weighting]:
    return [
        targets.FixedThreshold(0.8),
        targets.DualThreshold(0.9, 0.6),
        targets.FlexMatch(0.8, num_classes=4, num_items=64),
        targets.FreeMatch(4, momentum=0.9),
        targets.SoftMatch(4, momentum=0.9),
    ]


@pytest.mark.parametrize("index", range(5))
def test_state_round_trip_through_safetensors_and_call_is_pure(index: int, tmp_path: Path) -> None:
    w = _all_weightings()[index]
    fresh = _all_weightings()[index]
    assert isinstance(w, targets.Weighting)
    batches = batch_probs(4, 16, 4, seed=6)
    rng = np.random.default_rng(6)
    for probs in batches[:3]:
        w.update(t32(probs), torch.tensor(rng.choice(64, 16, replace=False)))
    state = w.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    before = {k: v.clone() for k, v in state.items()}
    out = w(t32(batches[3]))
    out2 = w(t32(batches[3]))
    assert torch.equal(out, out2) and state_equal(w.state_dict(), before)  # __call__ changes nothing
    if state:
        save_file(state, str(tmp_path / "w.safetensors"))
        loaded = load_file(str(tmp_path / "w.safetensors"))
    else:
        loaded = {}
    fresh.load_state_dict(loaded)
    assert state_equal(fresh.state_dict(), before)
    assert torch.equal(fresh(t32(batches[3])), out)
    # the state is a copy: updating one does not touch the other
    idx = torch.arange(16)
    w.update(t32(batches[3]), idx)
    fresh.update(t32(batches[3]), idx)
    assert state_equal(w.state_dict(), fresh.state_dict())
    assert not state or not state_equal(before, w.state_dict())


def test_gathered_update_equals_one_big_batch() -> None:
    """Under DDP each process updates with the gathered batch: the same as one process seeing all of it."""
    a, b = batch_probs(2, 8, 3, seed=7)
    one, two = targets.FreeMatch(3, 0.9), targets.FreeMatch(3, 0.9)
    one.update(t32(np.concatenate([a, b])))
    two.update(torch.cat([t32(a), t32(b)]))
    assert state_equal(one.state_dict(), two.state_dict())


def test_bad_state_dicts() -> None:
    free = targets.FreeMatch(3)
    with pytest.raises(ValueError, match="keys"):
        free.load_state_dict({"class_probs": torch.ones(3)})
    state = free.state_dict()
    state["class_probs"] = torch.ones(4)
    with pytest.raises(ValueError, match="class_probs"):
        free.load_state_dict(state)
    flex = targets.FlexMatch(num_classes=2, num_items=3)
    with pytest.raises(ValueError, match="memory"):
        flex.load_state_dict({"memory": torch.tensor([0, 5, -1])})
    with pytest.raises(ValueError, match="keys"):
        targets.FixedThreshold().load_state_dict({"x": torch.ones(1)})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: targets.FixedThreshold(1.5), "tau"),
        (lambda: targets.DualThreshold(high=0.5, low=0.8), "low"),
        (lambda: targets.DualThreshold(high=1.2), "high"),
        (lambda: targets.FlexMatch(-0.1, num_classes=3, num_items=5), "tau"),
        (lambda: targets.FlexMatch(num_classes=0, num_items=5), "num_classes"),
        (lambda: targets.FlexMatch(num_classes=3, num_items=0), "num_items"),
        (lambda: targets.FlexMatch(num_classes=3, num_items=5, mapping="cubic"), "mapping"),
        (lambda: targets.FreeMatch(3, momentum=1.5), "momentum"),
        (lambda: targets.FreeMatch(0), "num_classes"),
        (lambda: targets.SoftMatch(3, n_sigma=0), "n_sigma"),
        (lambda: targets.SoftMatch(3, momentum=-0.5), "momentum"),
        (lambda: targets.UniformAlignment(3, momentum=2.0), "momentum"),
        (lambda: targets.FreeMatch(3)(torch.ones(2, 4) / 4), "num_classes"),
        (lambda: targets.FreeMatch(3).update(torch.ones(4) / 4), "shape"),
        (lambda: targets.FlexMatch(num_classes=2, num_items=5).update(torch.ones(2, 2) / 2), "index"),
        (lambda: targets.FlexMatch(num_classes=2, num_items=5).update(torch.ones(2, 2) / 2, torch.tensor([0, 5])),
         "index"),
        (lambda: targets.FlexMatch(num_classes=2, num_items=5).update(torch.ones(2, 2) / 2, torch.tensor([0])),
         "index"),
        (lambda: targets.SoftMatch(2).update(torch.ones(1, 2) / 2), "at least 2"),
    ],
)
def test_bad_arguments_raise_value_errors(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_integer_probs_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        targets.FixedThreshold()(torch.ones(2, 3, dtype=torch.int64))


def test_rampup_is_mean_teachers_sigmoid_ramp() -> None:
    """Mean Teacher's sigmoid_rampup (Tarvainen & Valpola 2017, after Laine & Aila 2017): exp(-5 (1 - t)^2), t the
    clipped fraction of the ramp; mentor.schedules.RampUp counts steps."""
    ramp = RampUp(value=2.0, steps=100)
    for step in (0, 1, 25, 50, 99, 100, 150):
        t = min(max(step, 0), 100) / 100
        assert math.isclose(ramp(step), 2.0 * math.exp(-5.0 * (1.0 - t) ** 2), rel_tol=1e-12)
