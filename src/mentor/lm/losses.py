"""Token-level distillation losses for causal LMs, chunked along the sequence.

The divergences themselves are the functions of :mod:`mentor.losses` (``kl_div``, ``generalized_jsd``, ``skew_kl``,
``tvd``); this module only decides **which positions** are compared and **in what pieces**, and never restates a
formula.

* **Positions.** A causal LM's logits at position ``t`` predict token ``t + 1``. With ``shift=True`` (the default)
  the logits at positions ``[0, T - 1)`` are compared where ``labels[:, 1:] != ignore_index`` (the ``-100``
  convention of Hugging Face: prompt, padding and anything else not to be learned carry ``-100``). With
  ``shift=False`` the labels are already aligned with the logits.
* **Normaliser.** The loss is ``sum over target tokens of divergence(token) / num_items``. Pass as ``num_items`` the
  number of target tokens of the **whole optimizer step** (all micro-batches, all processes; :func:`count_targets`
  counts one micro-batch) and gradient accumulation gives exactly the gradient of one large batch. Left ``None``,
  it is the number of target tokens of this call (at least 1, so a call without any target gives 0, never NaN).
* **Chunks.** :func:`token_kd` takes final hidden states and output layers instead of logits. It walks the
  ``N`` target positions ``chunk_size`` at a time: per chunk it computes the student's and the teacher's
  ``[chunk, vocab]`` logits, the divergence, and (when a gradient is needed) the gradient of the divergence with
  respect to the chunk's student logits, which it turns at once into gradients for the hidden states and the
  output weight. So at most one ``[chunk, vocab]`` logits block per model is alive at a time, in the forward and in
  the backward, and the full ``[tokens, vocab]`` logits never exist. The backward (a custom autograd function) only
  scales the gradients kept from the forward: no recomputation. Without grad mode (evaluation) no gradient is
  computed.
* **Per-token weights.** ``token_weights`` (``[B, T]`` aligned with the labels, or ``[N]``) make the loss
  ``sum_i w_i * divergence_i / num_items``; they reach the divergence as the float ``mask`` of :mod:`mentor.losses`.
* **Sparse teachers.** :func:`token_kd_topk` is the same chunked loop over a teacher given by per-position top-k
  log-probabilities (what :mod:`mentor.cache` stores for sequence items), with
  :func:`mentor.losses.sparse_kl_div` per chunk.
* **Any loss, rows already selected.** :func:`chunked_loss` is the chunk loop itself for any function of
  :mod:`mentor.losses` over rows of hidden states (the target positions the training loop selects): the
  teacher's logits from its hidden rows, or the loss's own target rows (labels, top-k values). The loop's chunked
  LM terms call it (:mod:`mentor.recipes.lm_kd`); :func:`token_kd` and :func:`token_kd_topk` select their positions
  and call it too.
* **Vocabularies.** See :mod:`mentor.lm.vocab`: equal output sizes are required unless ``vocab_size`` (the shared
  tokenizer's length) is given, in which case both sides are truncated to ``[0, vocab_size)``.

The teacher side always runs without gradient: the teacher never receives one.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mentor import losses
from mentor.lm.vocab import shared_vocab_size

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "divergence",
    "target_mask",
    "count_targets",
    "chunked_loss",
    "select_token_weights",
    "token_kd",
    "token_kd_from_logits",
    "token_kd_topk",
    "token_kd_topk_from_logits",
]

Divergence = Callable[..., Tensor]
"""``divergence(student_logits [n, V], teacher_logits [n, V], *, num_items) -> scalar``: a function of
:mod:`mentor.losses` with its hyper-parameters bound (see :func:`divergence`)."""

HeadLike = nn.Module | Tensor | Callable[[Tensor], Tensor]
NumItems = int | float | Tensor | None

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
"""Names :func:`divergence` accepts."""


def divergence(
    name: str, *, temperature: float = 1.0, beta: float | None = None, alpha: float | None = None
) -> Divergence:
    """A token divergence from :mod:`mentor.losses`, with its hyper-parameters bound.

    ================== ======================================================= ===========================
    name               value per token (``p_t`` teacher, ``p_s`` student)     function
    ================== ======================================================= ===========================
    ``forward_kl``     ``KL(p_t || p_s)``                                      ``losses.kl_div``
    ``reverse_kl``     ``KL(p_s || p_t)``                                      ``losses.kl_div(reverse)``
    ``jsd``            generalised JSD of GKD, ``beta`` in ``[0, 1]``          ``losses.generalized_jsd``
    ``skew_forward_kl`` ``KL(p_t || a p_t + (1 - a) p_s)`` (DistiLLM)          ``losses.skew_kl``
    ``skew_reverse_kl`` ``KL(p_s || a p_s + (1 - a) p_t)`` (DistiLLM)          ``losses.skew_kl(reverse)``
    ``tvd``            ``0.5 * sum |p_t - p_s|``                               ``losses.tvd``
    ================== ======================================================= ===========================

    Every value is scaled by ``temperature ** 2`` (the convention of :mod:`mentor.losses`).

    Args:
        name: One of :data:`DIVERGENCES`.
        temperature: Softmax temperature of both models (> 0).
        beta: ``jsd`` only; default 0.5.
        alpha: ``skew_forward_kl`` / ``skew_reverse_kl`` only; the skew in ``[0, 1)``, default 0.1.

    Returns:
        ``fn(student_logits, teacher_logits, *, num_items=..., mask=...) -> scalar``.

    Raises:
        ValueError: An unknown name, a hyper-parameter the divergence does not take, or a value out of range.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}")
    if beta is not None and name != "jsd":
        raise ValueError(f"beta is a parameter of 'jsd' only, got beta={beta!r} for {name!r}")
    if alpha is not None and not name.startswith("skew_"):
        raise ValueError(f"alpha is a parameter of the skew divergences only, got alpha={alpha!r} for {name!r}")
    fn: Divergence
    if name in ("forward_kl", "reverse_kl"):
        fn = functools.partial(losses.kl_div, temperature=temperature, reverse=name == "reverse_kl")
    elif name == "jsd":
        fn = functools.partial(losses.generalized_jsd, beta=0.5 if beta is None else beta, temperature=temperature)
    elif name == "tvd":
        fn = functools.partial(losses.tvd, temperature=temperature)
    else:
        fn = functools.partial(
            losses.skew_kl,
            alpha=0.1 if alpha is None else alpha,
            reverse=name == "skew_reverse_kl",
            temperature=temperature,
        )
    fn(torch.zeros(1, 2), torch.zeros(1, 2))  # validates the hyper-parameters now, with the losses' own messages
    return fn


