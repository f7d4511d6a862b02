"""Evaluation: accuracy, agreement with the teacher, KL to the teacher, calibration, size and latency.

``evaluate`` runs a model (and optionally a teacher) over a dataset in eval mode without gradients and returns plain
floats. KL to the teacher is ``mentor.losses.kl_div`` at temperature 1 (mean ``KL(p_teacher || p_student)`` per
item); calibration is the expected calibration error (ECE) of the top-1 confidence over equal-width bins
(Guo et al. 2017, https://arxiv.org/abs/1706.04599).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from mentor import losses
from mentor.data import UNLABELLED, TensorData
from mentor.models import count_parameters
from mentor.teachers import Teacher, as_outputs

__all__ = ["evaluate", "expected_calibration_error", "reliability_bins", "latency_ms", "predict",
           "feature_discrepancy"]


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, batch_size: int = 1000, device: torch.device | str = "cpu") -> Tensor:
    """Logits of ``model`` on every item of ``data`` (eval mode; the mode is restored after). ``[N, C]``, float32."""
    was_training = model.training
    model.eval()
    try:
        out = [as_outputs(model(x.to(device)))["logits"].float().cpu() for x, _ in data.batches(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin: ``lower``, ``upper``, ``count``, ``confidence`` (mean), ``accuracy``.

    Args:
        probs: ``[N, C]`` probabilities.
        labels: ``[N]`` integer labels.
        n_bins: Equal-width bins over ``(0, 1]``.
    """
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    rows = []
    for i in range(n_bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        in_bin = (conf.double() > lo) & (conf.double() <= hi)
        count = int(in_bin.sum())
        rows.append({
            "lower": lo,
            "upper": hi,
            "count": float(count),
            "confidence": float(conf.double()[in_bin].mean()) if count else 0.0,
            "accuracy": float(correct[in_bin].mean()) if count else 0.0,
        })
    return rows


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    n = labels.shape[0]
    if n == 0:
        raise ValueError("expected_calibration_error needs at least one item")
    return sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels, n_bins))


@torch.no_grad()
def latency_ms(model: nn.Module, batch: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on ``batch`` in milliseconds (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            if batch.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorData,
    teacher: Teacher | None = None,
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    n_bins: int = 15,
    timing: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data``.

    Returns:
        ``accuracy`` and ``ece`` (over labelled items), ``agreement`` (top-1 agreement with the teacher) and
        ``kl_to_teacher`` when a teacher is given, ``params``, and ``latency_ms`` (one batch of ``batch_size``)
        when ``timing``. For sequence data (labels ``[N, T]``, language models) the metrics of
        :func:`mentor.lm.loop.evaluate_lm` instead: perplexity, token accuracy, token agreement and KL with the
        teacher on target positions, exact match on a prompt task.
    """
    if data.y.dim() > 1:
        from mentor.lm.loop import evaluate_lm

        lm_result = evaluate_lm(model, data, teacher, batch_size=min(batch_size, 256), device=device)
        if timing:
            lm_result["latency_ms"] = latency_ms(model, data.x[:batch_size].to(device))
        return lm_result
    logits = predict(model, data, batch_size, device)
    labels = data.y
    labelled = labels != UNLABELLED
    result: dict[str, Any] = {"params": count_parameters(model)}
    if bool(labelled.any()):
        probs = torch.softmax(logits[labelled], dim=-1)
        result["accuracy"] = float((logits[labelled].argmax(-1) == labels[labelled]).double().mean())
        result["ece"] = expected_calibration_error(probs, labels[labelled], n_bins)
    if teacher is not None:
        t_logits = torch.cat(
            [teacher.targets(x.to(device))["logits"].float().cpu() for x, _ in data.batches(batch_size)]
        )
        result["agreement"] = float((logits.argmax(-1) == t_logits.argmax(-1)).double().mean())
        result["kl_to_teacher"] = float(losses.kl_div(logits.double(), t_logits.double()))
    if timing:
        result["latency_ms"] = latency_ms(model, data.x[:batch_size].to(device))
    return result


@torch.no_grad()
def feature_discrepancy(
    student: nn.Module,
    teacher: nn.Module,
    method: Any,
    data: TensorData,
    projectors: nn.Module | None = None,
    *,
    feature: str | None = None,
    batch_size: int = 1000,
) -> Tensor:
    """Per-item ``||P(f_s) - f_t||^2`` of a feature a method taps (the anomaly score of ``feature_regression``).

    Args:
        student: The trained student.
        teacher: The teacher network.
        method: The method whose :class:`~mentor.method.Feature` list names the taps (e.g. ``feature_regression()``).
        data: Items to score.
        projectors: The trained projectors (``FitResult.projectors``), for features that have one.
        feature: Which feature (default: the method's first).
        batch_size: Items per forward.

    Returns:
        ``[N]`` float32 scores (higher: less like the student's training data).
    """
    from mentor.taps import FeaturePairs

    name = feature or method.features[0].name
    pairs = FeaturePairs(method.features, student, teacher, data.x[:2])
    if projectors is not None:
        pairs.projectors = projectors  # type: ignore[assignment]
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    scores = []
    try:
        for x, _ in data.batches(batch_size):
            s_out: dict[str, Tensor] = {}
            t_out: dict[str, Tensor] = {}
            with pairs.capture():
                teacher(x)
                student(x)
            pairs.merge(s_out, t_out)
            scores.append(losses.squared_error_per_item(s_out[f"feat.{name}"], t_out[f"feat.{name}"]).float())
    finally:
        student.train(was[0])
        teacher.train(was[1])
    return torch.cat(scores)

