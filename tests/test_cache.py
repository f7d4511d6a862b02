"""mentor.cache and teachers.Cached: round trip, interruption, damage, fingerprints, parallel builds, DDP reads."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mentor import cache, cli, losses, recipes, teachers
from mentor.data import TensorData
from mentor.train import Optim, fit

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
WORKER = TESTS / "_cache_worker.py"
sys.path.insert(0, str(TESTS))
import _cache_worker  # noqa: E402

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _checksums(root: Path) -> list[str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [s["sha256"] for s in manifest["shards"]]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p))
    env.update(extra or {})
    return env


def _spawn(spec: dict[str, Any], tmp: Path, name: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, str(WORKER), str(path)], env=_env(extra), stdout=log,
                            stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("values_dtype", ["float16", "bfloat16"])
def test_round_trip_topk_and_features(tmp_path: Path, values_dtype: str) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(100)
    spec = cache.CacheSpec(k=3, values_dtype=values_dtype, features=("1",), shard_size=30, batch_size=16)
    assert cache.build(model, x, tmp_path / "c", spec=spec, progress=False) == tmp_path / "c" / "manifest.json"
    reader = cache.TeacherCache(tmp_path / "c")
    index = torch.tensor([99, 0, 31, 30, 29, 64, 0])
    rows = reader.get(index)
    with torch.no_grad():
        hidden = model[1](model[0](x[index]))
        log_p = torch.log_softmax(model[2](hidden), -1)
    want_values, want_indices = log_p.topk(3, dim=-1)
    tol = 1e-3 if values_dtype == "float16" else 8e-3
    assert rows["indices"].dtype == torch.long and torch.equal(rows["indices"], want_indices)
    assert torch.allclose(rows["values"], want_values, rtol=tol, atol=tol)
    assert torch.allclose(rows["feat.1"], hidden, atol=1e-3)
    summary = cache.info(tmp_path / "c")
    assert summary["indices_dtype"] == "uint8" and summary["shards"] == 4
    assert summary["logit_bytes_per_item"] == 3 * 2 + 3 * 1


def test_shard_files_equal_an_independent_layout(tmp_path: Path) -> None:
    """A shard is its arrays one after another, little-endian, each at a 64-byte aligned offset, zero-padded."""
    model, x = _cache_worker.teacher(), _cache_worker.data(70)
    spec = cache.CacheSpec(k=3, features=("1",), shard_size=50, batch_size=16)
    cache.build(model, x, tmp_path, spec=spec, progress=False)
    with torch.no_grad():
        hidden = model[1](model[0](x))
        logits = model[2](hidden)
    top, indices = logits.topk(3, dim=-1)
    values = top - logits.logsumexp(dim=-1, keepdim=True)
    for shard in json.loads((tmp_path / "manifest.json").read_text())["shards"]:
        rows = slice(shard["start"], shard["stop"])
        want = b""
        for array in (values[rows].half().numpy().astype("<f2"), indices[rows].numpy().astype("u1"),
                      hidden[rows].half().numpy().astype("<f2")):
            want += bytes(-len(want) % 64) + array.tobytes()
        want += bytes(-len(want) % 64)
        raw = (tmp_path / shard["file"]).read_bytes()
        assert raw == want and hashlib.sha256(raw).hexdigest() == shard["sha256"]


def test_log_partition_is_torchs_logsumexp_to_the_last_bit() -> None:
    """The build's log-partition (logits more than 87 below their row's maximum raised to that bound) against
    torch's, on rows spanning up to +-3000 (most terms far below exp(-87)), and on rows with infinite or NaN
    entries."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 37, generator=g) * torch.logspace(-1, 3, 4000)[:, None]
    inf, nan = float("inf"), float("nan")
    special = torch.tensor([[-inf, -inf, -inf], [0.0, -inf, 1.0], [inf, 0.0, 1.0], [nan, 0.0, 1.0],
                            [-1e30, 0.0, 1e30], [3e38, 3e38, 0.0], [-200.0, -100.0, 0.0]])
    for x in (logits, special):
        torch.testing.assert_close(cache._log_partition(x), x.logsumexp(dim=-1, keepdim=True), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize(("classes", "dtype"), [(10, "uint8"), (300, "uint16"), (70000, "int32")])
def test_index_dtype_fits_the_class_count(tmp_path: Path, classes: int, dtype: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, classes)
    x = torch.randn(6, 4)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=4), progress=False)
    assert cache.info(tmp_path)["indices_dtype"] == dtype
    got = cache.TeacherCache(tmp_path).get(torch.arange(6))["indices"]
    with torch.no_grad():
        assert torch.equal(got, model(x).topk(4, dim=-1).indices)


