"""Tiny Llama-style causal LMs with random weights, and the two pieces of a causal LM that chunked KD needs.

:func:`tiny_llama` builds a ``transformers.LlamaForCausalLM`` from a ``LlamaConfig``: RMSNorm, rotary positions,
SwiGLU MLP, head width 64 (``width // 64`` heads, at least one), untied input and output embeddings. The reference
pair of issue 6 is :func:`tiny_teacher` (4 layers, width 256, about 3.4 M parameters at vocabulary 512) and
:func:`tiny_student` (2 layers, width 128, about 0.53 M).

:func:`final_hidden` runs a model's decoder only (no ``lm_head``, no logits) and :func:`output_head` returns its
output layer: together they are what :func:`mentor.lm.losses.token_kd` takes. :class:`HiddenHead` is the same
pair as a module whose forward returns them (``{"hidden", "head"}``): the training forward of the loop's chunked LM
terms, for the student (:func:`mentor.train.fit` hands the wrapper to Accelerate and evaluates and exports the model
inside) and, through :func:`hidden_teacher`, for a frozen teacher.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("mentor.lm.models needs transformers: pip install 'mentor[lm]'") from err

__all__ = ["tiny_llama", "tiny_teacher", "tiny_student", "final_hidden", "output_head", "output_size", "HiddenHead",
           "hidden_teacher"]


def tiny_llama(
    layers: int,
    width: int,
    vocab: int,
    *,
    heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    tie_embeddings: bool = False,
    **config: Any,
) -> LlamaForCausalLM:
    """A Llama-style causal LM with random weights.

    Args:
        layers: Decoder layers.
        width: Hidden size.
        vocab: Vocabulary size (``len(tokenizer)``; pass more to get padded output rows).
        heads: Attention heads; default ``max(1, width // 64)``. Must divide ``width``.
        intermediate: MLP width; default ``8 * width / 3`` rounded up to a multiple of 32 (Llama's ratio).
        max_positions: Longest sequence.
        seed: Seed of the weight initialisation (the global random state is left as it was).
        tie_embeddings: Share the input embedding and the output layer.
        **config: More ``LlamaConfig`` fields (``bos_token_id``, ``rms_norm_eps``, ...).

    Returns:
        The model, in training mode, float32.
    """
    for name, value in (("layers", layers), ("width", width), ("vocab", vocab), ("max_positions", max_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    heads = max(1, width // 64) if heads is None else heads
    if heads < 1 or width % heads:
        raise ValueError(f"heads must be a positive divisor of width={width}, got {heads!r}")
    if intermediate is None:
        intermediate = math.ceil(8 * width / 3 / 32) * 32
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def tiny_teacher(vocab: int, *, seed: int = 0, **kwargs: Any) -> LlamaForCausalLM:
    """The reference teacher: :func:`tiny_llama` with 4 layers of width 256."""
    return tiny_llama(4, 256, vocab, seed=seed, **kwargs)


def tiny_student(vocab: int, *, seed: int = 0, **kwargs: Any) -> LlamaForCausalLM:
    """The reference student: :func:`tiny_llama` with 2 layers of width 128."""
    return tiny_llama(2, 128, vocab, seed=seed, **kwargs)


def _check_plain_head(model: PreTrainedModel) -> None:
    cfg = model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, name, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits after the output layer ({name}={value!r}); pass a "
                f"callable that reproduces them instead of the bare output layer"
            )


def output_head(model: PreTrainedModel) -> nn.Linear:
    """The model's output layer (``lm_head``): final hidden ``[..., D]`` -> logits ``[..., V]``.

    Raises:
        ValueError: The model's logits are more than its output layer (soft-capping or a logit scale).
        TypeError: The output layer is not an ``nn.Linear``.
    """
    _check_plain_head(model)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output layer is {type(head).__name__}, not an nn.Linear")
    return head


def output_size(model: PreTrainedModel) -> int:
    """The number of logits the model produces per position (its output layer's rows, padding included)."""
    return int(output_head(model).out_features)


def final_hidden(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """The decoder's final hidden states (after the final norm), without computing logits.

    Args:
        model: A Hugging Face causal LM (``...ForCausalLM``).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``, 1 on real tokens.
        position_ids: ``[B, T]``, optional (``mentor.lm.generate.Generation.position_ids`` for left-padded
            prompts; rotary models give the same result either way, models with absolute positions do not).

    Returns:
        ``[B, T, D]``; ``output_head(model)(final_hidden(...))`` equals the model's logits.
    """
    base = model.base_model
    if base is model:
        raise TypeError(f"{type(model).__name__} has no separate decoder (base_model) to run without its head")
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state  # type: ignore[no-any-return]


class HiddenHead(nn.Module):
    """A causal LM's forward without logits: final hidden states and the output layer's weight.

    ``forward(input_ids) -> {"hidden": [B, T, D], "head": [V, D]}``: the decoder's final hidden states
    (:func:`final_hidden`) and the weight of its output layer (the parameter itself, so gradients reach it through
    the chunked losses of :mod:`mentor.lm.losses`), plus ``"logits"`` ``[B, T, V]`` when asked for (a method that
    mixes chunked terms with terms on the logits). The wrapped model is :attr:`model` (its parameters are this
    module's, under ``model.``); nothing else is held, so the wrapper trains, checkpoints and exports exactly the
    model's weights when the loop unwraps it.

    Args:
        model: A Hugging Face causal LM whose logits are its output layer (no soft-capping or logit scale) without
            a bias, and which has a separate decoder (``base_model``).
        num_classes: Keep only the first ``num_classes`` rows of the output layer (a teacher whose output layer is
            padded beyond the shared vocabulary, as :class:`mentor.teachers.Frozen` ``num_classes``).
        logits: Also return the full logits.

    Raises:
        ValueError: The model transforms its logits after the output layer, its output layer has a bias, or
            ``num_classes`` exceeds its rows.
        TypeError: The model has no separate decoder or no linear output layer.
    """

    model: PreTrainedModel
    num_classes: int | None
    logits: bool

    def __init__(self, model: nn.Module, *, num_classes: int | None = None, logits: bool = False) -> None:
        super().__init__()
        base = getattr(model, "base_model", None)
        if not isinstance(model, PreTrainedModel) or not isinstance(base, nn.Module) or base is model:
            raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM with a separate decoder "
                            "(base_model): its final hidden states cannot be computed without its logits")
        head = output_head(model)
        if head.bias is not None:
            raise ValueError(f"{type(model).__name__}'s output layer has a bias; the chunked LM terms take a "
                             "bias-free output layer (use the full-logits terms: recipe argument chunk_size null)")
        if num_classes is not None and not 1 <= num_classes <= head.out_features:
            raise ValueError(f"num_classes must be in [1, {head.out_features}] (the output layer's rows), "
                             f"got {num_classes!r}")
        self.model = model
        self.num_classes = num_classes
        self.logits = logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{"hidden": [B, T, D], "head": [V, D]}`` (and ``"logits"`` ``[B, T, V]``) of ``input_ids`` ``[B, T]``."""
        hidden = final_hidden(self.model, input_ids, attention_mask)
        weight = output_head(self.model).weight
        if self.num_classes is not None:
            weight = weight[: self.num_classes]
        out = {"hidden": hidden, "head": weight}
        if self.logits:
            out["logits"] = torch.nn.functional.linear(hidden, weight)
        return out


def hidden_teacher(teacher: Any) -> Any:
    """A frozen LM teacher whose ``targets`` are ``{"hidden", "head"}`` (a :class:`HiddenHead` of its network):
    the teacher's training forward for the chunked LM terms. The same network, frozen, with the same input
    transform and the same cut to ``num_classes``; the teacher given is left as it is (evaluation uses its logits).

    Raises:
        ValueError: ``teacher`` is not a :class:`mentor.teachers.Frozen` of a Hugging Face causal LM.
    """
    from mentor.teachers import Frozen

    model = getattr(teacher, "model", None)
    if not isinstance(teacher, Frozen) or not isinstance(model, PreTrainedModel):
        raise ValueError(
            "the chunked LM terms read the teacher's final hidden states ('teacher.hidden'), which needs a frozen "
            f"Hugging Face causal LM (teachers.Frozen(model)) or, for forward KL, a teacher cache; got "
            f"{type(teacher).__name__}. For a teacher that only gives logits, use the full-logits terms "
            "(recipe argument chunk_size=None)"
        )
    return Frozen(HiddenHead(model, num_classes=teacher.num_classes), input_transform=teacher.input_transform)
