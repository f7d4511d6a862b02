"""Training-free student selection: rank candidate students for a teacher at initialisation (DisWOT).

DisWOT (Dong, Li & Wei 2023, "DisWOT: Student Architecture Search for Distillation WithOut Training",
https://arxiv.org/abs/2303.15678) predicts which student will distil best from a teacher by comparing, on a few
batches and **without training the student**, two similarity matrices of the teacher's and the student's
penultimate features: a *semantic* one (how the classes relate in the class-activation signal) and a *relational*
one (how the items of the batch relate). The two distances are added; the smaller the sum, the better the student
is predicted to distil.

What mentor computes on each batch ``(x, y)``, with ``h`` the tapped feature (by default the input of the module
named ``classifier``, i.e. the penultimate feature, flattened to ``[B, D]``) and ``z`` the logits ``[B, K]``:

* **Relational distance** (the paper's sample-relation metric): the ``[B, B]`` batch correlation matrices ``h h^T``
  of teacher and student, each row L2-normalised, compared by the mean squared row difference. That is
  ``B * mentor.losses.similarity_preserving(h_s, h_t)`` (similarity-preserving KD divides the same squared
  Frobenius distance by ``B^2``; multiplying by ``B`` makes it a per-row mean in ``[0, 4]`` that does not shrink
  with the batch size). Uncentred, as in the paper; linear CKA would centre the features first.
* **Semantic distance** (the paper's Grad-CAM-based inter-class metric): Grad-CAM weights a model's features by
  the gradient of the class *score* (the pre-softmax logit ``z_c``). For a classifier fed by ``h`` that gradient,
  taken with respect to the classifier's weight and summed over the batch for each item's true class, is
  ``M = Y^T h`` (``[K, D]``, ``Y`` the one-hot labels): each row is the class-conditional activation of one class,
  what Grad-CAM's gradient-weighted activations reduce to for flat (non-spatial) features. The ``[K, K]`` class
  correlation matrices ``M M^T`` of teacher and student, row-normalised, are compared like the relational ones:
  ``K * similarity_preserving(M_s, M_t)``. ``K`` is the same for both models, so the widths ``D`` may differ.
  The class score, not the cross-entropy, is differentiated (as in Grad-CAM): the cross-entropy gradient
  ``softmax(z) - Y`` vanishes for a trained teacher on the items it fits, which leaves a few misfit items to
  decide the teacher's matrix. Items with a negative (unlabelled) label take the teacher's arg-max as their label;
  a class absent from a batch gives a zero row (compared as zero on both sides).

Both distances are averaged over the batches and returned negated, so that **higher is better** and a student that
equals the teacher (same architecture and weights) scores exactly ``0``, the maximum:
``score = semantic + relational = -(D_semantic + D_relational)``, the paper's unweighted sum.

The paper reports that the metric also works with a randomly initialised teacher; here the teacher is whatever
model is given (``mentor select`` uses the trained teacher of the base config).

The loss math lives in :mod:`mentor.losses` (``similarity_preserving``); this module only taps features, forms the
class-conditional sums and combines the two numbers. Scoring runs both models in eval mode (their train/eval flags
are restored afterwards) and never changes or trains a parameter; given the batches it is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor import losses
from mentor.config import ConfigError, RunConfig
from mentor.models import count_parameters
from mentor.taps import Taps

__all__ = ["score_candidate", "select_batches", "rank_candidates"]


def _features_and_logits(model: nn.Module, layer: str, x: Tensor, inputs: bool, who: str) -> tuple[Tensor, Tensor]:
    """One forward without gradients: the tapped feature ``[B, D]`` and the logits ``[B, K]``."""
    taps = Taps(model, [layer], inputs=inputs, clone=True)
    with taps, torch.no_grad():
        out = model(x)
    feature = taps.pop()[layer]
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"score_candidate: the {who} must return logits [B, classes], got {shape}")
    if feature.dim() < 2 or feature.shape[0] != x.shape[0]:
        raise ValueError(f"score_candidate: the {who}'s feature at {layer!r} has shape {tuple(feature.shape)}; "
                         f"expected [B, ...] with B = {x.shape[0]}")
    return feature.reshape(feature.shape[0], -1).float(), out.float()


def _class_activation(feature: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``Y^T h``: gradient of the summed true-class logits w.r.t. a linear classifier's weight, ``[K, D]``."""
    return F.one_hot(labels, num_classes).to(feature.dtype).transpose(0, 1) @ feature


