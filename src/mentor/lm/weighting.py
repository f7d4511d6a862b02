"""Per-token weights from the teacher's uncertainty, in the spirit of ATKD.

ATKD (Zhong et al. 2024, "Revisiting Knowledge Distillation for Autoregressive Language Models",
https://arxiv.org/abs/2404.14827) observes that tokens differ in how much the student can learn from the teacher
there, measures that by the teacher's **uncertainty** at the token, splits the tokens of a batch into "easy"
(certain teacher) and "hard" (uncertain teacher) halves and weights the two groups' KD losses differently. ATKD
itself also changes the loss of easy tokens (it drops their target-oriented part); mentor keeps the divergence as
it is and only **weights** whole per-token divergences, so the weights work with every divergence of
:mod:`mentor.lm.losses` (``token_kd(..., token_weights=w)``, ``token_kd_topk(..., token_weights=w)``).

The exact rules implemented:

* Uncertainty ``u_i`` of target token ``i`` (:func:`token_uncertainty`), from the teacher's distribution
  ``p = softmax(z_t / T)`` at the position that predicts it:

  - ``measure="target"`` (default, ATKD's measure): ``u_i = 1 - p(y_i)``, one minus the teacher's probability of
    the target token ``y_i``.
  - ``measure="entropy"``: ``u_i = H(p) / log V``, the normalised entropy (needs no target).

* Weights from the uncertainties of the ``N`` target tokens of one call (:func:`uncertainty_weights`):

  - ``rule="hard_easy"`` (ATKD's split): the ``n_h = ceil(hard_fraction * N)`` tokens of largest ``u`` are hard
    (ties: the earlier token first), the other ``n_e = N - n_h`` easy. Hard tokens get ``w = (1 - easy_weight) *
    N / n_h``, easy ones ``w = easy_weight * N / n_e``. Then ``sum_i w_i d_i / N = easy_weight * mean_easy(d) +
    (1 - easy_weight) * mean_hard(d)``: a convex mix of the two groups' mean divergences. With no easy token
    (``N = 1`` or ``hard_fraction = 1``) every weight is 1.
  - ``rule="proportional"``: ``w_i = u_i / mean_j(u_j)`` (mean weight 1; all 1 when every ``u`` is 0).

  Both keep the mean weight at 1, so ``token_kd``'s normaliser (the target-token count) keeps the loss scale.
  The groups (and the mean) are those of the tokens passed in: under gradient accumulation each micro-batch is
  split on its own, so accumulation is exact only if the weights are computed over the whole step's tokens.

In the training loop the LM recipes' ``token_weighting`` option (:mod:`mentor.recipes.lm_kd`) makes the KD term's
loss :func:`uncertainty_weighted`: uncertainties of the call's target tokens (chunk by chunk from the teacher's
hidden states on the chunked path), then the weights, then the divergence with the weights as its float mask.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mentor import losses
from mentor.lm.losses import HeadLike, _teacher_head, chunked_loss, target_mask
from mentor.lm.vocab import shared_vocab_size

__all__ = [
    "MEASURES",
    "RULES",
    "token_uncertainty",
    "uncertainty_weights",
    "teacher_rows_uncertainty",
    "teacher_token_uncertainty",
    "check_options",
    "uncertainty_weighted",
]

MEASURES = ("target", "entropy")
RULES = ("hard_easy", "proportional")


def token_uncertainty(
    teacher_logits: Tensor, targets: Tensor | None = None, *, measure: str = "target", temperature: float = 1.0
) -> Tensor:
    """The teacher's uncertainty at each token (see the module docstring for the rules).

    Args:
        teacher_logits: ``[..., V]``.
        targets: ``[...]`` target token ids (needed for ``measure="target"``).
        measure: ``"target"`` (``1 - p(y)``) or ``"entropy"`` (``H(p) / log V``).
        temperature: Softmax temperature (> 0).

    Returns:
        ``[...]`` float uncertainties in ``[0, 1]``, without gradient.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    with torch.no_grad():
        z = teacher_logits.detach()
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        if measure == "entropy":
            h = losses.entropy(z, temperature=temperature)
            size = teacher_logits.shape[-1]
            return h / math.log(size) if size > 1 else torch.zeros_like(h)
        if targets is None:
            raise ValueError("measure='target' needs the target token ids (targets)")
        if targets.shape != teacher_logits.shape[:-1]:
            raise ValueError(
                f"targets {tuple(targets.shape)} must match the logits' items {tuple(teacher_logits.shape[:-1])}"
            )
        # p_teacher(y) = exp(-CE(z / T, y)): the cross-entropy of mentor.losses, per token
        p_y = torch.exp(-losses.cross_entropy_per_item(z / temperature, targets.long()))
        return (1.0 - p_y).clamp(min=0.0)


