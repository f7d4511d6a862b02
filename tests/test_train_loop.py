"""The loop's guarantees (:func:`mentor.train.fit`).

* gradient accumulation: micro-batch 8 x 1 step == micro-batch 2 x 4 accumulation steps (weights and logged losses),
  with a label term normalised by the labelled count of the whole accumulated batch;
* 2 processes (DDP, gloo, CPU) with batch 4 each == 1 process with batch 8; the teacher is never wrapped by DDP and
  never in the optimiser; a 2-process run resumes exactly too;
* SIGKILL in the middle of an epoch, then ``resume=True``: final weights bitwise equal to an uninterrupted run
  (dropout RNG, optimiser, scheduler and EMA teacher state restored), the same metrics rows, none duplicated;
  a run stopped by ``max_steps`` in mid-epoch continues with the same data order;
* a NaN or inf loss stops the run with :class:`NonFiniteLossError` naming the step and the term, and leaves the last
  good checkpoint intact (no final weights for a failed run);
* checkpoint writes are atomic: a leftover ``.tmp-step_*`` folder is ignored and replaced on resume.

Subprocess runs use ``tests/_train_worker.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mentor import recipes, teachers
from mentor.data import UNLABELLED, TensorData
from mentor.train import FitResult, NonFiniteLossError, Optim, fit

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_train_worker.py"
SRC = TESTS.parent / "src"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


_PROCS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _fresh_accelerate_state_and_no_stray_workers():
    """Each in-process fit starts from a fresh Accelerate state, whatever ran before it in this process; workers a
    failed test leaves running are stopped."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    while _PROCS:
        proc = _PROCS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------------ helpers


def _mlp(seed: int, dim: int = 12, classes: int = 5, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, classes)).to(dtype)


def _data(n: int, unlabelled: float, dtype: torch.dtype = torch.float32, dim: int = 12, classes: int = 5,
          seed: int = 1) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < unlabelled] = UNLABELLED
    return TensorData(x, y)


