"""Subprocess worker for tests/test_cache.py.

    python tests/_cache_worker.py SPEC.json

``case: "build"`` builds a cache of a seeded MLP teacher over seeded data (``"slow": s`` makes each teacher
forward sleep ``s`` seconds, through a hook that leaves the model's fingerprint alone, so a test can kill the build
in the middle). ``case: "ddp_reads"`` trains on a ``Cached`` teacher that counts its reads and writes them to
``reads_rank<R>.json`` (ranks from the usual torchrun environment variables).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def teacher(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 10))


def data(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    from mentor import cache

    if spec["case"] == "build":
        model = teacher()
        if spec.get("slow"):  # a hook, so the model (and its fingerprint) is the same as in a fast build
            model.register_forward_pre_hook(lambda module, args: time.sleep(spec["slow"]))
        cache.build(model, data(spec["n"]), spec["out"], spec=cache.CacheSpec(**spec["cache"]), progress=False)
        return
    if spec["case"] == "ddp_reads":
        from mentor import recipes, teachers
        from mentor.data import TensorData
        from mentor.train import Optim, fit

        x = data(spec["n"])
        reader = cache.TeacherCache(spec["cache_dir"], count_reads=True)
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10))
        fit(student, cache.use_sparse_targets(recipes.transfer_kd(temperature=2.0)),
            TensorData(x, torch.full((x.shape[0],), -1)), teacher=teachers.Cached(reader), epochs=spec["epochs"],
            batch_size=spec["batch_size"], optim=Optim(lr=1e-2), progress=False)
        assert reader.reads is not None
        rank = int(os.environ.get("RANK", "0"))
        Path(spec["report_dir"], f"reads_rank{rank}.json").write_text(json.dumps(reader.reads.tolist()))
        return
    raise ValueError(f"unknown case {spec['case']!r}")


if __name__ == "__main__":
    from _worker_common import run

    run(main, json.loads(Path(sys.argv[1]).read_text()))