def score_candidate(
    teacher: nn.Module,
    student: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    teacher_layer: str = "classifier",
    student_layer: str = "classifier",
    inputs: bool = True,
) -> dict[str, float]:
    """DisWOT score of ``student`` (as it is, untrained) for ``teacher`` on ``batches`` (see the module docstring).

    Args:
        teacher: The teacher network (usually trained).
        student: The candidate student, at initialisation.
        batches: ``(x, y)`` pairs; ``y`` are integer labels (negative: unlabelled, the teacher's arg-max is used).
        teacher_layer: The teacher's module whose input (``inputs=True``) or output is the compared feature.
        student_layer: The same for the student.
        inputs: Tap the modules' inputs (the penultimate features when the layer is the classifier) or outputs.

    Returns:
        ``{"semantic": -D_sem, "relational": -D_rel, "score": semantic + relational}``, means over the batches;
        each distance is in ``[0, 4]``, so the score is in ``[-8, 0]`` and higher predicts a better student.

    Raises:
        ValueError: No batches, a batch of fewer than 2 items, a layer name that is not a submodule, models that
            do not return ``[B, K]`` logits, or teacher and student with different numbers of classes.
    """
    if len(batches) == 0:
        raise ValueError("score_candidate: batches is empty; expected at least one (x, y) batch")
    flags = [(m, m.training) for m in (*teacher.modules(), *student.modules())]
    teacher.eval()
    student.eval()
    semantic: list[float] = []
    relational: list[float] = []
    try:
        for i, (x, y) in enumerate(batches):
            if x.shape[0] < 2 or y.shape != (x.shape[0],):
                raise ValueError(f"score_candidate: batch {i} has inputs {tuple(x.shape)} and labels "
                                 f"{tuple(y.shape)}; expected at least 2 items and labels [B]")
            h_t, z_t = _features_and_logits(teacher, teacher_layer, x, inputs, "teacher")
            h_s, z_s = _features_and_logits(student, student_layer, x, inputs, "student")
            if z_t.shape[1] != z_s.shape[1]:
                raise ValueError(f"score_candidate: the teacher has {z_t.shape[1]} classes and the student "
                                 f"{z_s.shape[1]}; expected the same number")
            labels = torch.where(y >= 0, y, z_t.argmax(dim=1)).long()
            num_classes = z_t.shape[1]
            if bool((labels >= num_classes).any()):
                raise ValueError(f"score_candidate: batch {i} has label {int(labels.max())}; the models have "
                                 f"{num_classes} classes (expected labels 0..{num_classes - 1})")
            m_t = _class_activation(h_t, labels, num_classes)
            m_s = _class_activation(h_s, labels, num_classes)
            semantic.append(float(losses.similarity_preserving(m_s, m_t)) * num_classes)
            relational.append(float(losses.similarity_preserving(h_s, h_t)) * h_t.shape[0])
    finally:
        for module, flag in flags:
            module.training = flag
    sem = -sum(semantic) / len(semantic)
    rel = -sum(relational) / len(relational)
    return {"semantic": sem, "relational": rel, "score": sem + rel}


def select_batches(x: Tensor, y: Tensor, num_batches: int, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``num_batches`` disjoint batches of ``batch_size`` items drawn without replacement with ``seed``.

    Fewer (or a smaller last batch) when the data has fewer items; every batch has at least 2 items.
    """
    if num_batches < 1 or batch_size < 2:
        raise ValueError(f"expected num_batches >= 1 and batch_size >= 2, got {num_batches} and {batch_size}")
    n = int(x.shape[0])
    if n < 2:
        raise ValueError(f"the data has {n} item(s); scoring needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: num_batches * batch_size]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks = chunks[:-1]
    return [(x[c], y[c]) for c in chunks]


def rank_candidates(
    config: RunConfig,
    candidates: Sequence[RunConfig],
    *,
    num_batches: int = 4,
    batch_size: int = 64,
    names: Sequence[str] | None = None,
    teacher_layer: str = "classifier",
    student_layer: str = "classifier",
) -> list[dict[str, Any]]:
    """Score every candidate's student for the teacher of ``config``, best first.

    The teacher comes from ``config.teacher`` (:func:`mentor.run.load_teacher`); the batches are drawn with
    ``config.seed`` from the training data of ``config`` (:func:`mentor.run.load_data`); each candidate's student is
    built from its own ``student`` section and seed (:func:`mentor.run.build_student`) and scored untrained.

    Args:
        config: The base config; it must name a teacher.
        candidates: One config per candidate student (only ``student`` and ``seed`` are read).
        num_batches: Batches to average over.
        batch_size: Items per batch.
        names: One label per candidate (default: each config's ``name``).
        teacher_layer, student_layer: See :func:`score_candidate`.

    Returns:
        Rows ``{"rank", "name", "model", "params", "score", "semantic", "relational", "seconds"}`` sorted by
        ``score``, highest (best) first; ties keep the candidates' order.

    Raises:
        ConfigError: ``config`` has no teacher, no candidates, or names of the wrong length.
    """
    from mentor.run import build_student, load_data, load_teacher

    if config.teacher is None:
        raise ConfigError("select needs a teacher: set 'teacher.run' or 'teacher.checkpoint' in the base config")
    if not candidates:
        raise ConfigError("select needs at least one candidate config")
    labels = [c.name for c in candidates] if names is None else list(names)
    if len(labels) != len(candidates):
        raise ConfigError(f"got {len(labels)} names for {len(candidates)} candidates; expected one name each")
    teacher = load_teacher(config.teacher)
    train_data, _ = load_data(config)
    batches = select_batches(train_data.x, train_data.y, num_batches, batch_size, config.seed)
    rows: list[dict[str, Any]] = []
    for label, cand in zip(labels, candidates, strict=True):
        start = time.perf_counter()
        student = build_student(cand)
        scores = score_candidate(teacher, student, batches, teacher_layer=teacher_layer,
                                 student_layer=student_layer)
        rows.append({"name": label, "model": cand.student.model, "params": count_parameters(student), **scores,
                     "seconds": time.perf_counter() - start})
    rows.sort(key=lambda r: -r["score"])
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]