def _resolve_divergence(div: str | Divergence) -> Divergence:
    if isinstance(div, str):
        return divergence(div)
    if not callable(div):
        raise TypeError(f"divergence must be a name ({', '.join(DIVERGENCES)}) or a callable, got {div!r}")
    return div


def target_mask(labels: Tensor, *, shift: bool = True, ignore_index: int = -100) -> Tensor:
    """Which logit positions have a target token.

    Args:
        labels: Integer token labels ``[B, T]``; ``ignore_index`` marks positions without a target.
        shift: Causal-LM shift: logits at ``t`` predict ``labels[:, t + 1]``.
        ignore_index: The label of a position without a target.

    Returns:
        Boolean ``[B, T - 1]`` with ``shift`` (over logit positions ``0 .. T - 2``), else ``[B, T]``.
    """
    if labels.dim() != 2 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor [B, T], got shape {tuple(labels.shape)} {labels.dtype}")
    aligned = labels[:, 1:] if shift else labels
    return aligned != ignore_index


def count_targets(labels: Tensor, *, shift: bool = True, ignore_index: int = -100) -> int:
    """The number of target tokens in ``labels`` ``[B, T]``: sum it over the micro-batches of an optimizer step and
    pass the total as ``num_items``."""
    return int(target_mask(labels, shift=shift, ignore_index=ignore_index).sum())


