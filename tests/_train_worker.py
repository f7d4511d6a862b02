"""Subprocess worker for tests/test_train_loop.py: one :func:`mentor.train.fit` run described by a JSON spec.

    python tests/_train_worker.py SPEC.json

The spec names a ``case`` (``"ddp"``: float64 MLP, Frozen teacher, mixed labelled/unlabelled data; ``"dropout"``:
float32 MLP with dropout, Frozen teacher; ``"ema"``: float32 MLP with dropout, EMA teacher, mixed data) and the fit
arguments. Models and data are built from fixed seeds, so every process (each DDP rank, a killed run and its resumed
continuation, the uninterrupted reference) builds the same ones. Distributed runs take their rank from the usual
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), as under
``torchrun`` / ``accelerate launch``.

With ``"slow": s`` every student forward sleeps ``s`` seconds (numerics unchanged), so the test can kill the run in the
middle of an epoch. Each process writes ``report_rank<R>_run<I>.json`` under ``spec["report_dir"]`` with what it checked
about the teacher: never handed to Accelerate (so never wrapped by DDP), never in the optimiser, no gradients, and
unchanged (Frozen) by training. ``"runs": [overrides, ...]`` runs several fits one after the other in one process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def mlp(seed: int, dim: int, classes: int, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(dim, 32), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(32, classes))
    return nn.Sequential(*layers).to(dtype)


def make_data(n: int, dim: int, classes: int, unlabelled: float, dtype: torch.dtype, seed: int = 1) -> Any:
    from mentor.data import UNLABELLED, TensorData

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < unlabelled] = UNLABELLED
    return TensorData(x, y)


class PoisonOnRank(nn.Module):
    """Wraps a teacher network: from its ``after``-th call on, returns NaN logits, on process ``rank`` only."""

    def __init__(self, inner: nn.Module, rank: int, after: int) -> None:
        super().__init__()
        self.inner, self.rank, self.after, self.calls = inner, rank, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if int(os.environ.get("RANK", 0)) == self.rank and self.calls >= self.after:
            return torch.full_like(out, float("nan"))
        return out


def build(case: str) -> tuple[nn.Module, Any, Any, Any, Any]:
    """``(student, teacher, method, data, optim)`` of a case."""
    from mentor import recipes, teachers
    from mentor.train import Optim

    dim, classes = 12, 5
    if case == "ddp":
        student = mlp(0, dim, classes, dtype=torch.float64)
        teacher = teachers.Frozen(mlp(100, dim, classes, dtype=torch.float64))
        data = make_data(64, dim, classes, unlabelled=0.5, dtype=torch.float64)
        return student, teacher, recipes.hinton_kd(temperature=2.0, alpha=0.5), data, Optim(lr=1e-2)
    if case == "dropout":
        student = mlp(0, dim, classes, dropout=0.3)
        teacher = teachers.Frozen(mlp(100, dim, classes))
        data = make_data(400, dim, classes, unlabelled=0.0, dtype=torch.float32)
        optim = Optim(name="sgd", lr=0.05, momentum=0.9, schedule="cosine", warmup_steps=5)
        return student, teacher, recipes.hinton_kd(temperature=2.0, alpha=0.7), data, optim
    if case == "ema":
        student = mlp(0, dim, classes, dropout=0.3)
        teacher = teachers.EMA(student, decay=0.9)
        data = make_data(400, dim, classes, unlabelled=0.5, dtype=torch.float32)
        optim = Optim(name="adamw", lr=3e-3, weight_decay=0.01, schedule="linear", warmup_steps=5)
        return student, teacher, recipes.hinton_kd(temperature=2.0, alpha=0.5), data, optim
    if case == "ddp_nan":  # the ddp case; process 1's teacher turns NaN from its 4th call
        student = mlp(0, dim, classes, dtype=torch.float64)
        poisoned = PoisonOnRank(mlp(100, dim, classes, dtype=torch.float64), rank=1, after=4)
        # the dry-run check in fit calls the teacher once before training: count it
        teacher = teachers.Frozen(poisoned)
        data = make_data(64, dim, classes, unlabelled=0.5, dtype=torch.float64)
        return student, teacher, recipes.hinton_kd(temperature=2.0, alpha=0.5), data, Optim(lr=1e-2)
    if case == "lm_gkd":  # tests/test_lm_loop.py: on-policy GKD on tiny float64 Llamas
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from test_lm_loop import _data, _model

        return (_model(1), teachers.Frozen(_model(100)), recipes.gkd(lmbda=1.0, beta=0.5, max_new_tokens=4),
                _data(32), Optim(lr=1e-2))
    raise ValueError(f"unknown case {case!r}")


def fit_kwargs(spec: dict[str, Any], optim: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`mentor.train.fit` that a spec describes (shared with in-process runs)."""
    return {
        "epochs": spec["epochs"], "batch_size": spec["batch_size"], "grad_accum": spec.get("grad_accum", 1),
        "optim": optim, "seed": spec.get("seed", 0), "out": spec["out"],
        "checkpoint_every": spec.get("checkpoint_every", 0), "keep_checkpoints": spec.get("keep_checkpoints", 2),
        "resume": spec.get("resume", False), "log_every": spec.get("log_every", 1), "progress": False, "cpu": True,
    }


