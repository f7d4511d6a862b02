"""One-for-All KD and SimKD: the OFA loss against a float64 reference written from the paper, the logit-space
branches (trained with the student, left out of its export), the SimKD composite (what is trained, evaluated and
exported), short end-to-end fits of both recipes, and ``mentor train`` with ``recipe.name: simkd``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import Tensor

from mentor import cli, losses, recipes, teachers
from mentor.data import UNLABELLED, TensorData
from mentor.eval import evaluate
from mentor.method import Feature
from mentor.models import MLP, CNN1d
from mentor.recipes.simkd import SimKDHead, simkd_student
from mentor.taps import FeaturePairs, build_projector
from mentor.train import Optim, fit, load_model_weights, save_model

# ------------------------------------------------------------------------------------------------ the OFA loss


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _ofa_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, eps: float, temp: float,
                   keep: np.ndarray | None = None, n: float | None = None) -> float:
    """Hao et al. 2023, Eq. (8) with the authors' one-hot form, item by item in float64, times T^2:
    ``-(1 + p_t[y])^eps - 1) log p_s[y] - sum_{c != y} p_t[c]^eps log p_s[c]``, mean over the kept items."""
    p_s, p_t = _softmax64(s / temp), _softmax64(t / temp)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] < 0 or (keep is not None and not keep[i]):
            continue
        item = 0.0
        for c in range(s.shape[1]):
            w = (1.0 + p_t[i, c]) ** eps - 1.0 if c == y[i] else p_t[i, c] ** eps
            item -= w * math.log(p_s[i, c])
        total += item
        count += 1
    return temp**2 * total / (n if n is not None else max(count, 1))


def _logits(b: int = 12, c: int = 7, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


@pytest.mark.parametrize("eps", [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_ofa_loss_matches_float64_reference(eps: float, temp: float) -> None:
    s, t, y = _logits()
    got = losses.ofa_loss(s, t, y, eps=eps, temperature=temp)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_ofa_reference(s.numpy(), t.numpy(), y.numpy(), eps, temp), rel=1e-12)


def test_ofa_loss_mask_num_items_and_unlabelled_items() -> None:
    s, t, y = _logits(b=10)
    y[::3] = UNLABELLED
    mask = torch.ones(10, dtype=torch.bool)
    mask[1] = False
    ref = _ofa_reference(s.numpy(), t.numpy(), y.numpy(), 1.5, 2.0, keep=mask.numpy())
    assert float(losses.ofa_loss(s, t, y, eps=1.5, temperature=2.0, mask=mask)) == pytest.approx(ref, rel=1e-12)
    kept = int(((y >= 0) & mask).sum())
    ref_n = _ofa_reference(s.numpy(), t.numpy(), y.numpy(), 1.5, 2.0, keep=mask.numpy(), n=32.0)
    got_n = losses.ofa_loss(s, t, y, eps=1.5, temperature=2.0, mask=mask, num_items=32)
    assert float(got_n) == pytest.approx(ref_n, rel=1e-12)
    assert float(got_n) * 32 == pytest.approx(ref * kept, rel=1e-12)
    # gradient accumulation: two halves with the whole batch's normaliser sum to the whole
    whole = losses.ofa_loss(s, t, y, eps=1.5, num_items=kept, mask=mask)
    halves = sum(losses.ofa_loss(s[i:i + 5], t[i:i + 5], y[i:i + 5], eps=1.5, num_items=kept, mask=mask[i:i + 5])
                 for i in (0, 5))
    assert float(halves) == pytest.approx(float(whole), rel=1e-12)


def test_ofa_loss_at_eps_one_is_soft_cross_entropy_with_the_kd_gradient() -> None:
    s, t, y = _logits()
    for temp in (1.0, 4.0):
        ofa = losses.ofa_loss(s, t, y, eps=1.0, temperature=temp)
        p_t = F.softmax(t / temp, dim=-1)
        assert float(ofa) == pytest.approx(float(losses.soft_cross_entropy(s, p_t, temperature=temp)), rel=1e-12)
        entropy = float(-(p_t * p_t.log()).sum(-1).mean()) * temp**2
        assert float(ofa) == pytest.approx(float(losses.kl_div(s, t, temperature=temp)) + entropy, rel=1e-10)
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        losses.ofa_loss(a, t, y, eps=1.0, temperature=temp).backward()
        losses.kl_div(b, t, temperature=temp).backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-12)  # type: ignore[arg-type]


def test_ofa_loss_limit_of_a_certain_teacher_is_scaled_cross_entropy() -> None:
    """A teacher sure of the label (p_t = one-hot): weights (2^eps - 1) on the label, 0 elsewhere."""
    s, _, y = _logits()
    t = F.one_hot(y, 7).double() * 200.0
    for eps in (0.5, 1.0, 1.5):
        got = losses.ofa_loss(s, t, y, eps=eps)
        assert float(got) == pytest.approx((2**eps - 1) * float(losses.cross_entropy(s, y)), rel=1e-10)


def test_ofa_loss_enhances_the_target_class_for_eps_above_one() -> None:
    """eps > 1 raises the label's share of the total class weight (the paper's adaptive target enhancement)."""
    _, t, y = _logits()
    p_t = F.softmax(t, dim=-1)
    hot = F.one_hot(y, 7).double()
    share = []
    for eps in (1.0, 1.5, 2.0):
        w = (p_t + hot) ** eps - hot
        share.append((w * hot).sum(-1) / w.sum(-1))
    assert bool((share[1] > share[0]).all()) and bool((share[2] > share[1]).all())


def test_ofa_loss_errors() -> None:
    s, t, y = _logits()
    with pytest.raises(ValueError, match=r"label 7 out of range for 7 classes"):
        losses.ofa_loss(s, t, torch.full_like(y, 7))
    with pytest.raises(TypeError, match="integer class indices"):
        losses.ofa_loss(s, t, y.double())
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        losses.ofa_loss(s, t, y, eps=0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.ofa_loss(s, t[:, :5], y)


def test_ofa_loss_half_precision_runs_in_float32() -> None:
    s, t, y = _logits()
    got = losses.ofa_loss(s.bfloat16(), t.bfloat16(), y, eps=1.5)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(losses.ofa_loss(s.bfloat16().double(), t.bfloat16().double(), y,
                                                             eps=1.5)), rel=1e-5)


# ------------------------------------------------------------------------------------- branches to logit space


@pytest.mark.parametrize(("s_shape", "k"), [((6,), 10), ((3, 19), 10), ((2, 4, 5), 3)])
def test_head_projector_maps_any_feature_to_logits(s_shape: tuple[int, ...], k: int) -> None:
    head = build_projector("head", s_shape, (k,))
    out = head(torch.randn(4, *s_shape))
    assert out.shape == (4, k)
    out.square().mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    first = build_projector("head", s_shape, (k,), hidden=13).net[0]
    assert (first.out_channels if len(s_shape) > 1 else first.out_features) == 13
    with pytest.raises(ValueError, match=r"maps a feature to a vector \[K\]"):
        build_projector("head", s_shape, (k, 2))


def test_feature_without_teacher_needs_a_projector() -> None:
    with pytest.raises(ValueError, match=r"no teacher module.*expected a projector kind"):
        Feature("f", student="conv1", teacher=None)


def test_feature_pairs_logit_branches_need_no_teacher_and_take_an_explicit_shape() -> None:
    student = MLP(hidden=(6, 5))
    x = torch.randn(3, 40)
    pairs = FeaturePairs([Feature("a", student="features.1", teacher=None, projector="head"),
                          Feature("b", student="features.3", teacher=None, projector="head", hidden=7, shape=(4,))],
                         student, None, x[:2])
    assert pairs.shapes == {"a": ((6,), (10,)), "b": ((5,), (4,))}
    s_out: dict[str, Tensor] = {}
    t_out: dict[str, Tensor] = {}
    with pairs.capture():
        student(x)
    pairs.merge(s_out, t_out)
    assert s_out["feat.a"].shape == (3, 10) and s_out["feat.b"].shape == (3, 4) and t_out == {}
    with pytest.raises(ValueError, match=r"shape=.* applies only without a teacher module"):
        Feature("c", student="x", teacher="y", shape=(3,))
    with pytest.raises(ValueError, match="need the teacher network"):
        FeaturePairs([Feature("d", student="features.1", teacher="conv1")], student, None, x[:2])


def _blobs(n: int = 480, seed: int = 0) -> TensorData:
    """Ten classes, each a fixed random 40-step pattern plus noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 40, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorData(centres[y] + 0.8 * torch.randn(n, 40, generator=g), y)


