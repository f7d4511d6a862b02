"""On-policy sampling with a KV cache, the GKD on/off-policy mix, and speculative KD's interleaved sampling.

* :func:`sample`: the student (or any causal LM) continues left-padded prompts token by token with its KV cache
  (each step feeds one new token per row and reads the logits of that position only), with temperature and
  optional nucleus (top-p) filtering, from a ``torch.Generator`` seeded by ``seed``: the same seed gives the same
  completions and the global random state is neither read nor changed. The result (:class:`Generation`) is ready
  for token KD: ``labels`` are ``-100`` on the prompt and on the padding after each row's first eos.
* :func:`choose_on_policy` / :func:`on_policy_at`: GKD's mix (Agarwal et al. 2024,
  https://arxiv.org/abs/2306.13649, algorithm 1): per batch, with probability ``lmbda`` the student trains on its
  own samples (on-policy), else on the dataset's sequences.
* :func:`speculative_sample`: speculative KD's interleaved sampling (Xu et al. 2024,
  https://arxiv.org/abs/2410.11325): the student proposes each token; when the proposal is not among the teacher's
  top-``k`` tokens at that position, the teacher's own sample replaces it. Both models keep a KV cache and both
  consume the accepted token.

Conventions shared by every function here:

* Prompts are **left**-padded ``[B, P]`` (``mentor.lm.data.encode_task`` makes them) and every row's last column is
  a real token. Positions are ``cumsum(attention_mask) - 1`` (what ``transformers``' ``generate`` uses), so padding
  does not shift a row's positions; :attr:`Generation.position_ids` carries them for the scoring forward pass.
* A row stops at its first ``eos_id`` (kept, with a label: the student learns to stop); the columns after it are
  ``pad_id`` with attention mask 0 and label ``-100``. Sampling stops when every row has stopped or after
  ``max_new_tokens``, so the completion width ``G`` may be less than ``max_new_tokens``.
* ``temperature=0`` is greedy (arg-max). ``vocab_size`` restricts sampling to ids ``[0, vocab_size)`` (models
  whose output layer has padded rows).
* No dropout (it would draw from the global generator): a model that runs its own forward is put in eval mode
  and back in the mode it had; no gradient is recorded.
* How a model is run (``decoder=``): small stock Llama / Mistral / Qwen2 models go through
  :class:`mentor.lm.decode.LeanDecoder` (the same logits up to float rounding, the same tokens, a few times faster
  on small models; see that module), every other model through its own forward with its KV cache. ``"auto"``
  (default) chooses and logs the reason at debug level when it falls back; ``"model"`` forces the forward.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mentor.lm.decode import LeanDecoder, unsupported_reason

__all__ = [
    "Generation",
    "SpeculativeGeneration",
    "sample",
    "speculative_sample",
    "choose_on_policy",
    "on_policy_at",
    "position_ids_of",
    "filter_top_p",
]

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """Prompts with sampled continuations, laid out for a scoring forward pass and token KD.

    Attributes:
        input_ids: ``[B, P + G]``: the left-padded prompt, then the completion (``pad_id`` after the first eos).
        attention_mask: ``[B, P + G]``: 1 on real prompt tokens and on completion tokens up to and including the
            first eos.
        position_ids: ``[B, P + G]``: ``cumsum(attention_mask) - 1`` clamped at 0 (the positions used while
            sampling; pass them to the scoring forward pass for models with absolute positions).
        labels: ``[B, P + G]``: the completion's token ids (unshifted, the Hugging Face convention); ``-100`` on the
            prompt and the padding.
        completions: ``[B, G]``: the generated tokens.
        completion_mask: ``[B, G]``: 1 up to and including each row's first eos.
        prompt_length: ``P``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    completions: Tensor
    completion_mask: Tensor
    prompt_length: int

    @property
    def num_tokens(self) -> int:
        """Generated tokens that carry a label (eos included)."""
        return int(self.completion_mask.sum())


