"""Subprocess worker for tests/test_ssl_ddp.py: one semi-supervised :func:`mentor.train.fit` run from a JSON spec.

    python tests/_ssl_worker.py SPEC.json

The spec names the recipe (``mean_teacher``, ``fixmatch``, ``freematch``), ``batch_size``, ``grad_accum`` and
``out``; the model (a float64 MLP without dropout, so that no per-process randomness enters) and the data (64
labelled items, a pool of 256) come from fixed seeds. Ranks come from the torchrun environment variables. Writes
``result_rank<R>.json`` with the logged rows and the weights of the exported student and, for ``mean_teacher``, of
the EMA teacher.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


def main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    from mentor import recipes
    from mentor.data import TensorData
    from mentor.train import Optim, fit

    g = torch.Generator().manual_seed(3)
    labelled = TensorData(torch.randn(64, 12, generator=g, dtype=torch.float64),
                          torch.randint(0, 4, (64,), generator=g))
    pool = TensorData(torch.randn(256, 12, generator=g, dtype=torch.float64), torch.full((256,), -1))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    method = {"mean_teacher": lambda: recipes.mean_teacher(rampup_steps=4, decay=0.9),
              "fixmatch": lambda: recipes.fixmatch(tau=0.3),
              "freematch": lambda: recipes.freematch()}[spec["recipe"]]()
    result = fit(student, method, labelled, unlabelled=pool, mu=2, epochs=2, batch_size=spec["batch_size"],
                 grad_accum=spec["grad_accum"], optim=Optim(lr=1e-2), seed=0, log_every=1, progress=False, cpu=True)
    report: dict[str, Any] = {
        "rows": [r for r in result.history if r.get("split") == "train"],
        "student": {k: v.tolist() for k, v in result.student.state_dict().items()},
    }
    teacher = result.teacher
    if teacher is not None and hasattr(teacher, "state_dict"):
        report["teacher"] = {k: v.tolist() for k, v in teacher.state_dict().items()}
    rank = int(os.environ.get("RANK", "0"))
    Path(spec["out"], f"result_rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from _worker_common import run

    run(main, json.loads(Path(sys.argv[1]).read_text()))