@pytest.fixture(scope="module")
def teacher() -> CNN1d:
    torch.manual_seed(0)
    model = CNN1d(channels=16)
    fit(model, recipes.supervised(), _blobs(), epochs=6, batch_size=48, optim=Optim(lr=1e-2), progress=False,
        log_every=100)
    assert evaluate(model, _blobs(200, seed=1))["accuracy"] > 0.9
    return model


def _loss_curve(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history if r["split"] == "train"]


@pytest.mark.parametrize("student_kind", ["mlp", "cnn"])
def test_ofa_trains_cnn_to_mlp_and_to_narrower_cnn(teacher: CNN1d, student_kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    if student_kind == "mlp":
        student: torch.nn.Module = MLP(hidden=(32, 32))
        method = recipes.ofa(stages=["features.1", "features.3"], eps=1.5)
    else:
        student = CNN1d(channels=6)
        method = recipes.ofa(eps=[1.0, 1.2, 1.5, 1.5])
    test = _blobs(200, seed=1)
    result = fit(student, method, _blobs(), teacher=teachers.Frozen(teacher), eval_data=test, epochs=6,
                 batch_size=48, optim=Optim(lr=1e-2), progress=False, log_every=5, out=tmp_path / "run")
    curve = _loss_curve(result.history)
    assert curve[-1] < 0.7 * curve[0]
    assert result.metrics["accuracy"] > 0.7
    stages = method.features
    assert result.projectors is not None and list(result.projectors.names) == [f.name for f in stages]
    rows = [r for r in result.history if r["split"] == "train"]
    assert {f"loss/{f.name}" for f in stages} | {"loss/ce", "loss/kd"} <= set(rows[0])
    # branches are left out of the exported student, saved beside it, and it loads into the plain architecture
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert set(exported) == set(student.state_dict())
    assert {k.split(".")[1] for k in load_file(str(tmp_path / "run" / "projectors.safetensors"))} == \
        {f.name for f in stages}
    plain = MLP(hidden=(32, 32)) if student_kind == "mlp" else CNN1d(channels=6)
    load_model_weights(plain, tmp_path / "run" / "student.safetensors")


def test_ofa_branches_are_optimised_with_the_student(teacher: CNN1d) -> None:
    """With a vanishing learning rate the branches keep their initial values; with a real one they move: the
    optimiser holds them."""
    got = []
    for lr in (1e-12, 1e-12, 1e-2):
        torch.manual_seed(1)
        student = MLP(hidden=(16,))
        result = fit(student, recipes.ofa(stages=["features.1"]), _blobs(96), teacher=teachers.Frozen(teacher),
                     max_steps=3, batch_size=32, optim=Optim(lr=lr), progress=False, seed=4)
        assert result.projectors is not None
        got.append({k: v.clone() for k, v in result.projectors.state_dict().items()})
    assert all(torch.allclose(got[0][k], got[1][k], atol=1e-9) for k in got[0])
    assert any(not torch.allclose(got[0][k], got[2][k], atol=1e-6) for k in got[0])


def test_ofa_first_step_equals_the_losses_by_hand(teacher: CNN1d) -> None:
    """The logged kd term is ofa_loss on the final logits of the first batch, the ce term its cross-entropy."""
    data = _blobs(64)
    data.y[::4] = UNLABELLED
    torch.manual_seed(2)
    student = MLP(hidden=(16,))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003))
    x, y = data.x[perm[:16]], data.y[perm[:16]]
    with torch.no_grad():
        s, t = student(x), teacher(x)
    result = fit(student, recipes.ofa(stages=["features.1"], eps=1.5, temperature=2.0), data,
                 teacher=teachers.Frozen(teacher), max_steps=1, batch_size=16, log_every=1, progress=False, seed=3)
    row = next(r for r in result.history if r["split"] == "train")
    assert row["loss/kd"] == pytest.approx(float(losses.ofa_loss(s, t, y, eps=1.5, temperature=2.0)), rel=1e-5)
    assert row["loss/ce"] == pytest.approx(float(losses.cross_entropy(s, y)), rel=1e-5)


