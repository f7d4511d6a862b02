"""Tests of mentor.targets, mentor.teachers and mentor.method.compute_terms against numpy computations."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mentor import losses, targets, teachers
from mentor.data import UNLABELLED
from mentor.method import Method, Term, compute_terms
from mentor.schedules import Linear, RampUp, Step

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def tiny_model(seed: int, dropout: float = 0.5) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, in float64: 4 inputs, 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


class DictModel(nn.Module):
    """A model whose output is a dict with logits and features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(4, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "features": h}


# ----------------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------------


def test_hard_label() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 1.0, 2.0], [-5.0, -4.0, -3.0]])
    labels = targets.HardLabel()(logits)
    assert labels.tolist() == [1, 0, 2]
    assert labels.dtype == torch.long
    z = randn(2, 5, 7, seed=1)
    out = targets.HardLabel()(z)
    assert out.shape == (2, 5)
    assert np.array_equal(out.numpy(), _np(z).argmax(axis=-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_softmax_matches_numpy(temperature) -> None:
    z = randn(2, 4, 6, seed=2) * 3
    probs = targets.Softmax(temperature)(z)
    assert probs.dtype == torch.float32  # computed in float32 whatever the input
    np.testing.assert_allclose(_np(probs), np_softmax(_np(z) / temperature), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(probs).sum(axis=-1), 1.0, rtol=1e-6)


def test_softmax_half_precision_input() -> None:
    z = randn(3, 5, seed=3, dtype=torch.float16)
    probs = targets.Softmax(2.0)(z)
    assert probs.dtype == torch.float32
    np.testing.assert_allclose(_np(probs), np_softmax(_np(z) / 2.0), rtol=1e-5, atol=1e-7)


def test_softmax_hand_value() -> None:
    # logits [2 ln 3, 0] at T = 2 -> softmax([ln 3, 0]) = [3/4, 1/4]
    probs = targets.Softmax(2.0)(torch.tensor([[2 * math.log(3.0), 0.0]]))
    np.testing.assert_allclose(_np(probs), [[0.75, 0.25]], rtol=1e-6)


def test_softmax_bad_temperature() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"temperature must be > 0, got {bad}"):
            targets.Softmax(bad)


def test_top_k_hand_values() -> None:
    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.0]])
    assert targets.TopK(2)(logits).tolist() == [[-inf, 3.0, 2.0, -inf], [-inf, -inf, 4.0, 2.0]]
    assert targets.TopK(1)(logits).tolist() == [[-inf, 3.0, -inf, -inf], [-inf, -inf, 4.0, -inf]]
    assert torch.equal(targets.TopK(4)(logits), logits)
    assert torch.equal(targets.TopK(10)(logits), logits)


def test_top_k_probabilities_are_renormalised_top_k() -> None:
    z = randn(2, 3, 9, seed=4)
    kept = targets.TopK(3)(z)
    assert kept.shape == z.shape
    z_np = _np(z)
    expected = np.zeros_like(z_np)
    top = np.argsort(-z_np, axis=-1)[..., :3]
    top_vals = np.take_along_axis(z_np, top, axis=-1)
    np.put_along_axis(expected, top, np_softmax(top_vals), axis=-1)
    np.testing.assert_allclose(_np(torch.softmax(kept, dim=-1)), expected, rtol=1e-12, atol=1e-15)
    assert (torch.isfinite(kept).sum(dim=-1) == 3).all()


def test_top_k_bad_k() -> None:
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"k must be >= 1, got {bad}"):
            targets.TopK(bad)


# ----------------------------------------------------------------------------------------------------------------
# teachers.Frozen
# ----------------------------------------------------------------------------------------------------------------


def test_frozen_is_eval_and_has_no_grad() -> None:
    model = tiny_model(0)
    model.train()
    reference = copy.deepcopy(model).eval()
    teacher = teachers.Frozen(model)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert teacher.parameters() == list(model.parameters())

    x = randn(5, 4, seed=5).requires_grad_(True)
    out = teacher.targets(x)
    assert set(out) == {"logits"}
    assert not out["logits"].requires_grad
    assert out["logits"].grad_fn is None
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=0)


def test_frozen_stays_eval_after_train_is_called() -> None:
    model = tiny_model(1)
    teacher = teachers.Frozen(model)
    reference = copy.deepcopy(model).eval()
    running_mean = model[1].running_mean.clone()

    model.train()  # e.g. a loop that calls .train() on everything it sees
    x = randn(6, 4, seed=6)
    out_a = teacher.targets(x)["logits"]
    out_b = teacher.targets(x)["logits"]
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    # eval behaviour: deterministic (no dropout), BatchNorm uses and keeps its running statistics
    assert torch.equal(out_a, out_b)
    assert torch.equal(model[1].running_mean, running_mean)
    with torch.no_grad():
        torch.testing.assert_close(out_a, reference(x), rtol=0, atol=0)


