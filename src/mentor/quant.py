"""Quantized students: k-bit fake-quantized weights trained with a straight-through estimator, and their export.

"Quantized distillation" (Polino, Pascanu & Alistarh 2018, https://arxiv.org/abs/1802.05668) trains a student whose
forward pass uses k-bit weights while a float copy of the weights (the *latent* weights) takes the gradient
updates; the gradient of the loss with respect to the quantized weights is applied to the latent ones unchanged
(the straight-through estimator). The loss is any distillation recipe, so the quantized student is an ordinary
``nn.Module`` for :func:`mentor.train.fit`::

    student = quant.quantize_weights(models.MLP(hidden=(512, 512, 512)), bits=4)
    result = train.fit(student, recipes.hinton_kd(temperature=4, alpha=0.9), labelled, teacher=Frozen(cnn), ...)
    artefact = quant.export_quantized(result.student)      # int8 codes + per-channel scales: the deployable model
    float_copy = models.MLP(hidden=(512, 512, 512)); quant.dequantize(artefact, float_copy)   # for evaluation

**The quantizer.** Symmetric, uniform, round-to-nearest (ties to even), per output channel (dim 0) or per tensor:
``scale = max|w| / (2^(k-1) - 1)`` over the channel (1 where the channel is all zero), ``codes = clamp(round(w /
scale), -(2^(k-1) - 1), 2^(k-1) - 1)``, forward value ``codes * scale``: at most ``2^k - 1`` levels per channel
(3 at 2 bits, 15 at 4, 255 at 8). Polino et al. use min-max scaling of buckets with ``2^k`` levels; this symmetric
variant keeps zero exact, needs no zero point and maps onto int8 kernels (``torch.ao`` dynamic quantization).
Only weights of the chosen module types (default ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) are quantized;
biases, norms and buffers stay float, as in the paper.

**How the model is changed: parametrization, state-dict keys unchanged.** :func:`quantize_weights` registers a
:class:`FakeQuantize` parametrization (``torch.nn.utils.parametrize``) on each weight, so ``module.weight`` is
computed as ``fake_quantize(latent)`` on every access and the latent float tensor is the trainable parameter
(``module.parametrizations.weight.original``). Plain parametrization would rename the weight's state-dict key to
``<module>.parametrizations.weight.original``; mentor adds a state-dict post-hook and a load pre-hook on each
quantized module that map that key to and from ``<module>.weight``. So the state dict of a quantized model has the
keys and shapes of the float model, and holds the float *latent* weights: ``mentor.train.save_model``,
``load_model_weights``, checkpoints and ``resume=True`` work unchanged, a float model of the same architecture can
load a quantized run's ``student.safetensors`` (it then has the latent weights, not the quantized ones: evaluate
through :func:`quantize_weights` or :func:`dequantize`), and a float checkpoint can seed a quantized student.
:func:`strip_quantization` removes parametrizations and hooks, leaving the latent weights as plain parameters (the
same ``Parameter`` objects, so an optimiser holding them keeps working).

**Exports.** :func:`export_quantized` gives a ``dict[str, Tensor]`` (safetensors-ready): for each quantized weight
``K``, ``K`` holds the int8 codes (or, with ``pack=True``, the codes packed at ``bits`` bits per weight into a
uint8 byte string), ``K:scale`` the scales (``[out_channels]`` or ``[1]``; float32, float64 for a float64 model),
``K:bits`` the bit width (uint8 scalar) and, when packed, ``K:shape`` the weight's shape (int64); every other state
entry (biases, buffers) is copied as is. :func:`dequantize` turns it back into a float state dict (and loads it
into a model), with weights equal bit for bit to the forward weights of the fake-quantized model.
:func:`to_dynamic_int8` builds a ``torch.ao.quantization.quantize_dynamic`` model (int8 weights in fbgemm/x86
kernels, activations quantized on the fly) for ``nn.Linear`` layers with exactly these codes and scales; in torch
2.13 it works on the CPU but torch marks ``torch.ao.quantization`` as deprecated (``torchao`` is the successor),
and convolutions have no dynamic int8 kernel (they stay float there). :func:`model_size_bytes` reports the
bytes of the float state dict, of the int8-storage artefact and of the bit-packed one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["FakeQuantize", "fake_quantize", "quantize_codes", "quantize_weights", "strip_quantization",
           "quantized_modules", "export_quantized", "dequantize", "to_dynamic_int8", "model_size_bytes",
           "state_bytes", "DEFAULT_MODULES"]

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Module types whose ``weight`` :func:`quantize_weights` quantizes by default."""

