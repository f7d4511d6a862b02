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

:func:`mentor.losses.uld_distance` (sorted probabilities) is the other option for different vocabularies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["offsets_overlap", "align_tokens", "aligned_teacher_loss", "teacher_guided_weights"]


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
    if not 0.0 < select <= 1.0:
        raise ValueError(f"select must be in (0, 1], got {select!r}")
    if student_loss.dim() != 1 or overlap.dim() != 2 or overlap.shape[0] != student_loss.shape[0]:
        raise ValueError(
            f"student_loss must be [Ts] and overlap [Ts, Tt], got {tuple(student_loss.shape)} and "
            f"{tuple(overlap.shape)}"
        )
    ref, aligned = aligned_teacher_loss(teacher_loss, overlap, aggregate=aggregate)
    keep = aligned if valid is None else aligned & valid.to(torch.bool)
    s = student_loss.detach()
    dtype = s.dtype if s.is_floating_point() else torch.float32
    weights = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    candidates = keep.nonzero().flatten()
    if candidates.numel() == 0:
        return weights
    excess = (s - ref.to(s.dtype))[candidates]
    n_keep = max(1, math.ceil(select * candidates.numel()))
    order = torch.sort(excess, descending=True, stable=True).indices[:n_keep]
    weights[candidates[order]] = 1.0
    return weights
