"""Language models in mentor's one loop (:func:`mentor.train.fit`): data layout, on-policy batches, evaluation.

**Data layout.** An LM dataset is a :class:`LMData` (a :class:`mentor.data.TensorData`): ``x`` the input ids
``[N, T]``, right-padded, and ``y`` the labels **already shifted** for next-token prediction: ``y[:, t]`` is the
token that follows position ``t``, or ``-100`` where nothing is to be learned (prompt, padding, the last position).
So the logits ``[B, T, V]`` of a causal LM line up with ``y`` ``[B, T]`` position by position, and every loss of
:mod:`mentor.losses` applies as it is: the loop's item mask of a ``"labelled"`` term is ``y >= 0`` per position
and its normaliser the number of target tokens in the whole optimiser step (all micro-batches, all processes), so
gradient accumulation changes nothing. Right padding needs no attention mask in a causal model: a real token never
attends to a later (padding) one, and positions start at 0 in every row.

**On-policy batches.** :class:`OnPolicy` is a :attr:`mentor.method.Method.batch_hook`: per optimiser step it draws
GKD's coin (:func:`mentor.lm.generate.on_policy_at`: with probability ``lmbda`` the step is on-policy, decided by
``(seed, step)`` alone); on an on-policy step it cuts each sequence back to its prompt (the positions before the
first target), lets the student continue the prompts with its KV cache (:func:`mentor.lm.generate.sample`), or
interleaves student proposals with teacher corrections (speculative KD,
:func:`mentor.lm.generate.speculative_sample`), and returns the samples in the same right-padded, shifted layout
(:func:`to_training`), with targets on the generated tokens. The teacher then scores them in the loop's ordinary
teacher forward and the student trains on them. Sampling seeds come from ``(seed, step, chunk)``, the chunk being
the micro-batch's place in the global batch (``micro * processes + rank``), so 2 processes give the draws of 1
process with twice the accumulation.

**Sequence-level KD.** :func:`teacher_sequences` lets the teacher continue every training prompt once (greedy by
default) and returns the dataset with the teacher's answers as targets; :func:`cached_teacher_sequences` stores the
result under ``mentor.data.cache_dir() / "lm" / "seq_kd"`` keyed by the teacher's and the data's fingerprints, so
several students (seeds) reuse one generation. Written atomically.

**Evaluation.** :func:`evaluate_lm` (called by :func:`mentor.eval.evaluate` for sequence data): perplexity and
next-token accuracy on the target positions, token agreement (top-1) and KL with the teacher there, and, for a
prompt task (``LMData.max_new_tokens > 0``), exact match of the greedy continuation of each held-out prompt with
the reference answer, compared token by token up to and including the end-of-sequence token.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mentor import atomic, losses
from mentor.data import TensorData
from mentor.lm.generate import Generation, on_policy_at, sample, speculative_sample

__all__ = [
    "IGNORE_INDEX",
    "LMData",
    "OnPolicy",
    "shift_labels",
    "prompts_of",
    "to_training",
    "lm_task_data",
    "lm_corpus_data",
    "teacher_sequences",
    "cached_teacher_sequences",
    "evaluate_lm",
    "greedy_answers",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LMData(TensorData):
    """Sequence data for the loop: ``x`` input ids ``[N, T]`` (right-padded), ``y`` shifted labels ``[N, T]``.

    Attributes:
        eos_id: End-of-sequence token (generation stops after it).
        pad_id: Padding token.
        max_new_tokens: Longest generated answer in evaluation; 0 for a corpus without prompts (no exact match).
    """

    eos_id: int = 2
    pad_id: int = 0
    max_new_tokens: int = 0


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Hugging Face labels (``labels[:, t]`` is the token at ``t``) -> the loop's shifted labels (the token after
    ``t``): ``out[:, t] = labels[:, t + 1]``, the last column ``ignore_index``; negative labels become
    ``ignore_index``."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out.masked_fill(out < 0, ignore_index)


def prompts_of(x: Tensor, y: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """The prompts of right-padded sequences with shifted labels: each row up to and including the position before
    its first target, **left**-padded for generation.

    A row without any target keeps its whole length (as a prompt it then has nothing to answer).

    Returns:
        ``(prompt_ids [B, P], prompt_mask [B, P])``.
    """
    has = y >= 0
    width = x.shape[1]
    last = torch.full_like(has[:, 0], width - 1, dtype=torch.long)
    first = torch.where(has.any(dim=1), has.long().argmax(dim=1), last)
    length = first + 1  # the prompt: positions 0 .. first (position `first` predicts the first answer token)
    p = int(length.max())
    col = torch.arange(p, device=x.device)[None, :] - (p - length)[:, None]  # source column of each prompt column
    valid = col >= 0
    ids = torch.gather(x, 1, col.clamp(min=0)).masked_fill(~valid, pad_id)
    return ids, valid.long()


def to_training(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pad_id: int
) -> tuple[Tensor, Tensor]:
    """A generation (left-padded prompt, completion, padding; Hugging Face labels) -> the loop's layout.

    Every row is moved left so that it starts at column 0 (its positions are then ``0, 1, ...``, the ones used while
    sampling), padded on the right with ``pad_id``, and its labels are shifted (:func:`shift_labels`).

    Returns:
        ``(x [B, W], y [B, W])`` with ``W`` the longest row.
    """
    mask = attention_mask.bool()
    lead = (~mask).long().cumprod(dim=1).sum(dim=1)  # left padding of each row
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    col = torch.arange(width, device=input_ids.device)[None, :] + lead[:, None]
    inside = col < input_ids.shape[1]
    col = col.clamp(max=input_ids.shape[1] - 1)
    real = torch.gather(mask, 1, col) & inside
    x = torch.gather(input_ids, 1, col).masked_fill(~real, pad_id)
    hf_labels = torch.gather(labels, 1, col).masked_fill(~real, IGNORE_INDEX)
    return x, shift_labels(hf_labels)


def _mix_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**61 - 1)
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class OnPolicy:
    """On-policy batches for GKD, MiniLLM-style reverse KL and speculative KD: a ``Method.batch_hook``.

    Attributes:
        lmbda: Fraction of on-policy steps in ``[0, 1]`` (GKD's lambda); 1: every step.
        max_new_tokens: Most tokens the student generates per prompt.
        temperature: Sampling temperature of the student (0: greedy).
        top_p: Nucleus filtering, or ``None``.
        speculative_top_k: ``None`` for plain student samples; ``K`` for speculative KD: a proposal outside the
            teacher's top-``K`` is replaced by the teacher's sample (needs a teacher network).
        teacher_temperature: The teacher's sampling temperature for replacements (default ``temperature``).
        eos_id: End-of-sequence id (the built-in tokenizer's is 2).
        pad_id: Padding id (the built-in tokenizer's is 0).
    """

    lmbda: float = 1.0
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float | None = None
    speculative_top_k: int | None = None
    teacher_temperature: float | None = None
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, numbers.Real) or not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be a number in [0, 1], got {self.lmbda!r}")
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        if not (isinstance(self.temperature, numbers.Real) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null, got {self.top_p!r}")
        if self.speculative_top_k is not None:
            _check_int("top_k", self.speculative_top_k, 1)

    def __call__(self, x: Tensor, y: Tensor, context: Any) -> tuple[Tensor, Tensor]:
        """Micro-batch ``(x, y)`` of step ``context.step``: unchanged on an off-policy step, else the samples."""
        if not on_policy_at(context.step, float(self.lmbda), context.seed):
            return x, y
        prompt_ids, prompt_mask = prompts_of(x, y, self.pad_id)
        seed = _mix_seed(context.seed, context.step, context.chunk)  # one process or several: the same draws
        common: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                  "top_p": self.top_p, "seed": seed, "eos_id": self.eos_id, "pad_id": self.pad_id}
        gen: Generation
        if self.speculative_top_k is not None:
            teacher = getattr(context.teacher, "model", None)
            if not isinstance(teacher, nn.Module):
                raise ValueError("speculative KD needs the teacher network (teachers.Frozen), got "
                                 f"{type(context.teacher).__name__}")
            gen = speculative_sample(context.student, teacher, prompt_ids, prompt_mask, top_k=self.speculative_top_k,
                                     teacher_temperature=self.teacher_temperature, **common)
        else:
            gen = sample(context.student, prompt_ids, prompt_mask, **common)
        return to_training(gen.input_ids, gen.attention_mask, gen.labels, self.pad_id)


# ------------------------------------------------------------------------------------------------------ datasets


def lm_task_data(
    task: str = "arithmetic",
    *,
    num_train: int = 5000,
    num_test: int = 200,
    seed: int = 0,
    vocab_size: int = 512,
    max_new_tokens: int = 8,
    **task_args: Any,
) -> tuple[LMData, LMData]:
    """A built-in prompt/answer task (:func:`mentor.lm.data.arithmetic` or :func:`~mentor.lm.data.reversal`),
    tokenised with the built-in tokenizer, as ``(train, test)`` in the loop's layout (targets on the answer and
    its end-of-sequence token)."""
    from mentor.lm import data as lm_data

    makers = {"arithmetic": lm_data.arithmetic, "reversal": lm_data.reversal}
    if task not in makers:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(makers)}")
    tok = lm_data.tokenizer(vocab_size)
    out = []
    for split, n in (("train", num_train), ("test", num_test)):
        encoded = lm_data.encode_task(makers[task](n, split=split, seed=seed, **task_args), tok)  # type: ignore[operator]
        out.append(LMData(encoded.input_ids, shift_labels(encoded.labels), eos_id=int(tok.eos_token_id),
                          pad_id=int(tok.pad_token_id), max_new_tokens=max_new_tokens))
    return out[0], out[1]


def lm_corpus_data(
    *, block_size: int = 128, vocab_size: int = 512, num_train: int | None = None, num_test: int | None = None
) -> tuple[LMData, LMData]:
    """The standard-library docstring corpus (:func:`mentor.lm.data.stdlib_blocks`), packed into blocks, as
    ``(train, valid)`` in the loop's layout (every position but the last of a block has a target)."""
    from mentor.lm import data as lm_data

    tok = lm_data.tokenizer(vocab_size)
    out = []
    for split, n in (("train", num_train), ("valid", num_test)):
        blocks = lm_data.stdlib_blocks(split, block_size, vocab_size)  # type: ignore[arg-type]
        ids, labels = blocks.input_ids[:n], blocks.labels[:n]
        out.append(LMData(ids, shift_labels(labels), eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id)))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------- sequence-level KD


@torch.no_grad()
def teacher_sequences(
    teacher: nn.Module,
    data: LMData,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
) -> LMData:
    """Sequence-level KD's data (Kim & Rush 2016, https://arxiv.org/abs/1606.07947): every prompt of ``data``
    continued by the teacher (greedy by default: the usual approximation of the paper's beam search), with targets
    on the teacher's tokens.

    Args:
        teacher: The teacher causal LM.
        data: The training data (its prompts are kept, its answers dropped).
        max_new_tokens: Longest generation (default ``data.max_new_tokens``).
        temperature: 0 (greedy) or a sampling temperature.
        seed: Seed of the draws (batch ``i`` uses ``seed + i``).
        batch_size: Prompts per generation call.

    Returns:
        The teacher-written dataset, same items in the same order.
    """
    steps = max_new_tokens if max_new_tokens is not None else data.max_new_tokens
    _check_int("max_new_tokens", steps, 1)
    xs, ys = [], []
    for i, start in enumerate(range(0, len(data), batch_size)):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        prompt_ids, prompt_mask = prompts_of(x, y, data.pad_id)
        gen = sample(teacher, prompt_ids, prompt_mask, max_new_tokens=steps, temperature=temperature, seed=seed + i,
                     eos_id=data.eos_id, pad_id=data.pad_id)
        xs.append(gen)
    width = max(int(g.attention_mask.sum(dim=1).max()) for g in xs)
    for gen in xs:
        x, y = to_training(gen.input_ids, gen.attention_mask, gen.labels, data.pad_id)
        pad = width - x.shape[1]
        ys.append((torch.nn.functional.pad(x, (0, pad), value=data.pad_id),
                   torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)))
    return LMData(torch.cat([a for a, _ in ys]).cpu(), torch.cat([b for _, b in ys]).cpu(), eos_id=data.eos_id,
                  pad_id=data.pad_id, max_new_tokens=data.max_new_tokens)