_SCALE, _BITS, _SHAPE = ":scale", ":bits", ":shape"  # suffixes of the export's side entries


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(
            f"bits must be an integer from 2 to 8 (signed symmetric levels, stored as int8), got {bits!r}"
        )
    return bits


def quantize_codes(w: Tensor, bits: int, *, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Integer codes and scales of ``w`` (no gradient).

    Returns:
        ``(codes, scale)``: ``codes`` integer-valued, in the dtype of the computation (float32 for half-precision
        inputs, otherwise ``w``'s), in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``; ``scale`` broadcastable against ``w``
        (``[out, 1, ...]`` per channel, ``[1, ...]`` per tensor). ``codes * scale`` is the quantized value.
    """
    bits = _check_bits(bits)
    if not w.is_floating_point():
        raise ValueError(f"fake_quantize needs a floating-point tensor, got dtype {w.dtype}")
    qmax = 2 ** (bits - 1) - 1
    x = w.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    mag = x.abs()
    if per_channel and x.dim() > 1:
        amax = mag.amax(dim=tuple(range(1, x.dim())), keepdim=True)
    elif per_channel:  # 0-d or 1-d: every element is its own channel
        amax = mag
    else:
        amax = mag.amax().reshape([1] * x.dim())
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(x / scale).clamp_(-qmax, qmax)
    return codes, scale


def fake_quantize(w: Tensor, bits: int, *, per_channel: bool = True) -> Tensor:
    """``w`` rounded to signed symmetric ``bits``-bit levels in the forward pass; identity gradient (STE).

    Args:
        w: A floating-point tensor (a weight: dim 0 is the output channel).
        bits: 2 to 8; the values take at most ``2^bits - 1`` levels per channel.
        per_channel: One scale per index of dim 0 (``max|w[i]| / (2^(bits-1) - 1)``); otherwise one per tensor.
            An all-zero channel gets scale 1 (its values stay 0).

    Returns:
        A tensor of ``w``'s shape and dtype whose value is ``codes * scale`` exactly and whose gradient with
        respect to ``w`` is the identity: ``w + (q - w).detach()`` (for float32/float64, ``q - w`` is exact because
        ``q`` and ``w`` lie within a factor of 2 of each other, so the sum gives ``q`` bit for bit).
    """
    codes, scale = quantize_codes(w, bits, per_channel=per_channel)
    q = (codes * scale).to(w.dtype)
    return w + (q - w).detach()


class FakeQuantize(nn.Module):
    """Parametrization ``weight = fake_quantize(latent, bits, per_channel)``; it has no state of its own."""

    def __init__(self, bits: int, per_channel: bool = True) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.per_channel = bool(per_channel)

    def forward(self, latent: Tensor) -> Tensor:
        return fake_quantize(latent, self.bits, per_channel=self.per_channel)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


_ORIGINAL = "parametrizations.weight.original"


def _state_dict_post_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``<prefix>parametrizations.weight.original`` -> ``<prefix>weight``, first of the module's entries as in the
    float model (``weight`` then ``bias``)."""
    old = prefix + _ORIGINAL
    if old not in state:
        return
    own = [k for k in state if k.startswith(prefix)]  # this module's entries, the last ones written
    values = {k: state.pop(k) for k in own}
    state[prefix + "weight"] = values.pop(old)
    state.update(values)


def _load_pre_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """``<prefix>weight`` -> ``<prefix>parametrizations.weight.original`` before loading (either key is accepted)."""
    if prefix + "weight" in state and prefix + _ORIGINAL not in state:
        state[prefix + _ORIGINAL] = state.pop(prefix + "weight")


def _has_float_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.is_floating_point()


def _fake_quantizer(module: nn.Module) -> FakeQuantize | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain: Any = module.parametrizations["weight"]  # type: ignore[index]
    found = [p for p in chain if isinstance(p, FakeQuantize)]
    return found[0] if found else None


def quantized_modules(model: nn.Module) -> dict[str, FakeQuantize]:
    """Name -> :class:`FakeQuantize` of every module of ``model`` whose weight :func:`quantize_weights` quantized."""
    out = {}
    for name, module in model.named_modules():
        fq = _fake_quantizer(module)
        if fq is not None:
            out[name] = fq
    return out


def quantize_weights(
    model: nn.Module,
    bits: int,
    *,
    per_channel: bool = True,
    modules: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_MODULES,
) -> nn.Module:
    """Make ``model``'s forward use ``bits``-bit fake-quantized weights (in place; returns ``model``).

    Every submodule that is an instance of ``modules`` and has a floating-point ``weight`` parameter gets a
    :class:`FakeQuantize` parametrization; its float latent weight stays the trainable parameter. The state-dict
    keys do not change (see the module docstring).

    Raises:
        ValueError: ``bits`` outside 2..8, a model that is already quantized (call :func:`strip_quantization`
            first), or a model with no module of the given types.
    """
    bits = _check_bits(bits)
    types = tuple(modules) if isinstance(modules, Sequence) else (modules,)
    if quantized_modules(model):
        raise ValueError(
            f"model {type(model).__name__} is already quantized ({sorted(quantized_modules(model))[:5]}); "
            "call strip_quantization(model) first to change the bit width"
        )
    targets = [m for m in model.modules() if isinstance(m, types) and _has_float_weight(m)]
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no module of types {[t.__name__ for t in types]} with a float "
            "weight to quantize"
        )
    taken = [n for n, m in model.named_modules() if m in targets and parametrize.is_parametrized(m, "weight")]
    if taken:
        raise ValueError(
            f"the weights of {taken[:5]} already have a parametrization (weight norm, spectral norm, ...); "
            "quantize_weights supports plain weights only"
        )
    for m in targets:
        parametrize.register_parametrization(m, "weight", FakeQuantize(bits, per_channel))
        m._mentor_quant_hooks = (  # type: ignore[assignment]
            m.register_state_dict_post_hook(_state_dict_post_hook),
            m.register_load_state_dict_pre_hook(_load_pre_hook),
        )
    return model


def _remove_weight_parametrization(module: nn.Module) -> None:
    """Put the latent weight back as ``module.weight``, without touching the parametrized class.

    ``parametrize.remove_parametrizations`` deletes the ``weight`` property from the module's generated
    ``Parametrized<Class>``, and ``copy.deepcopy`` of a parametrized module shares that class between the copies
    (torch 2.13), so stripping one copy (an EMA teacher of a quantized student, the copy :func:`to_dynamic_int8`
    makes) would break the other. :func:`quantize_weights` parametrizes ``weight`` alone, so the module returns to
    its original class instead.
    """
    plist: Any = module.parametrizations  # the ModuleDict of parametrization chains
    if set(plist.keys()) != {"weight"} or len(plist["weight"]) != 1:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return
    original = plist["weight"].original
    delattr(module, "parametrizations")
    module.__class__ = module.__class__.__bases__[0]
    rest = dict(module._parameters)
    module._parameters.clear()  # weight first again, as in the float module's state dict
    module._parameters["weight"] = original
    module._parameters.update(rest)


def strip_quantization(model: nn.Module) -> nn.Module:
    """Remove what :func:`quantize_weights` added (in place; returns ``model``): plain float latent weights remain.

    The latent ``Parameter`` objects become the modules' ``weight`` again, so optimisers that hold them stay valid.
    A model that is not quantized is returned unchanged.
    """
    for module in list(model.modules()):
        if _fake_quantizer(module) is None:
            continue
        _remove_weight_parametrization(module)
        for handle in getattr(module, "_mentor_quant_hooks", ()):
            handle.remove()
        if hasattr(module, "_mentor_quant_hooks"):
            del module._mentor_quant_hooks
    return model


def _float_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _targets(
    model: nn.Module, bits: int | None, per_channel: bool, modules: Sequence[type[nn.Module]] | type[nn.Module]
) -> dict[str, tuple[int, bool]]:
    """State key of each weight to export -> (bits, per_channel)."""
    found = quantized_modules(model)
    if found:
        widths = {fq.bits for fq in found.values()}
        if bits is not None and widths != {bits}:
            raise ValueError(
                f"the model is quantized with {sorted(widths)} bits but bits={bits} was asked for; export it with "
                "bits=None (its own width), or strip_quantization(model) first for a post-training quantization"
            )
        return {(f"{n}." if n else "") + "weight": (fq.bits, fq.per_channel) for n, fq in found.items()}
    if bits is None:
        raise ValueError("the model is not quantized (no quantize_weights), so bits must be given (2 to 8)")
    bits = _check_bits(bits)
    types = tuple(modules) if isinstance(modules, Sequence) else (modules,)
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, types) and _has_float_weight(m):
            out[(f"{n}." if n else "") + "weight"] = (bits, per_channel)
    if not out:
        raise ValueError(f"model {type(model).__name__} has no module of types {[t.__name__ for t in types]}")
    return out


