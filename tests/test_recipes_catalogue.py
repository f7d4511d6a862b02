"""The feature, relation and decoupled-logit recipes: each one's first logged step equals its losses computed by
hand on the same batch, and a short run stays finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mentor import losses, recipes, teachers
from mentor.data import UNLABELLED, TensorData
from mentor.models import MLP, CNN1d
from mentor.recipes import RECIPES
from mentor.train import Optim, fit

SEED = 3


def _data(n: int = 64) -> TensorData:
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (n,), generator=g)
    y[::4] = UNLABELLED
    return TensorData(torch.randn(n, 40, generator=g), y)


def _cnn_convs(model: CNN1d, x: Tensor) -> list[Tensor]:
    """The outputs of conv1..conv3 (before their ReLU), as the taps see them."""
    outs, h = [], x.reshape(x.shape[0], 1, -1)
    for conv in (model.conv1, model.conv2, model.conv3):
        h = conv(h)
        outs.append(h)
        h = torch.relu(h)
    return outs


def _penultimate(model: torch.nn.Module, x: Tensor) -> Tensor:
    if isinstance(model, CNN1d):
        return torch.relu(_cnn_convs(model, x)[-1]).flatten(1)
    assert isinstance(model, MLP)
    return model.features(x)


def _first_row(method, student, teacher):
    result = fit(student, method, _data(), teacher=teachers.Frozen(teacher), max_steps=1, epochs=1, batch_size=16,
                 optim=Optim(lr=1e-2), log_every=1, progress=False, seed=SEED)
    return next(r for r in result.history if r["split"] == "train")


def _first_batch() -> tuple[Tensor, Tensor]:
    data = _data()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(SEED * 1_000_003))
    return data.x[perm[:16]], data.y[perm[:16]]


def _models(student_kind: str) -> tuple[torch.nn.Module, CNN1d]:
    torch.manual_seed(0)
    student: torch.nn.Module = MLP(hidden=(16,)) if student_kind == "mlp" else CNN1d(channels=3)
    torch.manual_seed(1)
    return student, CNN1d(channels=4)


def test_dkd_and_dist_first_step() -> None:
    x, y = _first_batch()
    lab = y >= 0
    for method, term, expected in (
        (recipes.dkd(alpha=0.5, beta=4.0, temperature=2.0), "dkd",
         lambda s, t: losses.dkd(s[lab], t[lab], y[lab], alpha=0.5, beta=4.0, temperature=2.0)),
        (recipes.dist(beta=2.0, gamma=1.0, temperature=1.5), "dist",
         lambda s, t: losses.dist(s, t, beta=2.0, gamma=1.0, temperature=1.5)),
    ):
        student, teacher = _models("mlp")
        with torch.no_grad():
            s, t = student(x), teacher(x)
        row = _first_row(method, student, teacher)
        assert row[f"loss/{term}"] == pytest.approx(float(expected(s, t)), rel=1e-5)
        assert row["loss/ce"] == pytest.approx(float(losses.cross_entropy(s, y)), rel=1e-5)


def test_rkd_and_sp_first_step_on_penultimate_features_of_different_widths() -> None:
    x, _ = _first_batch()
    student, teacher = _models("mlp")
    with torch.no_grad():
        e_s, e_t = _penultimate(student, x), _penultimate(teacher, x)
    assert e_s.shape[1] != e_t.shape[1]
    row = _first_row(recipes.rkd(distance_weight=2.0, angle_weight=3.0), student, teacher)
    assert row["loss/rkd_distance"] == pytest.approx(float(losses.rkd_distance(e_s, e_t)), rel=1e-5)
    assert row["loss/rkd_angle"] == pytest.approx(float(losses.rkd_angle(e_s, e_t)), rel=1e-5)
    student, teacher = _models("mlp")
    row = _first_row(recipes.similarity_preserving(weight=10.0), student, teacher)
    assert row["loss/sp"] == pytest.approx(float(losses.similarity_preserving(e_s, e_t)), rel=1e-5)


def test_attention_transfer_first_step_cnn_to_narrower_cnn() -> None:
    x, _ = _first_batch()
    student, teacher = _models("cnn")
    with torch.no_grad():
        fs, ft = _cnn_convs(student, x), _cnn_convs(teacher, x)
    row = _first_row(recipes.attention_transfer(weight=5.0), student, teacher)
    for i in range(3):
        assert row[f"loss/at{i}"] == pytest.approx(float(losses.attention_transfer(fs[i], ft[i])), rel=1e-5)


@pytest.mark.parametrize("name", ["fitnet", "attention_transfer", "rkd", "similarity_preserving", "dkd", "dist"])
def test_short_run_is_finite_and_listed(name: str) -> None:
    assert name in RECIPES
    student, teacher = _models("cnn" if name == "attention_transfer" else "mlp")
    result = fit(student, RECIPES[name](), _data(), teacher=teachers.Frozen(teacher), epochs=2, batch_size=16,
                 grad_accum=2, optim=Optim(lr=1e-2), log_every=1, progress=False, seed=SEED)
    rows = [r for r in result.history if r["split"] == "train"]
    assert len(rows) == 2 * 64 // 32
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))


def test_dkd_warmup_schedule_is_applied() -> None:
    method = recipes.dkd(warmup_steps=10)
    term = next(t for t in method.terms if t.name == "dkd")
    assert [term.weight_at(s) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