@dataclass(frozen=True)
class SpeculativeGeneration(Generation):
    """A :class:`Generation` from :func:`speculative_sample`.

    Attributes:
        replaced: ``[B, G]`` bool: ``True`` where the student's proposal fell outside the teacher's top-k and the
            teacher's sample took its place (``False`` on padding).
    """

    replaced: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------- helpers


def position_ids_of(attention_mask: Tensor) -> Tensor:
    """``cumsum(attention_mask) - 1`` clamped at 0: positions that ignore left padding, ``[B, T]`` int64."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751): keep the smallest set of most
    probable tokens whose probability sums to at least ``top_p`` (the most probable token always stays), set the
    others to ``-inf``.

    Args:
        logits: ``[B, V]`` (already divided by the temperature).
        top_p: In ``(0, 1]``; 1 keeps everything.

    Returns:
        ``[B, V]`` filtered logits.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _draw(logits: Tensor, temperature: float, top_p: float | None, generator: torch.Generator) -> Tensor:
    """One token per row from ``logits`` ``[B, V]``: arg-max at temperature 0, else a draw from the softmax.

    The draw is ``argmax(p / e)`` with ``e ~ Exp(1)`` per class from ``generator`` (the exponential race: class ``i``
    wins with probability ``p_i``). This is how ``torch.multinomial(p, 1, generator=...)`` draws one sample
    (torch 2.x), so the tokens are the same as its; written out because ``multinomial`` first checks ``p`` with a
    dozen small operations (about a sixth of a decode step of a small model). A NaN in ``p`` (NaN or infinite
    logits) is refused here instead.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if top_p is not None:
        z = filter_top_p(z, top_p)
    probs = z.softmax(dim=-1)
    if math.isnan(float(probs.sum())):
        raise ValueError("cannot sample: the model's logits contain NaN or infinite values")
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.div(probs, race, out=race).argmax(dim=-1)


def _check_number(name: str, value: Any, *, low: float, high: float | None = None, open_low: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > low if open_low else v >= low) and (high is None or v <= high)
    if not ok:
        lo = "(" if open_low else "["
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be a number in {lo}{low}, {hi}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[1] == 0 or not bool((prompt_mask[:, -1] != 0).all()):
        bad = [] if prompt_ids.shape[1] == 0 else (prompt_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"prompts must be left-padded with a real token in the last column (rows {bad} end in padding); "
            "mentor.lm.data.encode_task gives left-padded prompt_ids / prompt_mask"
        )


def _seed_generator(seed: int, device: torch.device) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


class _Decoder:
    """One causal LM continuing a batch of left-padded prompts through its own forward and KV cache (any model
    with the ``transformers`` causal-LM call signature)."""

    def __init__(self, model: nn.Module, vocab_size: int | None) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.x names the cache argument `cache` (`past_key_values` is deprecated); older: the latter.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in params
        self.vocab_size = vocab_size
        self.cache: Any = None
        self.positions: Tensor | None = None
        self.mask: Tensor | None = None

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self.cache_arg: self.cache,
        }
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        logits: Tensor = out.logits[:, -1]
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]

    def start(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int) -> Tensor:
        """Run the prompts; return the next-token logits ``[B, V]``."""
        positions = position_ids_of(prompt_mask)
        self.positions = positions[:, -1:]
        self.mask = prompt_mask.long()
        return self._forward(prompt_ids, self.mask, positions)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row ``[B]``; return the next-token logits ``[B, V]``."""
        assert self.positions is not None and self.mask is not None
        self.positions = self.positions + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._forward(tokens[:, None], self.mask, self.positions)


DECODERS = ("auto", "lean", "model")


def _check_decoder(decoder: Any) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def _decoder(model: nn.Module, vocab_size: int | None, decoder: str, length: int) -> _Decoder | LeanDecoder:
    """The decoder for ``model``: :class:`mentor.lm.decode.LeanDecoder` where it applies (``"auto"``) or is asked
    for (``"lean"``, refused with the reason where it does not apply), else the model's own forward."""
    _check_decoder(decoder)
    if decoder == "model":
        return _Decoder(model, vocab_size)
    reason = unsupported_reason(model, length)
    if reason is None:
        return LeanDecoder(model, vocab_size)
    if decoder == "lean":
        raise ValueError(f"decoder='lean' does not apply to {type(model).__name__}: {reason}; use decoder='auto'")
    logger.debug("sampling %s through its own forward (lean decoder off: %s)", type(model).__name__, reason)
    return _Decoder(model, vocab_size)


