"""``mentor demo``: a CNN teacher and three MLP students on MNIST-1D, one result table.

1. ``teacher``: a 1-D CNN trained with ``supervised`` on the 4000 labelled training items, in seeded weak views
   (``augment: weak``: shifted and scaled signals).
2. ``scratch``: an MLP (three hidden layers of 512) trained with ``supervised`` on the same 4000 items.
3. ``hinton_kd``: the same MLP, same 4000 items, cross-entropy plus KD from the teacher.
4. ``transfer_kd``: the same MLP trained only on the teacher's soft outputs over 50000 generated, unlabelled
   MNIST-1D samples (disjoint from the test set).

Every run is a normal config-driven run (``runs/demo/<name>/`` with config.yaml, metrics, checkpoints, report);
``runs/demo/report.md`` compares them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mentor.config import config_from_dict
from mentor.eval import latency_ms
from mentor.run import run

__all__ = ["demo", "demo_configs"]

_ROW_KEYS = ("accuracy", "agreement", "kl_to_teacher", "ece", "params", "latency_ms")


def demo_configs(out: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """The four demo configs as plain dicts (``quick``: far fewer items and epochs, for smoke tests)."""
    teacher_epochs, student_epochs, transfer_epochs = (3, 3, 1) if quick else (150, 40, 8)
    transfer_size = 2000 if quick else 50000
    train_common = {"out": str(out), "progress": progress, "log_every": 20}
    teacher = {
        "name": "teacher", "seed": seed,
        "data": {"train": "labelled"},
        "student": {"model": "cnn"},
        # Seeded shifted and scaled views of the labelled items: a teacher of about 0.97 instead of 0.91.
        "recipe": {"name": "supervised", "args": {"augment": "weak"}},
        "optim": {"lr": 1e-2, "schedule": "cosine"},
        "train": {"epochs": teacher_epochs, "batch_size": 100, **train_common},
    }
    teacher_ref = {"run": str(out / "teacher")}
    student_optim = {"lr": 1e-3, "schedule": "cosine"}
    scratch = {
        "name": "scratch", "seed": seed,
        "data": {"train": "labelled"},
        "student": {"model": "mlp", "args": {"hidden": [64] if quick else [512, 512, 512]}},
        "teacher": teacher_ref,  # only for agreement / KL in the table; 'supervised' never reads it in training
        "recipe": {"name": "supervised"},
        "optim": student_optim,
        "train": {"epochs": student_epochs, "batch_size": 100, **train_common},
    }
    hinton = {**scratch, "name": "hinton_kd", "recipe": {"name": "hinton_kd", "args": {"temperature": 4.0,
                                                                                      "alpha": 0.9}}}
    transfer = {
        **scratch, "name": "transfer_kd",
        "data": {"train": "transfer", "transfer_size": transfer_size, "transfer_seed": seed},
        "recipe": {"name": "transfer_kd", "args": {"temperature": 4.0}},
        "optim": {"lr": 2e-3, "schedule": "cosine"},
        "train": {"epochs": transfer_epochs, "batch_size": 256, **train_common},
    }
    return {"teacher": teacher, "scratch": scratch, "hinton_kd": hinton, "transfer_kd": transfer}


def demo(
    out: Path = Path("runs/demo"), quick: bool = False, seed: int = 0, progress: bool = True
) -> list[dict[str, Any]]:
    """Run the demo and return one row per model (teacher last), also written to ``out/report.md``."""
    # The demo's models are tiny: extra intra-op threads cost more in synchronisation than they gain (and on a
    # shared 2-core machine they oversubscribe it), so the demo runs on one thread and is restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out, quick, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _demo(out: Path, quick: bool, seed: int, progress: bool) -> list[dict[str, Any]]:
    from mentor.report import write_comparison_report

    rows: list[dict[str, Any]] = []
    for name, raw in demo_configs(out, quick, seed, progress).items():
        cfg = config_from_dict(raw)
        result = run(cfg).final
        metrics = dict(result.metrics)
        metrics["latency_ms"] = latency_ms(result.student.cpu(), torch.zeros(1000, 40))
        if name == "teacher":
            metrics["agreement"], metrics["kl_to_teacher"] = 1.0, 0.0
        rows.append({"name": name, **{k: metrics.get(k) for k in _ROW_KEYS}})
    rows = rows[1:] + rows[:1]
    write_comparison_report(out / "report.md", rows, title="mentor demo: MNIST-1D, CNN teacher -> MLP students",
                            plots_from={r["name"]: out / r["name"] for r in rows})
    return rows