def _check_targets(labels: Tensor, mask: Tensor, shift: bool, vocab: int) -> None:
    aligned = labels[:, 1:] if shift else labels
    targets = aligned[mask]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"target token ids must lie in [0, {vocab}) (the compared vocabulary), got ids in "
            f"[{int(targets.min())}, {int(targets.max())}]; labels without a target must be the ignore_index"
        )


def _normaliser(num_items: NumItems, count: int) -> int | float | Tensor:
    if num_items is None:
        return max(count, 1)
    if isinstance(num_items, Tensor):
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) or not num_items > 0:
        raise ValueError(f"num_items must be a number > 0 (target tokens in the optimizer step), got {num_items!r}")
    return num_items


def token_kd_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str | Divergence = "forward_kl",
    num_items: NumItems = None,
    vocab_size: int | None = None,
    token_weights: Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Token-level KD from full logits (not chunked): the reference for :func:`token_kd`, and the cheaper call
    when the logits already exist.

    Args:
        student_logits: ``[B, T, Vs]``.
        teacher_logits: ``[B, T, Vt]``; compared without gradient.
        labels: ``[B, T]`` integer labels, ``ignore_index`` where there is no target.
        divergence: A name of :data:`DIVERGENCES` (default hyper-parameters) or a function from :func:`divergence`.
        num_items: Normaliser: the number of target tokens in the whole optimizer step (see the module docstring).
        vocab_size: The shared tokenizer's length, when the output sizes differ by padded rows.
        token_weights: Optional per-token weights (see :func:`token_kd`).
        shift: Causal-LM shift (see :func:`target_mask`).
        ignore_index: The label of a position without a target.

    Returns:
        A scalar tensor.
    """
    div = _resolve_divergence(divergence)
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(
            f"logits must be [B, T, V], got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != labels.shape or teacher_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits [B, T, V] must match labels [B, T]: student {tuple(student_logits.shape)}, teacher "
            f"{tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}"
        )
    vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    _check_targets(labels, mask, shift, vocab)
    s = student_logits[:, :-1] if shift else student_logits
    t = teacher_logits[:, :-1] if shift else teacher_logits
    with torch.no_grad():
        t_sel = t[mask][:, :vocab]
    w = select_token_weights(token_weights, labels, mask, shift=shift)
    return div(s[mask][:, :vocab], t_sel, num_items=_normaliser(num_items, int(mask.sum())), mask=w)


def _student_head(head: nn.Module | Tensor) -> tuple[Tensor, Tensor | None]:
    if isinstance(head, Tensor):
        return head, None
    weight = getattr(head, "weight", None)
    if isinstance(head, nn.Linear) and isinstance(weight, Tensor):
        return weight, head.bias
    raise TypeError(
        f"student_head must be an nn.Linear or a weight tensor [V, D] (for example model.get_output_embeddings()), "
        f"got {type(head).__name__}"
    )


def _teacher_head(head: HeadLike) -> tuple[Callable[[Tensor], Tensor], int | None]:
    """A no-grad function ``hidden [n, D] -> logits [n, V]`` and ``V`` when known without calling it."""
    if isinstance(head, Tensor):
        weight = head.detach()
        return (lambda h: F.linear(h.to(weight.dtype), weight)), weight.shape[0]
    if isinstance(head, nn.Linear):
        return (lambda h: F.linear(h.to(head.weight.dtype), head.weight.detach(),
                                   None if head.bias is None else head.bias.detach())), head.out_features
    if callable(head):
        return head, None
    raise TypeError(f"teacher_head must be an nn.Linear, a weight tensor [V, D] or a callable, got {head!r}")


ChunkLoss = Callable[[Tensor, int, int], Tensor]
"""``chunk_loss(student_logits [n, V], start, stop) -> scalar``: the loss of target positions ``[start, stop)``
(the teacher's side of those positions is taken inside, without gradient)."""


def _chunk_loop(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_loss: ChunkLoss,
    chunk_size: int,
    vocab: int,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss over ``hidden`` ``[N, D]`` chunk by chunk, and the gradients asked for by ``want`` (hidden, weight,
    bias). Runs without building a graph outside each chunk's loss. Hidden states of another dtype than the weight
    (bfloat16 states from an autocast forward, float32 weights) are cast to the weight's dtype chunk by chunk."""
    w = weight.detach()[:vocab]
    b = None if bias is None else bias.detach()[:vocab]
    h_all = hidden.detach()
    grad_h = torch.zeros_like(h_all) if want[0] else None
    grad_w = torch.zeros_like(weight) if want[1] else None
    grad_b = torch.zeros_like(bias) if want[2] and bias is not None else None
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start in range(0, h_all.shape[0], chunk_size):
        stop = min(start + chunk_size, h_all.shape[0])
        h = h_all[start:stop].to(w.dtype)
        logits = F.linear(h, w, b)
        if not any(want):
            with torch.no_grad():
                total += chunk_loss(logits, start, stop).detach()
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_loss(logits, start, stop)
        (g,) = torch.autograd.grad(loss, logits)
        total += loss.detach()
        del logits, loss  # this chunk's [n, V] blocks go before the next chunk's are made
        if grad_h is not None:
            grad_h[start:stop] = (g @ w).to(grad_h.dtype)
        if grad_w is not None:
            grad_w[:vocab].addmm_(g.t().to(grad_w.dtype), h)
        if grad_b is not None:
            grad_b[:vocab] += g.sum(dim=0).to(grad_b.dtype)
        del g
    return total, grad_h, grad_w, grad_b


class _ChunkedTokenKD(torch.autograd.Function):
    """Loss and gradients computed together in the forward, chunk by chunk; the backward scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        chunk_loss: ChunkLoss,
        chunk_size: int,
        vocab: int,
    ) -> Tensor:
        want = (
            bool(ctx.needs_input_grad[0]),
            bool(ctx.needs_input_grad[1]),
            bias is not None and bool(ctx.needs_input_grad[2]),
        )
        total, grad_h, grad_w, grad_b = _chunk_loop(hidden, weight, bias, chunk_loss, chunk_size, vocab, want)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
        ctx.grads = None  # free the kept gradients with the graph
        return (*grads, None, None, None)


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _checked_student(student_hidden: Tensor, student_head: nn.Module | Tensor, labels: Tensor) -> tuple[
    Tensor, Tensor | None
]:
    if student_hidden.dim() != 3 or student_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"student hidden states must be [B, T, D] matching labels [B, T], got {tuple(student_hidden.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    weight, bias = _student_head(student_head)
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student head weight must be [V, {student_hidden.shape[-1]}] for hidden width "
            f"{student_hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    return weight, bias


def _run_chunks(
    s: Tensor, weight: Tensor, bias: Tensor | None, chunk_loss: ChunkLoss, chunk_size: int, vocab: int
) -> Tensor:
    """The chunked loss of the selected student rows ``s`` ``[N, D]``, through the custom autograd function when a
    gradient is needed."""
    needs_grad = torch.is_grad_enabled() and (
        s.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        return _chunk_loop(s, weight, bias, chunk_loss, chunk_size, vocab, (False,) * 3)[0]
    out = _ChunkedTokenKD.apply(s, weight, bias, chunk_loss, chunk_size, vocab)
    return out  # type: ignore[no-any-return]


def chunked_loss(
    student_hidden: Tensor,
    target: Tensor,
    *,
    loss: Callable[..., Tensor],
    student_head: nn.Module | Tensor,
    teacher_head: HeadLike | None = None,
    chunk_size: int = 1024,
    num_items: NumItems = None,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """A loss of :mod:`mentor.losses` on the student's logits at rows of hidden states, ``chunk_size`` rows at a time.

    The chunk loop of :func:`token_kd`, for any loss ``loss(student_logits [n, V], target [n, ...], *, mask,
    num_items, **kwargs)``: per chunk the student's logits ``[n, V]`` (``student_head`` on the chunk's hidden
    states), the chunk's target (the teacher's logits from its hidden states with ``teacher_head``, without
    gradient; or the target rows as given) and the loss with the normaliser of all rows, so the full ``[rows, V]``
    logits never exist. This is what the loop's chunked LM terms call (see :func:`mentor.recipes.lm_kd.token_terms`):
    ``loss`` is ``losses.kl_div`` / ``generalized_jsd`` / ... against ``"teacher.hidden"``, ``losses.cross_entropy``
    against the labels, or ``losses.sparse_kl_div`` against a cache's top-k; no formula is restated here.

    Args:
        student_hidden: The student's final hidden states ``[..., D]``: ``[N, D]`` target positions in the loop.
        target: Aligned with the rows of ``student_hidden`` (same leading shape): the teacher's hidden states
            ``[..., Dt]`` with ``teacher_head``; else the loss's own target per row (labels ``[...]`` for
            ``cross_entropy``, top-k log-probabilities ``[..., k]`` for ``sparse_kl_div``). Used without gradient.
        loss: A function of :mod:`mentor.losses` (or a ``functools.partial`` of one).
        student_head: The student's output layer: an ``nn.Linear`` or its weight ``[V, D]``; gradients flow into it.
        teacher_head: The teacher's output layer (``nn.Linear``, weight ``[Vt, Dt]`` or a callable ``[n, Dt] ->
            [n, Vt]``) when ``target`` holds the teacher's hidden states; ``None`` otherwise.
        chunk_size: Rows per chunk (> 0).
        num_items: Normaliser of the sum over rows (the step's target tokens in the loop); ``None``: the number of
            rows kept (at least 1).
        mask: ``None``; bool ``[...]`` (rows kept); or float weights ``[...]`` (rows of weight 0 are skipped, the
            others' weights reach the loss as its float ``mask``).
        vocab_size: Compare over the first ``vocab_size`` logits (padded output rows, see
            :func:`mentor.lm.vocab.shared_vocab_size`).
        **kwargs: More arguments of ``loss``: tensors are per row (leading shape of ``student_hidden``, sliced with
            the chunk, e.g. ``teacher_indices``), anything else is passed as it is (``temperature``, ``tail``).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); 0 without rows. Not twice differentiable.
    """
    chunk = _check_chunk_size(chunk_size)
    if not callable(loss):
        raise TypeError(f"loss must be a function of mentor.losses, got {loss!r}")
    if student_hidden.dim() < 2:
        raise ValueError(f"student hidden states must be [..., D], got shape {tuple(student_hidden.shape)}")
    lead, width = student_hidden.shape[:-1], student_hidden.shape[-1]
    rows = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    for name, value in (("target", target), *rows.items()):
        if value.shape[: len(lead)] != lead:
            raise ValueError(f"{name} must have the rows of the student's hidden states {tuple(student_hidden.shape)} "
                             f"(leading shape {tuple(lead)}), got shape {tuple(value.shape)}")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask must have the shape {tuple(lead)} of the hidden states' rows, got {tuple(mask.shape)}")
    weight, bias = _student_head(student_head)
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"student head weight must be [V, {width}] for hidden width {width}, "
                         f"got {tuple(weight.shape)}")
    s = student_hidden.reshape(-1, width)
    t = target.detach().reshape(-1, *target.shape[len(lead):])
    rows = {k: v.detach().reshape(-1, *v.shape[len(lead):]) for k, v in rows.items()}
    weights = None
    if mask is not None:
        flat = mask.detach().reshape(-1)
        keep = flat if flat.dtype == torch.bool else flat != 0
        s, t = s[keep], t[keep]
        rows = {k: v[keep] for k, v in rows.items()}
        weights = None if flat.dtype == torch.bool else flat[keep]
    norm = _normaliser(num_items, s.shape[0])
    plain = {k: v for k, v in kwargs.items() if k not in rows}
    if teacher_head is not None:
        teacher_logits, teacher_size = _teacher_head(teacher_head)
        if teacher_size is None:  # a callable head: learn its output size from one row
            with torch.no_grad():
                teacher_size = int(teacher_logits(t[:1]).shape[-1]) if t.shape[0] else int(weight.shape[0])
        vocab = shared_vocab_size(weight.shape[0], teacher_size, vocab_size)

        def target_rows(start: int, stop: int) -> Tensor:
            with torch.no_grad():
                return teacher_logits(t[start:stop])[:, :vocab]
    else:
        size = int(weight.shape[0])
        vocab = shared_vocab_size(size, size if vocab_size is None else vocab_size, vocab_size)

        def target_rows(start: int, stop: int) -> Tensor:
            return t[start:stop]

    def chunk_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        return loss(logits, target_rows(start, stop), num_items=norm,
                    mask=None if weights is None else weights[start:stop],
                    **{k: v[start:stop] for k, v in rows.items()}, **plain)

    return _run_chunks(s, weight, bias, chunk_loss, chunk, vocab)


def select_token_weights(
    token_weights: Tensor | None, labels: Tensor, mask: Tensor, *, shift: bool = True
) -> Tensor | None:
    """Per-target-token weights ``[N]`` in the order the losses select target positions.

    Args:
        token_weights: ``None``; or ``[B, T]`` aligned with ``labels`` (the weight of the target token
            ``labels[b, t]``; entries where the label is ignored are not read); or ``[N]``, one per target token
            in row-major order of the target positions.
        labels: ``[B, T]``.
        mask: The :func:`target_mask` of ``labels``.
        shift: Whether ``mask`` was taken with the causal shift.

    Returns:
        ``None`` or a detached floating tensor ``[N]``.
    """
    if token_weights is None:
        return None
    if not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")
    count = int(mask.sum())
    w = token_weights.detach()
    if w.shape == labels.shape:
        w = (w[:, 1:] if shift else w)[mask]
    elif w.dim() != 1 or w.shape[0] != count:
        raise ValueError(
            f"token_weights must be [B, T] like labels {tuple(labels.shape)} or [N] with N = {count} target "
            f"tokens, got {tuple(token_weights.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("token_weights must be finite and >= 0")
    return w


def token_kd(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_hidden: Tensor,
    teacher_head: HeadLike,
    labels: Tensor,
    *,
    divergence: str | Divergence = "forward_kl",
    num_items: NumItems = None,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    token_weights: Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Token-level KD from final hidden states, chunked so the full ``[tokens, vocab]`` logits never exist.

    Equal (up to float summation order) to :func:`token_kd_from_logits` on ``student_head(student_hidden)`` and
    ``teacher_head(teacher_hidden)``, with the same gradients, at a peak memory of ``O(chunk_size * vocab)`` per
    model instead of ``O(tokens * vocab)``.

    Args:
        student_hidden: The student's final hidden states (after its final norm) ``[B, T, Ds]``
            (``mentor.lm.models.final_hidden``).
        student_head: The student's output layer: an ``nn.Linear`` ``Ds -> Vs`` (``model.get_output_embeddings()``)
            or its weight ``[Vs, Ds]``. Gradients flow to ``student_hidden`` and to this weight (and bias).
        teacher_hidden: The teacher's final hidden states ``[B, T, Dt]``; used without gradient.
        teacher_head: The teacher's output layer: an ``nn.Linear``, a weight ``[Vt, Dt]``, or any callable
            ``hidden [n, Dt] -> logits [n, Vt]`` (for models whose logits are more than one linear layer); called
            without gradient.
        labels: ``[B, T]`` integer labels, ``ignore_index`` where there is no target.
        divergence: A name of :data:`DIVERGENCES` (default hyper-parameters) or a function from :func:`divergence`.
        num_items: Normaliser: the number of target tokens in the whole optimizer step (see the module docstring).
        chunk_size: Target positions per chunk (> 0).
        vocab_size: The shared tokenizer's length, when the output sizes differ by padded rows
            (:func:`mentor.lm.vocab.shared_vocab_size`).
        token_weights: Optional per-token weights ``w`` (``[B, T]`` aligned with ``labels``, or ``[N]``; see
            :func:`select_token_weights`), for example :func:`mentor.lm.weighting.uncertainty_weights`. The loss
            becomes ``sum_i w_i * divergence_i / num_items`` (a weighted **sum** over the normaliser, not a weighted
            mean: weights of mean 1 keep the scale). Weights are constants (no gradient through them).
        shift: Causal-LM shift (see :func:`target_mask`).
        ignore_index: The label of a position without a target.

    Returns:
        A scalar tensor (float32, or float64 for float64 hidden states). Its backward is not differentiable again.
    """
    div = _resolve_divergence(divergence)
    chunk = _check_chunk_size(chunk_size)
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden states [B, T, D] must match labels [B, T]: student {tuple(student_hidden.shape)}, teacher "
            f"{tuple(teacher_hidden.shape)}, labels {tuple(labels.shape)}"
        )
    weight, _ = _checked_student(student_hidden, student_head, labels)
    teacher_logits, teacher_size = _teacher_head(teacher_head)
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    s = (student_hidden[:, :-1] if shift else student_hidden)[mask]  # [N, Ds]
    t = (teacher_hidden[:, :-1] if shift else teacher_hidden)[mask].detach()  # [N, Dt]
    if teacher_size is None:  # a callable head: learn its output size from one row
        with torch.no_grad():
            probe = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[:1]
            teacher_size = int(teacher_logits(probe).shape[-1]) if probe.shape[0] else int(weight.shape[0])
    vocab = shared_vocab_size(weight.shape[0], teacher_size, vocab_size)
    _check_targets(labels, mask, shift, vocab)
    norm = _normaliser(num_items, s.shape[0])
    w = select_token_weights(token_weights, labels, mask, shift=shift)
    return chunked_loss(s, t, loss=div, student_head=student_head, teacher_head=teacher_head, chunk_size=chunk,
                        num_items=norm, mask=w, vocab_size=vocab)


