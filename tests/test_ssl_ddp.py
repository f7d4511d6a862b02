"""Semi-supervised recipes under 2-process DDP: the same run as 1 process with the same global batch.

Views are seeded per item and step, the weighting statistics are updated from probabilities gathered over
processes, and the EMA teacher is updated once per optimiser step from the (synchronised) student, so 2 processes
with micro-batch ``B`` must match 1 process with 2 accumulated micro-batches of ``B``: the same losses at every
step, the same student and (Mean Teacher) the same EMA teacher.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_ssl_worker.py"
SRC = TESTS.parent / "src"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _spawn(spec: dict[str, Any], tmp: Path, name: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p))
    env.update(extra or {})
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, str(WORKER), str(path)], env=env, stdout=log, stderr=subprocess.STDOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mean_teacher", "fixmatch", "freematch"])
def test_two_processes_equal_one_process_with_accumulation(tmp_path: Path, recipe: str) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    port = str(_free_port())
    procs = {"one": _spawn({"recipe": recipe, "batch_size": 4, "grad_accum": 2, "out": str(one)}, tmp_path, "one")}
    for r in range(2):
        procs[f"rank{r}"] = _spawn({"recipe": recipe, "batch_size": 4, "grad_accum": 1, "out": str(two)}, tmp_path,
                                   f"rank{r}", {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                                "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    ref = json.loads((one / "result_rank0.json").read_text())
    assert len(ref["rows"]) == 16  # 64 labelled items / global batch 8, 2 epochs
    assert ("teacher" in ref) == (recipe == "mean_teacher")  # the EMA teacher's weights are compared too
    for r in range(2):
        got = json.loads((two / f"result_rank{r}.json").read_text())
        assert [row["step"] for row in got["rows"]] == [row["step"] for row in ref["rows"]]
        for a, b in zip(ref["rows"], got["rows"], strict=True):
            for key in (k for k in a if k.startswith("loss")):
                assert b[key] == pytest.approx(a[key], abs=1e-8), (r, a["step"], key)
        for part in ("student", "teacher"):
            if part in ref:
                for name, value in ref[part].items():
                    assert np.allclose(got[part][name], value, rtol=0, atol=1e-9), (r, part, name)
