"""The loop: one function, :func:`fit`, for every method.

Each optimisation step:

    teacher targets  = teacher.targets(x)                      # no grad, teacher never wrapped or optimised
    loss             = sum_i w_i(step) * term_i(student(x), targets, labels)
    optimizer.step(); lr_scheduler.step(); teacher.update(student, step)   # explicit state updates

It runs on HF Accelerate (one process, or DDP/FSDP/DeepSpeed under ``accelerate launch``; CPU or GPU; mixed
precision where the device has it).

**Batches and exact normalisation.** A *global batch* has ``batch_size * grad_accum * num_processes`` items. Every
epoch draws a permutation from ``(seed, epoch)``; step ``s`` takes items ``perm[s*G:(s+1)*G]``, split into
``grad_accum`` micro-batches, each split across processes. Every loss term is divided by the number of items it
covers in the whole global batch (the ``num_items`` of :mod:`mentor.losses`), not by the micro-batch size, so
micro-batch 2 x 4 accumulation steps equals micro-batch 8 x 1 step, and 2 processes equal 1 process with the same
global batch. An incomplete last global batch is dropped.

**Checkpoints and exact resume.** Every ``checkpoint_every`` steps and at the end the loop writes
``checkpoints/step_<N>/`` (student and teacher state as safetensors, optimiser and scheduler state, RNG states, the
position in the data) to a temporary folder and renames it, then points ``checkpoints/latest`` at it. ``resume=True``
continues from ``latest``: data order, dropout RNG and optimiser state continue exactly, so on the CPU the final
weights equal those of an uninterrupted run bit for bit. Rows of ``metrics.jsonl`` logged after that checkpoint by
the interrupted run are dropped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mentor import atomic
from mentor.data import UNLABELLED, TensorData, check_data
from mentor.eval import evaluate
from mentor.method import BatchContext, Method, compute_terms
from mentor.semi import SemiData, Weighings, combine
from mentor.taps import FeaturePairs
from mentor.teachers import Teacher, as_outputs
from mentor.views import Views

__all__ = ["Optim", "FitResult", "NonFiniteLossError", "fit", "build_optimizer", "save_model", "load_model_weights",
           "check_setup"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the term."""


@dataclass(frozen=True)
class Optim:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        lr: Peak learning rate (> 0).
        weight_decay: Decoupled (AdamW) or L2 (SGD, Adam) weight decay (>= 0).
        momentum: SGD momentum.
        schedule: ``"constant"``, ``"cosine"`` (to 0 at the last step) or ``"linear"`` (to 0).
        warmup_steps: Linear warm-up from 0 over this many steps.
        grad_clip: Clip the global gradient norm to this value (``None``: no clipping).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optim.name must be one of 'adamw', 'adam', 'sgd', got {self.name!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.schedule must be one of 'constant', 'cosine', 'linear', got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


def build_optimizer(params: Sequence[nn.Parameter], optim: Optim) -> torch.optim.Optimizer:
    """The optimiser ``optim`` names, over ``params``."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _lr_factor(optim: Optim, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(total_steps - optim.warmup_steps, 1)
        frac = min(max(step - optim.warmup_steps, 0) / span, 1.0)
        if optim.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        student: The trained student (unwrapped, on the training device).
        metrics: Final evaluation metrics (``accuracy``, ``agreement``, ``kl_to_teacher``, ``ece``, ...).
        history: One dict per logged row (steps and evaluations), as in ``metrics.jsonl``.
        steps: Optimisation steps taken in total.
        out: The run directory, if any.
        projectors: The trained feature projectors of a method with projected features (not part of the student).
        teacher: The teacher the run used (for a method that builds its own, the EMA teacher or ``Self``).
        weightings: The weighting object of each weighted term (see :class:`mentor.method.Weigh`), by term name.
    """

    student: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    out: Path | None = None
    projectors: nn.Module | None = None
    teacher: Teacher | None = None
    weightings: dict[str, Any] = field(default_factory=dict)


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write a model's state dict to ``path`` as safetensors, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic.replacing(path) as tmp:
        save_file(state, str(tmp))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``; a missing file or a state of another architecture is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file: {err}") from err
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if wrong:
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                              for k in wrong[:5])
            )
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit model {type(model).__name__} (another architecture?): "
            + "; ".join(parts)
        )
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _write_checkpoint(
    ckpt_root: Path,
    step: int,
    student: nn.Module,
    teacher: Teacher | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: dict[str, Any],
    keep_last: int,
    loop_state: Mapping[str, Tensor] | None = None,
    projectors: nn.Module | None = None,
) -> Path:
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
              str(tmp / "student.safetensors"))
    teacher_state = getattr(teacher, "state_dict", None)
    if callable(teacher_state):
        save_file({k: v.detach().contiguous().cpu() for k, v in teacher_state().items()},
                  str(tmp / "teacher.safetensors"))
    rng: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    if loop_state:
        save_file({k: v.detach().contiguous().cpu() for k, v in loop_state.items()}, str(tmp / "loop.safetensors"))
    if projectors is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()},
                  str(tmp / "projectors.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({**position, "rng": _rng_state()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic.write_text(ckpt_root / "latest", final.name)
    kept = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_checkpoint(ckpt_root: Path) -> Path:
    latest = ckpt_root / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint in {str(ckpt_root)!r} (expected a 'latest' file)")
    path = ckpt_root / latest.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"cannot resume: checkpoint {str(path)!r} is incomplete or missing")
    return path


