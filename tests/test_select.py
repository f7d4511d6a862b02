"""Training-free student selection (DisWOT): scores against a hand computation, determinism, the maximum for a copy
of the teacher, ranking order, and ``mentor select`` on a tiny trained teacher."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from mentor import cli
from mentor.config import ConfigError, config_from_dict
from mentor.models import MLP, CNN1d
from mentor.select import rank_candidates, score_candidate, select_batches


def _batches(n_batches: int = 3, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 40, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _mlp(hidden: tuple[int, ...], seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden=hidden)


def _row_normalised_gram(m: np.ndarray) -> np.ndarray:
    g = m @ m.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _reference(teacher: nn.Module, student: nn.Module, batches: list) -> dict[str, float]:
    """The documented score in float64 numpy: per-row mean squared differences of row-normalised Gram matrices."""
    sem, rel = [], []
    for x, y in batches:
        with torch.no_grad():
            h_t = teacher.features(x).double().numpy()
            h_s = student.features(x).double().numpy()
        onehot = np.eye(10)[y.numpy()]
        d_rel = ((_row_normalised_gram(h_s) - _row_normalised_gram(h_t)) ** 2).sum() / len(x)
        d_sem = ((_row_normalised_gram(onehot.T @ h_s) - _row_normalised_gram(onehot.T @ h_t)) ** 2).sum() / 10
        sem.append(-d_sem)
        rel.append(-d_rel)
    return {"semantic": float(np.mean(sem)), "relational": float(np.mean(rel)),
            "score": float(np.mean(sem) + np.mean(rel))}


def test_score_matches_reference_formula() -> None:
    teacher, student, batches = _mlp((48, 32), 1), _mlp((24,), 2), _batches()
    got = score_candidate(teacher, student, batches)
    want = _reference(teacher, student, batches)
    for key in ("semantic", "relational", "score"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6)
    assert got["score"] == pytest.approx(got["semantic"] + got["relational"])
    assert -8.0 <= got["score"] < 0.0


def test_scores_are_deterministic_and_leave_models_unchanged() -> None:
    teacher, batches = _mlp((48, 32), 1), _batches()
    student = _mlp((24,), 2)
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    first = score_candidate(teacher, student, batches)
    second = score_candidate(teacher, student, batches)
    rebuilt = score_candidate(teacher, _mlp((24,), 2), batches)  # same seed, same initialisation
    assert first == second == rebuilt
    assert student.training and teacher.training  # flags restored
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in (*student.parameters(), *teacher.parameters()))


def test_copy_of_teacher_gets_the_maximum_score() -> None:
    teacher, batches = _mlp((48, 32), 1), _batches()
    same = score_candidate(teacher, copy.deepcopy(teacher), batches)
    assert same == {"semantic": 0.0, "relational": 0.0, "score": 0.0}
    for other in (_mlp((48, 32), 3), _mlp((16,), 4), CNN1d(channels=4)):  # another init, width, family
        scores = score_candidate(teacher, other, batches)
        assert scores["semantic"] < 0 and scores["relational"] < 0 and scores["score"] < 0


def test_unlabelled_items_take_the_teachers_argmax() -> None:
    teacher, student, batches = _mlp((32,), 1), _mlp((16,), 2), _batches(1)
    x, _ = batches[0]
    with torch.no_grad():
        predicted = teacher(x).argmax(dim=1)
    unlabelled = score_candidate(teacher, student, [(x, torch.full_like(predicted, -1))])
    assert unlabelled == score_candidate(teacher, student, [(x, predicted)])


def test_other_layers_and_bad_inputs() -> None:
    teacher, student, batches = CNN1d(channels=8), _mlp((16,), 2), _batches()
    scores = score_candidate(teacher, student, batches, teacher_layer="conv3", student_layer="features",
                             inputs=False)
    assert scores["score"] < 0
    with pytest.raises(ValueError, match="no submodule named 'head'"):
        score_candidate(teacher, student, batches, student_layer="head")
    with pytest.raises(ValueError, match="batches is empty"):
        score_candidate(teacher, student, [])
    with pytest.raises(ValueError, match="10 classes and the student 3"):
        score_candidate(teacher, MLP(hidden=(8,), num_classes=3), batches)


def test_select_batches_are_disjoint_and_seeded() -> None:
    x, y = torch.arange(100.0).reshape(100, 1), torch.zeros(100, dtype=torch.long)
    a = select_batches(x, y, 3, 20, seed=5)
    assert [len(b[0]) for b in a] == [20, 20, 20]
    seen = torch.cat([b[0].flatten() for b in a])
    assert len(set(seen.tolist())) == 60
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, select_batches(x, y, 3, 20, seed=5), strict=True))
    assert [len(b[0]) for b in select_batches(x[:45], y[:45], 4, 20, seed=0)] == [20, 20, 5]


def test_rank_candidates_best_first(tmp_path: Path) -> None:
    teacher = _mlp((64, 64), 7)
    save_file(teacher.state_dict(), str(tmp_path / "t.safetensors"))
    base = config_from_dict({"data": {"num_labelled": 200},
                             "teacher": {"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp",
                                         "args": {"hidden": [64, 64]}}})
    cands = [config_from_dict({"name": n, "seed": s, "student": {"model": "mlp", "args": {"hidden": h}}})
             for n, s, h in [("narrow", 0, [8]), ("copy", 7, [64, 64]), ("wide", 0, [128])]]
    rows = rank_candidates(base, cands, num_batches=2, batch_size=32)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["name"] == "copy" and rows[0]["score"] == 0.0  # same architecture and seed as the teacher
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {r["name"]: r["params"] for r in rows}["narrow"] == 40 * 8 + 8 + 8 * 10 + 10
    assert all(r["seconds"] >= 0 and r["model"] == "mlp" for r in rows)
    with pytest.raises(ConfigError, match="needs a teacher"):
        rank_candidates(config_from_dict({}), cands)


# --------------------------------------------------------------------------------------------------------- CLI


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def select_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], Path]:
    tmp = tmp_path_factory.mktemp("select")
    teacher_cfg = _write(tmp / "teacher.yaml", {
        "name": "teacher", "data": {"num_labelled": 200}, "student": {"model": "cnn", "args": {"channels": 8}},
        "optim": {"lr": 0.01}, "train": {"epochs": 2, "batch_size": 50, "out": str(tmp / "runs"), "progress": False}})
    assert cli.main(["train", teacher_cfg]) == 0
    base = _write(tmp / "base.yaml", {"name": "kd", "data": {"num_labelled": 200},
                                      "teacher": {"run": str(tmp / "runs" / "teacher")},
                                      "recipe": {"name": "hinton_kd"}})
    cands = [_write(tmp / f"mlp{w}.yaml", {"name": f"mlp{w}", "student": {"model": "mlp", "args": {"hidden": [w]}}})
             for w in (8, 32, 128)]
    return base, cands, tmp


def test_cli_select_table_and_json(select_setup: tuple[str, list[str], Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, cands, _ = select_setup
    capsys.readouterr()
    assert cli.main(["select", base, "--candidates", *cands, "--batches", "2"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["rank", "candidate", "params", "score", "semantic", "relational"]
    assert all(f"mlp{w}" in out for w in (8, 32, 128)) and "3 candidates scored in" in out

    assert cli.main(["select", base, "--candidates", *cands, "--batches", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rows = got["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3] and got["seconds"] > 0
    assert sorted(r["name"] for r in rows) == ["mlp128", "mlp32", "mlp8"]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert all(r["score"] == pytest.approx(r["semantic"] + r["relational"]) for r in rows)


def test_cli_select_errors(select_setup: tuple[str, list[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, cands, tmp = select_setup
    capsys.readouterr()
    missing = str(tmp / "nope.yaml")
    assert cli.main(["select", base, "--candidates", cands[0], missing]) == 2
    err = capsys.readouterr().err
    assert "--candidates" in err and "nope.yaml" in err and "does not exist" in err

    no_teacher = _write(tmp / "no_teacher.yaml", {"name": "x"})
    assert cli.main(["select", no_teacher, "--candidates", *cands]) == 2
    assert "names no teacher" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:
        cli.main(["select", "--help"])
    assert info.value.code == 0
    assert "--candidates" in capsys.readouterr().out
