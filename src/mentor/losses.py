"""Loss functions: pure functions over tensors.

Every loss in mentor lives here and nowhere else. The functions hold no state, touch no model and parse no
configuration. They share one contract:

* **Items.** A logit tensor has shape ``[..., classes]``; every leading dimension indexes *items* (a batch of
  examples ``[B, C]``, or a batch of token positions ``[B, T, V]``).
* **Reduction.** A loss is ``sum over kept items of loss_item / N``. The optional boolean ``mask`` (shape
  ``[...]``) keeps items where it is ``True``. ``N`` is ``num_items`` when given, else the number of kept items.
  Passing the item count of a whole accumulated batch as ``num_items`` makes gradient accumulation over
  micro-batches of any size give exactly the gradient of one large batch.
* **Per-item weights.** A floating-point ``mask`` weighs items instead: the loss is
  ``sum over items of w_i * loss_i / N`` (SoftMatch's soft weights, a confidence threshold as 0/1 weights). Items of
  weight 0 are dropped exactly (a non-finite loss there does not turn the sum into NaN), and the default ``N`` is
  ``sum_i w_i`` (a weighted mean), so a float mask of 0s and 1s gives exactly what the boolean mask gives. The
  weights are used as they are (no gradient is expected through them; pass detached weights). Every loss with a
  ``mask`` argument accepts both kinds, except :func:`freematch_fairness`, a batch-level loss that reads any mask
  as "kept where non-zero".
* **Precision.** Softmax and log-softmax run in float32 when the inputs are float16 or bfloat16 (float64 inputs
  stay float64, which the tests use).
* **Temperature.** Logit-distribution losses divide logits by ``temperature`` and multiply the result by
  ``temperature ** 2`` so that gradient magnitudes stay comparable across temperatures
  (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reduce_items",
    "squared_error_per_item",
    "kl_div",
    "generalized_jsd",
    "skew_kl",
    "tvd",
    "entropy",
    "softmax_mse",
    "soft_cross_entropy",
    "cross_entropy",
    "cross_entropy_per_item",
    "codebook_cross_entropy",
    "dkd",
    "dist",
    "ofa_loss",
    "rkd_distance",
    "rkd_angle",
    "attention_transfer",
    "similarity_preserving",
    "linear_cka",
    "cka_loss",
    "hint_mse",
    "cosine_embedding",
    "smooth_l1",
    "sparse_kl_div",
    "sparse_soft_cross_entropy",
    "freematch_fairness",
    "uld_distance",
]

NumItems = int | float | Tensor | None


def _as_float(x: Tensor) -> Tensor:
    """Upcast half precision to float32; keep float32/float64 as they are."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point logits, got dtype {x.dtype}")
    return x


def _check_temperature(name: str, value: float) -> None:
    if type(value) is float and 0.0 < value < math.inf:  # the common case, without the ABC isinstance checks
        return
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_unit(name: str, value: float, *, open_right: bool = False) -> None:
    ok = 0.0 <= value < 1.0 if open_right else 0.0 <= value <= 1.0
    if not ok:
        interval = "[0, 1)" if open_right else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )


def _positive(num_items: int | float) -> float:
    """A numeric normaliser, checked: ``num_items > 0`` (NaN is rejected too)."""
    if not num_items > 0:
        raise ValueError(f"num_items must be > 0, got {num_items!r}")
    return float(num_items)