def _generic(models: list[nn.Module], decoders: list[Any]) -> list[nn.Module]:
    """The models that run their own forward (put in eval mode while sampling; the lean decoder has no dropout)."""
    return [m for m, d in zip(models, decoders, strict=True) if isinstance(d, _Decoder)]


def _inference(*decoders: Any) -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode`` around a sampling loop whose decoders are all lean (cheaper tensor operations; the
    tokens it makes are inference tensors until :func:`_assemble` copies them out), else nothing: a model's own
    forward may keep tensors (hooks, caches) that must stay usable by autograd."""
    if decoders and all(isinstance(d, LeanDecoder) for d in decoders):
        return torch.inference_mode()
    return contextlib.nullcontext()


class _EvalMode:
    """Put models in eval mode for the block and restore each one's mode after."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.modes = [m.training for m in models]

    def __enter__(self) -> None:
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.models, self.modes, strict=True):
            m.train(mode)


def _assemble(
    prompt_ids: Tensor, prompt_mask: Tensor, tokens: list[Tensor], alive: list[Tensor], pad_id: int
) -> dict[str, Any]:
    """Completion columns -> the :class:`Generation` fields."""
    batch, width = prompt_ids.shape
    device = prompt_ids.device
    if tokens:
        completions = torch.stack(tokens, dim=1)
        completion_mask = torch.stack(alive, dim=1).long()
    else:
        completions = torch.empty(batch, 0, dtype=torch.long, device=device)
        completion_mask = torch.empty(batch, 0, dtype=torch.long, device=device)
    completions = completions.masked_fill(completion_mask == 0, pad_id)
    input_ids = torch.cat([prompt_ids.long(), completions], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :width] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_of(attention_mask),
        "labels": labels,
        "completions": completions,
        "completion_mask": completion_mask,
        "prompt_length": width,
    }