def test_sequence_items_store_per_position_topk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 300))  # [B, L] tokens -> [B, L, V] logits
    x = torch.randint(0, 50, (12, 7))
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=16, shard_size=5), progress=False)
    summary = cache.info(tmp_path)
    assert summary["positions"] == [7]
    assert summary["logit_bytes_per_position"] == 16 * 2 + 16 * 2 <= 64
    rows = cache.TeacherCache(tmp_path).get(torch.tensor([11, 3]))
    with torch.no_grad():
        want = torch.log_softmax(model(x[[11, 3]]), -1).topk(16, -1)
    assert rows["values"].shape == (2, 7, 16) and torch.equal(rows["indices"], want.indices)


def test_cached_teacher_with_all_classes_trains_like_the_online_teacher(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(256)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(), progress=False)
    data = TensorData(x, torch.full((256,), -1))
    method = recipes.transfer_kd(temperature=2.0)
    runs = []
    for teacher, m in ((teachers.Frozen(model), method),
                       (teachers.Cached(tmp_path), cache.use_sparse_targets(method, "rest"))):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10))
        runs.append(fit(student, m, data, teacher=teacher, epochs=2, batch_size=32, optim=Optim(lr=1e-2),
                        log_every=1, progress=False))
    online = [r["loss"] for r in runs[0].history if r["split"] == "train"]
    cached = [r["loss"] for r in runs[1].history if r["split"] == "train"]
    assert len(online) == len(cached) == 16
    assert np.allclose(online, cached, rtol=2e-3, atol=1e-5)  # fp16 storage of the log-probabilities


def test_use_sparse_targets_rewrites_only_plain_kl_terms() -> None:
    method = cache.use_sparse_targets(recipes.hinton_kd(temperature=3.0, alpha=0.7), "renormalize")
    kinds = {t.name: t for t in method.terms}
    assert kinds["kd"].loss is losses.sparse_kl_div and kinds["kd"].kwargs == {"temperature": 3.0,
                                                                              "tail": "renormalize"}
    assert kinds["ce"].loss is losses.cross_entropy
    assert cache.use_sparse_targets(recipes.dkd(), "rest").terms == recipes.dkd().terms


@pytest.mark.parametrize("tail", ["rest", "renormalize"])
def test_dense_from_topk(tail: str) -> None:
    log_p = torch.log_softmax(torch.randn(5, 10, generator=torch.Generator().manual_seed(1)), -1)
    values, indices = log_p.topk(4, -1)
    dense = teachers.dense_from_topk(values, indices, 10, tail)
    assert torch.equal(dense.gather(-1, indices), values)
    probs = dense.exp()
    if tail == "rest":
        assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-6)
        dropped = probs.sum(-1) - values.exp().sum(-1)
        assert torch.allclose(dropped, 1 - values.exp().sum(-1), atol=1e-6)
    else:
        assert int((dense == float("-inf")).sum()) == 5 * 6


# ------------------------------------------------------------------------------------------- interruption


@pytest.mark.slow
def test_sigkill_mid_build_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    spec = {"case": "build", "n": 120, "cache": {"k": 4, "shard_size": 10, "batch_size": 5}}
    ref = _spawn({**spec, "out": str(tmp_path / "ref")}, tmp_path, "ref")
    assert ref.wait(timeout=120) == 0, (tmp_path / "ref.log").read_text()
    out = tmp_path / "killed"
    proc = _spawn({**spec, "out": str(out), "slow": 0.05}, tmp_path, "killed")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard-*.json")))
    assert 3 <= done < 12 and not (out / "manifest.json").exists()
    with pytest.raises(cache.CacheError, match="partial build"):
        cache.TeacherCache(out)
    again = _spawn({**spec, "out": str(out)}, tmp_path, "again")
    assert again.wait(timeout=120) == 0, (tmp_path / "again.log").read_text()
    assert _checksums(out) == _checksums(tmp_path / "ref")
    assert not list(out.glob(".shard-*.tmp"))