def reduce_items(per_item: Tensor, mask: Tensor | None = None, num_items: NumItems = None) -> Tensor:
    """Sum per-item losses over the kept items and divide by the normaliser.

    Args:
        per_item: Loss of each item, shape ``[...]``.
        mask: Optional tensor of the same shape: boolean (``False`` drops the item) or floating-point per-item
            weights ``w`` (the sum becomes ``sum w_i * loss_i``; weight 0 drops the item exactly).
        num_items: Explicit normaliser ``N``. Defaults to the number of kept items (boolean mask) or the sum of the
            weights (float mask). When nothing is kept and no normaliser is given the result is a zero that still
            carries the graph.

    Returns:
        A scalar tensor.
    """
    weights: Tensor | None = None
    if mask is not None:
        if mask.shape != per_item.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(per_item.shape)}")
        zero = torch.zeros((), dtype=per_item.dtype, device=per_item.device)
        if mask.is_floating_point():
            weights = mask.to(per_item.dtype)
            # where() rather than a bare multiply: an item of weight 0 with a non-finite loss must not give NaN.
            per_item = torch.where(weights != 0, per_item * weights, zero)
        else:
            mask = mask.to(torch.bool)
            # where() rather than multiply: a masked item with a non-finite loss must not turn the sum into NaN.
            per_item = torch.where(mask, per_item, zero)
    total = per_item.sum()
    if num_items is None:
        if weights is not None:
            weight_sum = weights.sum()
            return total / torch.where(weight_sum != 0, weight_sum, torch.ones_like(weight_sum))
        count = mask.sum() if mask is not None else torch.tensor(per_item.numel(), device=per_item.device)
        return total / count.clamp(min=1).to(total.dtype)
    if isinstance(num_items, Tensor):
        return total / num_items.to(total.dtype)
    return total / _positive(num_items)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log q)`` (shape ``[..., C]``; summed over ``C`` it is ``KL(p || q)``), with
    ``0 * log 0 = 0``."""
    p = log_p.exp()
    # where() inside the product: where p == 0 the log-ratio may be -inf - -inf (a masked class in both); the
    # dropped branch must not exist in the product, or its 0 * nan poisons the gradient.
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=p.dtype, device=p.device))
    return p * log_ratio


def _item_count(shaped: Tensor, num_items: int | float | None) -> float:
    """The normaliser for a mask-free reduction over ``shaped`` (``[..., C]``)."""
    if num_items is None:
        return float(max(shaped.numel() // max(shaped.shape[-1], 1), 1))
    return _positive(num_items)


def _total_sum(total: Tensor, shaped: Tensor, num_items: int | float | None, scale: float) -> Tensor:
    """``scale * total / N`` for a sum ``total`` already taken over every element of ``shaped``."""
    return total * (scale / _item_count(shaped, num_items))


def _total(terms: Tensor, mask: Tensor | None, num_items: NumItems, scale: float = 1.0) -> Tensor:
    """``scale * reduce_items(terms.sum(-1), mask, num_items)`` for elementwise ``terms`` of shape ``[..., C]``.

    Without a mask and with a numeric (or default) normaliser this is one sum and one multiply: the hot path of
    every training step.
    """
    if mask is None and not isinstance(num_items, Tensor):
        return _total_sum(terms.sum(), terms, num_items, scale)
    out = reduce_items(terms.sum(dim=-1), mask, num_items)
    return out * scale if scale != 1.0 else out


def _softened(student_logits: Tensor, teacher_logits: Tensor, temperature: float, *, log: bool
              ) -> tuple[Tensor, Tensor]:
    """The checked pair of same-shape logits, softened at ``temperature``: ``(log_s, log_t)`` (``log=True``) or
    ``(p_s, p_t)``, float32 for half precision inputs, the teacher's in the student's dtype."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature("temperature", temperature)
    soften = F.log_softmax if log else F.softmax
    s = soften(_as_float(student_logits) / temperature, dim=-1)
    return s, soften(_as_float(teacher_logits) / temperature, dim=-1).to(s.dtype)


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    reverse: bool = False,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Temperature-scaled KL divergence between teacher and student distributions.

    ``T^2 * sum over items of KL(p_t || p_s) / N`` with ``p_t = softmax(teacher / T_t)`` and
    ``p_s = softmax(student / T)``; ``reverse=True`` gives ``KL(p_s || p_t)``. Hinton et al. 2015,
    https://arxiv.org/abs/1503.02531.

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``, same shape.
        temperature: Student temperature ``T`` (> 0); the result is scaled by ``T^2``.
        teacher_temperature: Teacher temperature ``T_t``; defaults to ``temperature``. Distinct temperatures are
            Low Temperature Distillation (LTD, Chen et al. 2021, https://arxiv.org/abs/2111.02331).
        reverse: Use the reverse (mode-seeking) KL ``KL(p_s || p_t)``.
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser (see module docstring).

    Returns:
        A scalar tensor.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature("temperature", temperature)
    t_t = temperature if teacher_temperature is None else teacher_temperature
    _check_temperature("teacher_temperature", t_t)
    log_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_as_float(teacher_logits) / t_t, dim=-1)
    if reverse:
        return _total(_kl_terms(log_s, log_t), mask, num_items, temperature**2)
    # Forward KL through the fused kernel (one op instead of five). Clamping -inf log-probabilities to the
    # smallest finite value keeps 0 * log 0 = 0 (a class masked in the teacher, or in both models) exact, with
    # zero gradient there; only a class masked in the student alone but not in the teacher, where the true value
    # is +inf, comes out as a huge finite number instead. (Probability targets through xlogy would save the
    # teacher's clamp, but give a NaN gradient to a teacher with a graph, a peer, where its softmax underflows.)
    lowest = torch.finfo(log_t.dtype).min
    log_t, log_s = log_t.clamp(min=lowest), log_s.clamp(min=lowest)
    if mask is None and not isinstance(num_items, Tensor):
        return _total_sum(F.kl_div(log_s, log_t, reduction="sum", log_target=True), log_t, num_items, temperature**2)
    terms = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    return _total(terms, mask, num_items, temperature**2)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649).

    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``, scaled by
    ``T^2``. The two ends are defined as the limits the GKD paper and TRL use: ``beta = 0`` is exactly the forward
    ``KL(p_t || p_s)`` and ``beta = 1`` exactly the reverse ``KL(p_s || p_t)``; ``beta = 0.5`` is the symmetric JSD.

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``.
        beta: Interpolation in ``[0, 1]``.
        temperature: Softmax temperature (> 0).
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return kl_div(student_logits, teacher_logits, temperature=temperature, mask=mask, num_items=num_items)
    if beta == 1.0:
        return kl_div(
            student_logits, teacher_logits, temperature=temperature, reverse=True, mask=mask, num_items=num_items
        )
    log_s, log_t = _softened(student_logits, teacher_logits, temperature, log=True)
    # clamp: a class masked (-inf) in both inputs would otherwise make logsumexp's gradient nan
    log_m = torch.logsumexp(
        torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]).clamp(min=torch.finfo(log_s.dtype).min),
        dim=0,
    )
    terms = beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)
    return _total(terms, mask, num_items, temperature**2)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024, https://arxiv.org/abs/2402.03898).

    Forward: ``KL(p_t || alpha * p_t + (1 - alpha) * p_s)``; reverse: ``KL(p_s || alpha * p_s + (1 - alpha) * p_t)``.
    ``alpha = 0`` is the plain forward / reverse KL. Scaled by ``T^2``.

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``.
        alpha: Skew in ``[0, 1)``.
        reverse: Skewed reverse KL.
        temperature: Softmax temperature (> 0).
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _check_unit("alpha", alpha, open_right=True)
    log_s, log_t = _softened(student_logits, teacher_logits, temperature, log=True)
    first, second = (log_s, log_t) if reverse else (log_t, log_s)
    if alpha == 0.0:
        log_mix = second
    else:
        # clamp: a class masked (-inf) in both inputs would otherwise make logsumexp's gradient nan
        log_mix = torch.logsumexp(
            torch.stack([first + math.log(alpha), second + math.log(1.0 - alpha)]).clamp(
                min=torch.finfo(first.dtype).min
            ),
            dim=0,
        )
    return _total(_kl_terms(first, log_mix), mask, num_items, temperature**2)


def entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The entropy (nats) of ``softmax(logits / T)`` per item, ``-sum_c p_c log p_c``, with ``0 log 0 = 0`` (a
    masked, ``-inf`` class contributes nothing). Not a loss: a per-item quantity that confidence weightings
    (multi-teacher, token weights) are built from, kept here with the other softmax math.

    Args:
        logits: ``[..., C]``.
        temperature: Softmax temperature (> 0).

    Returns:
        ``[...]``, float32 for half-precision inputs.
    """
    _check_temperature("temperature", temperature)
    p = F.softmax(_as_float(logits) / temperature, dim=-1)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Total variation distance ``0.5 * sum |p_t - p_s|`` per item, scaled by ``T^2``.

    Used as a distillation objective by Wen et al. 2023 (f-divergence KD, https://arxiv.org/abs/2307.15190).

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``.
        temperature: Softmax temperature (> 0).
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    p_s, p_t = _softened(student_logits, teacher_logits, temperature, log=False)
    return _total((p_t - p_s).abs(), mask, num_items, 0.5 * temperature**2)


def softmax_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Mean Teacher's consistency cost: the squared distance of the two softmax outputs, averaged over classes,
    ``(1 / C) * sum_c (p_s,c - p_t,c)^2`` per item, scaled by ``T^2`` (Tarvainen & Valpola 2017,
    https://arxiv.org/abs/1703.01780; their ``softmax_mse_loss``, and USB's ``consistency_loss(..., "mse")``).
    Gradients flow into the student only where the teacher logits are detached (as every mentor teacher's are).

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``, same shape.
        temperature: Softmax temperature (> 0).
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    p_s, p_t = _softened(student_logits, teacher_logits, temperature, log=False)
    return _total((p_s - p_t).square(), mask, num_items, temperature**2 / p_s.shape[-1])


def soft_cross_entropy(
    student_logits: Tensor,
    target_probs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Cross-entropy against a target distribution: ``T^2 * sum over items of -sum_c q_c log p_s,c / N``.

    Args:
        student_logits: ``[..., C]``.
        target_probs: ``[..., C]``, rows on the simplex (for example a teacher's ``softmax``).
        temperature: Student softmax temperature (> 0).
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _check_pair(student_logits, target_probs)
    _check_temperature("temperature", temperature)
    log_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    q = _as_float(target_probs).to(log_s.dtype)
    # 0 * log 0 = 0: a class the target gives no mass may be masked (-inf) in the student without making a nan
    terms = q * torch.where(q != 0, log_s, torch.zeros((), dtype=log_s.dtype, device=log_s.device))
    return _total(terms, mask, num_items, -(temperature**2))


def _check_labels(student_logits: Tensor, target: Tensor, label_smoothing: float) -> None:
    """Integer labels ``[...]`` for logits ``[..., C]``, and a smoothing in ``[0, 1]``; else a clear error."""
    _check_unit("label_smoothing", label_smoothing)
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(student_logits.shape)} "
            "without its class dimension"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")


def cross_entropy(
    student_logits: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Cross-entropy with integer labels and optional label smoothing.

    With smoothing ``e`` over ``C`` classes the target of an item is ``(1 - e) * onehot + e / C``.
    Items whose label is ``ignore_index`` (or negative) are dropped, as are items where ``mask`` is ``False``.

    Args:
        student_logits: ``[..., C]``.
        target: Integer labels ``[...]``.
        label_smoothing: ``e`` in ``[0, 1]``.
        ignore_index: Label value that marks an item without a label.
        mask: Optional boolean ``[...]`` (keep) or float ``[...]`` (per-item weights; module docstring).
        num_items: Explicit normaliser; defaults to the number of kept, labelled items.

    Returns:
        A scalar tensor.
    """
    _check_labels(student_logits, target, label_smoothing)
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(target.shape)}")
    logits = _as_float(student_logits)
    num_classes = logits.shape[-1]
    if mask is not None and mask.is_floating_point():  # per-item weights: per-item losses, then the weighted sum
        labelled = (target >= 0) if ignore_index < 0 else (target >= 0) & (target != ignore_index)
        per_item = cross_entropy_per_item(logits, target, label_smoothing=label_smoothing, ignore_index=ignore_index)
        return reduce_items(per_item, torch.where(labelled, mask.to(per_item.dtype), 0.0), num_items)
    # One fused kernel over the kept items; with smoothing e it sums (1 - e) * nll - e * mean_c log p. Items not
    # kept get a label the kernel skips: -1 when every negative label is to be dropped (a single clamp maps them
    # all to -1), else ignore_index. An out-of-range label makes the kernel raise.
    flat = logits if logits.dim() == 2 else logits.reshape(-1, num_classes)  # no view node for [B, C]
    try:
        if ignore_index < 0 and mask is None and target.dim() == 1:
            # Item labels are in {-1 (UNLABELLED), 0 .. C-1} and need no rewriting; any other negative label makes
            # the kernel raise, and the batch takes the clamped path. (Sequence labels, padded with -100, always
            # take it: an exception per call would cost more than the clamp.)
            skip, safe = -1, target
            try:
                total = F.cross_entropy(flat, target.reshape(-1), ignore_index=-1, reduction="sum",
                                        label_smoothing=label_smoothing)
            except (IndexError, RuntimeError):
                safe = target.clamp(min=-1)
                total = F.cross_entropy(flat, safe.reshape(-1), ignore_index=-1, reduction="sum",
                                        label_smoothing=label_smoothing)
        else:
            if ignore_index < 0:
                skip = -1
                safe = (target if mask is None else torch.where(mask.to(torch.bool), target, skip)).clamp(min=skip)
            else:
                skip = ignore_index
                keep_ = (target >= 0) if mask is None else (target >= 0) & mask.to(torch.bool)
                safe = torch.where(keep_, target, skip)
            total = F.cross_entropy(flat, safe.reshape(-1), ignore_index=skip, reduction="sum",
                                    label_smoothing=label_smoothing)
    except (IndexError, RuntimeError) as err:
        keep = safe >= 0 if skip < 0 else safe != skip
        bad = int(target[keep].max()) if bool(keep.any()) else -1
        raise ValueError(
            f"label {bad} out of range for {num_classes} classes (expected 0..{num_classes - 1}): {err}"
        ) from None
    if num_items is None:
        keep = safe >= 0 if skip < 0 else safe != skip
        return total / keep.sum().clamp(min=1).to(total.dtype)
    if isinstance(num_items, Tensor):
        return total / num_items.to(total.dtype)
    return total / _positive(num_items)


def cross_entropy_per_item(
    student_logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100
) -> Tensor:
    """The cross-entropy of each item, unreduced: what :func:`cross_entropy` sums (per-token losses of a language
    model, the excess-loss token selection of :mod:`mentor.lm.align`).

    Args:
        student_logits: ``[..., C]``.
        target: Integer labels ``[...]``.
        label_smoothing: ``e`` in ``[0, 1]``.
        ignore_index: Label value that marks an item without a label (negative labels are dropped too).

    Returns:
        ``[...]`` losses (float32 for half precision inputs), 0 on the items without a label.
    """
    _check_labels(student_logits, target, label_smoothing)
    logits = _as_float(student_logits)
    num_classes = logits.shape[-1]
    labelled = (target >= 0) if ignore_index < 0 else (target >= 0) & (target != ignore_index)
    safe = torch.where(labelled, target, -100).reshape(-1)
    if safe.numel() and int(safe.max()) >= num_classes:
        raise ValueError(f"label {int(safe.max())} out of range for {num_classes} classes "
                         f"(expected 0..{num_classes - 1})")
    return F.cross_entropy(logits.reshape(-1, num_classes), safe, ignore_index=-100, reduction="none",
                           label_smoothing=label_smoothing).reshape(target.shape)