# ----------------------------------------------------------------------------------------------------------- sample


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int,
    eos_id: int | None,
    pad_id: int,
    vocab_size: int | None = None,
    decoder: str = "auto",
) -> Generation:
    """Sample continuations of left-padded prompts with the model's KV cache (on-policy data for GKD).

    Each step runs one new token per row through the model with its cache (``use_cache=True``, logits of the last
    position only), so the cost per token does not grow with the length beyond attention over the cache.

    Args:
        model: A Hugging Face causal LM (``...ForCausalLM``), or any module with the same forward signature.
        prompt_ids: ``[B, P]`` left-padded prompts.
        prompt_mask: ``[B, P]``: 1 on real tokens; the last column must be 1.
        max_new_tokens: Most tokens to generate per row (>= 0).
        temperature: Sampling temperature (>= 0); 0 is greedy.
        top_p: Nucleus filtering in ``(0, 1]`` after the temperature, or ``None``.
        seed: Seed of the private ``torch.Generator`` that draws the tokens (the global generator is not used).
        eos_id: The end-of-sequence id (a row stops after it), or ``None`` to always generate ``max_new_tokens``.
        pad_id: Filler after a row's eos.
        vocab_size: Sample only ids ``[0, vocab_size)`` (output layers with padded rows).
        decoder: ``"auto"``: :class:`mentor.lm.decode.LeanDecoder` for the models it supports (stock Llama,
            Mistral, Qwen2; same draws, logits equal to ~1e-6 in float32), else the model's own forward (the reason
            is logged at debug level); ``"lean"``: the lean decoder or a ``ValueError`` saying why not; ``"model"``:
            always the model's own forward and cache.

    Returns:
        The :class:`Generation`.
    """
    _check_prompts(prompt_ids, prompt_mask)
    steps = _check_int("max_new_tokens", max_new_tokens, low=0)
    temp = _check_number("temperature", temperature, low=0.0)
    if top_p is not None:
        top_p = _check_number("top_p", top_p, low=0.0, high=1.0, open_low=True)
    _check_decoder(decoder)
    generator = _seed_generator(seed, prompt_ids.device)
    tokens: list[Tensor] = []
    alive_cols: list[Tensor] = []
    running = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    dec = _decoder(model, vocab_size, decoder, prompt_ids.shape[1] + steps) if steps else None
    with _EvalMode(*_generic([model], [dec])), _inference(dec):
        logits = dec.start(prompt_ids, prompt_mask, steps) if dec is not None else None
        for step in range(steps):
            assert dec is not None and logits is not None
            token = _draw(logits, temp, top_p, generator)
            tokens.append(token)
            alive_cols.append(running)  # `running` is replaced below, never changed in place
            if eos_id is not None:
                running = running & (token != eos_id)
            if step + 1 == steps or (eos_id is not None and not bool(running.any())):
                break
            logits = dec.step(token)
    return Generation(**_assemble(prompt_ids, prompt_mask, tokens, alive_cols, pad_id))


# ------------------------------------------------------------------------------------------------- GKD's mixing


def choose_on_policy(lmbda: float, generator: torch.Generator) -> bool:
    """GKD's per-batch choice: ``True`` (train on the student's own samples) with probability ``lmbda``.

    One uniform draw from ``generator`` (never from the global generator): ``u < lmbda``. ``lmbda=0`` is always
    off-policy (the dataset's or the teacher's sequences), ``lmbda=1`` always on-policy.

    Args:
        lmbda: Fraction of on-policy batches, in ``[0, 1]`` (GKD's lambda; TRL's ``lmbda``).
        generator: A seeded CPU ``torch.Generator``.

    Returns:
        Whether this batch is on-policy.
    """
    p = _check_number("lmbda", lmbda, low=0.0, high=1.0)
    u = float(torch.rand((), generator=generator))
    return u < p


def on_policy_at(step: int, lmbda: float, seed: int) -> bool:
    """:func:`choose_on_policy` for optimizer step ``step`` from a generator seeded by ``(seed, step)``: the choice
    depends on nothing else, so a resumed run makes the same choices without saved generator state."""
    _check_int("step", step, low=0)
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    return choose_on_policy(lmbda, generator)


# -------------------------------------------------------------------------------------------------------------- SKD