def uncertainty_weights(
    uncertainty: Tensor, *, rule: str = "hard_easy", hard_fraction: float = 0.5, easy_weight: float = 0.2
) -> Tensor:
    """Per-token weights ``[N]`` from uncertainties ``[N]`` (see the module docstring for the exact rules).

    Args:
        uncertainty: ``[N]``, one per target token (:func:`token_uncertainty`).
        rule: ``"hard_easy"`` or ``"proportional"``.
        hard_fraction: ``hard_easy``: share of tokens that are hard, in ``(0, 1]``.
        easy_weight: ``hard_easy``: the easy group's share of the loss, in ``[0, 1]`` (ours; 0 trains on hard
            tokens only, 0.5 weighs both groups' means equally).

    Returns:
        ``[N]`` non-negative weights of mean 1 (an empty input gives an empty output).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if uncertainty.dim() != 1:
        raise ValueError(f"uncertainty must be [N], got shape {tuple(uncertainty.shape)}")
    u = uncertainty.detach()
    u = u if u.is_floating_point() else u.float()
    n = u.shape[0]
    if n == 0:
        return u.clone()
    if rule == "proportional":
        mean = u.mean()
        return torch.where(mean > 0, u / mean.clamp(min=torch.finfo(u.dtype).tiny), torch.ones_like(u))
    if not 0.0 < hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction!r}")
    if not 0.0 <= easy_weight <= 1.0:
        raise ValueError(f"easy_weight must be in [0, 1], got {easy_weight!r}")
    n_hard = min(n, max(1, math.ceil(hard_fraction * n)))
    n_easy = n - n_hard
    if n_easy == 0:
        return torch.ones_like(u)
    order = torch.sort(u, descending=True, stable=True).indices  # stable: equal u, earlier token first
    hard = torch.zeros(n, dtype=torch.bool, device=u.device)
    hard[order[:n_hard]] = True
    w_hard = (1.0 - easy_weight) * n / n_hard
    w_easy = easy_weight * n / n_easy
    return torch.where(hard, torch.full_like(u, w_hard), torch.full_like(u, w_easy))


def teacher_rows_uncertainty(
    teacher_hidden: Tensor,
    teacher_head: HeadLike,
    targets: Tensor | None = None,
    *,
    measure: str = "target",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> Tensor:
    """:func:`token_uncertainty` at rows of the teacher's final hidden states (target positions already selected),
    chunk by chunk: at most one ``[chunk, V]`` logits block alive, without gradient.

    Args:
        teacher_hidden: ``[N, D]``, one row per target token.
        teacher_head: ``nn.Linear``, weight ``[V, D]`` or callable (as in :func:`mentor.lm.losses.token_kd`).
        targets: ``[N]`` target token ids (needed for ``measure="target"``).
        measure: ``"target"`` or ``"entropy"``.
        temperature: Softmax temperature.
        chunk_size: Rows per chunk.
        vocab_size: Compare over ``[0, vocab_size)`` (padded output rows).

    Returns:
        ``[N]`` uncertainties.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if teacher_hidden.dim() != 2 or (targets is not None and targets.shape != teacher_hidden.shape[:1]):
        raise ValueError(f"teacher hidden rows [N, D] {tuple(teacher_hidden.shape)} must match targets [N] "
                         f"{None if targets is None else tuple(targets.shape)}")
    logits_of, size = _teacher_head(teacher_head)
    h = teacher_hidden.detach()
    step = int(chunk_size)
    out = []
    with torch.no_grad():
        for start in range(0, h.shape[0], step):
            z = logits_of(h[start : start + step])
            vocab = shared_vocab_size(z.shape[-1], size if size is not None else z.shape[-1], vocab_size)
            out.append(token_uncertainty(z[:, :vocab], None if targets is None else targets[start : start + step],
                                         measure=measure, temperature=temperature))
    if not out:
        return torch.zeros(0, dtype=torch.promote_types(teacher_hidden.dtype, torch.float32),
                           device=teacher_hidden.device)
    return torch.cat(out)


