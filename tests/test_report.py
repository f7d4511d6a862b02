"""Tests for mentor.report: run reports from real (tiny) training runs, and comparison reports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from mentor.config import config_from_dict
from mentor.report import format_value, write_comparison_report, write_report
from mentor.run import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(out: Path, name: str, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "data": {"num_labelled": 200},
        "student": {"model": "mlp", "args": {"hidden": [16]}},
        "recipe": {"name": "supervised"},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 50, "out": str(out), "progress": False, "cpu": True, "log_every": 2},
    }
    raw.update(extra)
    return raw


def _train(raw: dict[str, Any]) -> Path:
    cfg = config_from_dict(raw)
    run(cfg, report=False)
    return cfg.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A supervised run (it also serves as the teacher) and a hinton_kd run that distils from it."""
    out = tmp_path_factory.mktemp("runs")
    teacher = _train(_config(out, "teacher"))
    kd = _train(_config(out, "kd", seed=1, recipe={"name": "hinton_kd", "args": {"temperature": 2.0}},
                        teacher={"run": str(teacher)}))
    return {"teacher": teacher, "kd": kd}


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def _table_value(report: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", report, flags=re.MULTILINE)
    assert match is not None, f"no table row {label!r} in the report"
    return match.group(1)


def _no_temporaries(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_report_without_teacher(runs: dict[str, Path]) -> None:
    run_dir = runs["teacher"]
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()
    result = json.loads((run_dir / "result.json").read_text())
    accuracy = result["metrics"]["accuracy"]
    assert _table_value(text, "accuracy") == f"{accuracy:.4f}"
    assert _table_value(text, "ECE (15 bins)") == f"{result['metrics']['ece']:.4f}"
    assert _table_value(text, "parameters") == f"{result['metrics']['params']:,}"
    # mlp 40 -> 16 -> 10
    assert result["metrics"]["params"] == 40 * 16 + 16 + 16 * 10 + 10
    assert _table_value(text, "agreement with the teacher (top-1)") == "n/a (no teacher)"
    latency = _table_value(text, "latency per batch of 1000 (ms, CPU)")
    assert float(latency) > 0
    assert text.startswith("# teacher: supervised")
    assert "```yaml\n" in text and "num_labelled: 200" in text
    for name in ("loss", "eval", "reliability"):
        _assert_png(run_dir / "plots" / f"{name}.png")
        assert f"](plots/{name}.png)" in text
    _no_temporaries(run_dir)


def test_report_with_teacher_has_agreement(runs: dict[str, Path]) -> None:
    run_dir = runs["kd"]
    text = write_report(run_dir).read_text()
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert 0.0 <= metrics["agreement"] <= 1.0
    assert _table_value(text, "agreement with the teacher (top-1)") == f"{metrics['agreement']:.4f}"
    assert _table_value(text, "KL(teacher ‖ student)") == f"{metrics['kl_to_teacher']:.4f}"
    assert _table_value(text, "accuracy") == f"{metrics['accuracy']:.4f}"
    assert text.startswith("# kd: hinton_kd")
    assert "Accuracy and agreement over epochs" in text
    assert "## Notes" not in text  # the saved student re-evaluates to the recorded accuracy
    # The loss plot has one line per term plus the total: the rows carry loss/ce and loss/kd.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_keys = {k for r in rows if r["split"] == "train" for k in r if k.startswith("loss/")}
    assert train_keys == {"loss/ce", "loss/kd"}
    for name in ("loss", "eval", "reliability"):
        _assert_png(run_dir / "plots" / f"{name}.png")


def test_report_with_few_rows(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "few"
    shutil.copytree(runs["teacher"], run_dir, ignore=shutil.ignore_patterns("plots", "report.md", "checkpoints"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if r["split"] == "eval"][-1]
    (run_dir / "metrics.jsonl").write_text(json.dumps(last_eval) + "\n")  # one eval row, no training rows
    (run_dir / "result.json").unlink()
    text = write_report(run_dir).read_text()
    assert _table_value(text, "accuracy") == f"{last_eval['accuracy']:.4f}"
    assert "No training rows" in text
    assert not (run_dir / "plots" / "loss.png").exists()
    _assert_png(run_dir / "plots" / "eval.png")
    _assert_png(run_dir / "plots" / "reliability.png")


def test_missing_metrics_names_path(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "broken"
    shutil.copytree(runs["teacher"], run_dir, ignore=shutil.ignore_patterns("plots", "report.md", "checkpoints"))
    (run_dir / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError) as info:
        write_report(run_dir)
    message = str(info.value)
    assert str(run_dir) in message and "metrics.jsonl" in message and "expected" in message
    assert not (run_dir / "report.md").exists() and not (run_dir / "plots").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_malformed_metrics_line(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "malformed"
    shutil.copytree(runs["teacher"], run_dir, ignore=shutil.ignore_patterns("plots", "report.md", "checkpoints"))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ValueError, match="line"):
        write_report(run_dir)
    assert not (run_dir / "report.md").exists()


def test_comparison_report(runs: dict[str, Path], tmp_path: Path) -> None:
    rows = [
        {"name": "teacher", "accuracy": 0.9, "params": 123456, "ece": 0.05, "latency_ms": 1.23456},
        {"name": "kd", "accuracy": 0.8, "agreement": 0.85, "kl_to_teacher": 0.321, "ece": 0.04, "params": 1000,
         "latency_ms": 0.5},
    ]
    path = write_comparison_report(tmp_path / "cmp" / "report.md", rows, "Demo", plots_from=dict(runs))
    text = path.read_text()
    assert text.startswith("# Demo")
    assert "| teacher | 0.9000 | n/a | n/a | 0.0500 | 123,456 | 1.235 |" in text
    assert "| kd | 0.8000 | 0.8500 | 0.3210 | 0.0400 | 1,000 | 0.500 |" in text
    _assert_png(tmp_path / "cmp" / "plots" / "accuracy.png")
    assert "](plots/accuracy.png)" in text
    assert "(../" in text  # run links are relative
    plain = write_comparison_report(tmp_path / "plain.md", rows, "Plain")
    assert "accuracy.png" not in plain.read_text()
    with pytest.raises(ValueError, match="name"):
        write_comparison_report(tmp_path / "bad.md", [{"accuracy": 0.5}], "Bad")


def test_format_value() -> None:
    assert format_value("accuracy", 0.81234) == "0.8123"
    assert format_value("params", 12345) == "12,345"
    assert format_value("latency_ms", 2) == "2.000"
    assert format_value("agreement", None) == "n/a"