def test_ofa_wrong_stage_lists_valid_names(teacher: CNN1d) -> None:
    with pytest.raises(ValueError, match=r"no submodule named 'conv9'.*valid names: .*'features.1'"):
        fit(MLP(hidden=(8,)), recipes.ofa(stages=["conv9"]), _blobs(64), teacher=teachers.Frozen(teacher),
            max_steps=1, batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"eps must be one number or 3 numbers"):
        recipes.ofa(stages=["a", "b"], eps=[1.0, 1.0])


# ------------------------------------------------------------------------------------------------------ SimKD


def test_simkd_composite_structure_and_wrong_names(teacher: CNN1d) -> None:
    plain = MLP(hidden=(12,))
    x = _blobs(8).x[:2]
    composite = simkd_student(plain, teacher, x)
    assert isinstance(plain.classifier, torch.nn.Linear)  # the argument is not modified
    head = composite.classifier
    assert isinstance(head, SimKDHead)
    assert torch.equal(head.teacher_head.weight, teacher.classifier.weight)
    assert not any(p.requires_grad for p in head.teacher_head.parameters())
    composite.train()
    assert not head.teacher_head.training
    with torch.no_grad():
        expected = teacher.classifier(head.projector(plain.features(x)))
        assert torch.allclose(composite(x), expected)
    with pytest.raises(ValueError, match=r"no submodule named 'fc'.*valid names: .*'classifier'"):
        simkd_student(plain, teacher, x, student_layer="fc")
    with pytest.raises(ValueError, match=r"no submodule named 'head'.*valid names: .*'conv3'"):
        simkd_student(plain, teacher, x, teacher_layer="head")
    with pytest.raises(ValueError, match=r"no submodule named 'classifier.teacher_head'"):  # a plain student
        fit(MLP(hidden=(8,)), recipes.simkd(), _blobs(64), teacher=teachers.Frozen(teacher), max_steps=1,
            batch_size=16, progress=False)