@torch.no_grad()
def speculative_sample(
    student: nn.Module,
    teacher: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    top_k: int,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_p: float | None = None,
    seed: int,
    eos_id: int | None,
    pad_id: int,
    vocab_size: int | None = None,
    decoder: str = "auto",
) -> SpeculativeGeneration:
    """Speculative KD's interleaved sampling (Xu et al. 2024, https://arxiv.org/abs/2410.11325).

    At each step the student samples a proposal ``y_s`` from its own distribution (temperature, ``top_p``). If
    ``y_s`` is among the teacher's ``top_k`` most probable tokens at that position it is kept; otherwise the
    teacher's sample ``y_t`` (at ``teacher_temperature``, same ``top_p``) is used. The kept token is fed to both
    models' KV caches. Ties at the teacher's ``k``-th logit are broken by ``torch.topk``.

    Randomness: the student's proposals come from a generator seeded by ``seed`` and the teacher's samples from a
    second one seeded by ``seed + 1``, so with ``top_k`` equal to the vocabulary (nothing replaced) the result is
    exactly ``sample(student, ..., seed=seed)``.

    Args:
        student: The proposing causal LM.
        teacher: The verifying causal LM (same vocabulary over ``[0, vocab_size)``).
        prompt_ids: ``[B, P]`` left-padded prompts.
        prompt_mask: ``[B, P]``.
        max_new_tokens: Most tokens per row.
        top_k: The teacher's acceptance set size ``K`` (>= 1); the paper uses small values (e.g. 5 to 25).
        temperature: The student's sampling temperature (0: greedy).
        teacher_temperature: The teacher's sampling temperature for replacements; default ``temperature``
            (0: the teacher's arg-max).
        top_p: Nucleus filtering for both samplers, or ``None``.
        seed: Seed (see above).
        eos_id: End-of-sequence id, or ``None``.
        pad_id: Filler after a row's eos.
        vocab_size: The shared vocabulary; required when the two output layers differ in size (padded rows).
        decoder: How each model decodes (see :func:`sample`); ``"auto"`` decides for each model on its own.

    Returns:
        A :class:`SpeculativeGeneration`, with ``replaced`` marking the teacher's tokens.
    """
    _check_prompts(prompt_ids, prompt_mask)
    steps = _check_int("max_new_tokens", max_new_tokens, low=0)
    k = _check_int("top_k", top_k, low=1)
    temp = _check_number("temperature", temperature, low=0.0)
    t_temp = temp if teacher_temperature is None else _check_number("teacher_temperature", teacher_temperature,
                                                                      low=0.0)
    if top_p is not None:
        top_p = _check_number("top_p", top_p, low=0.0, high=1.0, open_low=True)
    _check_decoder(decoder)
    student_gen = _seed_generator(seed, prompt_ids.device)
    teacher_gen = _seed_generator(int(seed) + 1, prompt_ids.device)
    tokens: list[Tensor] = []
    alive_cols: list[Tensor] = []
    replaced_cols: list[Tensor] = []
    running = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    length = prompt_ids.shape[1] + steps
    s_dec, t_dec = ((_decoder(student, vocab_size, decoder, length), _decoder(teacher, vocab_size, decoder, length))
                    if steps else (None, None))
    with _EvalMode(*_generic([student, teacher], [s_dec, t_dec])), _inference(s_dec, t_dec):
        if s_dec is not None and t_dec is not None:
            s_logits = s_dec.start(prompt_ids, prompt_mask, steps)
            t_logits = t_dec.start(prompt_ids, prompt_mask, steps)
            if s_logits.shape[-1] != t_logits.shape[-1]:
                raise ValueError(
                    f"student has {s_logits.shape[-1]} logits but teacher has {t_logits.shape[-1]}: pass "
                    f"vocab_size=len(tokenizer) to compare the shared range"
                )
            if k > t_logits.shape[-1]:
                raise ValueError(f"top_k={k} exceeds the vocabulary ({t_logits.shape[-1]})")
        for step in range(steps):
            assert s_dec is not None and t_dec is not None
            proposal = _draw(s_logits, temp, top_p, student_gen)
            teacher_token = _draw(t_logits, t_temp, top_p, teacher_gen)
            top = t_logits.topk(k, dim=-1).indices
            accepted = (top == proposal[:, None]).any(dim=-1)
            token = torch.where(accepted, proposal, teacher_token)
            tokens.append(token)
            alive_cols.append(running)
            replaced_cols.append(~accepted & running)
            if eos_id is not None:
                running = running & (token != eos_id)
            if step + 1 == steps or (eos_id is not None and not bool(running.any())):
                break
            s_logits, t_logits = s_dec.step(token), t_dec.step(token)
    fields = _assemble(prompt_ids, prompt_mask, tokens, alive_cols, pad_id)
    if replaced_cols:
        replaced = torch.stack(replaced_cols, dim=1)
    else:
        replaced = torch.zeros(prompt_ids.shape[0], 0, dtype=torch.bool, device=prompt_ids.device)
    return SpeculativeGeneration(**fields, replaced=replaced)
