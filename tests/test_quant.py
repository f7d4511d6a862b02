"""Quantized students (:mod:`mentor.quant`).

* ``fake_quantize`` equals a float64 NumPy computation of the same formula (bits 2, 4, 8; per channel and per
  tensor), takes at most ``2^bits - 1`` levels per channel, passes the gradient straight through, and is safe on
  all-zero channels;
* ``export_quantized`` -> ``dequantize`` gives the forward weights of the fake-quantized model bit for bit (int8 and
  bit-packed, through a safetensors file), and the dynamic int8 model holds the same codes;
* the state dict of a quantized model has the float model's keys, and ``strip_quantization`` leaves the latent
  weights (also on a deep copy, without breaking the original);
* a 4-bit MLP student trained with ``fit`` and ``hinton_kd`` keeps its forward weights on the grid, and a run stopped
  at ``max_steps=3`` and resumed equals an uninterrupted run bit for bit;
* packed 4-bit size = ``ceil(n * 4 / 8)`` + scales + float biases, about 1/8 of float32.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mentor import models, quant, recipes, teachers
from mentor.data import TensorData
from mentor.train import Optim, fit


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _reference(w: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    """The quantizer in float64 NumPy: scale = max|w| / (2^(k-1) - 1) (1 for a zero channel), round half to even."""
    qmax = 2 ** (bits - 1) - 1
    mag = np.abs(w)
    amax = mag.reshape(w.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel \
        else np.full((1,) * w.ndim, mag.max())
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def _weights(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 5, 3, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 7, dtype=torch.float64)[
        :, None, None]
    w[2] = 0.0  # an all-zero channel
    return w.to(dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantize_matches_numpy_formula(bits: int, per_channel: bool) -> None:
    w64 = _weights(torch.float64)
    out = quant.fake_quantize(w64, bits, per_channel=per_channel)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.from_numpy(_reference(w64.numpy(), bits, per_channel)))

    w32 = _weights(torch.float32)
    ref = _reference(w32.double().numpy(), bits, per_channel)
    codes, scale = quant.quantize_codes(w32, bits, per_channel=per_channel)
    out32 = quant.fake_quantize(w32, bits, per_channel=per_channel)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.double().numpy(), ref, rtol=2e-7, atol=0)
    assert torch.equal(out32, (codes * scale).float())
    assert torch.all(codes == codes.round()) and int(codes.abs().max()) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_levels_per_channel_at_most_2_pow_bits_minus_1(bits: int, per_channel: bool) -> None:
    torch.manual_seed(1)
    w = (torch.linspace(-1, 1, 3001) + 1e-3 * torch.randn(4, 3001)) * torch.tensor([[0.1], [1.0], [3.0], [50.0]])
    q = quant.fake_quantize(w, bits, per_channel=per_channel)
    counts = [len(torch.unique(row)) for row in q] if per_channel else [len(torch.unique(q))]
    assert max(counts) <= 2 ** bits - 1
    assert min(counts) == 2 ** bits - 1  # every row spans its range densely: every level is reached
    # The largest magnitude of each channel (or of the tensor) is kept exactly.
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(4)
    qmax = q.abs().amax(dim=1) if per_channel else q.abs().amax().expand(4)
    torch.testing.assert_close(qmax, amax, rtol=1e-6, atol=0)


def test_gradient_is_straight_through() -> None:
    torch.manual_seed(2)
    w = torch.randn(6, 9, requires_grad=True)
    quant.fake_quantize(w, 3).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))

    # In a parametrized layer the latent weight receives the gradient taken at the quantized weight.
    layer = quant.quantize_weights(nn.Linear(9, 4), 4)
    x = torch.randn(5, 9)
    F.cross_entropy(layer(x), torch.tensor([0, 1, 2, 3, 0])).backward()
    wq = layer.weight.detach().clone().requires_grad_(True)
    F.cross_entropy(F.linear(x, wq, layer.bias.detach()), torch.tensor([0, 1, 2, 3, 0])).backward()
    latent = layer.parametrizations.weight.original
    assert latent.grad is not None and wq.grad is not None and torch.equal(latent.grad, wq.grad)


def test_zero_channels_and_zero_tensors_are_safe() -> None:
    w = torch.randn(3, 4)
    w[1] = 0.0
    for per_channel in (True, False):
        q = quant.fake_quantize(w, 4, per_channel=per_channel)
        assert torch.isfinite(q).all() and torch.equal(q[1], torch.zeros(4))
    z = torch.zeros(2, 5, requires_grad=True)
    out = quant.fake_quantize(z, 2, per_channel=False)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 5)) and z.grad is not None and torch.equal(z.grad, torch.ones(2, 5))
    codes, scale = quant.quantize_codes(w, 4)
    assert float(scale[1]) == 1.0 and torch.equal(codes[1], torch.zeros(4))


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bits_out_of_range_is_a_clear_error(bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quant.fake_quantize(torch.randn(2, 2), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quant.quantize_weights(nn.Linear(2, 2), bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_export_then_dequantize_reproduces_forward_weights(tmp_path: Path, bits: int, per_channel: bool) -> None:
    torch.manual_seed(3)
    model = quant.quantize_weights(models.CNN1d(channels=6), bits, per_channel=per_channel)
    forward = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in quant.quantized_modules(model)}
    assert sorted(forward) == ["classifier", "conv1", "conv2", "conv3"]
    for pack in (False, True):
        artefact = quant.export_quantized(model, pack=pack)
        for n in forward:
            key = f"{n}.weight"
            assert artefact[key].dtype == (torch.uint8 if pack else torch.int8)
            if pack:
                assert artefact[key].numel() == math.ceil(forward[n].numel() * bits / 8)
        save_file(artefact, str(tmp_path / "q.safetensors"))
        state = quant.dequantize(load_file(str(tmp_path / "q.safetensors")))
        for n, w in forward.items():
            assert torch.equal(state[f"{n}.weight"], w), n
        assert torch.equal(state["conv1.bias"], model.conv1.bias)
        # Into a float model of the same architecture: the same outputs as the fake-quantized model.
        plain = models.CNN1d(channels=6)
        quant.dequantize(artefact, plain)
        x = torch.randn(3, 40)
        assert torch.equal(plain(x), model(x))


def test_post_training_export_of_a_float_model_matches_fake_quantize() -> None:
    torch.manual_seed(4)
    model = models.MLP(in_features=8, hidden=(16,), num_classes=3)
    state = quant.dequantize(quant.export_quantized(model, 4, per_channel=False))
    assert torch.equal(state["features.0.weight"], quant.fake_quantize(model.features[0].weight, 4, per_channel=False))
    with pytest.raises(ValueError, match="bits must be given"):
        quant.export_quantized(model)
    quant.quantize_weights(model, 4)
    with pytest.raises(ValueError, match="quantized with \\[4\\] bits but bits=8"):
        quant.export_quantized(model, 8)


def test_state_dict_keys_unchanged_and_strip_leaves_latent_weights() -> None:
    torch.manual_seed(5)
    model = models.MLP(in_features=8, hidden=(16,), num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    quant.quantize_weights(model, 4)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # latent, not quantized
    assert not torch.equal(model.features[0].weight, before["features.0.weight"])
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_weights(model, 8)

    # Loading a float state dict sets the latent weights; strip on a deep copy leaves the original quantized.
    other = models.MLP(in_features=8, hidden=(16,), num_classes=3)
    twin = copy.deepcopy(model)
    twin.load_state_dict(other.state_dict())
    assert torch.equal(twin.features[0].parametrizations.weight.original, other.features[0].weight)
    assert torch.equal(model.features[0].parametrizations.weight.original, before["features.0.weight"])
    quant.strip_quantization(twin)
    assert type(twin.features[0]) is nn.Linear and not quant.quantized_modules(twin)
    assert torch.equal(model.features[0].weight, quant.fake_quantize(before["features.0.weight"], 4))

    quant.strip_quantization(model)
    assert type(model.classifier) is nn.Linear and {id(p) for p in model.parameters()} == params
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_dynamic_int8_model_holds_the_exported_codes() -> None:
    torch.manual_seed(6)
    model = quant.quantize_weights(models.MLP(in_features=8, hidden=(32,), num_classes=3), 8)
    artefact = quant.export_quantized(model)
    dyn = quant.to_dynamic_int8(model)
    for name in ("features.0", "classifier"):
        weight = dyn.get_submodule(name).weight()
        assert torch.equal(weight.int_repr(), artefact[f"{name}.weight"])
    x = torch.randn(16, 8)
    torch.testing.assert_close(dyn(x), model(x), atol=0.05, rtol=0)
    assert quant.quantized_modules(model)  # the original is untouched


def test_packed_4bit_size_is_about_one_eighth_of_float32() -> None:
    torch.manual_seed(7)
    model = quant.quantize_weights(models.MLP(in_features=40, hidden=(256, 256), num_classes=10), 4)
    sizes = quant.model_size_bytes(model)
    shapes = [(40, 256), (256, 256), (256, 10)]
    n = sum(a * b for a, b in shapes)
    outs = sum(b for _, b in shapes)  # one float32 scale and one float32 bias per output channel
    assert sizes["quantized_params"] == n and sizes["bits"] == 4
    assert sizes["float_bytes"] == 4 * (n + outs)
    side = 4 * outs + 4 * outs + len(shapes) * 1  # scales, biases, the bit widths
    assert sizes["storage_bytes"] == n + side
    assert sizes["packed_bytes"] == sum(math.ceil(a * b * 4 / 8) for a, b in shapes) + side + 8 * 2 * len(shapes)
    assert 1 / 8 < sizes["packed_ratio"] < 1 / 8 + 0.02
    assert 1 / 4 < sizes["storage_ratio"] < 1 / 4 + 0.02


# ------------------------------------------------------------------------------------------------ with fit


def _student() -> nn.Module:
    torch.manual_seed(0)
    return quant.quantize_weights(models.MLP(in_features=12, hidden=(32,), num_classes=5), 4)


def _data() -> TensorData:
    g = torch.Generator().manual_seed(1)
    return TensorData(torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g))


def _run(out: Path, **kwargs):
    torch.manual_seed(100)
    teacher = teachers.Frozen(models.MLP(in_features=12, hidden=(32,), num_classes=5))
    return fit(_student(), recipes.hinton_kd(temperature=2.0), _data(), teacher=teacher, epochs=2, batch_size=8,
               optim=Optim(lr=1e-2), log_every=1, checkpoint_every=4, progress=False, out=out, **kwargs)


def test_fit_trains_a_4bit_student_on_the_grid_and_resumes_exactly(tmp_path: Path) -> None:
    init = {k: v.clone() for k, v in _student().state_dict().items()}
    ref = _run(tmp_path / "ref")
    assert ref.steps == 16
    student = ref.student
    artefact = quant.export_quantized(student)
    state = quant.dequantize(artefact)
    for name in ("features.0", "classifier"):
        layer = student.get_submodule(name)
        latent = layer.parametrizations.weight.original
        assert not torch.equal(latent, init[f"{name}.weight"])  # it trained
        assert not torch.equal(latent, layer.weight)  # latent weights are off the grid ...
        assert torch.equal(layer.weight, state[f"{name}.weight"])  # ... the forward weights are on it
        assert max(len(torch.unique(row)) for row in layer.weight) <= 15
    # The saved student has the float model's keys (latent weights); re-quantized, it predicts the same.
    saved = load_file(str(tmp_path / "ref" / "student.safetensors"))
    plain = models.MLP(in_features=12, hidden=(32,), num_classes=5)
    assert sorted(saved) == sorted(plain.state_dict())
    plain.load_state_dict(saved)
    x = _data().x
    assert torch.equal(quant.quantize_weights(plain, 4)(x), student(x))

    run = tmp_path / "run"
    assert _run(run, max_steps=3).steps == 3
    assert _run(run, resume=True).steps == 16
    resumed = load_file(str(run / "student.safetensors"))
    assert saved.keys() == resumed.keys()
    for k in saved:
        assert torch.equal(saved[k], resumed[k]), k