def test_simkd_trains_and_evaluates_the_deployed_composite(teacher: CNN1d, tmp_path: Path) -> None:
    torch.manual_seed(1)
    plain = MLP(hidden=(32, 32))
    train_data, test = _blobs(), _blobs(200, seed=1)
    student = simkd_student(plain, teacher, train_data.x[:2])
    head_before = teacher.classifier.weight.clone()
    proj_before = {k: v.clone() for k, v in student.classifier.projector.state_dict().items()}
    result = fit(student, recipes.simkd(), train_data, teacher=teachers.Frozen(teacher), eval_data=test, epochs=6,
                 batch_size=48, optim=Optim(lr=1e-2), progress=False, log_every=5, out=tmp_path / "run")
    curve = _loss_curve(result.history)
    assert curve[-1] < 0.5 * curve[0]
    assert result.metrics["accuracy"] > 0.7
    assert result.metrics["accuracy"] == pytest.approx(evaluate(result.student, test)["accuracy"])
    deployed = result.student.classifier
    assert torch.equal(deployed.teacher_head.weight, head_before)  # frozen
    assert any(not torch.equal(v, deployed.projector.state_dict()[k]) for k, v in proj_before.items())  # trained
    assert result.projectors is None
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert any(k.startswith("classifier.projector.") for k in exported)
    assert any(k.startswith("classifier.teacher_head.") for k in exported)
    again = simkd_student(MLP(hidden=(32, 32)), teacher, train_data.x[:2])
    load_model_weights(again, tmp_path / "run" / "student.safetensors")
    assert evaluate(again, test)["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_mentor_train_with_simkd_config_end_to_end(teacher: CNN1d, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    save_model(teacher, tmp_path / "teacher.safetensors")
    cfg = {
        "name": "simkd",
        "data": {"train": "labelled", "num_labelled": 300},
        "student": {"model": "mlp", "args": {"hidden": [16]}},
        "teacher": {"checkpoint": str(tmp_path / "teacher.safetensors"), "model": "cnn", "args": {"channels": 16}},
        "recipe": {"name": "simkd", "args": {"projector": "linear", "ce_weight": 0.5}},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 50, "out": str(tmp_path), "progress": False, "log_every": 1},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "s.yaml")]) == 0
    result = json.loads((tmp_path / "simkd" / "result.json").read_text())["metrics"]
    exported = load_file(str(tmp_path / "simkd" / "student.safetensors"))
    assert "classifier.projector.net.weight" in exported and "classifier.teacher_head.weight" in exported
    assert torch.equal(exported["classifier.teacher_head.weight"], teacher.classifier.weight)
    rows = [json.loads(line) for line in (tmp_path / "simkd" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/simkd", "loss/ce"} <= set(next(r for r in rows if r["split"] == "train"))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "simkd"), "--json"]) == 0  # rebuilds the composite from the config
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)
    # a SimKD run can teach in turn: load_teacher rebuilds its composite
    from mentor.config import TeacherConfig
    from mentor.run import load_teacher

    reloaded = load_teacher(TeacherConfig(run=str(tmp_path / "simkd")))
    assert isinstance(reloaded.classifier, SimKDHead)
    with pytest.raises(Exception, match="only be the main recipe"):
        from mentor.config import config_from_dict

        config_from_dict({**cfg, "recipe": {"name": "hinton_kd", "plus": [{"name": "simkd"}]}})
