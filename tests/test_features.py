"""Feature terms in the loop: taps on student and teacher, projectors trained with the student, left out of the
exported student, saved in checkpoints for an exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mentor import losses, recipes, teachers
from mentor.data import UNLABELLED, TensorData
from mentor.models import MLP, CNN1d
from mentor.taps import FeaturePairs
from mentor.train import Optim, fit


def _data(n: int = 64) -> TensorData:
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (n,), generator=g)
    y[::4] = UNLABELLED
    return TensorData(torch.randn(n, 40, generator=g), y)


def _models() -> tuple[MLP, CNN1d]:
    torch.manual_seed(0)
    student = MLP(hidden=(16,))
    torch.manual_seed(1)
    teacher = CNN1d(channels=4)
    return student, teacher


def _fit(out: Path | None = None, **kwargs: object):
    student, teacher = _models()
    method = recipes.fitnet(alpha=0.5, hint_weight=0.3)
    return fit(student, method, _data(), teacher=teachers.Frozen(teacher), epochs=2, batch_size=16,
               optim=Optim(lr=1e-2), log_every=1, progress=False, out=out, seed=3, **kwargs)


def test_first_step_losses_equal_a_hand_computation() -> None:
    student, teacher = _models()
    data = _data()
    method = recipes.fitnet(alpha=0.5, hint_weight=0.3)
    # The loop seeds torch with `seed`, then builds the projectors: rebuild them the same way by hand.
    torch.manual_seed(3)
    pairs = FeaturePairs(method.features, copy.deepcopy(student), copy.deepcopy(teacher), data.x[:2])
    projector = copy.deepcopy(pairs.projectors["hint"])
    result = _fit(max_steps=1)
    row = next(r for r in result.history if r["split"] == "train")

    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003))
    x, y = data.x[perm[:16]], data.y[perm[:16]]
    with torch.no_grad():
        s_pen = student.features(x)                                     # input of the student's classifier
        h = x.reshape(16, 1, -1)
        for conv in (teacher.conv1, teacher.conv2, teacher.conv3):
            h = torch.relu(conv(h))
        t_pen = h.flatten(1)                                            # input of the teacher's classifier
        hint = ((projector(s_pen) - t_pen) ** 2).sum(dim=1).mean()
        labelled = y >= 0
        ce = torch.nn.functional.cross_entropy(student(x)[labelled], y[labelled])
        kd = losses.kl_div(student(x), teacher(x), temperature=4.0)
    assert row["loss/hint"] == pytest.approx(float(hint), rel=1e-5)
    assert row["loss/ce"] == pytest.approx(float(ce), rel=1e-5)
    assert row["loss/kd"] == pytest.approx(float(kd), rel=1e-5)
    assert row["loss"] == pytest.approx(0.5 * float(ce) + 0.3 * float(hint) + 0.5 * float(kd), rel=1e-5)


def test_projectors_train_are_not_exported_and_hooks_are_gone(tmp_path: Path) -> None:
    student, teacher = _models()
    method = recipes.fitnet()
    torch.manual_seed(3)
    initial = FeaturePairs(method.features, copy.deepcopy(student), copy.deepcopy(teacher), _data().x[:2])
    frozen = teachers.Frozen(teacher)
    result = fit(student, method, _data(), teacher=frozen, epochs=2, batch_size=16, optim=Optim(lr=1e-2),
                 progress=False, out=tmp_path / "run", seed=3)
    assert result.projectors is not None
    before = initial.projectors.state_dict()
    after = result.projectors.state_dict()
    assert set(before) == set(after) and all(not torch.equal(before[k], after[k]) for k in before)  # optimised
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert set(exported) == set(MLP(hidden=(16,)).state_dict())  # loads into the plain student architecture
    saved = load_file(str(tmp_path / "run" / "projectors.safetensors"))
    assert all(torch.equal(saved[k], after[k].cpu()) for k in after)
    for module in [*student.modules(), *teacher.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not any(p.requires_grad for p in teacher.parameters())


def test_held_hooks_capture_only_inside_capture_and_are_released() -> None:
    student, teacher = _models()
    method = recipes.fitnet()
    pairs = FeaturePairs(method.features, student, teacher, _data().x[:2])
    pairs.hold()
    x = _data().x[:4]
    student(x)
    teacher(x)  # paused: these forwards capture nothing
    assert all(not taps._captured for _, taps in pairs._taps)
    with pairs.capture():
        s_out, t_out = {"logits": student(x)}, {"logits": teacher(x)}
    pairs.merge(s_out, t_out)
    assert s_out["feat.hint"].shape[0] == 4 and t_out["feat.hint"].shape[0] == 4
    h = x.reshape(4, 1, -1)
    for conv in (teacher.conv1, teacher.conv2, teacher.conv3):
        h = torch.relu(conv(h))
    assert torch.allclose(t_out["feat.hint"], h.flatten(1))  # the input of the teacher's classifier
    assert any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())  # kept between captures
    pairs.release()
    pairs.release()  # idempotent
    for module in [*student.modules(), *teacher.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_are_gone_after_a_run_that_stops_on_a_nonfinite_loss() -> None:
    import gc

    from mentor.train import NonFiniteLossError

    student, teacher = _models()
    data = _data()
    bad = TensorData(data.x.clone(), data.y)
    with torch.no_grad():
        teacher.conv3.weight.fill_(float("inf"))  # the hint term becomes non-finite at the first step
    with pytest.raises(NonFiniteLossError):
        fit(student, recipes.fitnet(), bad, teacher=teachers.Frozen(teacher), epochs=1, batch_size=16,
            optim=Optim(lr=1e-2), progress=False, seed=3)
    gc.collect()
    for module in [*student.modules(), *teacher.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_resume_with_projectors_is_exact(tmp_path: Path) -> None:
    ref = _fit(tmp_path / "ref", checkpoint_every=3)
    _fit(tmp_path / "run", checkpoint_every=3, max_steps=4)
    resumed = _fit(tmp_path / "run", checkpoint_every=3, resume=True)
    for a, b in ((ref.student.state_dict(), resumed.student.state_dict()),
                 (ref.projectors.state_dict(), resumed.projectors.state_dict())):  # type: ignore[union-attr]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_errors_come_before_training(tmp_path: Path) -> None:
    student, teacher = _models()
    with pytest.raises(ValueError, match=r"student feature: .*'clasifier'.*classifier"):
        fit(student, recipes.fitnet(student_layer="clasifier"), _data(), teacher=teachers.Frozen(teacher),
            epochs=1, batch_size=16, progress=False, out=tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"needs a teacher network .*got Callable"):
        fit(student, recipes.fitnet(), _data(), teacher=teachers.Callable(teacher), epochs=1, batch_size=16,
            progress=False)


def test_feature_regression_scores_equal_a_hand_computation_and_flag_unusual_inputs() -> None:
    from mentor.eval import feature_discrepancy

    student, teacher = _models()
    normal = TensorData(_data(256).x, torch.full((256,), UNLABELLED))
    method = recipes.feature_regression()
    result = fit(student, method, normal, teacher=teachers.Frozen(teacher), epochs=30, batch_size=32,
                 optim=Optim(lr=3e-3), progress=False, seed=3)
    scores = feature_discrepancy(result.student, teacher, method, normal, result.projectors)
    assert scores.shape == (256,)
    with torch.no_grad():
        x = normal.x
        h = x.reshape(len(x), 1, -1)
        for conv in (teacher.conv1, teacher.conv2, teacher.conv3):
            h = torch.relu(conv(h))
        assert result.projectors is not None
        hand = ((result.projectors["f"](student.features(x)) - h.flatten(1)) ** 2).sum(dim=1)
    torch.testing.assert_close(scores, hand, rtol=1e-5, atol=1e-6)
    # inputs far from the training data (10x the scale) score far higher than the data it learned from
    unusual = TensorData(10 * normal.x, normal.y)
    assert float(feature_discrepancy(result.student, teacher, method, unusual, result.projectors).median()) > \
        10 * float(scores.median())