def codebook_cross_entropy(
    student_logits: Tensor,
    codes: Tensor,
    *,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Multi-codebook index prediction (MVQ-KD, Guo et al. 2022, https://arxiv.org/abs/2211.00508).

    An item's target is ``M`` codebook indices (``mentor.mvq`` codes of a teacher feature); its loss is the **sum**
    over codebooks of the cross-entropy of the student's ``K`` logits for that codebook:
    ``sum over kept items of sum_m -log softmax(z[m])[codes[m]] / N``, ``N`` the number of items (not of
    item-codebook pairs; weight the term by ``1 / M`` for a mean over codebooks).

    Args:
        student_logits: ``[..., M, K]``, or flat ``[..., M * K]`` (codebook-major, as a linear projector gives).
        codes: Integer indices ``[..., M]`` in ``0..K-1`` (uint8 codes are fine).
        mask: Optional boolean ``[...]`` over items.
        num_items: Explicit normaliser (see module docstring); defaults to the number of kept items.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must hold integer codebook indices, got dtype {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have shape [..., M], got a scalar")
    m = codes.shape[-1]
    if student_logits.dim() == codes.dim() and student_logits.shape[:-1] == codes.shape[:-1] and m > 0 \
            and student_logits.shape[-1] % m == 0:
        student_logits = student_logits.reshape(*codes.shape, student_logits.shape[-1] // m)
    if student_logits.dim() != codes.dim() + 1 or student_logits.shape[:-1] != codes.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} does not fit codes shape {tuple(codes.shape)}: "
            f"expected [..., M, K] or [..., M * K] with [..., M] = {tuple(codes.shape)}"
        )
    if mask is not None and mask.shape != codes.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(codes.shape[:-1])}")
    logits = _as_float(student_logits)
    k = logits.shape[-1]
    target = codes.to(torch.int64)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"codes must lie in 0..{k - 1} for {k} logits per codebook, got values in "
                         f"{int(target.min())}..{int(target.max())}")
    if mask is None and not isinstance(num_items, Tensor):
        total = F.cross_entropy(logits.reshape(-1, k), target.reshape(-1), reduction="sum")
        n = float(max(codes.numel() // max(m, 1), 1)) if num_items is None else _positive(num_items)
        return total / n
    per_pair = F.cross_entropy(logits.reshape(-1, k), target.reshape(-1), reduction="none")
    return reduce_items(per_pair.reshape(codes.shape).sum(dim=-1), mask, num_items)


# ----------------------------------------------------------------------------------------------------------------
# The classic catalogue: decoupled and correlation-based logit losses, feature and relational losses.
#
# Relational losses (DIST's column term, RKD, similarity preserving, CKA) compare items of one batch with each
# other, so they have no per-item decomposition and take no ``mask`` / ``num_items``: they are means over the
# batch they are given. The per-item feature losses (``hint_mse``, ``cosine_embedding``, ``smooth_l1``) follow the
# module contract.
# ----------------------------------------------------------------------------------------------------------------

# Floors under square roots and norms: they keep gradients finite where a norm or a distance is exactly zero
# (duplicate embeddings, an all-zero attention map, a constant row of probabilities). Far below any scale that
# ordinary inputs reach, so they do not change values there.
_NORM_EPS = 1e-12  # vector norms: ||v|| is read as max(||v||, 1e-12)
_DIST_EPS_SQ = 1e-12  # RKD squared distances: a distance is read as max(||e_i - e_j||, 1e-6)
_PEARSON_EPS = 1e-8  # Pearson correlation: cov / max(sd_a * sd_b, 1e-8)
_COSINE_EPS = 1e-8  # cosine_embedding: <a, b> / (max(||a||, 1e-8) * max(||b||, 1e-8))


def _check_weight(name: str, value: float) -> None:
    """A loss weight: a finite real number >= 0."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _floating(name: str, x: Tensor) -> Tensor:
    """``x`` as float32 (half precision in) or as it is (float32 / float64); anything else is an error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same_shape(what: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )


def _batch_rows(name: str, x: Tensor) -> Tensor:
    """``[B, ...]`` -> float ``[B, D]`` (extra dimensions flattened)."""
    x = _floating(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [B, D] (extra dimensions are flattened), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _check_batch(student: Tensor, teacher: Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same number of items (dim 0), got {student.shape[0]} "
            f"(shape {tuple(student.shape)}) and {teacher.shape[0]} (shape {tuple(teacher.shape)})"
        )


def _unit(v: Tensor, dim: int = -1, eps: float = _NORM_EPS) -> Tensor:
    """``v / max(||v||, eps)`` along ``dim``; a zero vector stays zero, with a finite gradient.

    The floor is applied to the squared norm before the root, so no square root is ever taken of zero.
    """
    return v * torch.rsqrt((v * v).sum(dim=dim, keepdim=True).clamp(min=eps * eps))


def _per_item_sum(x: Tensor) -> Tensor:
    """Sum over every dimension but the first (items): ``[B, ...] -> [B]``."""
    return x.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled knowledge distillation, DKD (Zhao et al. 2022, https://arxiv.org/abs/2203.08679).

    ``T^2 * (alpha * TCKD + beta * NCKD)``, each a mean over items:

    * TCKD ("target class knowledge distillation") is ``KL(b_t || b_s)`` between the binary distributions
      ``b = [p_target, 1 - p_target]`` of the softened (``softmax(z / T)``) teacher and student.
    * NCKD ("non-target class knowledge distillation") is ``KL(p^_t || p^_s)`` between the distributions over the
      ``C - 1`` non-target classes, renormalised: ``p^ = softmax`` at temperature ``T`` of the logits with the
      target class removed.

    With ``alpha = 1`` and ``beta = 1 - p_target`` of the teacher (per item) the sum is the classic KD loss
    (the paper's Eq. 7), which the tests check.

    Args:
        student_logits: ``[B, C]`` (or ``[..., C]``: every leading dimension indexes items), ``C >= 2``.
        teacher_logits: Same shape.
        target: Integer class indices ``[B]`` (``[...]``), each in ``0 .. C - 1``.
        alpha: Weight of TCKD (>= 0).
        beta: Weight of NCKD (>= 0); the paper uses 8 on CIFAR-100 and 0.5 on ImageNet.
        temperature: Softmax temperature ``T`` (> 0); the result is scaled by ``T^2``.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    _check_pair(student_logits, teacher_logits)
    _check_weight("alpha", alpha)
    _check_weight("beta", beta)
    _check_temperature("temperature", temperature)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(f"dkd needs logits [B, C] with at least 2 classes, got shape {tuple(student_logits.shape)}")
    num_classes = student_logits.shape[-1]
    integer = isinstance(target, Tensor) and not (
        target.is_floating_point() or target.is_complex() or target.dtype == torch.bool
    )
    if not integer:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must hold integer class indices, got {got}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(student_logits.shape)} "
            "without its class dimension"
        )
    if target.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} out of range for {num_classes} classes (expected 0..{num_classes - 1})")

    z_s = _as_float(student_logits) / temperature
    z_t = _as_float(teacher_logits) / temperature
    index = target.to(device=z_s.device, dtype=torch.long).unsqueeze(-1)  # [..., 1]
    # Non-target classes of each item, in order: j + (j >= target) for j = 0 .. C - 2.
    j = torch.arange(num_classes - 1, device=z_s.device)
    others = j + (j >= index).long()  # [..., C - 1]

    def parts(z: Tensor) -> tuple[Tensor, Tensor]:
        log_p = F.log_softmax(z, dim=-1)
        log_gt = log_p.gather(-1, index)
        log_rest = torch.logsumexp(log_p.gather(-1, others), dim=-1, keepdim=True)  # log(1 - p_target), stably
        binary = torch.cat([log_gt, log_rest], dim=-1)  # [..., 2]
        non_target = F.log_softmax(z.gather(-1, others), dim=-1)  # [..., C - 1], renormalised
        return binary, non_target

    bin_s, nt_s = parts(z_s)
    bin_t, nt_t = parts(z_t)
    tckd = _kl_terms(bin_t, bin_s).sum(dim=-1)
    nckd = _kl_terms(nt_t, nt_s).sum(dim=-1)
    return reduce_items(alpha * tckd + beta * nckd) * temperature**2


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: ``cov / max(sd_a * sd_b, eps)``.

    A constant slice (zero variance) has correlation 0, with a finite (zero) gradient through the denominator.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    cov = (a * b).sum(dim=dim)
    var = (a * a).sum(dim=dim) * (b * b).sum(dim=dim)
    return cov / var.clamp(min=_PEARSON_EPS**2).sqrt()


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST: distillation from a stronger teacher by correlation (Huang et al. 2022, https://arxiv.org/abs/2205.10536).

    With ``P = softmax(z / T)`` of shape ``[B, C]`` for student and teacher,
    ``T^2 * (beta * (1 - mean_i rho(P_s[i, :], P_t[i, :])) + gamma * (1 - mean_c rho(P_s[:, c], P_t[:, c])))``
    where ``rho`` is the Pearson correlation: the first term is the paper's inter-class relation (each item, over
    its classes), the second its intra-class relation (each class, over the batch).

    ``rho = cov / max(sd_a * sd_b, 1e-8)``: a row or column without variance (all classes equally likely, or a
    batch of one item for the column term) has correlation 0, so its term is a constant with zero gradient. The
    authors' implementation adds ``1e-8`` to the denominator instead; the two agree to about ``1e-8 / (sd_a sd_b)``.

    Args:
        student_logits: ``[B, C]``; further leading dimensions (``[..., C]``) are flattened into the batch.
        teacher_logits: Same shape.
        beta: Weight of the inter-class (row) term (>= 0).
        gamma: Weight of the intra-class (column) term (>= 0).
        temperature: Softmax temperature ``T`` (> 0); the result is scaled by ``T^2``.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    _check_pair(student_logits, teacher_logits)
    _check_weight("beta", beta)
    _check_weight("gamma", gamma)
    _check_temperature("temperature", temperature)
    if student_logits.dim() < 2 or student_logits.numel() == 0:
        raise ValueError(f"dist needs logits [B, C] with B, C >= 1, got shape {tuple(student_logits.shape)}")
    num_classes = student_logits.shape[-1]
    p_s = F.softmax(_as_float(student_logits).reshape(-1, num_classes) / temperature, dim=-1)
    p_t = F.softmax(_as_float(teacher_logits).reshape(-1, num_classes) / temperature, dim=-1)
    inter = 1.0 - _pearson(p_s, p_t, dim=1).mean()
    intra = 1.0 - _pearson(p_s, p_t, dim=0).mean()
    return (beta * inter + gamma * intra) * temperature**2


def ofa_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    eps: float = 1.0,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """One-for-All KD loss with adaptive target enhancement (Hao et al. 2023, https://arxiv.org/abs/2310.19444).

    With ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)`` and ``y`` the label, per item
    ``-[(1 + p_t[y])^eps - 1] * log p_s[y] - sum_{c != y} p_t[c]^eps * log p_s[c]``, i.e. the cross-entropy
    against the teacher's distribution in which every class weight is raised to ``eps`` after the one-hot label
    has been added (the authors' code: ``(p_t + onehot)^eps - onehot``). ``eps = 1`` is the plain cross-entropy
    with the teacher's soft targets (KD up to the teacher's entropy, with the same gradient); ``eps > 1`` raises
    the target class's weight relative to the others (for a teacher that is unsure of the target class) and damps
    the non-target classes. The weights are not renormalised. The result is scaled by ``T^2`` like the other
    logit-distribution losses here (the paper uses ``T = 1``, where the two agree).

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: ``[..., C]``, same shape.
        target: Integer labels ``[...]``; items with a negative label (unlabelled) are dropped, as in
            :func:`cross_entropy`.
        eps: Enhancement exponent ``eps`` (> 0); the paper uses 1 to 1.5.
        temperature: Softmax temperature ``T`` (> 0); the result is scaled by ``T^2``.
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser; defaults to the number of kept, labelled items.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature("temperature", temperature)
    _check_temperature("eps", eps)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"ofa_loss needs logits [..., C], got shape {tuple(student_logits.shape)}")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must hold integer class indices, got {got}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(student_logits.shape)} "
            "without its class dimension"
        )
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(target.shape)}")
    num_classes = student_logits.shape[-1]
    keep = target >= 0 if mask is None else (target >= 0) & (mask != 0 if mask.is_floating_point() else mask.bool())
    safe = torch.where(keep, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
    try:
        onehot = F.one_hot(safe, num_classes)
    except RuntimeError as err:
        bad = int(safe.max())
        raise ValueError(
            f"label {bad} out of range for {num_classes} classes (expected 0..{num_classes - 1}): {err}"
        ) from None
    log_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_as_float(teacher_logits) / temperature, dim=-1).to(log_s.dtype)
    hot = onehot.to(log_s.dtype)
    weights = p_t if eps == 1.0 else (p_t + hot) ** eps - hot  # eps = 1: exactly the teacher's distribution
    # 0 * log 0 = 0: a class without weight may be masked (-inf) in the student without making a nan
    terms = weights * torch.where(weights != 0, log_s, torch.zeros((), dtype=log_s.dtype, device=log_s.device))
    if mask is not None and mask.is_floating_point():  # per-item weights on the labelled items
        return _total(terms, torch.where(keep, mask.to(terms.dtype), 0.0), num_items, -(temperature**2))
    return _total(terms, keep, num_items, -(temperature**2))


def _rkd_distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``[B, B]`` of ``e`` (``[B, D]``), divided by their off-diagonal mean.

    Safe square root: off-diagonal distances are ``sqrt(max(d^2, 1e-12))`` (so duplicate embeddings sit at
    ``1e-6`` with zero gradient rather than at the non-differentiable 0); the diagonal is exactly 0. The mean is
    taken over the ``B (B - 1)`` pairs ``i != j``; a batch whose distances are all ~0 (or ``B < 2``) gives zeros.
    """
    e = e - e.mean(dim=0, keepdim=True)  # translation-invariant; smaller norms, smaller Gram cancellation error
    gram = e @ e.transpose(0, 1)
    sq_norm = gram.diagonal()  # from the same product as the off-diagonal terms: duplicates cancel exactly
    squared = sq_norm.unsqueeze(0) + sq_norm.unsqueeze(1) - 2.0 * gram
    n = e.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    d = torch.where(off, squared.clamp(min=_DIST_EPS_SQ).sqrt(), torch.zeros((), dtype=e.dtype, device=e.device))
    mean = d.sum() / max(n * (n - 1), 1)
    return d / mean.clamp(min=_NORM_EPS)


def rkd_distance(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Distance-wise relational KD, RKD-D (Park et al. 2019, https://arxiv.org/abs/1904.05068).

    ``psi_D(i, j) = ||e_i - e_j||_2 / mu`` with ``mu`` the mean distance over the pairs ``i != j`` of the batch
    (the paper: "the average distance between pairs from X^2 in the mini-batch"). The loss is the Huber
    (smooth-L1, ``delta = 1``) loss between the student's and the teacher's ``[B, B]`` matrices of ``psi_D``,
    averaged over all ``B^2`` entries (the diagonal, 0 on both sides, included), as in the authors' code.

    Invariant to scaling, translating and rotating either embedding. The teacher side is computed without
    gradient. Distances below ``1e-6`` are read as ``1e-6`` (a safe square root: duplicate embeddings in a batch
    give finite gradients); a batch of fewer than 2 items gives 0.

    Args:
        student_emb: ``[B, Ds]`` (extra dimensions are flattened).
        teacher_emb: ``[B, Dt]``; the widths may differ.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    return _relation_huber(student_emb, teacher_emb, _rkd_distances)


def _relation_huber(student_emb: Tensor, teacher_emb: Tensor, relation: Callable[[Tensor], Tensor]) -> Tensor:
    """Huber (delta 1, mean) between ``relation`` of the student's and of the teacher's (no-grad) embeddings."""
    s = _batch_rows("student_emb", student_emb)
    t = _batch_rows("teacher_emb", teacher_emb)
    _check_batch(student_emb, teacher_emb)
    with torch.no_grad():
        r_t = relation(t)
    r_s = relation(s)
    return F.smooth_l1_loss(r_s, r_t.to(r_s.dtype), reduction="mean", beta=1.0) if s.shape[0] else r_s.sum()


def _rkd_cosines(e: Tensor) -> Tensor:
    """``cos[j, i, k] = <u(e_i - e_j), u(e_k - e_j)>`` with ``u(v) = v / max(||v||, 1e-12)``: ``[B, B, B]``."""
    diff = _unit(e.unsqueeze(0) - e.unsqueeze(1))  # [j, i, D] = unit(e_i - e_j); zero where i == j
    return diff @ diff.transpose(1, 2)


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Angle-wise relational KD, RKD-A (Park et al. 2019, https://arxiv.org/abs/1904.05068).

    For every triple ``(i, j, k)`` of the batch, ``psi_A(i, j, k) = cos angle(e_i, e_j, e_k) = <e^ij, e^kj>`` with
    ``e^ij = (e_i - e_j) / ||e_i - e_j||``. The loss is the Huber (smooth-L1, ``delta = 1``) loss between the
    student's and the teacher's ``[B, B, B]`` cosine tensors, averaged over all ``B^3`` entries. Triples with a
    repeated index (or duplicate embeddings) have a zero difference vector, which is read as the zero vector
    (cosine 0, finite gradient).

    Invariant to scaling, translating and rotating either embedding. The teacher side is computed without gradient.
    Memory is ``O(B^2 D + B^3)``.

    Args:
        student_emb: ``[B, Ds]`` (extra dimensions are flattened).
        teacher_emb: ``[B, Dt]``; the widths may differ.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    return _relation_huber(student_emb, teacher_emb, _rkd_cosines)


def attention_transfer(student_feat: Tensor, teacher_feat: Tensor, *, p: float = 2) -> Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017, https://arxiv.org/abs/1612.03928).

    The attention map of a feature map ``f`` (``[B, C, ...spatial]``) is ``Q = vec(mean_c |f_c|^p)`` (the paper's
    ``F^p_sum`` up to the factor ``C``, which the normalisation removes), and the loss is
    ``mean over items of || Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2 ||_2^2``: the squared L2 distance, a **sum over
    positions**, so a value in ``[0, 2]`` that does not depend on the spatial size. (The authors' code takes the
    mean over positions too, i.e. this value divided by ``H * W``, and compensates with ``beta = 1000``; divide
    the weight accordingly.) An all-zero map is read as the zero vector.

    Args:
        student_feat: ``[B, Cs, ...spatial]`` (at least one spatial dimension).
        teacher_feat: ``[B, Ct, ...spatial]``: the channels may differ, the spatial sizes must match.
        p: Exponent ``p >= 1`` (the paper uses 2; below 1 the derivative of ``|f|^p`` is infinite at 0).

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    if isinstance(p, bool) or not (isinstance(p, numbers.Real) and math.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    s = _floating("student_feat", student_feat)
    t = _floating("teacher_feat", teacher_feat)
    for name, x in (("student_feat", s), ("teacher_feat", t)):
        if x.dim() < 3:
            raise ValueError(f"{name} must have shape [B, C, ...spatial], got {tuple(x.shape)}")
    _check_batch(s, t)
    if s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"student and teacher spatial sizes must match, got {tuple(s.shape[2:])} and {tuple(t.shape[2:])} "
            f"(shapes {tuple(s.shape)} and {tuple(t.shape)}); resize or pool one of them first"
        )

    def attention(f: Tensor) -> Tensor:
        a = f * f if p == 2 else f.abs().pow(p)
        return _unit(a.mean(dim=1).reshape(f.shape[0], -1))

    diff = attention(s) - attention(t)
    return reduce_items((diff * diff).sum(dim=-1))


def similarity_preserving(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, https://arxiv.org/abs/1907.09682).

    With ``Q`` the features flattened to ``[B, D]``, ``G = Q Q^T`` (``[B, B]``) with each row L2-normalised, the
    loss is ``||G_s - G_t||_F^2 / B^2``. A zero row of ``G`` stays zero.

    Args:
        student_feat: ``[B, ...]``.
        teacher_feat: ``[B, ...]``; the widths may differ.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    s = _batch_rows("student_feat", student_feat)
    t = _batch_rows("teacher_feat", teacher_feat)
    _check_batch(student_feat, teacher_feat)
    diff = _unit(s @ s.transpose(0, 1)) - _unit(t @ t.transpose(0, 1))
    return (diff * diff).sum() / max(s.shape[0], 1) ** 2


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment, CKA (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414).

    With ``X`` and ``Y`` column-centred, ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, a similarity in
    ``[0, 1]`` that is 1 for ``y = x`` and invariant to isotropic scaling and orthogonal transforms of either
    side. Computed from ``[D, D]`` cross-covariances or, when the batch is smaller than ``Dx + Dy``, from the
    equal ``[B, B]`` Gram form ``<XX^T, YY^T>_F / (||XX^T||_F ||YY^T||_F)``. Both sides are first divided by their
    Frobenius norm (CKA does not change; float32 cannot overflow). A constant side (zero after centring) gives 0.

    Args:
        x: ``[B, Dx]`` (extra dimensions are flattened).
        y: ``[B, Dy]``.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    a = _batch_rows("x", x)
    b = _batch_rows("y", y)
    _check_batch(x, y)
    tiny = torch.finfo(torch.promote_types(a.dtype, b.dtype)).tiny

    def centred(m: Tensor) -> Tensor:
        m = m - m.mean(dim=0, keepdim=True)
        return m * torch.rsqrt((m * m).sum().clamp(min=tiny))

    a, b = centred(a), centred(b)
    n, da, db = a.shape[0], a.shape[1], b.shape[1]
    if n < da + db:
        k, l_ = a @ a.transpose(0, 1), b @ b.transpose(0, 1)
        cross, self_a, self_b = (k * l_).sum(), (k * k).sum(), (l_ * l_).sum()
    else:
        ba, aa, bb = b.transpose(0, 1) @ a, a.transpose(0, 1) @ a, b.transpose(0, 1) @ b
        cross, self_a, self_b = (ba * ba).sum(), (aa * aa).sum(), (bb * bb).sum()
    return cross / (self_a * self_b).clamp(min=tiny).sqrt()


def cka_loss(x: Tensor, y: Tensor) -> Tensor:
    """``1 - linear_cka(x, y)``: a loss in ``[0, 1]`` that is 0 when the two representations agree up to isotropic
    scaling and an orthogonal transform (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414).

    Args:
        x: Student features ``[B, Dx]`` (extra dimensions are flattened).
        y: Teacher features ``[B, Dy]``.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    return 1.0 - linear_cka(x, y)


def squared_error_per_item(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """``||f_s - f_t||^2`` of each item (dim 0), summed over all its other dimensions: ``[B, ...] -> [B]``.

    The per-item form of :func:`hint_mse`; a student that regresses teacher features scores anomalies with it
    (EfficientAD, Batzner et al. 2024, https://arxiv.org/abs/2303.14535: the student-teacher discrepancy is large
    where the student never saw similar inputs).
    """
    s = _floating("student_feat", student_feat)
    t = _floating("teacher_feat", teacher_feat)
    _check_same_shape("features", s, t)
    if s.dim() < 1:
        raise ValueError(f"features need an item dimension [B, ...], got shape {tuple(s.shape)}")
    diff = s - t
    return _per_item_sum(diff * diff)


def hint_mse(
    student_feat: Tensor,
    teacher_feat: Tensor,
    *,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """FitNets hint loss (Romero et al. 2015, https://arxiv.org/abs/1412.6550).

    Per item (dim 0) the **sum** of squared differences over all its other dimensions, then the module's reduction
    over items: ``sum over kept items of ||f_s - f_t||^2 / N``. (The paper writes ``1/2 ||u_h - r(v_g)||^2``; the
    ``1/2`` is left to the term's weight.) The regressor ``r`` that maps student width to teacher width is a
    projector from ``mentor.taps``, applied before this call.

    Args:
        student_feat: ``[B, ...]``.
        teacher_feat: Exactly the same shape.
        mask: Optional boolean ``[B]``.
        num_items: Explicit normaliser (see module docstring).

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    s = _floating("student_feat", student_feat)
    t = _floating("teacher_feat", teacher_feat)
    _check_same_shape("features", s, t)
    if s.dim() < 1:
        raise ValueError(f"hint_mse needs features [B, ...] with an item dimension, got shape {tuple(s.shape)}")
    diff = s - t
    sq = diff * diff
    if mask is None and not isinstance(num_items, Tensor):
        n = float(max(s.shape[0], 1)) if num_items is None else _positive(num_items)
        return sq.sum() / n
    return reduce_items(_per_item_sum(sq), mask, num_items)


def cosine_embedding(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Cosine embedding loss: ``1 - cos(s, t)`` per item, as DistilBERT aligns hidden states
    (Sanh et al. 2019, https://arxiv.org/abs/1910.01108).

    ``cos = <s, t> / (max(||s||, 1e-8) * max(||t||, 1e-8))`` over the last dimension; every leading dimension
    indexes items (``[B, D]`` or ``[B, T, D]``). A zero vector has cosine 0 (loss 1) with a finite gradient.

    Args:
        student_emb: ``[..., D]``.
        teacher_emb: Exactly the same shape.
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser (see module docstring).

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    s = _floating("student_emb", student_emb)
    t = _floating("teacher_emb", teacher_emb)
    _check_same_shape("embeddings", s, t)
    if s.dim() < 1:
        raise ValueError(f"cosine_embedding needs embeddings [..., D], got shape {tuple(s.shape)}")
    cos = (_unit(s, eps=_COSINE_EPS) * _unit(t, eps=_COSINE_EPS)).sum(dim=-1)
    return reduce_items(1.0 - cos, mask, num_items)


def smooth_l1(
    student: Tensor,
    teacher: Tensor,
    *,
    beta: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Smooth-L1 loss (Girshick 2015, Fast R-CNN, https://arxiv.org/abs/1504.08083), per item summed over the
    last dimension.

    Elementwise, with ``x = s - t``: ``0.5 * x^2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 * beta`` (PyTorch's
    ``smooth_l1_loss``; this is the Huber loss with ``delta = beta`` divided by ``beta``, and equal to it at
    ``beta = 1``). Per item the sum over the last dimension, then the module's reduction over the leading
    dimensions (items).

    Args:
        student: ``[..., D]``.
        teacher: Exactly the same shape.
        beta: Threshold between the quadratic and the linear part (> 0).
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser (see module docstring).

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    s = _floating("student", student)
    t = _floating("teacher", teacher)
    _check_same_shape("tensors", s, t)
    if s.dim() < 1:
        raise ValueError(f"smooth_l1 needs tensors [..., D], got shape {tuple(s.shape)}")
    dtype = torch.promote_types(s.dtype, t.dtype)
    terms = F.smooth_l1_loss(s.to(dtype), t.to(dtype), reduction="none", beta=float(beta))
    return _total(terms, mask, num_items)


# ---------------------------------------------------------------------------------------------------------------
# Sparse (top-k) teacher targets, as stored by mentor.cache
# ---------------------------------------------------------------------------------------------------------------

_TAILS = ("rest", "renormalize")


def _sparse_parts(
    student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor, tail: str, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per item ``sum_b p_b log p_b`` and ``sum_b p_b log q_b`` over the buckets a top-k teacher defines.

    The buckets are the teacher's top-k classes (``tail="renormalize"``), plus one "rest" bucket holding every other
    class (``tail="rest"``). Both results have shape ``[...]``; only the second carries gradient.
    """
    if tail not in _TAILS:
        raise ValueError(f"tail must be 'rest' or 'renormalize', got {tail!r}")
    _check_temperature("temperature", temperature)
    if teacher_values.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_values {tuple(teacher_values.shape)} and teacher_indices {tuple(teacher_indices.shape)} "
            "must have the same shape [..., k]"
        )
    if teacher_indices.dtype.is_floating_point or teacher_indices.dtype == torch.bool:
        raise ValueError(f"teacher_indices must be an integer tensor, got {teacher_indices.dtype}")
    if student_logits.dim() < 1 or student_logits.shape[:-1] != teacher_values.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher top-k {tuple(teacher_values.shape)} must "
            "share their leading (item) dimensions: [..., C] and [..., k]"
        )
    num_classes, k = student_logits.shape[-1], teacher_values.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k size k = {k} must be in [1, {num_classes}] (the student's class count)")
    z = _as_float(student_logits) / temperature
    lowest = torch.finfo(z.dtype).min
    index = teacher_indices.long()
    values = _as_float(teacher_values).to(z.dtype)
    with torch.no_grad():  # the teacher's side: constants
        if tail == "renormalize" or k == num_classes:  # with k = C there is no tail (stored rounding aside)
            log_p = F.log_softmax(values / temperature, dim=-1)
        else:
            # The values are log-probabilities of the full distribution, so the tail holds 1 - sum(exp(values));
            # rounding in a stored fp16/bf16 value can push the sum a hair over 1, which reads as an empty tail.
            rest = (1.0 - values.exp().sum(dim=-1, keepdim=True)).clamp(min=0.0)
            log_p = F.log_softmax(torch.cat([values, rest.log()], dim=-1) / temperature, dim=-1)
        p = log_p.exp()
        neg_entropy = torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
    # sum_b p_b log q_b. Log-probabilities are floored at the lowest finite value (as in kl_div): a class the student
    # masks (-inf) where the teacher has mass gives a huge finite loss instead of inf.
    log_s = F.log_softmax(z, dim=-1)
    cross = (p[..., :k] * log_s.gather(-1, index).clamp(min=lowest)).sum(-1)
    if p.shape[-1] > k:
        # The student's tail, log of its mass outside the teacher's top-k: with the top-k set to the lowest finite
        # value (not -inf, so everything stays finite), log_softmax of the masked logits at any tail class j is
        # z_j - lse(tail), while log_s_j = z_j - lse(all); their difference is log q_rest. j = the tail's largest
        # logit keeps both terms well away from underflow. (Two fused log_softmax calls cost less than logsumexp.)
        masked = z.scatter(-1, index, lowest)
        j = masked.detach().argmax(dim=-1, keepdim=True)
        log_q_rest = log_s.gather(-1, j) - F.log_softmax(masked, dim=-1).gather(-1, j)
        cross = cross + p[..., k] * log_q_rest.squeeze(-1).clamp(min=lowest)
    return neg_entropy, cross


def sparse_kl_div(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    *,
    tail: str = "rest",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """KL divergence from a top-k teacher to the student's full distribution, ``T^2 * sum_items KL / N``.

    The teacher is given by its ``k`` largest log-probabilities (``teacher_values``, normalised over *all*
    classes, so ``1 - sum(exp(values))`` is the mass of the dropped classes) at ``teacher_indices``. Two
    treatments of the dropped classes:

    * ``tail="renormalize"``: the teacher's top-k probabilities renormalised to sum 1 (the dropped classes get 0).
      This equals :func:`kl_div` with the teacher's logits set to ``-inf`` outside its top-k.
    * ``tail="rest"``: ``k + 1`` buckets, the top-k classes and one "rest" bucket holding the dropped mass; the
      student's rest bucket is the sum of its probabilities outside the teacher's top-k. At ``T = 1`` this is
      exactly the KL between the two distributions coarsened to these buckets. At ``T != 1`` the rest bucket is
      tempered as a single class (``m^(1/T)`` before renormalising), which is exact only at ``T = 1``.

    With ``k = C`` both treatments equal :func:`kl_div` on the full teacher distribution. Sparse top-k targets as in
    "Sparse Logit Sampling" (Anshumann et al. 2025, https://arxiv.org/abs/2503.16870) discuss the bias of plain
    top-k truncation that the rest bucket avoids.

    Args:
        student_logits: ``[..., C]``.
        teacher_values: ``[..., k]`` teacher log-probabilities (full-distribution normalised).
        teacher_indices: ``[..., k]`` class indices of those values (any integer dtype).
        tail: ``"rest"`` or ``"renormalize"``.
        temperature: Softmax temperature (> 0) for both sides; the result is scaled by ``T^2``.
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser (see module docstring).

    Returns:
        A scalar tensor.
    """
    neg_entropy, cross = _sparse_parts(student_logits, teacher_values, teacher_indices, tail, temperature)
    return _total((neg_entropy - cross).unsqueeze(-1), mask, num_items, temperature**2)


def sparse_soft_cross_entropy(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    *,
    tail: str = "rest",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Cross-entropy ``-T^2 * sum_items sum_b p_b log q_b / N`` over the buckets of a top-k teacher.

    The buckets and the two tail treatments are those of :func:`sparse_kl_div`; this differs from it by the
    teacher's (constant) entropy over the buckets.

    Args:
        student_logits: ``[..., C]``.
        teacher_values: ``[..., k]`` teacher log-probabilities (full-distribution normalised).
        teacher_indices: ``[..., k]`` class indices of those values.
        tail: ``"rest"`` or ``"renormalize"``.
        temperature: Softmax temperature (> 0); the result is scaled by ``T^2``.
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _, cross = _sparse_parts(student_logits, teacher_values, teacher_indices, tail, temperature)
    return _total(cross.unsqueeze(-1), mask, num_items, -(temperature**2))


def freematch_fairness(
    student_logits: Tensor,
    class_probs: Tensor,
    label_hist: Tensor,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """FreeMatch's self-adaptive fairness term (Wang et al. 2023, https://arxiv.org/abs/2205.07246, eq. 11).

    Over the kept items (``mask``: the confident ones) of the student's strong-view predictions ``p_b =
    softmax(z_b)``, with their mean ``p_bar`` and arg-max histogram ``h_bar`` (shares summing to 1), and the
    running class probabilities ``p~`` and histogram ``h~`` of :class:`mentor.targets.FreeMatch`::

        L_f = -H(SumNorm(p~ / h~), SumNorm(p_bar / h_bar)) = sum_c a_c log(b_c + 1e-12)

    with ``H(a, b) = -sum_c a_c log b_c``, ``SumNorm(v) = v / sum(v)`` and ``1 / 0`` read as 0 (a class with an
    empty histogram contributes nothing). It is negative; minimising it raises the cross-entropy of the batch's
    modulated mean prediction against the running one, i.e. spreads the average prediction over the classes (the
    paper's sign). Gradients flow through ``p_bar`` only; ``h_bar``, ``p~`` and ``h~`` are constants. A
    batch-level loss (``Term(reduction="batch")``); with no kept item it is a zero that keeps the graph.

    Args:
        student_logits: ``[B, C]``.
        class_probs: ``p~`` ``[C]``.
        label_hist: ``h~`` ``[C]``.
        mask: Optional boolean ``[B]``.

    Returns:
        A scalar tensor.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [B, C], got {tuple(student_logits.shape)}")
    num_classes = student_logits.shape[1]
    for name, v in (("class_probs", class_probs), ("label_hist", label_hist)):
        if tuple(v.shape) != (num_classes,):
            raise ValueError(f"{name} must have shape [{num_classes}], got {tuple(v.shape)}")
    logits = _as_float(student_logits)
    if mask is not None:
        if tuple(mask.shape) != (logits.shape[0],):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape ({logits.shape[0]},)")
        logits = logits[mask.to(torch.bool)]
    if logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    probs = torch.softmax(logits, dim=-1)
    hist = torch.bincount(probs.detach().argmax(dim=-1), minlength=num_classes).to(probs.dtype)
    hist = hist / hist.sum()

    def inverse(v: Tensor) -> Tensor:
        return torch.where(v > 0, 1.0 / v, torch.zeros((), dtype=v.dtype, device=v.device))

    running = class_probs.detach().to(probs) * inverse(label_hist.detach().to(probs))
    running = running / running.sum()
    batch = probs.mean(dim=0) * inverse(hist)
    batch = batch / batch.sum()
    return (running * torch.log(batch + 1e-12)).sum()


# ---------------------------------------------------------------------------------------------------------------
# Different vocabularies
# ---------------------------------------------------------------------------------------------------------------


def uld_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: NumItems = None,
) -> Tensor:
    """Universal Logit Distillation's sorted-probability distance (Boizard et al. 2024,
    https://arxiv.org/abs/2402.12030), for a student and a teacher with **different vocabularies**.

    Per item, both distributions ``p_s = softmax(student / T)`` over ``Vs`` classes and ``p_t = softmax(teacher /
    T)`` over ``Vt`` classes are sorted in decreasing order, the shorter one is padded with zeros to
    ``V = max(Vs, Vt)``, and the distance is ``sum_r |p_s,(r) - p_t,(r)|`` (the closed form of the Wasserstein-1
    distance that ULD derives for a uniform transport cost; it ignores which token is which, so no vocabulary
    mapping is needed). The loss is ``T^2 * sum over items / N`` like every logit-distribution loss here. Items are
    token positions the caller has already paired (ULD truncates both answers to the shorter length).

    Args:
        student_logits: ``[..., Vs]``.
        teacher_logits: ``[..., Vt]``; the leading (item) dimensions must match the student's.
        temperature: Softmax temperature (> 0); the result is scaled by ``T^2``.
        mask: Optional boolean or float (per-item weights) ``[...]``.
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor (float32 for half precision inputs).
    """
    _check_temperature("temperature", temperature)
    if student_logits.dim() < 1 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must share "
            "their leading (item) dimensions: [..., Vs] and [..., Vt]"
        )
    p_s = F.softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_as_float(teacher_logits) / temperature, dim=-1)
    dtype = torch.promote_types(p_s.dtype, p_t.dtype)
    p_s, p_t = p_s.to(dtype), p_t.to(dtype)
    width = max(p_s.shape[-1], p_t.shape[-1])
    sorted_s = F.pad(p_s.sort(dim=-1, descending=True).values, (0, width - p_s.shape[-1]))
    sorted_t = F.pad(p_t.sort(dim=-1, descending=True).values, (0, width - p_t.shape[-1]))
    return _total((sorted_s - sorted_t).abs(), mask, num_items, temperature**2)