def _check_topk(teacher_values: Tensor, teacher_indices: Tensor, labels: Tensor) -> None:
    if teacher_values.shape != teacher_indices.shape or teacher_values.dim() != 3:
        raise ValueError(
            f"teacher_values and teacher_indices must both be [B, T, k], got {tuple(teacher_values.shape)} and "
            f"{tuple(teacher_indices.shape)}"
        )
    if teacher_values.shape[:2] != labels.shape:
        raise ValueError(
            f"teacher top-k [B, T, k] {tuple(teacher_values.shape)} must match labels [B, T] {tuple(labels.shape)}"
        )


def _check_indices(indices: Tensor, vocab: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(
            f"teacher_indices must lie in [0, {vocab}) (the student's compared vocabulary), got indices in "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )


def token_kd_topk(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    labels: Tensor,
    *,
    tail: str = "rest",
    temperature: float = 1.0,
    num_items: NumItems = None,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    token_weights: Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Token-level KD from a sparse (top-k) teacher, as stored by :mod:`mentor.cache`, chunked like
    :func:`token_kd`.

    Per target position the divergence is :func:`mentor.losses.sparse_kl_div` between the teacher's top-k
    log-probabilities (normalised over the full vocabulary, so the dropped mass is ``1 - sum(exp(values))``) and
    the student's full distribution; ``tail`` picks how the dropped classes count (``"rest"``: one bucket holding
    the dropped mass; ``"renormalize"``: the top-k renormalised). With ``k`` equal to the vocabulary it is the full
    forward KL. Sparse targets and their bias: Anshumann et al. 2025, https://arxiv.org/abs/2503.16870.

    The teacher arrays are aligned with the student's positions, like logits: ``teacher_values[b, t]`` describes
    the teacher's prediction at position ``t`` (of token ``t + 1`` under ``shift``), which is what a sequence item
    of the cache holds (an item of ``L`` tokens -> ``[L, k]``).

    Args:
        student_hidden: ``[B, T, Ds]`` final hidden states.
        student_head: ``nn.Linear`` ``Ds -> Vs`` or its weight ``[Vs, Ds]``.
        teacher_values: ``[B, T, k]`` teacher log-probabilities (any float dtype; fp16 from the cache is fine).
        teacher_indices: ``[B, T, k]`` token ids of those values (any integer dtype).
        labels: ``[B, T]``, ``ignore_index`` where there is no target.
        tail: ``"rest"`` or ``"renormalize"`` (see :func:`mentor.losses.sparse_kl_div`).
        temperature: Softmax temperature (> 0); the result is scaled by ``T^2``.
        num_items: Normaliser: target tokens in the whole optimizer step.
        chunk_size: Target positions per chunk (> 0).
        vocab_size: Compare over the first ``vocab_size`` student logits (padded output rows); the teacher's indices
            must lie below it.
        token_weights: Optional per-token weights (as in :func:`token_kd`).
        shift: Causal-LM shift.
        ignore_index: The label of a position without a target.

    Returns:
        A scalar tensor.
    """
    chunk = _check_chunk_size(chunk_size)
    _check_topk(teacher_values, teacher_indices, labels)
    weight, _ = _checked_student(student_hidden, student_head, labels)
    vocab = shared_vocab_size(weight.shape[0], weight.shape[0] if vocab_size is None else vocab_size, vocab_size)
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    _check_targets(labels, mask, shift, vocab)
    s = (student_hidden[:, :-1] if shift else student_hidden)[mask]
    values = (teacher_values[:, :-1] if shift else teacher_values)[mask].detach()
    indices = (teacher_indices[:, :-1] if shift else teacher_indices)[mask]
    _check_indices(indices, vocab)
    indices = indices.long()
    norm = _normaliser(num_items, s.shape[0])
    w = select_token_weights(token_weights, labels, mask, shift=shift)
    return chunked_loss(s, values, loss=losses.sparse_kl_div, student_head=student_head, chunk_size=chunk,
                        num_items=norm, mask=w, vocab_size=vocab, teacher_indices=indices, tail=tail,
                        temperature=temperature)


def token_kd_topk_from_logits(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    labels: Tensor,
    *,
    tail: str = "rest",
    temperature: float = 1.0,
    num_items: NumItems = None,
    vocab_size: int | None = None,
    token_weights: Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """:func:`token_kd_topk` from full student logits ``[B, T, Vs]`` (not chunked): its reference, and the cheaper
    call when the logits exist. Arguments as in :func:`token_kd_topk`."""
    _check_topk(teacher_values, teacher_indices, labels)
    if student_logits.dim() != 3 or student_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"student logits must be [B, T, V] matching labels [B, T], got {tuple(student_logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    size = student_logits.shape[-1]
    vocab = shared_vocab_size(size, size if vocab_size is None else vocab_size, vocab_size)
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    _check_targets(labels, mask, shift, vocab)
    s = (student_logits[:, :-1] if shift else student_logits)[mask][:, :vocab]
    values = (teacher_values[:, :-1] if shift else teacher_values)[mask].detach()
    indices = (teacher_indices[:, :-1] if shift else teacher_indices)[mask]
    _check_indices(indices, vocab)
    w = select_token_weights(token_weights, labels, mask, shift=shift)
    return losses.sparse_kl_div(
        s, values, indices.long(), tail=tail, temperature=temperature, mask=w,
        num_items=_normaliser(num_items, s.shape[0]),
    )