def teacher_token_uncertainty(
    teacher_hidden: Tensor,
    teacher_head: HeadLike,
    labels: Tensor,
    *,
    measure: str = "target",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """:func:`token_uncertainty` at every target token, from the teacher's final hidden states, chunk by chunk
    (at most one ``[chunk, V]`` logits block alive), in the order :func:`mentor.lm.losses.token_kd` uses.

    Args:
        teacher_hidden: ``[B, T, D]``.
        teacher_head: ``nn.Linear``, weight ``[V, D]`` or callable (as in ``token_kd``).
        labels: ``[B, T]``, ``ignore_index`` where there is no target.
        measure: ``"target"`` or ``"entropy"``.
        temperature: Softmax temperature.
        chunk_size: Target positions per chunk.
        vocab_size: Compare over ``[0, vocab_size)`` (padded output rows).
        shift: Causal-LM shift.
        ignore_index: The label without a target.

    Returns:
        ``[N]`` uncertainties, ready for :func:`uncertainty_weights` and ``token_kd(token_weights=...)``.
    """
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"teacher hidden [B, T, D] {tuple(teacher_hidden.shape)} must match labels [B, T] {tuple(labels.shape)}"
        )
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    h = (teacher_hidden[:, :-1] if shift else teacher_hidden)[mask]
    y = (labels[:, 1:] if shift else labels)[mask]
    return teacher_rows_uncertainty(h, teacher_head, y, measure=measure, temperature=temperature,
                                    chunk_size=chunk_size, vocab_size=vocab_size)


def check_options(
    token_weighting: str | None, uncertainty: str = "target", hard_fraction: float = 0.5, easy_weight: float = 0.2
) -> None:
    """The token-weighting options of the LM recipes checked, each error naming the option and what it accepts.

    Args:
        token_weighting: ``None`` (off), ``"hard_easy"`` or ``"proportional"`` (:func:`uncertainty_weights`).
        uncertainty: ``"target"`` or ``"entropy"`` (:func:`token_uncertainty`).
        hard_fraction: A number in ``(0, 1]``.
        easy_weight: A number in ``[0, 1]``.

    Raises:
        ValueError: A value out of its allowed set or range.
    """
    if token_weighting is not None and token_weighting not in RULES:
        raise ValueError(f"token_weighting = {token_weighting!r}: expected one of {', '.join(RULES)} or None / null "
                         "(no weighting)")
    if uncertainty not in MEASURES:
        raise ValueError(f"uncertainty = {uncertainty!r}: expected one of {', '.join(MEASURES)}")
    for name, value, low_open in (("hard_fraction", hard_fraction, True), ("easy_weight", easy_weight, False)):
        number = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not number or not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
            raise ValueError(f"{name} = {value!r}: expected a number in {'(0, 1]' if low_open else '[0, 1]'}")


