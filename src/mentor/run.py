"""From a validated :class:`~mentor.config.RunConfig` to a finished run directory.

``runs/<name>/`` holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``student.safetensors``,
``result.json`` and, after :func:`mentor.report.write_report`, ``report.md`` with ``plots/``. A born-again recipe
with ``generations: n`` writes one such folder per generation (``gen1`` ... ``genN``) and a ``result.json`` above
them that lists every generation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mentor import atomic
from mentor.config import ConfigError, RunConfig, TeacherConfig, build_method, dump_config, load_config
from mentor.data import TensorData, check_data, mnist1d, mnist1d_transfer
from mentor.method import Method
from mentor.models import build_model
from mentor.teachers import Frozen
from mentor.train import FitResult, Optim, check_setup, fit, load_model_weights

__all__ = ["RunResult", "load_data", "load_teacher", "run", "build_student"]


@dataclass
class RunResult:
    """The outcome of :func:`run`: one :class:`~mentor.train.FitResult` per generation."""

    config: RunConfig
    generations: list[FitResult]

    @property
    def final(self) -> FitResult:
        return self.generations[-1]


def load_data(cfg: RunConfig) -> tuple[TensorData, TensorData]:
    """``(train, test)`` as the config's ``data`` section says."""
    d = cfg.data
    test = mnist1d("test")
    if d.train == "labelled":
        return mnist1d("train", d.num_labelled), test
    transfer = mnist1d_transfer(d.transfer_size, d.transfer_seed)
    if d.train == "transfer":
        return transfer, test
    labelled = mnist1d("train", d.num_labelled)
    return TensorData(torch.cat([labelled.x, transfer.x]), torch.cat([labelled.y, transfer.y])), test


def build_student(cfg: RunConfig, seed: int | None = None) -> nn.Module:
    """The student of the config, initialised from ``seed`` (the config's seed by default)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        model = build_model(cfg.student.model, cfg.student.args)
    except ValueError as err:
        raise ConfigError(f"student.model: {err}") from None
    if cfg.student.quantize_bits is not None:
        from mentor.quant import quantize_weights

        quantize_weights(model, cfg.student.quantize_bits)
    return model


def load_teacher(spec: TeacherConfig) -> nn.Module:
    """The teacher network a config names: a run directory, or a checkpoint plus a model spec."""
    if spec.run is not None:
        run_dir = Path(spec.run)
        cfg_path, weights = run_dir / "config.yaml", run_dir / "student.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ConfigError(
                f"teacher.run = {spec.run!r} is not a finished run directory "
                "(expected config.yaml and student.safetensors in it)"
            )
        teacher_cfg = load_config(cfg_path)
        model_name, args = teacher_cfg.student.model, teacher_cfg.student.args
        bits = teacher_cfg.student.quantize_bits  # a quantized run teaches with its quantized weights
    else:
        assert spec.checkpoint is not None and spec.model is not None
        weights, model_name, args = Path(spec.checkpoint), spec.model, spec.args
        bits = None
        if not weights.is_file():
            raise ConfigError(f"teacher.checkpoint = {spec.checkpoint!r} does not exist")
    try:
        model = build_model(model_name, args)
    except ValueError as err:
        raise ConfigError(f"teacher.model: {err}") from None
    if bits is not None:
        from mentor.quant import quantize_weights

        quantize_weights(model, bits)
    try:
        load_model_weights(model, weights)
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    return model


def _labels_only(method: Method) -> Method:
    terms = tuple(t for t in method.terms if not t.uses_teacher)
    if not terms:
        raise ConfigError(f"recipe {method.name!r} has no label terms to train its first generation without a teacher")
    return Method(method.name, terms, 1, method.description)


def is_main_process() -> bool:
    """Whether this is the process that writes run files: rank 0 under ``accelerate launch`` / ``torchrun``."""
    return int(os.environ.get("RANK", "0")) == 0


def run(cfg: RunConfig, *, resume: bool = False, report: bool = True) -> RunResult:
    """Run a validated config end to end (every generation), writing the run directory."""
    method = build_method(cfg.recipe)
    teacher_model = load_teacher(cfg.teacher) if cfg.teacher is not None else None
    t = cfg.train
    out = cfg.run_dir
    # Everything that can be wrong is checked before anything is written to the run directory.
    first_student = build_student(cfg)
    if t.mixed_precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
        why = "train.cpu is true" if t.cpu else "no CUDA GPU is available"
        raise ConfigError(f"train.mixed_precision = 'fp16' needs a CUDA GPU, but {why}: expected 'bf16' or 'no'")
    first_ckpt = (out if method.generations == 1 else out / "gen1") / "checkpoints" / "latest"
    if resume and not first_ckpt.is_file():
        raise FileNotFoundError(
            f"cannot resume: {str(first_ckpt)!r} does not exist (no earlier run of {cfg.name!r} wrote a checkpoint); "
            "run without --resume to start afresh"
        )
    train_data, test_data = load_data(cfg)
    per_step = t.batch_size * t.grad_accum
    if len(train_data) < per_step:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} x train.grad_accum = {t.grad_accum} takes {per_step} items per step, "
            f"but the training data (data.train = {cfg.data.train!r}) has {len(train_data)}: expected at most "
            f"{len(train_data)} items per step"
        )
    teacher = Frozen(teacher_model) if teacher_model is not None else None
    first_method = method if (teacher is not None or not method.needs_teacher) else _labels_only(method)
    check_setup(first_student, teacher, first_method, train_data, "train data")
    check_data(test_data, "eval data")
    optim = Optim(**cfg.optim.model_dump())
    main = is_main_process()
    if main:
        atomic.write_text(out / "config.yaml", dump_config(cfg))
    results: list[FitResult] = []
    for gen in range(1, method.generations + 1):
        gen_out = out if method.generations == 1 else out / f"gen{gen}"
        gen_method = method if (teacher is not None or not method.needs_teacher) else _labels_only(method)
        student = build_student(cfg, cfg.seed + gen - 1)
        if method.generations > 1 and main:
            atomic.write_text(gen_out / "config.yaml", dump_config(cfg))
        result = fit(
            student, gen_method, train_data, teacher=teacher, eval_data=test_data, epochs=t.epochs,
            max_steps=t.max_steps, batch_size=t.batch_size, grad_accum=t.grad_accum, optim=optim,
            seed=cfg.seed + gen - 1, out=gen_out, checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, resume=resume and (gen_out / "checkpoints" / "latest").is_file(),
            mixed_precision=t.mixed_precision, cpu=t.cpu, log_every=t.log_every, eval_every=t.eval_every,
            progress=t.progress, trackers=t.trackers, run_config=cfg.model_dump(mode="json"),
        )
        results.append(result)
        if report and main:
            from mentor.report import write_report

            write_report(gen_out)
        if gen < method.generations:
            prev = build_student(cfg, 0)
            prev.load_state_dict(result.student.state_dict())
            teacher = Frozen(prev)
    if method.generations > 1 and main:
        summary = [{"generation": i + 1, **r.metrics} for i, r in enumerate(results)]
        atomic.write_text(out / "result.json", json.dumps({"generations": summary}, indent=2))
    return RunResult(cfg, results)


def summary_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per generation for printing."""
    return [{"generation": i + 1, **r.metrics} for i, r in enumerate(result.generations)]