def test_frozen_input_transform_and_dict_outputs() -> None:
    model = tiny_model(2)
    teacher = teachers.Frozen(model, input_transform=lambda x: 2.0 * x + 1.0)
    x = randn(3, 4, seed=7)
    with torch.no_grad():
        expected = model(2.0 * x + 1.0)
    torch.testing.assert_close(teacher.targets(x)["logits"], expected, rtol=0, atol=0)

    dict_model = DictModel()
    out = teachers.Frozen(dict_model).targets(x)
    assert set(out) == {"logits", "features"}
    assert all(not v.requires_grad for v in out.values())
    with torch.no_grad():
        h = torch.tanh(dict_model.body(x))
        torch.testing.assert_close(out["features"], h)
        torch.testing.assert_close(out["logits"], dict_model.head(h))


# ----------------------------------------------------------------------------------------------------------------
# teachers.Self
# ----------------------------------------------------------------------------------------------------------------


def test_self_is_the_student_detached() -> None:
    student = tiny_model(3, dropout=0.0)
    student.eval()
    teacher = teachers.Self(student)
    x = randn(4, 4, seed=8)
    out = teacher.targets(x)["logits"]
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.requires_grad for p in student.parameters())  # the student itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(out, student(x), rtol=0, atol=0)
    # no copy: the targets follow the student as it changes
    with torch.no_grad():
        student[4].bias.add_(1.0)
    torch.testing.assert_close(teacher.targets(x)["logits"], out + 1.0)
    assert teacher.to("cpu") is teacher


# ----------------------------------------------------------------------------------------------------------------
# teachers.Ensemble
# ----------------------------------------------------------------------------------------------------------------


def _fixed(z: torch.Tensor) -> teachers.Callable:
    return teachers.Callable(lambda _x: z)