# ------------------------------------------------------------------------------------------------------ loop


def _fresh_accelerate_state() -> None:
    """Let each ``fit`` in one single-process Python session choose its own device and precision.

    Accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another ``mixed_precision``
    ("AcceleratorState has already been initialized and cannot be changed"), so a notebook that calls ``fit`` with
    bf16 and then without it would fail. In a single process nothing else depends on that state between fits, so
    it is reset; under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) the launcher's state is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _micro_batches(index: Tensor, grad_accum: int, world: int, rank: int) -> list[Tensor]:
    per = index.shape[0] // (grad_accum * world)
    return list(index.view(grad_accum, world, per)[:, rank])


def _epoch_item_counts(
    method: Method, labels: Tensor, perm: Tensor, steps: int, global_batch: int
) -> list[dict[str, float]]:
    """Per step of an epoch, the number of items each term covers in the whole global batch (at least 1).

    With sequence labels ``[N, T]`` the items are positions: a ``"labelled"`` term counts the target positions
    (labels >= 0) of the global batch, an ``"all"`` term every position."""
    every = float(global_batch * (labels[0].numel() if labels.dim() > 1 else 1))
    labelled = [every] * steps
    if method.needs_labels or any(t.items == "unlabelled" for t in method.terms):
        used = labels[perm[: steps * global_batch]].reshape(steps, -1)
        labelled = (used >= 0).sum(dim=1).double().tolist()
    return [
        {t.name: max(labelled[i] if t.items == "labelled" else every - labelled[i]
                     if t.items == "unlabelled" else every, 1.0) for t in method.terms}
        for i in range(steps)
    ]


def _num_items(method: Method, labelled: float, every: float) -> dict[str, float]:
    """Each term's normaliser from the step's count of labelled items (target positions) and of all items."""
    return {t.name: max(labelled if t.items == "labelled" else every - labelled if t.items == "unlabelled" else every,
                        1.0) for t in method.terms}


def check_setup(student: nn.Module, teacher: Teacher | None, method: Method, data: TensorData, name: str) -> int:
    """Dry-run one tiny batch through student and teacher; return the class count. Fails before any training."""
    if method.needs_teacher and teacher is None:
        raise ValueError(f"recipe {method.name!r} needs a teacher, but none was given (set 'teacher' in the config)")
    check_data(data, name)
    if method.needs_labels and data.num_labelled == 0:
        raise ValueError(
            f"recipe {method.name!r} needs labelled training data, but {name} has no labels "
            "(use a labelled split, or a recipe without label terms such as transfer_kd)"
        )
    x = data.x[:2]
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            s_logits = as_outputs(student(x))["logits"]
    except Exception as err:
        raise ValueError(f"the student cannot run on {name} items of shape {tuple(x.shape[1:])}: {err}") from err
    finally:
        student.train(was_training)
    num_classes = int(s_logits.shape[-1])
    if teacher is not None and method.needs_teacher:
        indexed = getattr(teacher, "needs_index", False)
        if indexed and hasattr(teacher, "check_data"):
            teacher.check_data(data.x)  # a cache built on other data is refused here, with both fingerprints
        try:
            t_out = (teacher.targets(x, index=torch.arange(x.shape[0])) if indexed  # type: ignore[call-arg]
                     else teacher.targets(x))
        except Exception as err:
            raise ValueError(f"the teacher cannot run on {name} items of shape {tuple(x.shape[1:])}: {err}") from err
        t_classes = int(t_out["logits"].shape[-1]) if "logits" in t_out else getattr(teacher, "num_classes", None)
        check_method = getattr(teacher, "check_method", None)
        if callable(check_method):  # a teacher in another vocabulary (lm.cross) says which terms may read it
            check_method(method, num_classes, t_classes)
        elif t_classes is not None and t_classes != num_classes:
            raise ValueError(
                f"teacher has {t_classes} output classes but the student has {num_classes}: "
                "expected the same number of classes (language models with different tokenizers: recipe "
                "cross_tokenizer_kd with a mentor.lm.cross.CrossTokenizer teacher)"
            )
    if method.features:
        _feature_pairs(method, student, teacher, data.x[:2])  # module names, shapes and projectors, checked
    check_data(data, name, num_classes)
    return num_classes


def _feature_pairs(method: Method, student: nn.Module, teacher: Teacher | None, example: Tensor) -> FeaturePairs:
    teacher_net = getattr(teacher, "model", None)
    stored = getattr(teacher, "feature_shapes", None)
    if not isinstance(teacher_net, nn.Module) and callable(stored):  # features read from a teacher cache
        return FeaturePairs(method.features, student, None, example, teacher_features=stored())
    if not isinstance(teacher_net, nn.Module) and all(f.teacher is None for f in method.features):
        teacher_net = None  # student-side features only (branches into the logit space): no teacher network needed
    elif not isinstance(teacher_net, nn.Module):
        raise ValueError(
            f"recipe {method.name!r} compares intermediate features, which needs a teacher network "
            f"(teachers.Frozen or teachers.EMA), got {type(teacher).__name__}"
        )
    return FeaturePairs(method.features, student, teacher_net, example)


def _lm_training_forwards(method: Method, student: nn.Module, teacher: Teacher | None) -> tuple[
    nn.Module | None, Teacher | None
]:
    """The training forwards of chunked LM terms (:func:`mentor.lm.losses.chunked_loss`): where a term reads the
    student's ``"hidden"``, a :class:`mentor.lm.models.HiddenHead` of the student (the module Accelerate wraps; it
    returns ``{"hidden", "head"}``, and ``"logits"`` too where another term reads them); where a term reads
    ``"teacher.hidden"``, the teacher's (:func:`mentor.lm.models.hidden_teacher`, used for its targets only).
    ``(None, None)`` for every other method: nothing changes."""
    student_keys: set[str] = set()
    teacher_keys: set[str] = set()
    for term in method.terms:
        student_keys.add(term.student)
        for source in term.sources:
            if source.startswith("teacher."):
                teacher_keys.add(source.split(".", 1)[1])
            elif source.startswith("detached."):
                student_keys.add(source.split(".", 1)[1])
            elif source != "label" and not source.startswith("weighting."):
                student_keys.add(source)
    if "hidden" not in student_keys and "hidden" not in teacher_keys:
        return None, None
    from mentor.lm.models import HiddenHead, hidden_teacher

    try:
        lm_student = HiddenHead(student, logits="logits" in student_keys) if "hidden" in student_keys else None
        lm_teacher = hidden_teacher(teacher) if "hidden" in teacher_keys and teacher is not None else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe {method.name!r}: {err}") from err
    return lm_student, lm_teacher


def fit(
    student: nn.Module,
    method: Method,
    train_data: TensorData,
    *,
    teacher: Teacher | None = None,
    eval_data: TensorData | None = None,
    epochs: int = 10,
    max_steps: int | None = None,
    batch_size: int = 64,
    grad_accum: int = 1,
    optim: Optim | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
    mixed_precision: str = "no",
    cpu: bool = False,
    log_every: int = 10,
    eval_every: int = 1,
    progress: bool = True,
    trackers: Sequence[str] = (),
    run_config: Mapping[str, Any] | None = None,
    eval_teacher: Teacher | None = None,
    unlabelled: TensorData | None = None,
    mu: int = 1,
    export: str = "student",
) -> FitResult:
    """Train ``student`` with ``method``.

    Args:
        student: The model to train (unwrapped; Accelerate wraps it for DDP where needed).
        method: What to optimise (see :mod:`mentor.recipes`).
        train_data: Training items; unlabelled items carry label ``-1``.
        teacher: Where targets come from (see :mod:`mentor.teachers`); never optimised or wrapped.
        eval_data: Evaluated after every ``eval_every`` epochs and at the end.
        epochs: Passes over ``train_data``.
        max_steps: Stop after this many optimisation steps (``None``: ``epochs`` decides).
        batch_size: Micro-batch size per process.
        grad_accum: Micro-batches accumulated per optimisation step.
        optim: Optimiser and schedule (default AdamW, lr 1e-3, constant).
        seed: Seeds data order and the torch/numpy/python generators.
        out: Run directory for ``metrics.jsonl``, checkpoints and ``student.safetensors`` (``None``: nothing saved).
        checkpoint_every: Write a checkpoint every this many steps (0: only at the end).
        keep_checkpoints: How many step checkpoints to keep.
        resume: Continue from ``out/checkpoints/latest``.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA only) or ``"bf16"``.
        cpu: Force the CPU even where a GPU is present.
        log_every: Write a training row to ``metrics.jsonl`` every this many steps.
        eval_every: Evaluate every this many epochs.
        progress: Show a progress bar (main process only).
        trackers: Accelerate trackers (``"tensorboard"``, ``"wandb"``, ``"mlflow"``), logged to on the main process.
        run_config: The resolved configuration, passed to trackers.
        eval_teacher: The teacher whose agreement and KL the evaluation reports; defaults to ``teacher``, except
            for a teacher that reads by item index (``teachers.Cached``), which cannot score the evaluation data.
        unlabelled: An unlabelled pool drawn separately from ``train_data`` (then the labelled set): every
            micro-batch holds ``batch_size`` labelled items followed by ``mu * batch_size`` pool items, an epoch is
            one pass over the labelled set (see :mod:`mentor.semi`).
        mu: Unlabelled items per labelled item in a batch (with ``unlabelled``).
        export: ``"student"`` or ``"teacher"``: the model evaluated and written to ``student.safetensors`` (the
            run's deployed model). ``"teacher"`` needs a teacher trained alongside (``teachers.EMA``); the other
            model's accuracy is logged too (``teacher_accuracy`` or ``student_accuracy``).

    Returns:
        A :class:`FitResult`.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    optim = optim or Optim()
    for key, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1),
                            ("log_every", log_every, 1), ("eval_every", eval_every, 1),
                            ("checkpoint_every", checkpoint_every, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"train.{key} must be an integer >= {low}, got {value!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null, got {max_steps}")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"train.mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    for tracker in trackers:
        package = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(tracker)
        if package is None:
            raise ValueError(
                f"train.trackers: unknown tracker {tracker!r}, expected 'tensorboard', 'wandb' or 'mlflow'"
            )
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"train.trackers: {tracker!r} needs the {package!r} package (pip install {package})")
    if mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ValueError("train.mixed_precision 'fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'no'")
    if resume and out is None:
        raise ValueError("resume=True needs the run directory 'out'")
    if teacher is None and method.teacher is not None and method.needs_teacher:
        teacher = method.teacher(student)  # built from the student: an EMA of it, or the student itself
    if export not in ("student", "teacher"):
        raise ValueError(f"train.export must be 'student' or 'teacher', got {export!r}")
    if export == "teacher" and not (isinstance(getattr(teacher, "model", None), nn.Module)
                                    and callable(getattr(teacher, "update", None))):
        raise ValueError(f"train.export = 'teacher' needs a teacher network trained alongside the student "
                         f"(teachers.EMA), got {type(teacher).__name__ if teacher is not None else None}")
    labelled_set: TensorData | None = None
    if unlabelled is not None:
        if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
            raise ValueError(f"data.mu must be an integer >= 1, got {mu!r}")
        check_data(unlabelled, "unlabelled pool")
        if train_data.num_labelled != len(train_data):
            missing = len(train_data) - train_data.num_labelled
            raise ValueError(f"with an unlabelled pool, train data is the labelled set, but {missing} of its "
                             f"{len(train_data)} items have no label")
        labelled_set, train_data = train_data, combine(train_data, unlabelled)
    num_classes = check_setup(student, teacher, method, train_data, "train data")
    # Chunked LM terms read hidden states and output layers instead of logits: the student trains through a
    # wrapper that returns them (evaluation, checkpoints and the export see the student itself), and the teacher's
    # targets come from its own such forward. None for every other method.
    lm_student, lm_teacher = _lm_training_forwards(method, student, teacher)
    train_net = lm_student if lm_student is not None else student
    if method.features and any(t.weighting is not None for t in method.terms):
        raise ValueError(f"recipe {method.name!r} has weighted terms and feature terms; the loop scores a step's "
                         "micro-batches before the student's forwards when it weighs, so the teacher's features "
                         "cannot be tapped with them (not supported)")
    if eval_data is not None:
        check_data(eval_data, "eval data")
    if method.batch_hook is not None:
        if getattr(teacher, "needs_index", False) and method.needs_teacher:
            raise ValueError(f"recipe {method.name!r} replaces its batches (on-policy samples), which a teacher that "
                             "reads stored outputs by item index (a cache) cannot score: give the teacher network")
        if method.views is not None or unlabelled is not None:
            raise ValueError(f"recipe {method.name!r} replaces its batches; views and an unlabelled pool are not "
                             "supported with it")

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    _fresh_accelerate_state()
    # Without a GPU, Accelerate forms a multi-process (gloo) group under torchrun only when told cpu=True; with
    # cpu=False every process would silently train alone on the same files.
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=cpu or not torch.cuda.is_available(), log_with=list(trackers) or None,
        project_dir=str(out) if out is not None else None,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the launcher's settings (accelerate config / torchrun flags)"
        )
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    global_batch = batch_size * grad_accum * world
    steps_per_epoch = len(train_data) // global_batch
    semi: SemiData | None = None
    if labelled_set is not None and unlabelled is not None:
        semi = SemiData(len(labelled_set), len(unlabelled), batch_size, mu, grad_accum * world, seed)
        if semi.steps_per_epoch == 0:
            raise ValueError(f"the labelled set has {len(labelled_set)} items, fewer than one global batch of "
                             f"{semi.labelled_per_step} (batch_size {batch_size} x grad_accum {grad_accum} x "
                             f"{world} processes)")
        if len(unlabelled) < semi.unlabelled_per_step:
            raise ValueError(f"the unlabelled pool has {len(unlabelled)} items, fewer than one step takes "
                             f"({semi.unlabelled_per_step} = mu {mu} x batch_size {batch_size} x grad_accum "
                             f"{grad_accum} x {world} processes)")
        global_batch, steps_per_epoch = (1 + mu) * semi.labelled_per_step, semi.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train data has {len(train_data)} items, fewer than one global batch of {global_batch} "
            f"(batch_size {batch_size} x grad_accum {grad_accum} x {world} processes)"
        )
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    features = _feature_pairs(method, student, teacher, train_data.x[:2]) if method.features else None
    if features is not None:
        features.hold()  # hooks registered once for the run, switched on around each training forward
    projectors = features.projectors if features is not None and len(features.projectors) else None

    student.to(device)
    if teacher is not None:
        teacher.to(device)
    if eval_teacher is not None:
        eval_teacher.to(device)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if projectors is not None:
        projectors.to(device)
        trainable += list(projectors.parameters())  # trained with the student, left out of its export
    # A routed ensemble's router (teachers.Router) trains with the student; it is checkpointed as the ensemble's
    # state and left out of the student's export.
    router = getattr(teacher, "router", None) if teacher is not None and method.needs_teacher else None
    if router is not None:
        router.to(device)
        trainable += list(router.parameters())
    optimizer = build_optimizer(trainable, optim)
    if teacher is not None and hasattr(teacher, "parameters"):
        teacher_ids = {id(p) for p in teacher.parameters()}
        if any(id(p) in teacher_ids for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("a teacher parameter is in the student's optimiser: the teacher must stay frozen")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(optim, total_steps))
    if projectors is not None:
        model, prepared_projectors, optimizer = accelerator.prepare(train_net, projectors, optimizer)
    else:
        model, optimizer = accelerator.prepare(train_net, optimizer)
        prepared_projectors = None
    prepared_router = accelerator.prepare(router) if router is not None else None
    # The weighting objects of weighted terms: fresh for this run, updated once per step, checkpointed.
    weighings = Weighings(method, train_data.y, num_classes, accelerator.gather if world > 1 else None)

    out_dir = Path(out) if out is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    metrics_path = out_dir / "metrics.jsonl" if out_dir is not None else None
    history: list[dict[str, Any]] = []

    step = 0
    start_epoch, start_batch = 0, 0
    resumed_window: Tensor | None = None
    elapsed_before = 0.0  # training seconds of the run before a resume
    if resume:
        assert ckpt_root is not None and metrics_path is not None
        path = _read_checkpoint(ckpt_root)
        load_model_weights(student, path / "student.safetensors")
        # Read onto the CPU: load_state_dict copies onto the models' and parameters' devices (under DDP on CPUs the
        # device is "cpu:<rank>", which torch.load and safetensors reject).
        if (path / "teacher.safetensors").is_file() and hasattr(teacher, "load_state_dict"):
            teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))  # type: ignore[union-attr]
        if projectors is not None:
            projectors.load_state_dict(load_file(str(path / "projectors.safetensors")))
        opt_state = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        state = json.loads((path / "state.json").read_text())
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
            if cuda_states:
                torch.cuda.set_rng_state_all(cuda_states)
        _set_rng_state(state["rng"])
        if (path / "loop.safetensors").is_file():
            loop_state = load_file(str(path / "loop.safetensors"))
            if "running" in loop_state:
                resumed_window = loop_state["running"].to(device)
            if weighings:
                weighings.load_state_dict({k[len("weighting."):]: v.to(device) for k, v in loop_state.items()
                                           if k.startswith("weighting.")})
        if metrics_path.is_file():  # every process's history starts with the rows kept; the main one rewrites the file
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r.get("step", 0) <= step]
            if accelerator.is_main_process:
                atomic.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            history = rows
    elif out_dir is not None and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()
        if ckpt_root is not None and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
    accelerator.wait_for_everyone()

    if trackers:
        accelerator.init_trackers(out_dir.name if out_dir else "mentor", config=dict(run_config or {}))

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        if accelerator.is_main_process and metrics_path is not None:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if trackers:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    scorer = eval_teacher if eval_teacher is not None else (
        None if getattr(teacher, "needs_index", False) or getattr(teacher, "student", None) is student
        or getattr(teacher, "cross_vocabulary", False) else teacher)  # another vocabulary: no agreement / KL

    # What the evaluation reports and the run exports: the student, or (export="teacher") the EMA teacher.
    ema_net: nn.Module | None = getattr(teacher, "model", None) if callable(getattr(teacher, "update", None)) \
        and isinstance(getattr(teacher, "model", None), nn.Module) else None

    def unwrapped_student() -> nn.Module:
        """The student itself: without Accelerate's / DDP's wrapper and without the LM training wrapper."""
        net = accelerator.unwrap_model(model)
        return student if lm_student is not None and net is lm_student else net

    train_teacher = lm_teacher if lm_teacher is not None else teacher  # the teacher's training forward

    def run_eval(epoch: int) -> dict[str, Any]:
        assert eval_data is not None
        student_net = unwrapped_student()
        if export == "teacher":
            assert ema_net is not None
            metrics = {**evaluate(ema_net, eval_data, None, device=device), "evaluated": "teacher"}
            other = evaluate(student_net, eval_data, None, device=device)
            if "accuracy" in other:
                metrics["student_accuracy"] = other["accuracy"]
        else:
            metrics = {**evaluate(student_net, eval_data, scorer, device=device), "evaluated": "student"}
            if ema_net is not None:  # a teacher trained alongside: its accuracy too
                other = evaluate(ema_net, eval_data, None, device=device)
                if "accuracy" in other:
                    metrics["teacher_accuracy"] = other["accuracy"]
        log({"step": step, "epoch": epoch, "split": "eval", **metrics})
        return metrics

    def checkpoint(epoch: int, batch: int) -> None:
        if ckpt_root is None:
            return
        # The term values of the steps since the last log row (summed over processes), so that a resumed run logs
        # the same averages as an uninterrupted one. reduce() is collective: every process calls checkpoint().
        window = accelerator.reduce(torch.stack([torch.stack(v) for v in running]), "sum") if running else None
        if accelerator.is_main_process:
            loop_state = {"running": window} if window is not None else {}
            loop_state.update({f"weighting.{k}": v for k, v in weighings.state_dict().items()})
            _write_checkpoint(ckpt_root, step, unwrapped_student(), teacher, optimizer, scheduler,
                              {"step": step, "epoch": epoch, "batch": batch,
                               "elapsed_s": elapsed_before + time.perf_counter() - started}, keep_checkpoints,
                              loop_state or None, projectors)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and accelerator.is_local_main_process),
               desc=method.name, unit="step", dynamic_ncols=True)
    running: list[list[Tensor]] = []  # detached term values of the steps since the last log row
    if resumed_window is not None:  # the log window the checkpoint cut; rank 0 holds the sums over processes
        own = resumed_window if accelerator.is_main_process else torch.zeros_like(resumed_window)
        running = [list(values.unbind(0)) for values in own]
    final_metrics: dict[str, Any] = {}
    term_names = [t.name for t in method.terms]
    use_teacher = teacher is not None and method.needs_teacher
    indexed = use_teacher and getattr(teacher, "needs_index", False)  # a cache: targets by item index
    student_view = getattr(teacher, "student_inputs", None) if indexed else None
    update = getattr(teacher, "update", None) if teacher is not None else None
    autocast = accelerator.autocast if mixed_precision != "no" else nullcontext
    on_cpu = device.type == "cpu"
    views = method.views
    teacher_view_for_labelled = views is not None and method.supervised_view == "teacher"
    # Under DDP each process's forwards update its own copy of the student's buffers (DDP broadcasts rank 0's at
    # the next forward); an EMA teacher averages rank 0's, so that every process holds the same teacher.
    sync_buffers = world > 1 and callable(update) and any(True for _ in student.buffers())

    def teacher_pass(micro_index: Tensor, batch: tuple[Tensor, Tensor] | None = None
                     ) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """The student's input, the labels and the teacher's outputs of one micro-batch (views applied: each
        item's view is seeded by (run seed, step, item index, view), so a resumed run sees the same views).
        ``batch``: the micro-batch as the method's batch hook replaced it (on the device)."""
        if batch is not None:
            x, y = batch
            return x, y, (train_teacher.targets(x) if use_teacher else None)  # type: ignore[union-attr]
        x, y = train_data.take(micro_index)
        if not on_cpu:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_t = x
        if views is not None:
            with torch.no_grad():
                x_t = views.view(Views.TEACHER, x, micro_index, step, seed)
            x = views.view(Views.STUDENT, x, micro_index, step, seed)
            if teacher_view_for_labelled:  # FixMatch: labelled items in the (weak) teacher view
                x = torch.where((y != UNLABELLED).view(-1, *([1] * (x.dim() - 1))), x_t, x)
        if indexed:
            if student_view is not None:  # the stored view the teacher saw (CED)
                x = student_view(x, micro_index, epoch)
            return x, y, teacher.targets(x, index=micro_index, epoch=epoch)  # type: ignore[union-attr,call-arg]
        return x, y, (train_teacher.targets(x_t) if use_teacher else None)  # type: ignore[union-attr]
    hook = method.batch_hook
    # The student without its DDP / Accelerate wrapper: the same object all run long. Looked up once, because
    # unwrap_model asks importlib whether DeepSpeed is installed on every call (about 0.25 ms on a CPU core).
    plain_model = unwrapped_student()

    def replace_batch(m: int, micro_index: Tensor) -> tuple[Tensor, Tensor]:
        """Micro-batch ``m`` of this step as the method's batch hook replaces it (on-policy samples)."""
        assert hook is not None
        x, y = train_data.take(micro_index)
        context = BatchContext(student=plain_model, teacher=teacher, step=step, micro=m,
                               rank=rank, seed=seed, world=world)
        with torch.no_grad():
            return hook(x.to(device), y.to(device), context)

    # Accelerate's AcceleratedOptimizer.step looks up an optional package with importlib on every call (accelerate
    # 1.15: `is_lomo_available()`, about 0.25 ms per step on a CPU core). Where the wrapper adds nothing (no fp16
    # grad scaler, no XLA, no DeepSpeed/FSDP), step the wrapped optimiser directly.
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    raw_optimizer = optimizer.optimizer if plain and accelerator.scaler is None else optimizer
    optimizer_step = raw_optimizer.step
    # The wrapper's zero_grad also inspects the signature of the wrapped one on every call (about 0.1 ms), and
    # accelerator.backward only adds a loss scaler or DeepSpeed's engine, neither of which is in play here.
    optimizer_zero_grad = raw_optimizer.zero_grad
    backward: Callable[[Tensor], None] = (
        Tensor.backward if plain and accelerator.scaler is None else accelerator.backward
    )
    model.train()
    started = time.perf_counter()
    epoch = start_epoch
    position = (start_epoch, start_batch)  # where the data order continues: (epoch, batch) of the next step
    done = step >= total_steps
    while not done and epoch < epochs:
        if semi is not None:  # labelled items and the unlabelled stream, B + mu * B per micro-batch
            perm = semi.epoch_order(epoch)
        else:
            perm = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        counts = _epoch_item_counts(method, train_data.y, perm, steps_per_epoch, global_batch)
        for batch_idx in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            index = perm[batch_idx * global_batch : (batch_idx + 1) * global_batch]
            num_items = counts[batch_idx]
            micro = [index] if grad_accum == 1 and world == 1 else _micro_batches(index, grad_accum, world, rank)
            step_values: list[Tensor] = []
            nonfinite: str | None = None
            staged = None
            replaced: list[tuple[Tensor, Tensor]] | None = None
            if hook is not None:  # every micro-batch replaced first, so the normalisers count the new labels
                replaced = [replace_batch(m, micro_index) for m, micro_index in enumerate(micro)]
                counts_here = torch.tensor([float(sum(int((y >= 0).sum()) for _, y in replaced)),
                                            float(sum(y.numel() for _, y in replaced))], device=device)
                if world > 1:
                    counts_here = accelerator.reduce(counts_here, "sum")
                num_items = _num_items(method, float(counts_here[0]), float(counts_here[1]))
            if weighings:  # score every micro-batch first: the weighting is updated once, before any weight
                with autocast():
                    staged = [teacher_pass(micro_index, replaced[m] if replaced is not None else None)
                              for m, micro_index in enumerate(micro)]
                step_weights = weighings.step([(t, y, i) for (_, y, t), i in zip(staged, micro, strict=True)])
            for m, micro_index in enumerate(micro):
                ctx = accelerator.no_sync(model) if world > 1 and m < len(micro) - 1 else nullcontext()
                with ctx:
                    with autocast():
                        with features.capture() if features is not None else nullcontext():
                            x, y, t_out = staged[m] if staged is not None else teacher_pass(
                                micro_index, replaced[m] if replaced is not None else None)
                            s_out = as_outputs(model(x))
                            if prepared_router is not None:  # the routed mixture, with gradients into the router
                                s_out.update(prepared_router(x, t_out["members"]))  # type: ignore[index]
                        if features is not None:
                            features.merge(s_out, t_out if t_out is not None else {}, prepared_projectors)
                    total, values = compute_terms(method, s_out, t_out, y, step, num_items,
                                                  step_weights[m] if staged is not None else None)
                    if not math.isfinite(total.detach().item()):  # .item(): 0.6 us; bool(isfinite()): 5 us
                        bad = next((k for k, v in values.items() if not torch.isfinite(v.detach())), "total")
                        nonfinite = nonfinite or (
                            f"loss term {bad!r} is {float(values.get(bad, total).detach())} at step {step} "
                            f"(counting from 0; {step} steps completed; epoch {epoch}, batch {batch_idx}"
                            + (f", process {rank}" if world > 1 else "") + "); stopping. Check the learning rate, "
                            "the inputs and the teacher's outputs. The last checkpoint, if any, is intact."
                        )
                        if world == 1:
                            raise NonFiniteLossError(nonfinite)
                    # Terms are already divided by the global item count; DDP averages gradients over processes.
                    backward(total * world if world > 1 else total)
                detached = [v.detach() for v in values.values()]
                step_values = detached if not step_values else [a + b for a, b in zip(step_values, detached,
                                                                                       strict=True)]
            if world > 1:
                # Every process must stop at the same step, or the others wait for it in the next all-reduce. A
                # process that saw a non-finite loss still ran its backward (the gradients are discarded, no step
                # is taken), so the collectives stay matched; then all processes agree here.
                flags = accelerator.reduce(torch.tensor(0.0 if nonfinite is None else 1.0, device=device), "sum")
                if float(flags) > 0:
                    raise NonFiniteLossError(
                        nonfinite or f"a loss term is not finite on another process at step {step} (counting from "
                        f"0; epoch {epoch}, batch {batch_idx}); stopping on every process. The last checkpoint, "
                        "if any, is intact."
                    )
            if optim.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer_step()
            scheduler.step()
            optimizer_zero_grad(set_to_none=True)
            if callable(update):
                if sync_buffers:
                    for buffer in plain_model.buffers():
                        torch.distributed.broadcast(buffer, 0)
                update(plain_model, step)
            step += 1
            running.append(step_values)
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                # One stack of every step's values (not one per step): [steps, terms], then the mean per term.
                means = torch.stack([v for values in running for v in values]).view(len(running), -1).mean(dim=0)
                reduced = accelerator.reduce(means, "sum").tolist()
                row: dict[str, Any] = {"step": step, "epoch": epoch, "split": "train",
                                       "elapsed_s": elapsed_before + time.perf_counter() - started,
                                       "loss": float(sum(t.weight_at(step - 1) * v
                                                         for t, v in zip(method.terms, reduced, strict=True))),
                                       "lr": scheduler.get_last_lr()[0]}
                row.update({f"loss/{k}": float(v) for k, v in zip(term_names, reduced, strict=True)})
                log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                running = []
            position = (epoch + 1, 0) if batch_idx == steps_per_epoch - 1 else (epoch, batch_idx + 1)
            if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
                checkpoint(*position)
            if step >= total_steps:
                done = True
                break
        if eval_data is not None and ((epoch + 1) % eval_every == 0 or done):
            final_metrics = run_eval(epoch)
        epoch += 1
    bar.close()
    if eval_data is not None and not final_metrics:
        final_metrics = run_eval(epoch - 1 if epoch > 0 else 0)
    checkpoint(*position)  # a max_steps stop in mid-epoch resumes at the next batch, not the next epoch
    if features is not None:
        features.release()
    unwrapped = unwrapped_student()
    if out_dir is not None and accelerator.is_main_process:
        exported = ema_net if export == "teacher" and ema_net is not None else unwrapped
        save_model(exported, out_dir / "student.safetensors")  # the deployed model, whichever it is
        if projectors is not None:  # kept beside, not inside, the exported student
            save_model(projectors, out_dir / "projectors.safetensors")
        atomic.write_text(out_dir / "result.json", json.dumps({"metrics": final_metrics, "steps": step,
                                                               "exported": export}, indent=2))
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return FitResult(student=unwrapped, metrics=final_metrics, history=history, steps=step, out=out_dir,
                     projectors=projectors, teacher=teacher, weightings=weighings.objects)