def uncertainty_weighted(
    student: Tensor,
    target: Tensor,
    *,
    loss: Callable[..., Tensor],
    labels: Tensor | None = None,
    rule: str = "hard_easy",
    measure: str = "target",
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
    mask: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    student_head: nn.Module | Tensor | None = None,
    teacher_head: HeadLike | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """A token divergence of :mod:`mentor.losses` with each token weighted by the teacher's uncertainty there.

    Two passes over the call's rows (target tokens): first the teacher's uncertainty of every row
    (:func:`token_uncertainty` at temperature 1, the teacher's own distribution, whatever the loss's temperature),
    then the weights of all rows together (:func:`uncertainty_weights`), then the loss itself with the weights as
    its float ``mask`` (``sum_i w_i d_i / num_items``). Nothing is restated: the divergence is ``loss``, the
    uncertainty and the weights are this module's functions.

    * **Full logits** (``teacher_head`` is ``None``): ``student`` and ``target`` are the two models' logits
      ``[..., V]``; ``loss(student, target, mask=w, num_items=..., **kwargs)``.
    * **Chunked** (``student_head`` and ``teacher_head`` given): ``student`` / ``target`` are the models' final
      hidden states ``[..., D]``; the uncertainties are computed chunk by chunk from the teacher's rows under no
      grad (:func:`teacher_rows_uncertainty`), then :func:`mentor.lm.losses.chunked_loss` runs with ``mask=w``, so
      the full ``[rows, V]`` logits never exist. This is the loop's weighted chunked KD term
      (:func:`mentor.recipes.lm_kd.token_terms` with ``token_weighting``).

    The split (``hard_easy``) and the mean (``proportional``) are over the rows of **this call**: in the training
    loop, one micro-batch of one process.

    Args:
        student: The student's logits or hidden states ``[..., V | D]``.
        target: The teacher's logits or hidden states, same leading shape; used without gradient.
        loss: A divergence of :mod:`mentor.losses` (``kl_div``, ``generalized_jsd``, ...).
        labels: The target token ids ``[...]`` (leading shape of ``student``); needed for ``measure="target"``.
        rule: ``"hard_easy"`` or ``"proportional"`` (:func:`uncertainty_weights`).
        measure: ``"target"`` or ``"entropy"`` (:func:`token_uncertainty`).
        hard_fraction: ``hard_easy``: share of hard tokens, in ``(0, 1]``.
        easy_weight: ``hard_easy``: the easy group's share of the loss, in ``[0, 1]``.
        mask: ``None``; bool ``[...]`` (rows kept: the weights are computed over the kept rows only); or float
            ``[...]`` (rows of weight 0 dropped; the others' weights multiply the uncertainty weights).
        num_items: Normaliser (the step's target tokens in the loop); ``None``: the number of rows kept.
        student_head: Chunked: the student's output layer (``nn.Linear`` or weight ``[V, D]``).
        teacher_head: Chunked: the teacher's output layer (``nn.Linear``, weight ``[Vt, Dt]`` or a callable).
        chunk_size: Chunked: rows per chunk.
        vocab_size: Chunked: compare over ``[0, vocab_size)`` (padded output rows).
        **kwargs: The loss's hyper-parameters (``temperature``, ``beta``, ...).

    Returns:
        A scalar tensor.
    """
    check_options(rule, measure, hard_fraction, easy_weight)
    chunked = teacher_head is not None
    if chunked and (student_head is None or chunk_size is None):
        raise ValueError("the chunked form needs student_head, teacher_head and chunk_size together")
    lead = student.shape[:-1]
    if target.shape[:-1] != lead or (labels is not None and labels.shape != lead):
        raise ValueError(f"student {tuple(student.shape)}, target {tuple(target.shape)} and labels "
                         f"{None if labels is None else tuple(labels.shape)} must share the leading (row) shape")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask must have the shape {tuple(lead)} of the rows, got {tuple(mask.shape)}")
    flat = None if mask is None else mask.detach().reshape(-1)
    keep = None if flat is None else (flat if flat.dtype == torch.bool else flat != 0)
    rows = target.detach().reshape(-1, target.shape[-1])
    ids = None if labels is None else labels.reshape(-1)
    if keep is not None:
        rows, ids = rows[keep], None if ids is None else ids[keep]
    if chunked:
        assert chunk_size is not None and teacher_head is not None
        u = teacher_rows_uncertainty(rows, teacher_head, ids, measure=measure, chunk_size=chunk_size,
                                     vocab_size=vocab_size)
    else:
        u = token_uncertainty(rows, ids, measure=measure)
    w_kept = uncertainty_weights(u, rule=rule, hard_fraction=hard_fraction, easy_weight=easy_weight)
    if flat is not None and flat.dtype != torch.bool:
        w_kept = w_kept * flat[keep].to(w_kept.dtype)
    if keep is None:
        weights = w_kept
    else:
        weights = torch.zeros(flat.shape[0], dtype=w_kept.dtype, device=w_kept.device)  # type: ignore[union-attr]
        weights[keep] = w_kept
    weights = weights.reshape(lead)
    norm = num_items if num_items is not None else max(int(u.shape[0]), 1)
    if chunked:
        return chunked_loss(student, target, loss=loss, student_head=student_head,  # type: ignore[arg-type]
                            teacher_head=teacher_head, chunk_size=chunk_size,  # type: ignore[arg-type]
                            num_items=norm, mask=weights, vocab_size=vocab_size, **kwargs)
    return loss(student, target, mask=weights, num_items=norm, **kwargs)