def test_ensemble_weighted_mean_of_probabilities() -> None:
    zs = [randn(5, 4, seed=10 + i) * 2 for i in range(3)]
    ens = teachers.Ensemble([_fixed(z) for z in zs], weights=[1.0, 3.0, 0.5])
    out = ens.targets(torch.zeros(5, 1))["logits"]
    w = np.array([1.0, 3.0, 0.5]) / 4.5
    expected = sum(wi * np_softmax(_np(z)) for wi, z in zip(w, zs, strict=True))
    # returned as log probabilities: exp() is the mixture, and softmax() of these logits is the mixture too
    np.testing.assert_allclose(np.exp(_np(out)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(torch.softmax(out, dim=-1)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(torch.logsumexp(out, dim=-1)), 0.0, atol=1e-6)
    assert ens.weights == pytest.approx(list(w), rel=1e-15)


def test_ensemble_default_equal_weights_and_zero_weight() -> None:
    z1, z2 = randn(4, 3, seed=20), randn(4, 3, seed=21)
    out = teachers.Ensemble([_fixed(z1), _fixed(z2)]).targets(torch.zeros(4, 1))["logits"]
    np.testing.assert_allclose(np.exp(_np(out)), 0.5 * np_softmax(_np(z1)) + 0.5 * np_softmax(_np(z2)), rtol=1e-5)
    # a member with weight 0 contributes nothing
    only_second = teachers.Ensemble([_fixed(z1), _fixed(z2)], weights=[0.0, 2.0]).targets(torch.zeros(4, 1))
    np.testing.assert_allclose(np.exp(_np(only_second["logits"])), np_softmax(_np(z2)), rtol=1e-5)
    assert torch.isfinite(only_second["logits"]).all()


def test_ensemble_logits_mode() -> None:
    zs = [randn(5, 4, seed=30 + i) for i in range(3)]
    ens = teachers.Ensemble([_fixed(z) for z in zs], weights=[2.0, 1.0, 1.0], combine="logits")
    out = ens.targets(torch.zeros(5, 1))["logits"]
    expected = 0.5 * _np(zs[0]) + 0.25 * _np(zs[1]) + 0.25 * _np(zs[2])
    np.testing.assert_allclose(_np(out), expected, rtol=1e-6, atol=1e-6)


def test_ensemble_of_frozen_models_has_no_grad() -> None:
    models = [tiny_model(40), tiny_model(41)]
    refs = [copy.deepcopy(m).eval() for m in models]
    ens = teachers.Ensemble([teachers.Frozen(m) for m in models], weights=[1.0, 1.0])
    x = randn(6, 4, seed=42).requires_grad_(True)
    out = ens.targets(x)["logits"]
    assert not out.requires_grad
    with torch.no_grad():
        expected = 0.5 * np_softmax(_np(refs[0](x))) + 0.5 * np_softmax(_np(refs[1](x)))
    np.testing.assert_allclose(np.exp(_np(out)), expected, rtol=1e-5, atol=1e-7)
    assert ens.to("cpu") is ens


def test_ensemble_errors() -> None:
    a, b = _fixed(torch.zeros(1, 2)), _fixed(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least one teacher"):
        teachers.Ensemble([])
    with pytest.raises(ValueError, match="got 2 teachers but 3 weights"):
        teachers.Ensemble([a, b], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights must be >= 0 with a positive sum, got \[1.0, -0.5\]"):
        teachers.Ensemble([a, b], weights=[1.0, -0.5])
    with pytest.raises(ValueError, match=r"weights must be >= 0 with a positive sum, got \[0.0, 0.0\]"):
        teachers.Ensemble([a, b], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="combine must be 'probs' or 'logits', got 'mean'"):
        teachers.Ensemble([a, b], combine="mean")


# ----------------------------------------------------------------------------------------------------------------
# teachers.EMA
# ----------------------------------------------------------------------------------------------------------------


def _train_step(student: nn.Module, seed: int) -> None:
    """Stand-in for an optimiser step: new parameters, and a train-mode forward that moves BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        student.train()
        student(torch.randn(8, 4, generator=g, dtype=torch.float64) * 2 + 1)


def _state_np(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("average_buffers", [True, False])
def test_ema_update_formula_over_three_steps(average_buffers) -> None:
    student = tiny_model(50)
    schedule = Linear(0.5, 0.9, 2)  # decays 0.5, 0.7, 0.9 at steps 0, 1, 2
    ema = teachers.EMA(student, decay=schedule, buffers=average_buffers)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for ep, sp in zip(ema.model.parameters(), student.parameters(), strict=True):
        assert torch.equal(ep, sp) and ep.data_ptr() != sp.data_ptr()  # a copy, not the same tensors

    expected = _state_np(student)
    float_buffers = {"1.running_mean", "1.running_var"}
    param_names = {name for name, _ in student.named_parameters()}
    for step, decay in enumerate((0.5, 0.7, 0.9)):
        _train_step(student, seed=100 + step)
        current = _state_np(student)
        for key in expected:
            if key in param_names or (average_buffers and key in float_buffers):
                expected[key] = decay * expected[key] + (1.0 - decay) * current[key]
            else:  # copied: float buffers when buffers=False, and the integer num_batches_tracked always
                expected[key] = current[key].copy()
        ema.update(student, step)
        got = _state_np(ema.model)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=1e-14, err_msg=f"{key} @ {step}")

    assert int(ema.model[1].num_batches_tracked) == 3
    # averaged and copied buffers really differ from each other here
    same = np.allclose(_state_np(ema.model)["1.running_mean"], _state_np(student)["1.running_mean"])
    assert same is (not average_buffers)


def test_ema_decay_ends() -> None:
    student = tiny_model(51)
    start = _state_np(student)
    keep = teachers.EMA(student, decay=1.0)
    follow = teachers.EMA(student, decay=0.0)
    _train_step(student, seed=200)
    keep.update(student, 0)
    follow.update(student, 0)
    now = _state_np(student)
    for name, _ in student.named_parameters():
        np.testing.assert_array_equal(_state_np(keep.model)[name], start[name])
        np.testing.assert_array_equal(_state_np(follow.model)[name], now[name])


def test_ema_targets_use_the_average_in_eval_mode() -> None:
    student = tiny_model(52)
    ema = teachers.EMA(student, decay=0.9)
    _train_step(student, seed=300)
    ema.update(student, 0)
    x = randn(5, 4, seed=53).requires_grad_(True)
    out = ema.targets(x)["logits"]
    assert not out.requires_grad
    reference = copy.deepcopy(ema.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)


def test_ema_state_dict_round_trip() -> None:
    student = tiny_model(54)
    ema = teachers.EMA(student, decay=Linear(0.5, 0.9, 2))
    for step in range(3):
        _train_step(student, seed=400 + step)
        ema.update(student, step)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}

    restored = teachers.EMA(tiny_model(99), decay=Linear(0.5, 0.9, 2))  # different initial weights
    x = randn(5, 4, seed=55)
    assert not torch.equal(restored.targets(x)["logits"], ema.targets(x)["logits"])
    restored.load_state_dict(saved)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert torch.equal(restored.targets(x)["logits"], ema.targets(x)["logits"])
    # and both continue identically
    _train_step(student, seed=500)
    ema.update(student, 3)
    restored.update(student, 3)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_ema_bad_decay() -> None:
    student = tiny_model(56)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"EMA decay at step 7 is {bad}, expected a value in \[0, 1\]"):
            teachers.EMA(student, decay=bad).update(student, 7)
    with pytest.raises(ValueError, match="EMA decay at step 0 is nan"):
        teachers.EMA(student, decay=lambda step: float("nan")).update(student, 0)


# ----------------------------------------------------------------------------------------------------------------
# teachers.Callable
# ----------------------------------------------------------------------------------------------------------------


def test_callable_detaches_tensor_dict_and_hf_style_outputs() -> None:
    w = randn(4, 3, seed=60).requires_grad_(True)
    x = randn(5, 4, seed=61)

    out = teachers.Callable(lambda inp: inp @ w).targets(x)
    assert set(out) == {"logits"}
    assert not out["logits"].requires_grad
    np.testing.assert_allclose(_np(out["logits"]), _np(x) @ _np(w), rtol=1e-12)

    out = teachers.Callable(lambda inp: {"logits": inp @ w, "extra": (inp @ w).sum(-1)}).targets(x)
    assert set(out) == {"logits", "extra"}
    assert all(not v.requires_grad for v in out.values())

    out = teachers.Callable(lambda inp: SimpleNamespace(logits=inp @ w)).targets(x)
    assert set(out) == {"logits"} and not out["logits"].requires_grad

    with pytest.raises(TypeError, match="expected a tensor or a mapping with 'logits', got list"):
        teachers.Callable(lambda inp: [inp]).targets(x)


# ----------------------------------------------------------------------------------------------------------------
# method.compute_terms
# ----------------------------------------------------------------------------------------------------------------


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(axis=-1)


def _method() -> Method:
    return Method(
        "test",
        (
            Term("kd", losses.kl_div, kwargs={"temperature": 2.0}, weight=Linear(0.0, 1.0, 10)),
            Term("ce", losses.cross_entropy, target="label", items="labelled", weight=0.5),
            Term("tvd_labelled", losses.tvd, items="labelled", weight=Step((5,), (2.0, 3.0))),
            Term(
                "soft",
                losses.soft_cross_entropy,
                transform=targets.Softmax(2.0),
                kwargs={"temperature": 2.0},
                weight=RampUp(1.0, 4),
            ),
        ),
    )


# The Softmax transform computes its probabilities in float32 (by design), so "soft" matches to float32 precision.
REL = {"kd": 1e-10, "ce": 1e-10, "tvd_labelled": 1e-10, "soft": 1e-6}


def _batch():
    s = randn(6, 4, seed=70).requires_grad_(True)
    t = randn(6, 4, seed=71)
    labels = torch.tensor([0, UNLABELLED, 3, 2, UNLABELLED, 1])
    return s, t, labels


def _expected_terms(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    s_np, t_np, y = _np(s), _np(t), labels.numpy()
    lab = y != UNLABELLED
    p_s2, p_t2 = np_softmax(s_np / 2.0), np_softmax(t_np / 2.0)
    p_s1, p_t1 = np_softmax(s_np), np_softmax(t_np)
    return {
        "kd": 4.0 * _np_kl(p_t2, p_s2).mean(),
        "ce": -np.log(p_s1[lab, y[lab]]).mean(),
        "tvd_labelled": (0.5 * np.abs(p_t1 - p_s1).sum(axis=-1))[lab].mean(),
        "soft": 4.0 * (-(p_t2 * np.log(p_s2)).sum(axis=-1)).mean(),
    }


@pytest.mark.parametrize("step", [0, 3, 7, 20])
def test_compute_terms_total_is_weighted_sum(step) -> None:
    s, t, labels = _batch()
    total, values = compute_terms(_method(), {"logits": s}, {"logits": t}, labels, step)
    expected = _expected_terms(s, t, labels)
    assert list(values) == ["kd", "ce", "tvd_labelled", "soft"]
    for name, value in values.items():
        assert float(value.detach()) == pytest.approx(expected[name], rel=REL[name]), name
    # weights by hand: Linear(0, 1, 10), 0.5, Step((5,), (2, 3)), RampUp(1, 4) = exp(-5 (1 - step / 4)^2) before 4
    weights = {
        "kd": min(step, 10) / 10,
        "ce": 0.5,
        "tvd_labelled": 2.0 if step < 5 else 3.0,
        "soft": math.exp(-5.0 * (1.0 - step / 4) ** 2) if step < 4 else 1.0,
    }
    expected_total = sum(weights[k] * expected[k] for k in expected)
    assert float(total.detach()) == pytest.approx(expected_total, rel=1e-6)
    # the gradient of the total is the weighted sum of the terms' gradients
    total.backward()
    grad_total = s.grad.clone()
    grad_sum = torch.zeros_like(s)
    for name, value in compute_terms(_method(), {"logits": s}, {"logits": t}, labels, step)[1].items():
        (g,) = torch.autograd.grad(value, s)
        grad_sum += weights[name] * g
    torch.testing.assert_close(grad_total, grad_sum, rtol=1e-10, atol=1e-12)


def test_compute_terms_labelled_term_ignores_unlabelled_items() -> None:
    s, t, labels = _batch()
    _, values = compute_terms(_method(), {"logits": s}, {"logits": t}, labels, 0)
    lab = labels != UNLABELLED
    expected = float(losses.tvd(s[lab], t[lab]).detach())
    assert float(values["tvd_labelled"].detach()) == pytest.approx(expected, rel=1e-12)
    # changing what the teacher says on unlabelled items changes "kd" but not the labelled term
    t2 = t.clone()
    t2[~lab] = randn(int((~lab).sum()), 4, seed=72) * 5
    _, values2 = compute_terms(_method(), {"logits": s}, {"logits": t2}, labels, 0)
    assert torch.equal(values2["tvd_labelled"], values["tvd_labelled"])
    assert torch.equal(values2["ce"], values["ce"])
    assert abs(float(values2["kd"].detach()) - float(values["kd"].detach())) > 1e-3


def test_compute_terms_num_items() -> None:
    s, t, labels = _batch()
    n = {"kd": 12, "ce": 10, "tvd_labelled": 8, "soft": 24}
    _, values = compute_terms(_method(), {"logits": s}, {"logits": t}, labels, 0, num_items=n)
    expected = _expected_terms(s, t, labels)
    counts = {"kd": 6, "ce": 4, "tvd_labelled": 4, "soft": 6}  # items each term covers in this batch
    for name, value in values.items():
        assert float(value.detach()) == pytest.approx(expected[name] * counts[name] / n[name], rel=REL[name]), name


def test_compute_terms_errors() -> None:
    s, t, labels = _batch()
    with pytest.raises(KeyError, match="needs student output 'logits'"):
        compute_terms(_method(), {"features": s}, {"logits": t}, labels, 0)
    with pytest.raises(ValueError, match="term 'kd' needs a teacher, but none was given"):
        compute_terms(_method(), {"logits": s}, None, labels, 0)
    with pytest.raises(KeyError, match="needs teacher output 'logits'"):
        compute_terms(_method(), {"logits": s}, {"features": t}, labels, 0)


def test_batch_reduction_terms_take_extra_inputs_and_weight_by_item_share() -> None:
    """A "batch" term (DKD here) is called without mask/num_items, on the covered items only, with extra inputs
    from the outputs; under accumulation it is weighted by the micro-batch's share of the covered items."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, UNLABELLED, 3, 2, UNLABELLED, 1])
    term = Term("dkd", losses.dkd, target="teacher.logits", items="labelled", reduction="batch",
                       extra={"target": "label"}, kwargs={"temperature": 2.0})
    m = Method("m", (term,))
    assert m.needs_teacher and m.needs_labels
    lab = labels != UNLABELLED
    expected = losses.dkd(s[lab], t[lab], labels[lab], temperature=2.0)
    total, values = compute_terms(m, {"logits": s}, {"logits": t}, labels, 0)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    # this micro-batch covers 4 labelled items out of 10 in the accumulated batch: weight 4/10
    total, values = compute_terms(m, {"logits": s}, {"logits": t}, labels, 0, {"dkd": 10.0})
    assert float(values["dkd"]) == pytest.approx(0.4 * float(expected), rel=1e-6)
    # no covered item: zero, with a graph
    s_req = s.clone().requires_grad_(True)
    none = torch.full((6,), UNLABELLED)
    total, _ = compute_terms(m, {"logits": s_req}, {"logits": t}, none, 0, {"dkd": 10.0})
    assert float(total.detach()) == 0.0 and total.requires_grad