def test_rerun_with_another_plan_is_refused(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(40)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=4, shard_size=10), progress=False)
    with pytest.raises(cache.CacheError, match=r"spec\.k: existing 4, requested 5"):
        cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=5, shard_size=10), progress=False)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=5, shard_size=10), progress=False, overwrite=True)
    assert cache.info(tmp_path)["k"] == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(cache.CacheError, match="not empty"):
        cache.build(model, x, tmp_path / "other", progress=False)


def test_a_killed_builders_temporary_plan_does_not_block_a_build(tmp_path: Path) -> None:
    """A temporary left by a builder killed while writing plan.json is not "another file"; the plan written (by
    the writer thread, in a new cache) holds the data's fingerprint, and the builder's manifest is the one
    `finalize` makes from the files alone."""
    (tmp_path / ".plan.json.k1ll3d.tmp").write_text("{")
    model, x = _cache_worker.teacher(), _cache_worker.data(40)
    assert cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=2, shard_size=16), progress=False) is not None
    assert json.loads((tmp_path / "plan.json").read_text())["dataset"]["fingerprint"] == cache.fingerprint_data(x)
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").unlink()
    assert cache.finalize(tmp_path) == tmp_path / "manifest.json"
    assert (tmp_path / "manifest.json").read_text() == manifest and cache.verify(tmp_path) == []


# ------------------------------------------------------------------------------------------------- damage


def test_flipped_byte_is_caught_by_verify_and_the_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(50)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=4, shard_size=20), progress=False)
    assert cache.verify(tmp_path) == []
    assert cli.main(["cache", "verify", str(tmp_path)]) == 0
    shard = tmp_path / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 0x10
    shard.write_bytes(bytes(raw))
    problems = cache.verify(tmp_path)
    assert len(problems) == 1 and "shard-00001.bin" in problems[0] and "sha256" in problems[0]
    with pytest.raises(cache.CacheError, match=r"shard-00001\.bin"):
        cache.TeacherCache(tmp_path)
    assert cli.main(["cache", "verify", str(tmp_path)]) == 1
    assert "shard-00001.bin" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- fingerprints


def test_other_teacher_or_dataset_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(64)
    cache.build(model, x, tmp_path, progress=False)
    reader = cache.TeacherCache(tmp_path)
    other = _cache_worker.teacher(seed=7)
    ours, theirs = cache.fingerprint_model(model), cache.fingerprint_model(other)
    assert ours != theirs and reader.teacher_fingerprint == ours
    with pytest.raises(cache.CacheError) as err:
        reader.check_matches(teacher=theirs)
    assert ours in str(err.value) and theirs in str(err.value)
    other_x = _cache_worker.data(64, seed=3)
    with pytest.raises(cache.CacheError) as err:
        fit(nn.Linear(8, 10), recipes.transfer_kd(), TensorData(other_x, torch.full((64,), -1)),
            teacher=teachers.Cached(reader), epochs=1, batch_size=32, progress=False)
    assert cache.fingerprint_data(x) in str(err.value) and cache.fingerprint_data(other_x) in str(err.value)


def _teacher_run(tmp: Path, seed: int) -> Path:
    """A finished 'run directory' for a cnn teacher, as `mentor train` would leave it (weights + config)."""
    from mentor.models import build_model
    from mentor.train import save_model

    run = tmp / f"teacher{seed}"
    run.mkdir()
    torch.manual_seed(seed)
    save_model(build_model("cnn", {"channels": 8}), run / "student.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "t", "student": {"model": "cnn",
                                                                               "args": {"channels": 8}}}))
    return run


