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
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor import losses
from mentor.lm.losses import HeadLike, _teacher_head, target_mask
from mentor.lm.vocab import shared_vocab_size

__all__ = ["MEASURES", "RULES", "token_uncertainty", "uncertainty_weights", "teacher_token_uncertainty"]

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
        log_p = F.log_softmax(z / temperature, dim=-1)
        p_y = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).exp()
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"teacher hidden [B, T, D] {tuple(teacher_hidden.shape)} must match labels [B, T] {tuple(labels.shape)}"
        )
    logits_of, size = _teacher_head(teacher_head)
    mask = target_mask(labels, shift=shift, ignore_index=ignore_index)
    h = (teacher_hidden[:, :-1] if shift else teacher_hidden)[mask].detach()
    y = (labels[:, 1:] if shift else labels)[mask]
    out = []
    with torch.no_grad():
        for start in range(0, h.shape[0], int(chunk_size)):
            z = logits_of(h[start : start + int(chunk_size)])
            vocab = shared_vocab_size(z.shape[-1], size if size is not None else z.shape[-1], vocab_size)
            out.append(token_uncertainty(z[:, :vocab], y[start : start + int(chunk_size)], measure=measure,
                                         temperature=temperature))
    if not out:
        return torch.zeros(0, dtype=torch.promote_types(teacher_hidden.dtype, torch.float32),
                           device=teacher_hidden.device)
    return torch.cat(out)
