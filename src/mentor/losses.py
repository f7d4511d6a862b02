"""Loss functions: pure functions over tensors.

Every loss in mentor lives here and nowhere else. The functions hold no state, touch no model and parse no
configuration. They share one contract:

* **Items.** A logit tensor has shape ``[..., classes]``; every leading dimension indexes *items* (a batch of
  examples ``[B, C]``, or a batch of token positions ``[B, T, V]``).
* **Reduction.** A loss is ``sum over kept items of loss_item / N``. The optional boolean ``mask`` (shape
  ``[...]``) keeps items where it is ``True``. ``N`` is ``num_items`` when given, else the number of kept items.
  Passing the item count of a whole accumulated batch as ``num_items`` makes gradient accumulation over
  micro-batches of any size give exactly the gradient of one large batch.
* **Precision.** Softmax and log-softmax run in float32 when the inputs are float16 or bfloat16 (float64 inputs
  stay float64, which the tests use).
* **Temperature.** Logit-distribution losses divide logits by ``temperature`` and multiply the result by
  ``temperature ** 2`` so that gradient magnitudes stay comparable across temperatures
  (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reduce_items",
    "kl_div",
    "generalized_jsd",
    "skew_kl",
    "tvd",
    "soft_cross_entropy",
    "cross_entropy",
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
        mask: Optional boolean tensor of the same shape; ``False`` drops the item.
        num_items: Explicit normaliser ``N``. Defaults to the number of kept items. When nothing is kept and no
            normaliser is given the result is a zero that still carries the graph.

    Returns:
        A scalar tensor.
    """
    if mask is not None:
        if mask.shape != per_item.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(per_item.shape)}")
        mask = mask.to(torch.bool)
        # where() rather than multiply: a masked item with a non-finite loss must not turn the sum into NaN.
        per_item = torch.where(mask, per_item, torch.zeros((), dtype=per_item.dtype, device=per_item.device))
    total = per_item.sum()
    if num_items is None:
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
        mask: Optional boolean ``[...]``.
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
    # is +inf, comes out as a huge finite number instead.
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
        mask: Optional boolean ``[...]``.
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
    _check_pair(student_logits, teacher_logits)
    _check_temperature("temperature", temperature)
    log_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_as_float(teacher_logits) / temperature, dim=-1)
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
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _check_pair(student_logits, teacher_logits)
    _check_unit("alpha", alpha, open_right=True)
    _check_temperature("temperature", temperature)
    log_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_as_float(teacher_logits) / temperature, dim=-1)
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
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser.

    Returns:
        A scalar tensor.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature("temperature", temperature)
    p_s = F.softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_as_float(teacher_logits) / temperature, dim=-1)
    return _total((p_t - p_s).abs(), mask, num_items, 0.5 * temperature**2)


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
        mask: Optional boolean ``[...]``.
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
        mask: Optional boolean ``[...]``.
        num_items: Explicit normaliser; defaults to the number of kept, labelled items.

    Returns:
        A scalar tensor.
    """
    _check_unit("label_smoothing", label_smoothing)
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(student_logits.shape)} "
            "without its class dimension"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match item shape {tuple(target.shape)}")
    logits = _as_float(student_logits)
    num_classes = logits.shape[-1]
    # One fused kernel over the kept items; with smoothing e it sums (1 - e) * nll - e * mean_c log p. Items not
    # kept get a label the kernel skips: -1 when every negative label is to be dropped (a single clamp maps them
    # all to -1), else ignore_index. An out-of-range label makes the kernel raise.
    if ignore_index < 0:
        skip = -1
        safe = (target if mask is None else torch.where(mask.to(torch.bool), target, skip)).clamp(min=skip)
    else:
        skip = ignore_index
        keep_ = (target >= 0) if mask is None else (target >= 0) & mask.to(torch.bool)
        safe = torch.where(keep_, target, skip)
    try:
        total = F.cross_entropy(
            logits.reshape(-1, num_classes), safe.reshape(-1), ignore_index=skip, reduction="sum",
            label_smoothing=label_smoothing,
        )
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
