"""Lean incremental decoding for small Llama-family Hugging Face causal LMs (the fast path of
:mod:`mentor.lm.generate`).

Sampling a small model token by token through ``transformers``' generic forward costs far more in Python than in
arithmetic: every step builds an attention mask, updates a cache object, computes the rotary table and walks the
module tree with its hooks and output classes (for the 2 x 128 reference student, batch 8, on one CPU core: about
1.4 ms per token). On such models a step costs about what the number of tensor operations it launches costs, so
:class:`LeanDecoder` computes the same function from the model's weights with as few as it can:

* **weights prepared once per decode** (they change between the training steps that sample): q/k/v joined into
  one matrix and gate/up into another, the RMSNorm weights folded into the columns of the projection that reads
  the norm (the final norm's into the output layer), every matrix stored transposed and contiguous (on CPU a
  product with a contiguous right-hand matrix is about twice as fast as with a transposed view). This copies all
  projections, so the path is limited to models whose copies take at most ``MAX_JOINED_BYTES``;
* **nothing rebuilt per step**: one preallocated key/value buffer per layer ``[2, B, kv, P + max_new_tokens, hd]``
  written in place at the fed column; the padding mask and the rotary ``cos`` / ``sin`` of every column computed
  once per decode (the table by the model's own rotary module, at positions ``cumsum(mask) - 1`` as in the generic
  path), then one view per step; ``rotate_half(x) * sin`` as ``x.roll(hd / 2) * sin'`` with the first half of
  ``sin'`` negated (the same products), over the query and key heads at once;
* **attention of one query** as ``softmax(mask + scale * q K^T) V`` over the columns written so far (two batched
  matrix products, grouped-query heads without repeating the keys); the prompt runs through
  ``scaled_dot_product_attention`` with a causal and padding mask, where a padded query attends to itself only (a
  row with no key would give NaN; these rows are never read and real queries never see padded keys);
* RMSNorm as ``x * rsqrt(mean(x^2) + eps)`` with the mean as one matrix-vector product; SwiGLU; residuals added by
  the matrix product (``addmm``); everything under ``torch.inference_mode``.

The logits equal the generic forward's up to float rounding (about 1e-6 in float32; tested to 1e-5 against
``transformers``, and the sampled tokens are the same).

:func:`unsupported_reason` says why a model cannot take this path (``None`` when it can); :mod:`mentor.lm.generate`
then falls back to the model's own forward. Accepted: exactly the stock ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` classes (not subclasses, which may change ``forward``) with their
own decoder, attention, MLP and RMSNorm classes, plain ``nn.Linear`` / ``nn.Embedding`` layers (not LoRA, not
quantised), float32 or float64 weights, SiLU MLPs, a static rotary table (``default``, ``linear``, ``llama3``,
``yarn``; not ``dynamic`` / ``longrope``, whose frequencies depend on the length seen), the ``sdpa`` or ``eager``
attention implementation, no sliding window shorter than the sequence, no forward hooks or replaced ``forward`` on
any module (they would not run: the lean path calls no module's ``forward``), autocast off. Biases on any
projection (Qwen2's q/k/v), tied embeddings, grouped-query attention and an explicit ``head_dim`` are supported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeanDecoder", "MAX_JOINED_BYTES", "joined_bytes", "unsupported_reason"]

# The stock causal-LM classes whose decoder layer is Llama's: (module, class) -> the prefix of their module classes.
_FAMILIES = {
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"): "Llama",
    ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"): "Mistral",
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"): "Qwen2",
}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
MAX_JOINED_BYTES = 256 * 2**20
"""Largest total size of the weight copies :class:`LeanDecoder` makes per decode; bigger models use their own
forward (their steps are dominated by arithmetic, not by per-operation overhead)."""


def _hooked(module: nn.Module) -> bool:
    """Forward hooks, or a ``forward`` replaced on the instance (Accelerate's hooks and autocast wrapper)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or "_hf_hook" in module.__dict__)


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg]
    except TypeError:  # torch < 2.4 has no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def joined_bytes(model: nn.Module) -> int:
    """Bytes of the weight copies :class:`LeanDecoder` makes per decode of ``model`` (a supported model): every
    projection of every layer and the output layer, once each."""
    m: Any = model
    head: Any = m.get_output_embeddings()
    total = head.weight.numel() * head.weight.element_size()
    for layer in list(m.model.layers)[: m.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            total += lin.weight.numel() * lin.weight.element_size()
    return total


def unsupported_reason(model: nn.Module, length: int | None = None) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (``None``: it can).

    Args:
        model: A causal LM.
        length: Columns of the decode (prompt width + ``max_new_tokens``), checked against a sliding window;
            ``None`` skips that check.

    Returns:
        ``None``, or a sentence naming what is not supported.
    """
    cls = type(model)
    family = _FAMILIES.get((cls.__module__, cls.__qualname__))
    if family is None:
        return f"{cls.__module__}.{cls.__qualname__} is not a stock Llama, Mistral or Qwen2 causal LM"
    modeling = cls.__module__

    def own(module: Any, name: str) -> bool:
        return type(module).__module__ == modeling and type(module).__qualname__ == f"{family}{name}"

    base: Any = getattr(model, "model", None)
    if not own(base, "Model"):
        return f"the decoder is not a {family}Model"
    embed: Any = base.embed_tokens
    if type(embed) is not nn.Embedding or embed.max_norm is not None:
        return "the input embedding is not a plain nn.Embedding"
    if embed.weight.dtype not in (torch.float32, torch.float64):
        return (f"dtype {embed.weight.dtype}: the lean path folds the norm weights into the projections, equal to "
                "the model's arithmetic up to rounding in float32 / float64 only")
    if _autocast_on(embed.weight.device.type):
        return "autocast is on (the lean path computes in the weights' dtype)"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered (the lean path calls no module's forward)"
    cfg: Any = model.config
    if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (only silu)"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        return f"attention implementation {impl!r} (only sdpa and eager)"
    rope_type = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    if not isinstance(rope_type, str) or rope_type not in _STATIC_ROPE:
        return f"rotary type {rope_type!r} (only the static types {', '.join(_STATIC_ROPE)})"
    for name, module in model.named_modules():
        if _hooked(module):
            return f"module {name or cls.__name__!r} has forward hooks or a replaced forward"
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear:
        return f"the output layer is {type(head).__name__}, not an nn.Linear"
    for i, layer in enumerate(list(base.layers)[: cfg.num_hidden_layers]):
        if not own(layer, "DecoderLayer"):
            return f"layer {i} is {type(layer).__qualname__}, not {family}DecoderLayer"
        attn, mlp = layer.self_attn, layer.mlp
        if not (own(attn, "Attention") and own(mlp, "MLP") and own(layer.input_layernorm, "RMSNorm")
                and own(layer.post_attention_layernorm, "RMSNorm")):
            return f"layer {i}'s attention, MLP or norms are not {family}'s own"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(lin) is not nn.Linear for lin in linears):
            return f"layer {i} has projections that are not plain nn.Linear (adapters, quantisation)"
        if attn.head_dim % 2 or attn.q_proj.out_features % attn.k_proj.out_features:
            return f"layer {i}: odd head_dim {attn.head_dim} or query heads not a multiple of the key heads"
    if not own(base.norm, "RMSNorm"):
        return f"the final norm is not {family}RMSNorm"
    size = joined_bytes(model)
    if size > MAX_JOINED_BYTES:
        return (f"its joined weight copies would take {size / 2**20:.0f} MiB (MAX_JOINED_BYTES: "
                f"{MAX_JOINED_BYTES / 2**20:.0f} MiB); the lean path is for small models, whose steps are "
                "dominated by per-operation overhead")
    window = getattr(cfg, "sliding_window", None)
    if length is not None and window is not None and window < length:
        sliding = True
        if family == "Qwen2":  # Qwen2's window applies only where enabled, to the layers typed as sliding
            sliding = bool(getattr(cfg, "use_sliding_window", False)) or "sliding_attention" in (
                getattr(cfg, "layer_types", None) or [])
        if sliding:
            return f"sliding_window={window} is shorter than the sequence ({length} columns)"
    return None


def _joined_bias(linears: tuple[nn.Linear, ...]) -> Tensor | None:
    """The linears' biases joined (zeros where one has none); ``None`` if no linear has a bias."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])


class _Norm:
    """An RMSNorm ``w * x / sqrt(mean(x^2) + eps)`` in two parts: :meth:`normed` (``x / sqrt(mean(x^2) + eps)``,
    the mean of squares as one matrix-vector product) and :meth:`fold`, which puts ``w`` into the columns of the
    projection that reads the result."""

    def __init__(self, norm: Any) -> None:
        weight: Tensor = norm.weight
        self.weight = weight
        self.eps_value = float(norm.variance_epsilon)
        self.eps = weight.new_full((1, 1), self.eps_value)
        self.mean = weight.new_full((weight.shape[0], 1), 1.0 / weight.shape[0])

    def normed(self, x: Tensor) -> Tensor:
        """``x / sqrt(mean(x^2) + eps)`` of ``x`` ``[N, D]``, without the weight. In float32 (``transformers``
        normalises in float32 whatever the dtype: float64 models get its arithmetic, rounded to float32)."""
        if x.dtype == torch.float32:
            return x * torch.addmm(self.eps, x * x, self.mean).rsqrt_()
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps_value)).to(x.dtype)

    def fold(self, *weights: Tensor) -> Tensor:
        """The weights ``[n_i, D]`` stacked, column ``j`` scaled by ``w_j``, transposed and contiguous:
        ``[D, sum n_i]``."""
        return (torch.cat(weights) * self.weight).t().contiguous()