def _config(tmp: Path, teacher_run: Path, **teacher: Any) -> Path:
    cfg = {"name": "cached", "data": {"train": "transfer", "transfer_size": 600},
           "student": {"model": "mlp", "args": {"hidden": [32]}},
           "teacher": {"run": str(teacher_run), "cache": str(tmp / "cache"), **teacher},
           "recipe": {"name": "transfer_kd", "args": {"temperature": 2.0}},
           "cache": {"k": 4, "shard_size": 256},
           "train": {"epochs": 1, "batch_size": 100, "out": str(tmp / "runs"), "progress": False}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_build_info_train_and_refuse_another_teacher(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _teacher_run(tmp_path, 0))
    assert cli.main(["cache", "build", str(config), "--quiet"]) == 0
    assert cli.main(["cache", "info", str(tmp_path / "cache"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 600 and summary["k"] == 4 and summary["logit_bytes_per_item"] == 12
    assert cli.main(["train", str(config)]) == 0
    result = json.loads((tmp_path / "runs" / "cached" / "result.json").read_text())
    assert "agreement" in result["metrics"]  # the named teacher network scores the evaluation
    other = _config(tmp_path, _teacher_run(tmp_path, 1))
    assert cli.main(["train", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another teacher" in err and err.count("sha256:") == 2


@pytest.mark.slow
def test_cli_two_builder_processes_equal_one(tmp_path: Path) -> None:
    run = _teacher_run(tmp_path, 0)
    config = _config(tmp_path, run)
    one = subprocess.run([sys.executable, "-m", "mentor", "cache", "build", str(config), "cache.dir=" +
                          str(tmp_path / "one"), "--quiet"], env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "mentor", "cache", "build", str(config), "cache.dir=" +
                          str(tmp_path / "two"), "--num-processes", "2", "--quiet"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert _checksums(tmp_path / "two") == _checksums(tmp_path / "one")
    assert len(_checksums(tmp_path / "one")) == 3


# ----------------------------------------------------------------------------------------------- reading


class _Rows(torch.utils.data.Dataset):
    def __init__(self, reader: cache.TeacherCache) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.reader.get(torch.tensor([i]))["values"][0]


def test_dataloader_workers_read_the_same_rows(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(64)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=2, shard_size=16), progress=False)
    reader = cache.TeacherCache(tmp_path)
    reader.get(torch.tensor([0]))  # maps a shard in this process before the workers fork
    loader = torch.utils.data.DataLoader(_Rows(reader), batch_size=8, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(got, reader.get(torch.arange(64))["values"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_two_processes_read_each_item_once_per_epoch(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(128)
    cache.build(model, x, tmp_path / "c", spec=cache.CacheSpec(k=4, shard_size=50), progress=False)
    spec = {"case": "ddp_reads", "n": 128, "cache_dir": str(tmp_path / "c"), "epochs": 2, "batch_size": 16,
            "report_dir": str(tmp_path)}
    for attempt in range(2):  # a second try only if the free port was taken before the group could bind it
        port = str(_free_port())
        procs = [_spawn(spec, tmp_path, f"rank{r}", {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                                    "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                                    "LOCAL_WORLD_SIZE": "2"})
                 for r in range(2)]
        codes = [p.wait(timeout=180) for p in procs]
        logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
        if attempt == 0 and any(codes) and any("address already in use" in log.lower() for log in logs):
            continue
        break
    for r in range(2):
        assert codes[r] == 0, logs[r][-3000:]
    reads = [np.array(json.loads((tmp_path / f"reads_rank{r}.json").read_text())) for r in range(2)]
    setup = np.zeros(128, dtype=np.int64)
    setup[:2] = 1  # each process's dry run (check_setup) reads items 0 and 1 once before training
    for r in range(2):
        assert (reads[r] - setup).sum() == 2 * 64  # each rank: half of the items, in each of 2 epochs
    assert np.array_equal(reads[0] - setup + reads[1] - setup, np.full(128, 2))  # every item once per epoch


# --------------------------------------------------------------------------------------------------- views


def _noise(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """A per-item seeded augmentation for the test: Gaussian noise drawn from each item's own generator."""
    out = x.clone()
    for i, s in enumerate(seeds.tolist()):
        out[i] += torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
    return out


def test_views_store_seeds_and_the_student_sees_the_teachers_view(tmp_path: Path) -> None:
    model, x = _cache_worker.teacher(), _cache_worker.data(40)
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(k=10, num_views=3, shard_size=16), augment=_noise,
                progress=False)
    cached = teachers.Cached(tmp_path, augment=_noise)
    index = torch.tensor([5, 17, 39, 0])
    for epoch in (0, 1, 2):
        seen = cached.student_inputs(x[index], index, epoch)
        assert not torch.equal(seen, x[index])
        with torch.no_grad():
            want = torch.log_softmax(model(seen), -1)
        got = cached.targets(seen, index=index, epoch=epoch)["logits"]
        assert torch.allclose(got, want, atol=2e-3)
    views = torch.stack([cached.views(torch.arange(40), e) for e in range(6)])
    assert set(views.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="augmentation"):
        teachers.Cached(tmp_path)
    with pytest.raises(ValueError, match="needs an augmentation"):
        cache.build(model, x, tmp_path / "v", spec=cache.CacheSpec(num_views=2), progress=False)


def test_item_seeds_depend_only_on_item_view_and_seed() -> None:
    a = cache.item_seeds(np.array([3, 9, 4]), 4, seed=11)
    b = cache.item_seeds(np.array([4, 3]), 4, seed=11)
    assert np.array_equal(a[[2, 0]], b) and (a >= 0).all()
    assert len(np.unique(a)) == a.size
    assert not np.array_equal(cache.item_seeds(np.array([3]), 4, seed=12), a[:1])


def test_bad_spec_values_name_the_key() -> None:
    for kwargs, key in (({"k": 0}, "k"), ({"values_dtype": "float32"}, "values_dtype"),
                        ({"num_views": 0}, "num_views"), ({"shard_size": -1}, "shard_size")):
        with pytest.raises(ValueError, match=f"cache {key}"):
            cache.CacheSpec(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(cache.CacheError, match="not a finished teacher cache"):
        cache.TeacherCache("/nonexistent/cache")


def test_fitnet_on_cached_features_equals_fitnet_on_the_teacher_network(tmp_path: Path) -> None:
    from mentor.models import build_model

    torch.manual_seed(0)
    teacher_net = build_model("cnn", {"channels": 8})
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(5))
    data = TensorData(x, labels)
    spec = cache.CacheSpec(features=("classifier",), feature_inputs=True)
    cache.build(teacher_net, x, tmp_path, spec=spec, progress=False)
    cached = teachers.Cached(tmp_path)
    assert cached.feature_shapes() == {("classifier", True): torch.Size([40])}
    runs = []
    for teacher in (teachers.Frozen(teacher_net), cached):
        torch.manual_seed(1)
        student = build_model("mlp", {"hidden": [16]})
        runs.append(fit(student, recipes.fitnet(alpha=0.5), data, teacher=teacher, epochs=2, batch_size=32,
                        optim=Optim(lr=1e-2), log_every=1, progress=False))
    online = [r["loss/hint"] for r in runs[0].history if r["split"] == "train"]
    stored = [r["loss/hint"] for r in runs[1].history if r["split"] == "train"]
    assert len(online) == 6 and np.allclose(online, stored, rtol=2e-3)  # fp16 features
    with pytest.raises(ValueError, match="stored teacher features"):
        fit(build_model("mlp", {"hidden": [16]}), recipes.fitnet(teacher_layer="conv3"), data, teacher=cached,
            epochs=1, batch_size=32, progress=False)


def test_cli_cache_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _teacher_run(tmp_path, 0)
    config = _config(tmp_path, run)
    cfg = yaml.safe_load(config.read_text())
    no_net = tmp_path / "no_net.yaml"
    no_net.write_text(yaml.safe_dump({**cfg, "teacher": {"cache": str(tmp_path / "cache")}}))
    assert cli.main(["cache", "build", str(no_net)]) == 2
    assert "teacher.run" in capsys.readouterr().err
    assert cli.main(["cache", "build", str(config), "cache.num_views=2"]) == 2
    assert "cache.augment" in capsys.readouterr().err
    assert cli.main(["cache", "build", str(config), "cache.k=0"]) == 2
    assert "cache.k" in capsys.readouterr().err
    assert cli.main(["train", str(config)]) == 2  # no cache built yet
    assert "not a finished teacher cache" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cached").exists()  # refused before anything was written


def test_train_from_a_cache_alone(tmp_path: Path) -> None:
    run = _teacher_run(tmp_path, 0)
    config = _config(tmp_path, run)
    assert cli.main(["cache", "build", str(config), "--quiet"]) == 0
    cfg = yaml.safe_load(config.read_text())
    alone = tmp_path / "alone.yaml"
    alone.write_text(yaml.safe_dump({**cfg, "name": "alone", "teacher": {"cache": str(tmp_path / "cache"),
                                                                         "tail": "renormalize"}}))
    assert cli.main(["train", str(alone)]) == 0
    metrics = json.loads((tmp_path / "runs" / "alone" / "result.json").read_text())["metrics"]
    assert "accuracy" in metrics and "agreement" not in metrics  # no teacher network to score the test split


def test_ced_views_from_the_config_train_on_the_teachers_views(tmp_path: Path) -> None:
    run = _teacher_run(tmp_path, 0)
    config = _config(tmp_path, run)
    views = ["cache.num_views=3", "cache.augment=strong", "cache.k=10"]
    assert cli.main(["cache", "build", str(config), *views, "--quiet"]) == 0
    summary = cache.info(tmp_path / "cache")
    assert summary["views"]["num_views"] == 3 and "RandAugment" in summary["views"]["augmentation"]
    assert cli.main(["train", str(config), *views]) == 0
    assert cli.main(["train", str(config), "cache.augment=sideways"]) == 2


def test_ced_teacher_targets_match_the_teacher_on_the_student_view(tmp_path: Path) -> None:
    from mentor.run import build_augment

    model, x = _cache_worker.teacher(), _cache_worker.data(30)
    model = nn.Sequential(nn.Flatten(), model)
    augment = build_augment("strong")
    cache.build(model, x, tmp_path, spec=cache.CacheSpec(num_views=4), augment=augment, progress=False)
    cached = teachers.Cached(tmp_path, augment=augment)
    index = torch.arange(30)
    seen = cached.student_inputs(x, index, epoch=5)
    with torch.no_grad():
        assert torch.allclose(cached.targets(seen, index=index, epoch=5)["logits"],
                              torch.log_softmax(model(seen), -1), atol=2e-3)


def test_mvq_codes_from_a_cache_train_like_the_online_quantized_teacher(tmp_path: Path) -> None:
    from mentor import mvq
    from mentor.models import build_model
    from mentor.taps import Taps

    torch.manual_seed(0)
    net = build_model("cnn", {"channels": 8})
    x = torch.randn(128, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), Taps(net, ["classifier"], inputs=True) as taps:
        net(x)
        feats = taps.pop()["classifier"]
    q = mvq.MultiCodebookQuantizer(feats.shape[1], num_codebooks=4, codebook_size=16).fit(feats, iters=2, seed=0)
    quantized = mvq.QuantizedTeacher(net, "classifier", q, inputs=True)
    cache.build(quantized, x, tmp_path, spec=cache.CacheSpec(outputs=("codes",)), progress=False)
    summary = cache.info(tmp_path)
    assert summary["bytes_per_item"] < 10 * 2 + 10 + 4 + 64  # logits (fp16 + uint8 indices) + 4 uint8 codes
    rows = cache.TeacherCache(tmp_path).get(torch.arange(128))
    assert rows["out.codes"].dtype == torch.uint8 and torch.equal(rows["out.codes"], q.encode(feats))
    data = TensorData(x, torch.full((128,), -1))
    base = recipes.transfer_kd(temperature=2.0)
    runs = []
    for teacher, method in ((teachers.Frozen(quantized), mvq.with_code_prediction(base, "classifier", inputs=True)),
                            (teachers.Cached(tmp_path), cache.use_sparse_targets(mvq.with_code_prediction(
                                base, "classifier", inputs=True, code_shape=(4, 16))))):
        torch.manual_seed(1)
        student = build_model("mlp", {"hidden": [16]})
        runs.append(fit(student, method, data, teacher=teacher, epochs=2, batch_size=32, optim=Optim(lr=1e-2),
                        log_every=1, progress=False))
    online = [r["loss/mvq_ce"] for r in runs[0].history if r["split"] == "train"]
    stored = [r["loss/mvq_ce"] for r in runs[1].history if r["split"] == "train"]
    assert len(online) == 8 and np.allclose(online, stored, rtol=1e-3)