def _without_clock(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row less its wall-clock fields (``elapsed_s``, throughput, ...), which no two runs share."""
    return {k: v for k, v in row.items() if not re.search(r"elapsed|_s$|per_s|per_sec|throughput|time", k)}


def _train_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_without_clock(r) for r in history if r.get("split") == "train"]


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [_without_clock(r) for r in rows]


def _assert_rows_close(rows: list[dict[str, Any]], expected: list[dict[str, Any]], rel: float = 1e-12) -> None:
    """Same rows, same keys, same values up to ``rel`` (numbers) or exactly (the rest)."""
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected, strict=True):
        assert row.keys() == exp.keys()
        for k, v in exp.items():
            if isinstance(v, float):
                assert row[k] == pytest.approx(v, rel=rel, abs=0), (exp["step"], k)
            else:
                assert row[k] == v, (exp["step"], k)


def _assert_weights_equal(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


def _latest(run: Path) -> Path | None:
    try:
        return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    except (FileNotFoundError, OSError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(spec: dict[str, Any], tmp: Path, name: str, dist: dict[str, str] | None = None) -> subprocess.Popen:
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p))
    env.update(dist or {})
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(tmp))
    _PROCS.append(proc)
    return proc


def _wait(proc: subprocess.Popen, tmp: Path, name: str, timeout: float = 180) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = (tmp / f"{name}.log").read_text()
    assert proc.returncode == 0, f"worker {name} exited with {proc.returncode}:\n{log[-4000:]}"


def _spawn_two_processes(spec: dict[str, Any], tmp: Path) -> dict[str, subprocess.Popen]:
    """Start ranks 0 and 1 of a 2-process (gloo) run of ``spec``, as torchrun would set their environment."""
    port = str(_free_port())
    procs = {}
    for rank in range(2):
        dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs[f"rank{rank}"] = _spawn(spec, tmp, f"rank{rank}", dist)
    return procs


def _report(report_dir: Path, rank: int = 0, run: int = 0) -> dict[str, Any]:
    return json.loads((report_dir / f"report_rank{rank}_run{run}.json").read_text())


# --------------------------------------------------------------------------------------- gradient accumulation


def _accum_run(micro: int, accum: int, data: TensorData, teacher_model: nn.Module, epochs: int = 2):
    return fit(_mlp(0, dtype=torch.float64), recipes.hinton_kd(temperature=2.0, alpha=0.5), data,
               teacher=teachers.Frozen(copy.deepcopy(teacher_model)), epochs=epochs, batch_size=micro,
               grad_accum=accum, optim=Optim(lr=1e-2), log_every=1, progress=False)


@pytest.mark.parametrize("unlabelled", [0.0, 0.5], ids=["labelled", "mixed"])
def test_grad_accum_equals_one_large_batch(unlabelled: float) -> None:
    data = _data(64, unlabelled, torch.float64)
    if unlabelled:
        assert 0 < data.num_labelled < len(data)
    teacher_model = _mlp(100, dtype=torch.float64)
    big = _accum_run(8, 1, data, teacher_model)
    assert big.steps == 16
    for micro, accum in [(2, 4), (4, 2)]:
        small = _accum_run(micro, accum, data, teacher_model)
        assert small.steps == big.steps
        rows_big, rows_small = _train_rows(big.history), _train_rows(small.history)
        assert [r["step"] for r in rows_small] == [r["step"] for r in rows_big] == list(range(1, 17))
        for rb, rs in zip(rows_big, rows_small, strict=True):
            for key in ("loss", "loss/ce", "loss/kd"):
                assert rs[key] == pytest.approx(rb[key], abs=1e-6), (micro, accum, rb["step"], key)
        for (name, pb), ps in zip(big.student.state_dict().items(), small.student.state_dict().values(), strict=True):
            assert torch.allclose(pb, ps, rtol=0, atol=1e-6), (micro, accum, name, (pb - ps).abs().max())


def test_logged_loss_is_the_global_batch_loss() -> None:
    """One global batch covers the whole (8-item) data set, so step 1's loss is a formula of the initial weights,
    whatever the data order: (1 - alpha) * CE over the 3 labelled items + alpha * T^2 * KL over all 8. Split into
    micro-batches of 2 or 1, the labelled items are spread unevenly, so a per-micro-batch mean would differ."""
    data = _data(8, 0.0, torch.float64)
    y = data.y.clone()
    y[[0, 2, 3, 5, 7]] = UNLABELLED
    data = TensorData(data.x, y)
    teacher_model = _mlp(100, dtype=torch.float64)
    alpha, temp = 0.5, 2.0
    with torch.no_grad():
        s, t = _mlp(0, dtype=torch.float64)(data.x), teacher_model(data.x)
        labelled = y != UNLABELLED
        ce = F.cross_entropy(s[labelled], y[labelled])
        kd = temp**2 * F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                                reduction="batchmean")
    expected = (1 - alpha) * ce + alpha * kd
    for micro, accum in [(8, 1), (2, 4), (1, 8)]:
        row = _train_rows(_accum_run(micro, accum, data, teacher_model, epochs=1).history)[0]
        assert row["step"] == 1
        assert row["loss/ce"] == pytest.approx(float(ce), abs=1e-6), (micro, accum)
        assert row["loss/kd"] == pytest.approx(float(kd), abs=1e-6), (micro, accum)
        assert row["loss"] == pytest.approx(float(expected), abs=1e-6), (micro, accum)


# ------------------------------------------------------------------------------------------------- DDP (gloo)


def _worker_module() -> Any:
    spec = importlib.util.spec_from_file_location("_mentor_train_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(spec: dict[str, Any]) -> FitResult:
    """The spec's run in this process, with the worker's models, data and fit arguments, on one thread."""
    worker = _worker_module()
    student, teacher, method, data, optim = worker.build(spec["case"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(student, method, data, teacher=teacher, **worker.fit_kwargs(spec, optim))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_ddp_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    """Process 1's teacher turns NaN at its 4th call (one dry-run call in fit's checks, then steps 0, 1, 2): both
    processes stop with NonFiniteLossError at step 2, process 1 naming the term, process 0 pointing at another
    process, and neither takes the poisoned step (weights stay finite), instead of one hanging in an all-reduce."""
    spec = {"case": "ddp_nan", "epochs": 2, "log_every": 1, "batch_size": 4, "out": str(tmp_path / "nan"),
            "report_dir": str(tmp_path / "nan_report"), "expect_error": True}
    procs = _spawn_two_processes(spec, tmp_path)
    for name, proc in procs.items():
        _wait(proc, tmp_path, name, timeout=120)
    rank0, rank1 = (_report(tmp_path / "nan_report", rank) for rank in range(2))
    assert rank1["error"] is not None and re.search(r"loss term 'kd' is nan at step 2\b", rank1["error"])
    assert "process 1" in rank1["error"]
    assert rank0["error"] is not None and re.search(r"not finite on another process at step 2\b", rank0["error"])
    assert rank0["weights_finite"] and rank1["weights_finite"]
    assert not (tmp_path / "nan" / "student.safetensors").exists()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    """2 processes x micro-batch 4 (and 2 processes x 2 x 2 accumulation steps, where DDP skips the gradient sync of
    the first micro-batch) equal 1 process x 8: the same global batches, the labelled CE term normalised by the
    labelled count over both processes. Then a 2-process run resumed from a mid-epoch checkpoint (one that cuts a
    log window in two) ends bitwise equal to the same run uninterrupted, with the same metrics rows."""
    base = {"case": "ddp", "epochs": 2, "log_every": 1}
    ddp_runs = [{"batch_size": 4, "out": str(tmp_path / "ddp")},
                {"batch_size": 2, "grad_accum": 2, "out": str(tmp_path / "ddp_accum")}]
    ckpt_run = {"batch_size": 4, "out": str(tmp_path / "ddp_ckpt"), "log_every": 2, "checkpoint_every": 3,
                "keep_checkpoints": 10}
    resumed_run = {**ckpt_run, "resume": True, "rewind_latest_to": "step_00000003"}
    ddp_spec = {**base, "report_dir": str(tmp_path / "ddp_report"), "runs": [*ddp_runs, ckpt_run, resumed_run]}
    procs = _spawn_two_processes(ddp_spec, tmp_path)
    ref = _reference({**base, "batch_size": 8, "out": str(tmp_path / "ref")})  # while the workers start
    for name, proc in procs.items():
        _wait(proc, tmp_path, name)

    assert ref.steps == 16
    rows_ref = _train_rows(ref.history)
    assert [r["step"] for r in rows_ref] == list(range(1, 17))
    w_ref = load_file(str(tmp_path / "ref" / "student.safetensors"))
    for run_index, run in enumerate(ddp_runs):
        ranks = [_report(tmp_path / "ddp_report", rank, run_index) for rank in range(2)]
        for rep in ranks:
            assert rep["world_size"] == 2
            assert rep["steps"] == 16  # 64 items / global batch 8, 2 epochs
            # the student (only) is wrapped by DDP; the teacher is never handed to Accelerate and never optimised
            assert rep["num_ddp_wrapped"] == 1 and rep["ddp_wraps_student"]
            assert not rep["teacher_is_ddp"] and not rep["teacher_handed_to_accelerate"]
            assert rep["num_optimizers"] == 1
            assert rep["teacher_params_in_optimizer"] == 0
            assert rep["student_params_in_optimizer"] == rep["num_student_params"]
            assert not rep["teacher_requires_grad"] and not rep["teacher_has_grad"]
            assert not rep["teacher_in_train_mode"] and rep["teacher_unchanged"]

            rows = _train_rows(rep["history"])
            assert [r["step"] for r in rows] == list(range(1, 17))
            for a, b in zip(rows_ref, rows, strict=True):
                for key in ("loss", "loss/ce", "loss/kd"):
                    assert b[key] == pytest.approx(a[key], abs=1e-5), (run, rep["rank"], a["step"], key)
        out = Path(run["out"])
        assert _metrics(out) == _train_rows(ranks[0]["history"])  # rank 0 writes the file, one row per step

        w_ddp = load_file(str(out / "student.safetensors"))
        assert w_ref.keys() == w_ddp.keys()
        for k in w_ref:
            assert torch.allclose(w_ref[k], w_ddp[k], rtol=0, atol=1e-8), (run, k, (w_ref[k] - w_ddp[k]).abs().max())

    for rank in range(2):
        whole, resumed = (_report(tmp_path / "ddp_report", rank, i) for i in (2, 3))
        assert whole["steps"] == resumed["steps"] == 16
        assert resumed["weights_sha256"] == whole["weights_sha256"], f"rank {rank}: resumed weights differ"
        # the log window the checkpoint cut is restored as sums over processes: equal up to rounding
        _assert_rows_close(_train_rows(resumed["history"]), _train_rows(whole["history"]))
    rows = _metrics(tmp_path / "ddp_ckpt")
    assert [r["step"] for r in rows] == list(range(2, 17, 2))  # no duplicates, none missing
    _assert_rows_close(rows, _train_rows(_report(tmp_path / "ddp_report", 0, 2)["history"]))


# --------------------------------------------------------------------------------------- SIGKILL and resume


def _max_train_step(run: Path) -> int:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if row.get("split") == "train":
            steps.append(int(row["step"]))
    return max(steps)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "checkpoint_every", "log_every"),
    # ema: a log row every 4 steps and a checkpoint every 6, so checkpoints cut log windows in two
    [("dropout", 7, 1), ("ema", 6, 4)],
)
def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(
    tmp_path: Path, case: str, checkpoint_every: int, log_every: int
) -> None:
    # 400 items / batch 8 = 50 steps per epoch, 2 epochs; the killed run sleeps 20 ms per step so it can be caught.
    base = {"case": case, "epochs": 2, "batch_size": 8, "checkpoint_every": checkpoint_every, "log_every": log_every}
    run = tmp_path / "run"
    victim = _spawn({**base, "out": str(run), "report_dir": str(tmp_path / "killed_report"), "slow": 0.02},
                    tmp_path, "killed")
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the run ended before it could be killed:\n" + (
            tmp_path / "killed.log").read_text()[-3000:]
        ckpt = _latest(run)
        if ckpt is not None and _max_train_step(run) >= int(ckpt.name.split("_")[-1]) + 2:
            victim.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    victim.wait(timeout=30)
    assert killed, "no checkpoint appeared in time"
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "student.safetensors").exists()
    ckpt = _latest(run)
    assert ckpt is not None
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] % checkpoint_every == 0 and 0 < state["step"] < 100
    assert 0 < state["batch"] < 50, f"the checkpoint should sit in the middle of an epoch: {state}"
    assert _max_train_step(run) > state["step"]  # the killed run logged rows past its checkpoint

    resumed = _spawn({**base, "out": str(run), "report_dir": str(tmp_path / "resumed_report"), "resume": True},
                     tmp_path, "resumed")
    ref_dir = tmp_path / "ref"
    ref = _reference({**base, "out": str(ref_dir)})  # uninterrupted, while the resumed run starts
    _wait(resumed, tmp_path, "resumed")
    assert _report(tmp_path / "resumed_report")["steps"] == ref.steps == 100

    _assert_weights_equal(ref_dir / "student.safetensors", run / "student.safetensors")
    ref_final, run_final = _latest(ref_dir), _latest(run)
    assert ref_final is not None and run_final is not None and ref_final.name == run_final.name == "step_00000100"
    if case == "ema":  # the EMA teacher's state was restored and continued exactly
        _assert_weights_equal(ref_final / "teacher.safetensors", run_final / "teacher.safetensors")

    rows_run = _metrics(run)
    steps = [r["step"] for r in rows_run]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    assert steps == sorted(steps)
    assert rows_run == _metrics(ref_dir)  # same rows, same values: log windows cut by the checkpoint included


# ------------------------------------------------------------------------------------------ non-finite losses


def _nan_teacher(model: nn.Module, nan_from_call: int | None) -> teachers.Callable:
    calls = {"n": 0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        z = model(x)
        return torch.full_like(z, math.nan) if nan_from_call is not None and calls["n"] >= nan_from_call else z

    return teachers.Callable(fn)


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    data = _data(64, 0.25)
    teacher_model = _mlp(100)
    kwargs: dict[str, Any] = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "optim": Optim(lr=1e-2),
                              "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10, "progress": False}
    method = recipes.hinton_kd(temperature=2.0, alpha=0.5)
    clean = fit(_mlp(0), method, data, teacher=_nan_teacher(teacher_model, None), out=tmp_path / "clean", **kwargs)
    assert clean.steps == 8

    # Teacher calls: 1 is fit's set-up check, then two micro-batches per step: step s uses calls 2s+2 and 2s+3.
    # NaN from call 9 on: the second micro-batch of step 3 (0-based; 3 steps completed, checkpoint at 2).
    student = _mlp(0)
    run = tmp_path / "failed"
    with pytest.raises(NonFiniteLossError) as info:
        fit(student, method, data, teacher=_nan_teacher(teacher_model, 9), out=run, **kwargs)
    message = str(info.value)
    assert re.search(r"\bstep 3\b", message), message
    assert "'kd'" in message and "nan" in message.lower(), message
    assert "'ce'" not in message, message  # the label term stayed finite
    # the NaN gradients were never applied
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # a failed run has no final weights or result; the last good checkpoint is intact and complete
    assert not (run / "student.safetensors").exists() and not (run / "result.json").exists()
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    assert _metrics(run) == _metrics(tmp_path / "clean")[:3]
    ckpt = _latest(run)
    assert ckpt is not None and ckpt.name == "step_00000002"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))
    _assert_weights_equal(tmp_path / "clean" / "checkpoints" / "step_00000002" / "student.safetensors",
                          ckpt / "student.safetensors")

    # ... and resuming from it with a healthy teacher finishes exactly like the clean run
    result = fit(_mlp(0), method, data, teacher=_nan_teacher(teacher_model, None), out=run, resume=True, **kwargs)
    assert result.steps == 8
    _assert_weights_equal(tmp_path / "clean" / "student.safetensors", run / "student.safetensors")
    assert _metrics(run) == _metrics(tmp_path / "clean")


def test_exploding_lr_stops_with_non_finite_loss(tmp_path: Path) -> None:
    data = _data(64, 0.0)
    with pytest.raises(NonFiniteLossError, match=r"loss term '(ce|kd)' is (nan|inf|-inf) at step \d+"):
        fit(_mlp(0), recipes.hinton_kd(), data, teacher=teachers.Frozen(_mlp(100)), epochs=2, batch_size=8,
            optim=Optim(name="sgd", lr=1e38, momentum=0.0), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "student.safetensors").exists()


# --------------------------------------------------------------------------------------- atomic checkpoints


def _small_run(out: Path, **kwargs: Any):
    return fit(_mlp(0), recipes.hinton_kd(temperature=2.0), _data(64, 0.25), teacher=teachers.Frozen(_mlp(100)),
               epochs=2, batch_size=8, optim=Optim(lr=1e-2), log_every=1, checkpoint_every=4, progress=False,
               out=out, **kwargs)


def test_leftover_tmp_checkpoint_is_ignored_and_replaced_on_resume(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert _small_run(ref, keep_checkpoints=10).steps == 16

    # A run killed while writing step 12: its complete checkpoints are 4 and 8 (latest -> 8), step 12 is a
    # half-written temporary folder, a temporary 'latest' points at it, and rows past step 8 were logged.
    run = tmp_path / "run"
    _small_run(run, keep_checkpoints=10)
    ckpts = run / "checkpoints"
    (run / "student.safetensors").unlink()
    (run / "result.json").unlink()
    shutil.rmtree(ckpts / "step_00000016")
    tmp = ckpts / ".tmp-step_00000012"
    (ckpts / "step_00000012").rename(tmp)
    half = (tmp / "student.safetensors").read_bytes()
    (tmp / "student.safetensors").write_bytes(half[: len(half) // 2])
    (tmp / "state.json").unlink()
    (ckpts / "latest.tmp").write_text(".tmp-step_00000012")
    (ckpts / "latest").write_text("step_00000008")
    assert _max_train_step(run) == 16

    result = _small_run(run, keep_checkpoints=10, resume=True)
    assert result.steps == 16
    _assert_weights_equal(ref / "student.safetensors", run / "student.safetensors")
    assert not tmp.exists() and not list(ckpts.glob(".tmp-*"))
    state = json.loads((ckpts / "step_00000012" / "state.json").read_text())
    assert state["step"] == 12
    _assert_weights_equal(ref / "checkpoints" / "step_00000012" / "student.safetensors",
                          ckpts / "step_00000012" / "student.safetensors")
    assert (ckpts / "latest").read_text().strip() == "step_00000016"
    assert _metrics(run) == _metrics(ref)


def test_resume_after_max_steps_continues_the_same_data_order(tmp_path: Path) -> None:
    """Stopping at max_steps in the middle of an epoch, then resuming with more steps, equals one run."""
    ref = tmp_path / "ref"
    assert _small_run(ref).steps == 16
    run = tmp_path / "run"
    assert _small_run(run, max_steps=5).steps == 5
    assert _small_run(run, resume=True).steps == 16
    _assert_weights_equal(ref / "student.safetensors", run / "student.safetensors")
    assert _train_rows(_metrics(run)) == _train_rows(_metrics(ref))


def test_elapsed_seconds_continue_across_a_resume(tmp_path: Path) -> None:
    """``elapsed_s`` counts training time of the whole run: after a resume it continues from the checkpoint's."""
    run = tmp_path / "run"
    _small_run(run, max_steps=5)
    state = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "state.json").read_text())
    assert state["elapsed_s"] > 0
    _small_run(run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    after = [r["elapsed_s"] for r in rows if r["step"] > 5]
    assert after and min(after) >= state["elapsed_s"]
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