class _Layer:
    """One decoder layer's weights: q/k/v joined, gate/up joined, norm weights folded in, all transposed and
    contiguous (see the module doc)."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        self.in_norm, self.post_norm = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.qkv = self.in_norm.fold(q.weight, k.weight, v.weight)  # [D, (nh + 2 kv) hd]
        self.qkv_bias = _joined_bias((q, k, v))
        self.o, self.o_bias = attn.o_proj.weight.t().contiguous(), attn.o_proj.bias  # [nh hd, D]
        self.gate_up = self.post_norm.fold(mlp.gate_proj.weight, mlp.up_proj.weight)  # [D, 2 I]
        self.gate_up_bias = _joined_bias((mlp.gate_proj, mlp.up_proj))
        self.intermediate = int(mlp.gate_proj.out_features)
        self.down, self.down_bias = mlp.down_proj.weight.t().contiguous(), mlp.down_proj.bias  # [I, D]
        self.scaling = float(attn.scaling)


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``h @ weight + bias`` for 2-D ``h`` and a transposed weight ``[in, out]``."""
    return torch.mm(h, weight) if bias is None else torch.addmm(bias, h, weight)


def _residual(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x + (h @ weight + bias)`` for 2-D ``x``, ``h`` and a transposed weight."""
    return torch.addmm(x, h, weight) if bias is None else x + torch.addmm(bias, h, weight)


class LeanDecoder:
    """Incremental decoding of left-padded prompts through a small Llama-family model (see the module doc).

    Use: ``logits = dec.start(prompt_ids, prompt_mask, max_new_tokens)``, then ``logits = dec.step(tokens)`` once
    per generated token (at most ``max_new_tokens - 1`` times). The weights are copied when the decoder is made;
    later changes to the model do not reach it. The logits it returns are inference-mode tensors (read them, do
    not change them in place).

    Args:
        model: A model for which :func:`unsupported_reason` is ``None``.
        vocab_size: Keep only logits ``[0, vocab_size)``, or ``None`` for all.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        m: Any = model
        base, cfg = m.model, m.config
        layers = list(base.layers)[: cfg.num_hidden_layers]
        attn = layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.embed: Tensor = base.embed_tokens.weight.detach()
        self.layers = [_Layer(layer) for layer in layers]
        self.norm = _Norm(base.norm)
        head: Any = m.get_output_embeddings()
        self.head = self.norm.fold(head.weight)  # [D, V]
        self.head_bias: Tensor | None = head.bias
        self.rotary: nn.Module = base.rotary_emb
        self.vocab_size = vocab_size
        self.column = 0
        self.kv: list[Tensor] = []  # per layer [2, B, kv, L, hd]
        self.kv_columns: list[Tensor] = []  # per layer, views [L, B, 2, kv, hd]
        self.keys_t: list[Tensor] = []  # per layer, views [B * kv, hd, L]
        self.values: list[Tensor] = []  # per layer, views [B * kv, L, hd]
        self.key_mask = self.embed.new_empty(0)  # [B * kv, 1, L]: 0, or -inf on the left padding
        self.cos: tuple[Tensor, ...] = ()  # per column [B, 1, hd]
        self.sin: tuple[Tensor, ...] = ()  # per column [B, 1, hd], first half negated (see start)

    @torch.inference_mode()
    def start(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int) -> Tensor:
        """Run the prompts and make room for ``max_new_tokens`` more columns.

        Args:
            prompt_ids: ``[B, P]`` left-padded.
            prompt_mask: ``[B, P]``, 1 on real tokens.
            max_new_tokens: Columns to reserve after the prompt.

        Returns:
            The next-token logits ``[B, V]``.
        """
        batch, width = prompt_ids.shape
        length = width + max(int(max_new_tokens), 1)
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        dtype, device = self.embed.dtype, self.embed.device
        valid = torch.cat([prompt_mask.bool(), torch.ones(batch, length - width, dtype=torch.bool, device=device)], 1)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = self.rotary(self.embed.new_empty(0), positions)  # [B, L, hd]: the model's own table
        half = hd // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half(x) * sin == x.roll(half) * this
        self.cos = cos.transpose(0, 1).contiguous().view(length, batch, 1, hd).unbind(0)
        self.sin = sin.transpose(0, 1).contiguous().view(length, batch, 1, hd).unbind(0)
        key_mask = torch.zeros(batch, 1, length, dtype=dtype, device=device).masked_fill_(~valid[:, None], -math.inf)
        self.key_mask = key_mask.repeat_interleave(nkv, dim=0)
        self.kv = [torch.zeros(2, batch, nkv, length, hd, dtype=dtype, device=device) for _ in self.layers]
        self.kv_columns = [kv.permute(3, 1, 0, 2, 4) for kv in self.kv]  # [L, B, 2, kv, hd] views
        self.keys_t = [kv[0].view(batch * nkv, length, hd).transpose(1, 2) for kv in self.kv]  # [B kv, hd, L]
        self.values = [kv[1].view(batch * nkv, length, hd) for kv in self.kv]
        # The prompt: causal, real keys only; a padded query attends to itself (never read, but finite).
        col = torch.arange(width, device=device)
        allowed = (col[:, None] >= col[None, :]) & (valid[:, None, :width] | torch.eye(width, dtype=torch.bool,
                                                                                       device=device))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)[:, None]
        cos_p = cos[:, :width].reshape(batch * width, 1, hd)
        sin_p = sin[:, :width].reshape(batch * width, 1, hd)
        group, tokens = nh // nkv, batch * width
        x = F.embedding(prompt_ids.flatten(), self.embed)  # [B P, D]
        for layer, kv in zip(self.layers, self.kv, strict=True):
            out = _linear(layer.in_norm.normed(x), layer.qkv, layer.qkv_bias).view(tokens, nh + 2 * nkv, hd)
            qk = out[:, : nh + nkv]
            qk = torch.addcmul(qk * cos_p, qk.roll(half, -1), sin_p).view(batch, width, nh + nkv, hd)
            v = out[:, nh + nkv:].view(batch, width, nkv, hd).transpose(1, 2)
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)  # [B, heads, P, hd]
            kv[0, :, :, :width] = k
            kv[1, :, :, :width] = v
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling)  # [B, nh, P, hd]
            x = _residual(x, a.transpose(1, 2).reshape(tokens, nh * hd), layer.o, layer.o_bias)
            gu = _linear(layer.post_norm.normed(x), layer.gate_up, layer.gate_up_bias)
            x = _residual(x, F.silu(gu[:, : layer.intermediate]) * gu[:, layer.intermediate:], layer.down,
                          layer.down_bias)
        self.column = width
        return self._logits(x.view(batch, width, -1)[:, -1])

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row ``[B]``; return the next-token logits ``[B, V]``. Runs under
        ``torch.inference_mode`` (entered here unless the caller is already in it, as the samplers are)."""
        if torch.is_inference_mode_enabled():
            return self._step(tokens)
        with torch.inference_mode():
            return self._step(tokens)

    def _step(self, tokens: Tensor) -> Tensor:
        c = self.column
        x = F.embedding(tokens, self.embed)  # [B, D]
        batch = x.shape[0]
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        group, half = nh // nkv, hd // 2
        cos, sin = self.cos[c], self.sin[c]  # [B, 1, hd]
        mask = self.key_mask[:, :, : c + 1]  # [B kv, 1, c + 1]
        for layer, columns, keys_t, values in zip(self.layers, self.kv_columns, self.keys_t, self.values,
                                                  strict=True):
            out = _linear(layer.in_norm.normed(x), layer.qkv, layer.qkv_bias).view(batch, nh + 2 * nkv, hd)
            qk = out[:, : nh + nkv]
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # rotary: q cos + rotate_half(q) sin, k too
            column = columns[c]  # [B, 2, kv, hd]
            column[:, 0].copy_(qk[:, nh:])
            column[:, 1].copy_(out[:, nh + nkv:])
            q = qk[:, :nh].reshape(batch * nkv, group, hd)
            scores = torch.baddbmm(mask, q, keys_t[:, :, : c + 1], alpha=layer.scaling)  # [B kv, group, c + 1]
            a = torch.bmm(scores.softmax(dim=-1), values[:, : c + 1])  # [B kv, group, hd]
            x = _residual(x, a.view(batch, nh * hd), layer.o, layer.o_bias)
            gu = _linear(layer.post_norm.normed(x), layer.gate_up, layer.gate_up_bias)
            x = _residual(x, F.silu(gu[:, : layer.intermediate]) * gu[:, layer.intermediate:], layer.down,
                          layer.down_bias)
        self.column = c + 1
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """Final norm and output layer: ``x`` ``[B, D]`` -> ``[B, V]`` (cut to ``vocab_size``)."""
        logits = _linear(self.norm.normed(x), self.head, self.head_bias)
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]
