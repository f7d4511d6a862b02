"""The command line: train with overrides, resolved config, eval, recipes, born-again generations, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mentor import cli
from mentor.config import config_from_dict, dump_config, load_config, parse_overrides
from mentor.recipes import RECIPES


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _small(out: Path, name: str, **extra: object) -> dict:
    cfg = {
        "name": name,
        "data": {"train": "labelled", "num_labelled": 300},
        "student": {"model": "mlp", "args": {"hidden": [16]}},
        "recipe": {"name": "supervised"},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 50, "out": str(out), "progress": False, "log_every": 1},
    }
    cfg.update(extra)
    return cfg


def test_parse_overrides_types_and_nesting() -> None:
    got = parse_overrides(["train.epochs=3", "recipe.args.temperature=2.5", "train.cpu=true", "name=x",
                           "student.args.hidden=[4, 5]"])
    assert got == {"train": {"epochs": 3, "cpu": True}, "recipe": {"args": {"temperature": 2.5}}, "name": "x",
                   "student": {"args": {"hidden": [4, 5]}}}


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config_from_dict(_small(tmp_path, "rt"), ["train.epochs=7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and again.train.epochs == 7


def test_recipes_lists_each_recipe_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["recipes"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == len(RECIPES)
    for name, line in zip(RECIPES, lines, strict=True):
        assert line.split()[0] == name and len(line.split()) > 3


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "eval", "report", "recipes", "demo"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert "usage: mentor " + command in capsys.readouterr().out


def test_train_then_eval_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher_cfg = _write(tmp_path / "t.yaml", _small(tmp_path, "teacher", student={"model": "cnn",
                                                                                  "args": {"channels": 8}}))
    assert cli.main(["train", str(teacher_cfg), "train.epochs=3"]) == 0
    run_dir = tmp_path / "teacher"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3  # the override is in the resolved config
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 19))  # 300 // 50 = 6 steps x 3 epochs, log_every 1
    assert all("loss/ce" in r for r in train_rows)
    assert (run_dir / "report.md").is_file() and (run_dir / "student.safetensors").is_file()
    capsys.readouterr()

    student_cfg = _write(tmp_path / "s.yaml", _small(tmp_path, "kd", seed=1, teacher={"run": str(run_dir)},
                                                     recipe={"name": "hinton_kd", "args": {"temperature": 2.0}}))
    assert cli.main(["train", str(student_cfg)]) == 0
    result = json.loads((tmp_path / "kd" / "result.json").read_text())["metrics"]
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "kd"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "agreement", "kl_to_teacher", "ece"):
        assert evaluated[key] == pytest.approx(result[key], abs=1e-6)
    assert evaluated["params"] == 40 * 16 + 16 + 16 * 10 + 10


def test_born_again_generations_teach_each_other(tmp_path: Path) -> None:
    from mentor.run import run

    cfg = config_from_dict(_small(tmp_path, "ba", recipe={"name": "born_again", "args": {"generations": 3}}))
    result = run(cfg, report=False)
    assert len(result.generations) == 3
    for k in (1, 2, 3):
        assert (tmp_path / "ba" / f"gen{k}" / "student.safetensors").is_file()
    summary = json.loads((tmp_path / "ba" / "result.json").read_text())["generations"]
    assert [g["generation"] for g in summary] == [1, 2, 3]
    # Generation 1 has no teacher: labels only. Later generations log a KD term against the previous student.
    gen1 = [json.loads(x) for x in (tmp_path / "ba" / "gen1" / "metrics.jsonl").read_text().splitlines()]
    gen2 = [json.loads(x) for x in (tmp_path / "ba" / "gen2" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/kd" not in gen1[0] and "loss/kd" in gen2[0]
    assert "agreement" in summary[1] and "agreement" not in summary[0]
    # The students of different generations differ (fresh initialisation each generation).
    w1 = result.generations[0].student.state_dict()
    w2 = result.generations[1].student.state_dict()
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_demo_quick_json_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--quick", "--json", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(out[-1])
    names = [r["name"] for r in payload["rows"]]
    assert names == ["scratch", "hinton_kd", "transfer_kd", "teacher"]
    for row in payload["rows"]:
        assert set(row) >= {"accuracy", "agreement", "kl_to_teacher", "ece", "params", "latency_ms"}
        assert 0.0 <= row["accuracy"] <= 1.0
    assert (tmp_path / "demo" / "report.md").is_file()
    assert "student" in out[0] and "accuracy" in out[0]


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    """The README's multi-process CPU command: torchrun starts 2 processes (gloo) that train one run together (half
    the steps of one process at the same per-process batch); rank 0 alone writes the files and prints the table."""
    import os
    import subprocess
    import sys

    cfg = _small(tmp_path, "launched")
    cfg["train"]["batch_size"] = 25  # per process: a global batch of 50, 300 // 50 = 6 steps per epoch
    path = _write(tmp_path / "c.yaml", cfg)
    launcher = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "-m", "mentor.cli", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1
    run_dir = tmp_path / "launched"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
    assert (run_dir / "report.md").is_file() and (run_dir / "student.safetensors").is_file()


def test_recipe_plus_combines_terms_weights_and_features(tmp_path: Path) -> None:
    from mentor.config import build_method

    cfg = config_from_dict(_small(tmp_path, "combo", teacher={"checkpoint": "t.safetensors", "model": "mlp"},
                                  recipe={"name": "dkd", "args": {"beta": 2.0},
                                          "plus": [{"name": "fitnet", "args": {"hint_weight": 0.5},
                                                    "weight": {"linear": {"start": 0.0, "end": 2.0, "steps": 10}}}]}))
    method = build_method(cfg.recipe)
    assert method.name == "dkd+fitnet"
    assert [t.name for t in method.terms] == ["ce", "dkd", "hint"]  # fitnet's own "ce" is not added twice
    hint = method.terms[2]
    assert [hint.weight_at(s) for s in (0, 5, 10)] == [0.0, 0.5 * 1.0, 0.5 * 2.0]
    assert [f.name for f in method.features] == ["hint"]
    with pytest.raises(Exception, match=r"plus\[0\].weight: unknown schedule 'sigmoid'"):
        config_from_dict(_small(tmp_path, "bad", teacher={"checkpoint": "t.safetensors", "model": "mlp"},
                                recipe={"name": "dkd", "plus": [{"name": "fitnet", "weight": {"sigmoid": {}}}]}))


def test_recipe_plus_trains_end_to_end(tmp_path: Path) -> None:
    teacher_cfg = _write(tmp_path / "t.yaml", _small(tmp_path, "teacher"))
    assert cli.main(["train", str(teacher_cfg)]) == 0
    cfg = _small(tmp_path, "combo", seed=1, teacher={"run": str(tmp_path / "teacher")},
                 recipe={"name": "dkd", "plus": [{"name": "rkd", "weight": 0.1}]})
    assert cli.main(["train", str(_write(tmp_path / "c.yaml", cfg))]) == 0
    rows = [json.loads(x) for x in (tmp_path / "combo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"loss/ce", "loss/dkd", "loss/rkd_distance", "loss/rkd_angle"} <= set(train_rows[0])
    first = train_rows[0]
    expected = first["loss/ce"] + first["loss/dkd"] + 0.1 * (25 * first["loss/rkd_distance"]
                                                             + 50 * first["loss/rkd_angle"])
    assert first["loss"] == pytest.approx(expected, rel=1e-6)


def test_quantized_student_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mentor.quant import quantized_modules

    cfg = _small(tmp_path, "q4", student={"model": "mlp", "args": {"hidden": [16]}, "quantize_bits": 4})
    assert cli.main(["train", str(_write(tmp_path / "q.yaml", cfg))]) == 0
    result = json.loads((tmp_path / "q4" / "result.json").read_text())["metrics"]
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "q4"), "--json"]) == 0  # rebuilt quantized: the same accuracy
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == result["accuracy"]
    from mentor.run import build_student

    assert len(quantized_modules(build_student(load_config(tmp_path / "q4" / "config.yaml")))) == 2
    with pytest.raises(Exception, match=r"student.quantize_bits"):
        config_from_dict(_small(tmp_path, "q1", student={"model": "mlp", "quantize_bits": 1}))
