"""Teacher and student with **different tokenizers**: token alignment through character offsets, and a
teacher-guided per-token loss weight (VocAgnoLM-style).

VocAgnoLM (Shin et al. 2025, "Overcoming Vocabulary Mismatch: Vocabulary-agnostic Teacher Guided Language
Modeling", https://arxiv.org/abs/2503.19123) lets a teacher with another vocabulary guide a student's language
modelling in two steps, both implemented here as pure functions:

1. **Token-level lexical alignment.** Both tokenizers encode the same text with character offsets (fast
   tokenizers' ``return_offsets_mapping=True``: token ``i`` covers characters ``[start_i, end_i)``). Student token
   ``i`` is aligned to every teacher token whose span **overlaps** its own: ``max(s_i, s_j) < min(e_i, e_j)``.
   Empty spans (special tokens, offsets ``(0, 0)``) overlap nothing. Pieces of one character split into several
   byte tokens share that character's span, so they align with the same teacher tokens. (:func:`offsets_overlap`,
   :func:`align_tokens`.)

2. **Teacher-guided loss weight.** The teacher's per-token losses (its own next-token cross-entropy on its own
   tokens of the text) are carried to the student's tokens through the alignment and compared with the student's
   per-token losses. The rule implemented (:func:`teacher_guided_weights`):

   - ``l_t(i) = agg_{j aligned with i} l_t,j`` with ``agg`` = ``max`` (default: a student token is as hard as the
     hardest teacher token it overlaps) or ``mean``;
   - the excess loss ``e_i = l_s,i - l_t(i)``: how much worse the student does than the teacher on that text;
   - among the aligned student tokens with a target, the ``ceil(select * n)`` of largest excess get weight 1
     (ties: the earlier token first), the others 0; student tokens without any aligned teacher token (or without
     a target) get weight 0. ``select = 1`` keeps every aligned token.

   The weights multiply the student's own per-token language-modelling loss (``mentor.losses.cross_entropy`` with
   a float ``mask``, or ``token_kd``'s ``token_weights``); the teacher's logits are never compared class by class,
   so the vocabularies may differ arbitrarily. This is a token-selection rule in the family of Rho-1's excess loss
   (Lin et al. 2024, https://arxiv.org/abs/2404.07965) that VocAgnoLM builds on.

   :func:`guided_cross_entropy` applies the same rule inside a training step, per sequence, to inputs already
   carried to the student's positions (:class:`mentor.lm.cross.CrossTokenizer`), through :func:`top_share`.

3. **Next-token alignment** (for comparing *distributions*, :func:`next_token_alignment`). A position of a causal
   LM predicts the next token, so a student position and a teacher position are comparable only where both have
   read exactly the same characters and their next tokens start at the same character. Student position ``t``
   (predicting student token ``t + 1``) is aligned with teacher position ``j`` (predicting teacher token
   ``j + 1``) when both next tokens start at the same character ``a`` **at a token boundary**: a token starts at
   a boundary when its span is not empty and it does not start inside an earlier token's span
   (``start_k >= max(end_0, ..., end_{k-1})``; the second byte piece of one character, sharing its span, does
   not). The teacher's distribution there is over its tokens starting at ``a``, the student's over its own;
   :func:`mentor.losses.uld_distance` compares the two (sorted probabilities, so the vocabularies may differ).

:func:`mentor.losses.uld_distance` (sorted probabilities) is the other option for different vocabularies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mentor import losses

__all__ = ["offsets_overlap", "align_tokens", "aligned_teacher_loss", "teacher_guided_weights", "top_share",
           "guided_cross_entropy", "boundary_starts", "next_token_alignment"]


def _as_offsets(name: str, offsets: Tensor | list[tuple[int, int]]) -> Tensor:
    t = torch.as_tensor(offsets, dtype=torch.long)
    if t.dim() < 2 or t.shape[-1] != 2:
        raise ValueError(f"{name} must be [..., T, 2] (start, end) character offsets, got shape {tuple(t.shape)}")
    if bool((t[..., 1] < t[..., 0]).any()):
        raise ValueError(f"{name} has a span whose end is before its start")
    return t


def offsets_overlap(
    student_offsets: Tensor | list[tuple[int, int]], teacher_offsets: Tensor | list[tuple[int, int]]
) -> Tensor:
    """Which teacher tokens overlap each student token's character span.

    Args:
        student_offsets: ``[..., Ts, 2]`` ``(start, end)`` per student token (end exclusive).
        teacher_offsets: ``[..., Tt, 2]`` per teacher token, same leading (batch) dimensions.

    Returns:
        Boolean ``[..., Ts, Tt]``: ``True`` where ``max(start) < min(end)``.
    """
    s = _as_offsets("student_offsets", student_offsets)
    t = _as_offsets("teacher_offsets", teacher_offsets)
    if s.shape[:-2] != t.shape[:-2]:
        raise ValueError(f"leading dimensions differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    start = torch.maximum(s[..., :, None, 0], t[..., None, :, 0])
    end = torch.minimum(s[..., :, None, 1], t[..., None, :, 1])
    return start < end


def align_tokens(
    student_offsets: Tensor | list[tuple[int, int]], teacher_offsets: Tensor | list[tuple[int, int]]
) -> list[list[int]]:
    """For one text: the indices of the teacher tokens overlapping each student token (see the module docstring).

    Args:
        student_offsets: ``[Ts, 2]``.
        teacher_offsets: ``[Tt, 2]``.

    Returns:
        ``Ts`` lists of teacher token indices, in increasing order (empty for a token without overlap).
    """
    overlap = offsets_overlap(student_offsets, teacher_offsets)
    if overlap.dim() != 2:
        raise ValueError(f"align_tokens takes one text ([T, 2] offsets), got overlap {tuple(overlap.shape)}")
    return [row.nonzero().flatten().tolist() for row in overlap]


def aligned_teacher_loss(teacher_loss: Tensor, overlap: Tensor, *, aggregate: str = "max") -> tuple[Tensor, Tensor]:
    """The teacher's per-token losses carried to the student's tokens.

    Args:
        teacher_loss: ``[..., Tt]`` teacher per-token losses (NaN or anything where the teacher token has no target
            is fine as long as ``overlap`` excludes it).
        overlap: ``[..., Ts, Tt]`` from :func:`offsets_overlap` (and-ed with the teacher tokens that have a loss).
        aggregate: ``"max"`` or ``"mean"`` over the aligned teacher tokens.

    Returns:
        ``(loss [..., Ts], aligned [..., Ts])``: the aggregated loss (0 where nothing is aligned) and whether any
        teacher token is aligned.
    """
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    if overlap.shape[:-2] != teacher_loss.shape[:-1] or overlap.shape[-1] != teacher_loss.shape[-1]:
        raise ValueError(
            f"overlap [..., Ts, Tt] {tuple(overlap.shape)} does not match teacher_loss [..., Tt] "
            f"{tuple(teacher_loss.shape)}"
        )
    loss = teacher_loss.detach()[..., None, :].expand(overlap.shape)
    aligned = overlap.any(dim=-1)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if aggregate == "max":
        out = torch.where(overlap, loss, torch.full_like(loss, -math.inf)).amax(dim=-1)
    else:
        out = torch.where(overlap, loss, zero).sum(-1) / overlap.sum(-1).clamp(min=1)
    return torch.where(aligned, out, zero), aligned


def teacher_guided_weights(
    student_loss: Tensor,
    teacher_loss: Tensor,
    overlap: Tensor,
    *,
    select: float = 1.0,
    aggregate: str = "max",
    valid: Tensor | None = None,
) -> Tensor:
    """VocAgnoLM-style per-token weights for the student's loss (the exact rule is in the module docstring).

    Args:
        student_loss: ``[Ts]`` the student's per-token losses (used without gradient).
        teacher_loss: ``[Tt]`` the teacher's per-token losses on the same text.
        overlap: ``[Ts, Tt]`` from :func:`offsets_overlap`; and it with the teacher tokens that have a loss.
        select: Share of the aligned student tokens kept, in ``(0, 1]``.
        aggregate: ``"max"`` or ``"mean"`` (see :func:`aligned_teacher_loss`).
        valid: Optional boolean ``[Ts]``: student tokens that have a target (others get weight 0).

    Returns:
        ``[Ts]`` weights in ``{0, 1}`` (float, the student loss's dtype).
    """
    if student_loss.dim() != 1 or overlap.dim() != 2 or overlap.shape[0] != student_loss.shape[0]:
        raise ValueError(
            f"student_loss must be [Ts] and overlap [Ts, Tt], got {tuple(student_loss.shape)} and "
            f"{tuple(overlap.shape)}"
        )
    ref, aligned = aligned_teacher_loss(teacher_loss, overlap, aggregate=aggregate)
    keep = aligned if valid is None else aligned & valid.to(torch.bool)
    s = student_loss.detach()
    dtype = s.dtype if s.is_floating_point() else torch.float32
    return top_share(s - ref.to(s.dtype), keep, select).to(dtype)


def top_share(score: Tensor, keep: Tensor, select: float, groups: Tensor | None = None) -> Tensor:
    """Weight 1 for the ``ceil(select * n)`` items of largest ``score`` among the ``n`` kept items of each group
    (ties: the earlier item first), 0 elsewhere: the selection rule of :func:`teacher_guided_weights`.

    Args:
        score: ``[...]`` (the excess loss ``l_s - l_t``; used without gradient).
        keep: Boolean ``[...]``: the candidates.
        select: Share kept per group, in ``(0, 1]``; ``1`` keeps every candidate.
        groups: Optional integer ``[...]``: the group of each item (the sequence it belongs to); ``None``: one group.

    Returns:
        Float32 ``[...]`` weights in ``{0, 1}``.
    """
    if not 0.0 < select <= 1.0:
        raise ValueError(f"select must be in (0, 1], got {select!r}")
    if keep.shape != score.shape or (groups is not None and groups.shape != score.shape):
        raise ValueError(f"score {tuple(score.shape)}, keep {tuple(keep.shape)} and groups "
                         f"{None if groups is None else tuple(groups.shape)} must have one shape")
    weights = torch.zeros(score.numel(), dtype=torch.float32, device=score.device)
    candidates = keep.reshape(-1).to(torch.bool).nonzero().flatten()
    if candidates.numel() == 0:
        return weights.reshape(score.shape)
    if select == 1.0:
        weights[candidates] = 1.0
        return weights.reshape(score.shape)
    s = score.detach().reshape(-1)[candidates]
    g = (torch.zeros_like(candidates) if groups is None else groups.reshape(-1)[candidates].long())
    # Order by group, then by score (largest first), then by position: two stable sorts.
    by_score = torch.sort(s, descending=True, stable=True).indices
    order = by_score[torch.sort(g[by_score], stable=True).indices]
    _, counts = torch.unique_consecutive(g[order], return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    group_of = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    rank = torch.arange(order.numel(), device=order.device) - first[group_of]
    # ceil(select * n), at least 1; the 1e-9 keeps 0.6 * 5 = 3.0000000000000004 from rounding up to 4
    limit = torch.clamp(torch.ceil(counts.double() * select - 1e-9), min=1).long()
    weights[candidates[order[rank < limit[group_of]]]] = 1.0
    return weights.reshape(score.shape)


def guided_cross_entropy(
    student_logits: Tensor,
    target: Tensor,
    *,
    teacher_loss: Tensor,
    covered: Tensor,
    sequence: Tensor | None = None,
    select: float = 1.0,
    mask: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """The student's cross-entropy on its target tokens, weighted per token by the teacher-guided weights
    (VocAgnoLM's objective, the rule of :func:`teacher_guided_weights` on inputs already carried to the student's
    positions, as :class:`mentor.lm.cross.CrossTokenizer` returns them).

    A token is a candidate where it has a target (label >= 0) and ``covered`` (a teacher token with a loss overlaps
    it); per sequence, the ``ceil(select * n)`` candidates of largest excess ``l_s - l_t`` get weight 1 and the
    others 0 (:func:`top_share`). The student's per-token loss ``l_s`` is this forward's (detached); the loss is
    ``sum_i w_i CE_i / num_items`` through :func:`mentor.losses.cross_entropy` with the weights as its float mask.
    Selecting per sequence makes the weights independent of how a step is split into micro-batches.

    Args:
        student_logits: ``[..., V]``.
        target: Integer labels ``[...]`` (negative: no target).
        teacher_loss: ``[...]`` the teacher's loss carried to each token (``"token_loss"``).
        covered: ``[...]`` (bool or 0/1): a teacher token with a loss overlaps the token.
        sequence: Optional integer ``[...]``: the sequence of each token (``None``: all one sequence).
        select: Share of the candidates kept per sequence, in ``(0, 1]``.
        mask: Optional boolean or float ``[...]``, multiplied into the weights.
        num_items: Normaliser (default: the sum of the weights).

    Returns:
        A scalar tensor.
    """
    keep = covered.to(torch.bool) & (target >= 0)
    if mask is not None:
        keep = keep & (mask != 0)
    if select < 1.0:
        student_loss = losses.cross_entropy_per_item(student_logits.detach(), target)
        weights = top_share(student_loss - teacher_loss.to(student_loss.dtype), keep, select, sequence)
    else:
        weights = top_share(torch.zeros(keep.shape, device=keep.device), keep, select)
    if mask is not None and mask.is_floating_point():
        weights = weights * mask.to(weights.dtype)
    return losses.cross_entropy(student_logits, target, mask=weights, num_items=num_items)


def boundary_starts(offsets: Tensor | list[tuple[int, int]]) -> Tensor:
    """Which tokens of one text start at a token boundary (module docstring, point 3).

    Args:
        offsets: ``[T, 2]`` character spans in text order.

    Returns:
        Boolean ``[T]``: the span is not empty and its start is at or after the end of every earlier token.
    """
    t = _as_offsets("offsets", offsets)
    if t.dim() != 2:
        raise ValueError(f"boundary_starts takes one text ([T, 2] offsets), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    ends = torch.cummax(t[:, 1], dim=0).values
    before = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    return (t[:, 1] > t[:, 0]) & (t[:, 0] >= before)


def next_token_alignment(
    student_offsets: Tensor | list[tuple[int, int]], teacher_offsets: Tensor | list[tuple[int, int]]
) -> Tensor:
    """For one text: the teacher position whose next token starts where each student position's next token starts
    (module docstring, point 3).

    Example (the text ``"12+7=19"``; student tokens ``12|+|7|=|19``, teacher tokens ``1|2+|7|=|1|9``)::

        student offsets (0,2) (2,3) (3,4) (4,5) (5,7)        next token of position t: t + 1
        teacher offsets (0,1) (1,3) (3,4) (4,5) (5,6) (6,7)
        student position 0 predicts "+" starting at 2: no teacher token starts at 2 ("2+" starts at 1)  -> -1
        student position 1 predicts "7" starting at 3: teacher token 2 ("7") -> teacher position 1
        student position 2 predicts "=" at 4 -> teacher position 2;  position 3 predicts "19" at 5 -> position 3
        student position 4 predicts nothing -> -1
        result: [-1, 1, 2, 3, -1]

    Args:
        student_offsets: ``[Ts, 2]`` character spans of the student's tokens.
        teacher_offsets: ``[Tt, 2]`` of the teacher's tokens of the same text.

    Returns:
        Long ``[Ts]``: the aligned teacher position, ``-1`` where there is none (the next student token does not
        start at a boundary, or no teacher token starts at a boundary there, or it is the teacher's first token,
        which no position predicts; the last student position predicts nothing).
    """
    s = _as_offsets("student_offsets", student_offsets)
    t = _as_offsets("teacher_offsets", teacher_offsets)
    if s.dim() != 2 or t.dim() != 2:
        raise ValueError(f"next_token_alignment takes one text ([T, 2] offsets), got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    out = torch.full((s.shape[0],), -1, dtype=torch.long)
    teacher_at = {int(a): k for k, (a, ok) in enumerate(zip(t[:, 0].tolist(), boundary_starts(t).tolist(),
                                                            strict=True)) if ok}
    for i, (a, ok) in enumerate(zip(s[:, 0].tolist(), boundary_starts(s).tolist(), strict=True)):
        k = teacher_at.get(int(a), 0) if ok and i > 0 else 0
        if k > 0:  # student position i - 1 predicts student token i; teacher position k - 1 predicts token k
            out[i - 1] = k - 1
    return out