def main(spec_path: str) -> None:
    """Run the spec; with ``"runs": [overrides, ...]`` run it once per entry (spec updated by the entry), one after
    the other in this process, writing ``report_rank<R>_run<I>.json`` for each."""
    import accelerate
    from torch.nn.parallel import DistributedDataParallel

    import mentor.train as train

    base = json.loads(Path(spec_path).read_text())

    # Watch what fit hands to Accelerate and what it puts in the optimiser, without changing either.
    seen: dict[str, Any] = {}
    original_prepare = accelerate.Accelerator.prepare
    original_build = train.build_optimizer

    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original_prepare(self, *args, **kwargs)
        seen["prepared_in"].extend(args)
        seen["prepared_out"].extend(out if isinstance(out, tuple) else (out,))
        return out

    def build_optimizer(params: Any, optim_cfg: Any) -> torch.optim.Optimizer:
        opt = original_build(params, optim_cfg)
        seen["optimizers"].append(opt)
        return opt

    accelerate.Accelerator.prepare = prepare  # type: ignore[method-assign]
    train.build_optimizer = build_optimizer  # type: ignore[assignment]

    for run_index, override in enumerate(base.get("runs", [{}])):
        spec = {**base, **override}
        seen.update(prepared_in=[], prepared_out=[], optimizers=[])
        student, teacher, method, data, optim = build(spec["case"])
        teacher_model: nn.Module = teacher.model
        frozen_before = copy.deepcopy(teacher_model.state_dict())
        if spec.get("slow"):
            delay = float(spec["slow"])
            student.register_forward_pre_hook(lambda module, args, delay=delay: time.sleep(delay))

        if spec.get("rewind_latest_to"):  # as if the run had been killed right after writing that checkpoint
            ckpts = Path(spec["out"]) / "checkpoints"
            tmp = ckpts / f"latest.rank{os.environ.get('RANK', 0)}.tmp"
            tmp.write_text(spec["rewind_latest_to"])
            os.replace(tmp, ckpts / "latest")

        report_dir = Path(spec["report_dir"])
        report_dir.mkdir(parents=True, exist_ok=True)
        if spec.get("expect_error"):
            rank = int(os.environ.get("RANK", 0))
            try:
                train.fit(student, method, data, teacher=teacher, **fit_kwargs(spec, optim))
                error = None
            except train.NonFiniteLossError as err:
                error = str(err)
            weights_finite = all(bool(torch.isfinite(p).all()) for p in student.parameters())
            (report_dir / f"report_rank{rank}_run{run_index}.json").write_text(
                json.dumps({"rank": rank, "error": error, "weights_finite": weights_finite})
            )
            continue
        result = train.fit(student, method, data, teacher=teacher, **fit_kwargs(spec, optim))

        teacher_ids = {id(p) for p in teacher_model.parameters()}
        optimised = [id(p) for opt in seen["optimizers"] for g in opt.param_groups for p in g["params"]]
        wrapped = [m for m in seen["prepared_out"] if isinstance(m, DistributedDataParallel)]
        report = {
            "rank": int(os.environ.get("RANK", 0)),
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "steps": result.steps,
            "weights_sha256": hashlib.sha256(
                b"".join(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                         for v in result.student.state_dict().values())
            ).hexdigest(),
            "history": result.history,
            "num_ddp_wrapped": len(wrapped),
            "ddp_wraps_student": all(m.module is student for m in wrapped),
            "teacher_is_ddp": isinstance(teacher_model, DistributedDataParallel),
            "teacher_handed_to_accelerate": any(
                obj is teacher or obj is teacher_model or getattr(obj, "module", None) is teacher_model
                for obj in seen["prepared_in"] + seen["prepared_out"]
            ),
            "num_optimizers": len(seen["optimizers"]),
            "teacher_params_in_optimizer": sum(i in teacher_ids for i in optimised),
            "student_params_in_optimizer": sum(i in {id(p) for p in student.parameters()} for i in optimised),
            "num_student_params": len(list(student.parameters())),
            "teacher_requires_grad": any(p.requires_grad for p in teacher_model.parameters()),
            "teacher_has_grad": any(p.grad is not None for p in teacher_model.parameters()),
            "teacher_in_train_mode": teacher_model.training,
            "teacher_unchanged": all(torch.equal(v, teacher_model.state_dict()[k]) for k, v in frozen_before.items()),
        }
        (report_dir / f"report_rank{report['rank']}_run{run_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    from _worker_common import run

    run(main, sys.argv[1])