def cached_teacher_sequences(
    teacher: nn.Module, data: LMData, *, root: str | Path | None = None, **kwargs: Any
) -> tuple[LMData, Path]:
    """:func:`teacher_sequences`, computed once and stored (safetensors, written atomically) under ``root``
    (default ``mentor.data.cache_dir() / "lm" / "seq_kd"``), keyed by the teacher's and the data's fingerprints
    and the generation arguments. Returns the data and the file."""
    from safetensors.torch import load_file, save_file

    from mentor.cache import fingerprint_data, fingerprint_model
    from mentor.data import cache_dir

    key = json.dumps({"teacher": fingerprint_model(teacher), "x": fingerprint_data(data.x),
                      "y": fingerprint_data(data.y), "eos": data.eos_id, "pad": data.pad_id,
                      "args": {k: kwargs[k] for k in sorted(kwargs)}, "version": 1}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = Path(root) if root is not None else cache_dir() / "lm" / "seq_kd"
    path = folder / f"teacher_sequences_{digest}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return LMData(stored["x"], stored["y"], eos_id=data.eos_id, pad_id=data.pad_id,
                      max_new_tokens=data.max_new_tokens), path
    made = teacher_sequences(teacher, data, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        save_file({"x": made.x.contiguous(), "y": made.y.contiguous()}, str(tmp), metadata={"key": key})
    return made, path


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def greedy_answers(
    model: nn.Module, data: LMData, *, batch_size: int = 256, device: torch.device | str = "cpu",
    max_new_tokens: int | None = None,
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Greedy continuations of the prompts of ``data``.

    Returns:
        ``(prompts, completions, references)``: per item the prompt's tokens, the generated tokens up to and
        including the first eos, and the reference answer's tokens (the targets, eos included).
    """
    steps = max_new_tokens if max_new_tokens is not None else data.max_new_tokens
    prompts: list[list[int]] = []
    completions: list[list[int]] = []
    references: list[list[int]] = []
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size].to(device), data.y[start : start + batch_size].to(device)
        prompt_ids, prompt_mask = prompts_of(x, y, data.pad_id)
        gen = sample(model, prompt_ids, prompt_mask, max_new_tokens=steps, temperature=0.0, seed=0,
                     eos_id=data.eos_id, pad_id=data.pad_id)
        for i in range(x.shape[0]):
            prompts.append(prompt_ids[i][prompt_mask[i].bool()].tolist())
            completions.append(gen.completions[i][gen.completion_mask[i].bool()].tolist())
            references.append(y[i][y[i] >= 0].tolist())
    return prompts, completions, references


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    data: TensorData,
    teacher: Any = None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """LM metrics of ``model`` on sequence data (eval mode, no gradient; the mode is restored after).

    Returns:
        ``perplexity`` (``exp`` of the mean cross-entropy per target token), ``token_accuracy`` (next-token top-1
        on target positions), ``target_tokens``, with a teacher ``agreement`` (top-1 agreement with the teacher on
        target positions) and ``kl_to_teacher`` (mean ``KL(p_t || p_s)`` per target token), and for a prompt task
        ``exact_match`` (greedy answers equal to the references, eos included).
    """
    from mentor.models import count_parameters
    from mentor.teachers import as_outputs

    was_training = model.training
    model.eval()
    try:
        nll = correct = agree = kl = 0.0
        count = 0
        for x, y in data.batches(batch_size):
            x, y = x.to(device), y.to(device)
            logits = as_outputs(model(x))["logits"]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            target = y >= 0
            n = int(target.sum())
            if n == 0:
                continue
            count += n
            nll += float(losses.cross_entropy(logits, y, num_items=1))
            pred = logits.argmax(dim=-1)
            correct += float((pred == y)[target].sum())
            if teacher is not None:
                t_logits = teacher.targets(x)["logits"].to(logits.dtype)
                agree += float((pred == t_logits.argmax(dim=-1))[target].sum())
                kl += float(losses.kl_div(logits, t_logits, mask=target, num_items=1))
        result: dict[str, Any] = {"params": count_parameters(model), "target_tokens": count}
        if count:
            result["perplexity"] = math.exp(nll / count)
            result["token_accuracy"] = correct / count
            if teacher is not None:
                result["agreement"] = agree / count
                result["kl_to_teacher"] = kl / count
        if isinstance(data, LMData) and data.max_new_tokens > 0:
            _, completions, references = greedy_answers(model, data, batch_size=batch_size, device=device)
            result["exact_match"] = sum(c == r for c, r in zip(completions, references, strict=True)) / max(
                len(references), 1)
    finally:
        model.train(was_training)
    return result