def _pack(codes: Tensor, bits: int) -> Tensor:
    """Signed codes -> ``ceil(n * bits / 8)`` bytes: each code offset by ``2^(bits-1) - 1``, low bit first."""
    u = (codes.reshape(-1).to(torch.int16) + (2 ** (bits - 1) - 1)).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    bitstream = ((u[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).view(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    n = math.prod(shape)
    bitstream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits].view(n, bits)
    u = (bitstream.to(torch.int16) << torch.arange(bits, dtype=torch.int16)).sum(dim=1)
    return (u - (2 ** (bits - 1) - 1)).to(torch.int8).view(*shape)


@torch.no_grad()
def export_quantized(
    model: nn.Module,
    bits: int | None = None,
    *,
    pack: bool = False,
    per_channel: bool = True,
    modules: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_MODULES,
) -> dict[str, Tensor]:
    """The low-precision artefact of ``model`` (CPU tensors; ``safetensors.torch.save_file`` can write it).

    Args:
        model: A model quantized with :func:`quantize_weights` (its weights, bit widths and scale granularity are
            used; ``bits`` may be left out), or a float model (post-training quantization of the weights of
            ``modules`` at ``bits``, ``per_channel``).
        bits: Bit width (2 to 8); must match a quantized model's.
        pack: Store each quantized weight as its codes packed at ``bits`` bits each (uint8 bytes, ``K:shape``
            beside) instead of one int8 per weight.

    Returns:
        ``K`` -> int8 codes (or packed uint8), ``K:scale`` -> scales (``[out]`` or ``[1]``), ``K:bits`` -> uint8
        scalar for each quantized weight ``K``; every other state entry unchanged. Keys are those of the float
        state dict.
    """
    plan = _targets(model, bits, per_channel, modules)
    out: dict[str, Tensor] = {}
    for key, value in _float_state(model).items():
        if key not in plan:
            out[key] = value.clone()
            continue
        b, pc = plan[key]
        codes, scale = quantize_codes(value, b, per_channel=pc)
        codes8 = codes.to(torch.int8)
        if pack:
            out[key] = _pack(codes8, b)
            out[key + _SHAPE] = torch.tensor(list(value.shape), dtype=torch.int64)
        else:
            out[key] = codes8.contiguous()
        out[key + _SCALE] = scale.reshape(-1).contiguous()
        out[key + _BITS] = torch.tensor(b, dtype=torch.uint8)
    return out


def dequantize(artefact: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Float state dict of an :func:`export_quantized` artefact; loaded into ``model`` (strictly) when given.

    Each quantized weight becomes ``codes * scale`` in the scales' dtype, equal bit for bit to the forward weight of the
    fake-quantized model it was exported from. ``model`` may be a float model of the same architecture or a
    quantized one (the keys are the same).
    """
    state: dict[str, Tensor] = {}
    for key, value in artefact.items():
        if key.endswith((_SCALE, _BITS, _SHAPE)):
            continue
        if key + _SCALE not in artefact:
            state[key] = value
            continue
        if key + _BITS not in artefact:
            raise ValueError(f"artefact entry {key!r} has a scale but no {key + _BITS!r} entry (not a mentor export?)")
        bits = _check_bits(int(artefact[key + _BITS]))
        scale = artefact[key + _SCALE]
        if key + _SHAPE in artefact:
            shape = [int(s) for s in artefact[key + _SHAPE].tolist()]
            codes = _unpack(value, bits, shape)
        else:
            codes = value
        if codes.dim() > 0 and scale.numel() == codes.shape[0]:  # per channel (or a single channel)
            scale = scale.reshape([-1] + [1] * (codes.dim() - 1))
        elif scale.numel() == 1:  # per tensor
            scale = scale.reshape([1] * codes.dim())
        else:
            raise ValueError(f"artefact entry {key!r}: {scale.numel()} scales do not fit codes of shape "
                             f"{tuple(codes.shape)} (expected 1 or {codes.shape[0] if codes.dim() else 1})")
        state[key] = codes.to(scale.dtype) * scale
    if model is not None:
        model.load_state_dict(state)
    return state


def to_dynamic_int8(model: nn.Module, bits: int | None = None, *, per_channel: bool = True) -> nn.Module:
    """A ``torch.ao.quantization.quantize_dynamic`` copy of ``model`` whose ``nn.Linear`` weights are its codes.

    The weights of every ``nn.Linear`` are stored as qint8 with this module's per-channel (or per-tensor) scales,
    so they equal :func:`export_quantized`'s codes exactly (a ``bits`` < 8 model uses ``2^bits - 1`` of the int8
    levels). Activations are quantized to 8 bits per batch by the kernel, so outputs differ slightly from the
    fake-quantized float model. Other layers (convolutions included: no dynamic int8 kernel) stay float. The copy
    runs on the CPU; its state dict holds packed parameters (``torch.save``, not safetensors). ``model`` itself is
    not changed. ``torch.ao.quantization`` is deprecated in recent torch; its warnings are silenced here.
    """
    artefact = export_quantized(model, bits, per_channel=per_channel, modules=(nn.Linear,))
    float_model = strip_quantization(copy.deepcopy(model)).cpu().eval()
    dequantize(artefact, float_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantized tensor).*")
        from torch.ao.quantization import quantize_dynamic

        qmodel = quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
        for name, module in qmodel.named_modules():
            key = (f"{name}." if name else "") + "weight"
            if key + _SCALE not in artefact or not hasattr(module, "set_weight_bias"):
                continue
            codes = artefact[key].float()
            scale = artefact[key + _SCALE].double()
            if scale.numel() > 1:
                qweight = torch.quantize_per_channel(codes * scale[:, None].float(), scale,
                                                     torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            else:
                qweight = torch.quantize_per_tensor(codes * scale.float(), float(scale), 0, torch.qint8)
            if not torch.equal(qweight.int_repr(), artefact[key]):
                raise RuntimeError(f"int8 weight of {name!r} does not reproduce the exported codes")
            set_weight_bias: Any = module.set_weight_bias
            bias: Any = module.bias
            set_weight_bias(qweight, bias())
    return qmodel


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' data (``numel * element_size``, no file header)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def model_size_bytes(
    model: nn.Module,
    bits: int | None = None,
    *,
    per_channel: bool = True,
    modules: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_MODULES,
) -> dict[str, Any]:
    """Sizes of ``model`` as a float state dict and as its quantized artefacts (tensor data bytes, no headers).

    Returns:
        ``float_bytes`` (the state dict as it is: the latent float weights), ``storage_bytes`` (the
        :func:`export_quantized` artefact, one int8 per quantized weight), ``packed_bytes`` (the ``pack=True``
        artefact: ``ceil(n * bits / 8)`` bytes per weight tensor), both including float32 scales, the 1-byte bit
        widths, the packed shapes and the unquantized entries (biases); ``quantized_params``, ``bits``, and the
        ratios ``storage_ratio`` and ``packed_ratio`` to ``float_bytes``.
    """
    plan = _targets(model, bits, per_channel, modules)
    float_bytes = state_bytes(_float_state(model))
    storage = state_bytes(export_quantized(model, bits, per_channel=per_channel, modules=modules))
    packed = state_bytes(export_quantized(model, bits, pack=True, per_channel=per_channel, modules=modules))
    state = model.state_dict()
    widths = sorted({b for b, _ in plan.values()})
    return {
        "bits": widths[0] if len(widths) == 1 else widths,
        "quantized_params": sum(state[k].numel() for k in plan),
        "float_bytes": float_bytes,
        "storage_bytes": storage,
        "packed_bytes": packed,
        "storage_ratio": storage / float_bytes,
        "packed_ratio": packed / float_bytes,
    }
