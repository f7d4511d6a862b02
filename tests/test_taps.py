"""Taps and projectors: captured features equal the submodules called by hand, hooks never outlive their use,
gradients flow through student features, and projectors map the given shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor import models, teachers
from mentor.taps import PROJECTOR_KINDS, Projector, Projectors, Taps, build_projector, feature_shapes


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


class SmallCNN(nn.Module):
    """[B, 2, 16] -> [B, 4]: a 1-D CNN with a nested block and a pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(6, 6, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(torch.relu(self.stem(x)))
        return self.head(h.mean(dim=-1))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: holds the model as ``.module`` and forwards to it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


# ---------------------------------------------------------------------------------------------- captured values


def test_sequential_mlp_outputs_equal_manual() -> None:
    model, x = _mlp(), torch.randn(4, 6)
    with Taps(model, ["3", "0", "4"]) as taps:  # not in execution order: pop keeps the order of the names
        out = model(x)
        feats = taps.pop()
    h0 = model[0](x)
    h3 = model[3](model[2](model[1](h0)))
    assert list(feats) == ["3", "0", "4"]
    assert torch.equal(feats["0"], h0)
    assert torch.equal(feats["3"], h3)
    assert torch.equal(feats["4"], out)


def test_small_cnn_outputs_and_inputs_equal_manual() -> None:
    model, x = SmallCNN(), torch.randn(3, 2, 16)
    with Taps(model, ["stem", "block.0", "block", "head"]) as taps:
        model(x)
        feats = taps.pop()
    stem = model.stem(x)
    b0 = model.block[0](torch.relu(stem))
    block = model.block[2](model.block[1](b0))
    assert torch.equal(feats["stem"], stem)
    assert torch.equal(feats["block.0"], b0)
    assert torch.equal(feats["block"], block)
    assert torch.equal(feats["head"], model.head(block.mean(dim=-1)))
    with Taps(model, ["block.0", "head"], inputs=True) as taps:
        model(x)
        ins = taps.pop()
    assert torch.equal(ins["block.0"], torch.relu(stem))
    assert torch.equal(ins["head"], block.mean(dim=-1))


def test_builtin_cnn1d_and_mlp_equal_manual() -> None:
    cnn, x = models.CNN1d(length=40, channels=5), torch.randn(4, 40)
    with Taps(cnn, ["conv1", "conv2", "conv3", "classifier"]) as taps:
        cnn(x)
        feats = taps.pop()
    c1 = cnn.conv1(x.reshape(4, 1, -1))
    c2 = cnn.conv2(torch.relu(c1))
    c3 = cnn.conv3(torch.relu(c2))
    for name, ref in [("conv1", c1), ("conv2", c2), ("conv3", c3), ("classifier", cnn.classifier(
            torch.relu(c3).flatten(1)))]:
        assert torch.equal(feats[name], ref), name
    with Taps(cnn, ["classifier"], inputs=True) as taps:
        cnn(x)
        assert torch.equal(taps.pop()["classifier"], torch.relu(c3).flatten(1))

    mlp = models.MLP(in_features=40, hidden=(7, 5))
    with Taps(mlp, ["features.1", "features.2"]) as taps, Taps(mlp, ["features.2"], inputs=True) as taps_in:
        mlp(x)
        feats, ins = taps.pop(), taps_in.pop()
    h1 = mlp.features[1](mlp.features[0](x))
    assert torch.equal(feats["features.1"], h1)
    assert torch.equal(ins["features.2"], h1)
    assert torch.equal(feats["features.2"], mlp.features[2](h1))


def test_tuple_output_takes_first_tensor() -> None:
    model, x = models.GRUClassifier(hidden=6), torch.randn(2, 9)
    with Taps(model, ["gru"]) as taps:
        model(x)
        feats = taps.pop()
    ref, _ = model.gru(x.reshape(2, -1, 1))
    assert torch.equal(feats["gru"], ref)  # the [B, L, H] sequence, the first element of (output, h_n)


def test_inputs_passed_by_keyword_and_outputs_without_tensors() -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.nothing = nn.Identity()

        def forward(self, x: Tensor) -> Tensor:
            self.nothing(None)
            return self.lin(input=x * 2)

    model, x = KeywordCall(), torch.randn(2, 3)
    with Taps(model, ["lin"], inputs=True) as taps:
        model(x)
        assert torch.equal(taps.pop()["lin"], x * 2)
    with pytest.raises(TypeError, match=r"module 'nothing' was called without a tensor argument"), \
            Taps(model, ["nothing"], inputs=True):
        model(x)
    with pytest.raises(TypeError, match=r"output of module 'nothing' is NoneType, which holds no tensor"), \
            Taps(model, ["nothing"]):
        model(x)
    _assert_no_hooks(model)


def test_teacher_side_is_captured_without_graph() -> None:
    model, x = SmallCNN(), torch.randn(2, 2, 16)
    teacher = teachers.Frozen(copy.deepcopy(model))
    with Taps(teacher.model, ["block"]) as taps:
        teacher.targets(x)
        feat = taps.pop()["block"]
    assert not feat.requires_grad and feat.grad_fn is None
    with torch.no_grad():
        ref = model.block(torch.relu(model.stem(x)))
    assert torch.equal(feat, ref)


# -------------------------------------------------------------------------------------------------------- names


def test_wrong_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="no submodule named 'stme'") as info:
        Taps(SmallCNN(), ["stme"])
    for name in ("'stem'", "'block'", "'block.0'", "'block.2'", "'head'"):
        assert name in str(info.value)


def test_wrong_name_in_a_large_model_suggests_close_matches() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(30))
    with pytest.raises(ValueError) as info:
        Taps(model, ["block.17"])
    message = str(info.value)
    assert "closest matches" in message and "'blocks.17'" in message
    assert "31 names in all" in message
    assert "'blocks.3'" not in message  # not a listing of everything


def test_bad_names_argument() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match=r"single string '0'"):
        Taps(model, "0")
    with pytest.raises(ValueError, match="names is empty"):
        Taps(model, [])
    with pytest.raises(ValueError, match=r"repeat \['2'\]"):
        Taps(model, ["2", "0", "2"])


def test_ddp_style_wrapper_accepts_both_name_forms() -> None:
    inner, x = SmallCNN(), torch.randn(2, 2, 16)
    wrapped = Wrapper(inner)
    ref = inner.block(torch.relu(inner.stem(x)))
    for model, names in [(wrapped, ["block", "module.stem"]), (inner, ["module.block", "stem"]),
                         (wrapped, ["_orig_mod.block", "module._orig_mod.stem"])]:
        taps = Taps(model, names)
        with taps:
            model(x)
            feats = taps.pop()
        assert list(feats) == names
        assert torch.equal(feats[names[0]], ref)
        assert torch.equal(feats[names[1]], inner.stem(x))
    assert Taps(wrapped, ["block"]).resolved == {"block": "module.block"}
    with pytest.raises(ValueError, match=r"both name the submodule 'module\.block'"):
        Taps(wrapped, ["block", "module.block"])
    with pytest.raises(ValueError, match=r"leading 'module\.'"):
        Taps(wrapped, ["module.blok"])


# -------------------------------------------------------------------------------------------------------- hooks


def test_hooks_are_removed_after_the_block_and_on_exceptions() -> None:
    model, x = SmallCNN(), torch.randn(2, 2, 16)
    with Taps(model, ["stem", "block.1"]):
        assert model.stem._forward_hooks and model._forward_pre_hooks
    _assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), Taps(model, ["stem", "head"], inputs=True):
        model(x)
        raise RuntimeError("boom")
    _assert_no_hooks(model)
    with pytest.raises(RuntimeError), Taps(model, ["head"]):
        model(torch.randn(2, 3, 16))  # wrong channel count: the forward itself raises
    _assert_no_hooks(model)


def test_attach_and_remove_are_idempotent() -> None:
    model, x = _mlp(), torch.randn(2, 6)
    ref = model[2](model[1](model[0](x)))
    taps = Taps(model, ["2"])
    assert taps.attach() is taps and taps.attach() is taps
    assert taps.attached and len(model[2]._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    with pytest.raises(RuntimeError, match="already attached"):
        taps.__enter__()
    model(x)
    assert torch.equal(taps.pop()["2"], ref)
    model(x)
    taps.remove()
    taps.remove()
    _assert_no_hooks(model)
    assert torch.equal(taps.pop()["2"], ref)  # captured before remove(): still there
    model(x)
    with pytest.raises(RuntimeError, match="not attached"):
        taps.pop()
    with taps:  # usable again after remove(); pop() after the block returns what the block captured
        model(x)
    assert torch.equal(taps.pop()["2"], ref)


def test_pop_clears_and_names_what_did_not_run() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x: Tensor, use_b: bool = True) -> Tensor:
            h = self.a(x)
            return self.b(h) if use_b else h

    model, x = Branchy(), torch.randn(2, 3)
    with Taps(model, ["a", "b"]) as taps:
        model(x)
        assert set(taps.pop()) == {"a", "b"}
        with pytest.raises(RuntimeError, match=r"no feature captured for 'a', 'b'"):
            taps.pop()  # cleared by the first pop
        model(x)
        model(x, use_b=False)  # a new forward drops the unpopped captures of the previous one: 'b' is not stale
        with pytest.raises(RuntimeError, match=r"no feature captured for 'b'.*captured: 'a'.*did not run"):
            taps.pop()


def test_module_running_twice_is_an_error() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(self.lin(x))

    model = Shared()
    with Taps(model, ["lin"]) as taps:
        model(torch.randn(2, 3))
        with pytest.raises(RuntimeError, match="'lin' ran 2 times"):
            taps.pop()


def test_in_place_change_after_capture_is_detected_and_clone_avoids_it() -> None:
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), torch.randn(8, 4)
    with Taps(model, ["0"]) as taps:
        model(x)
        with pytest.raises(RuntimeError, match=r"'0' were modified in place.*clone=True"):
            taps.pop()
    with Taps(model, ["0"], clone=True) as taps:
        model(x)
        feat = taps.pop()["0"]
    ref = model[0](x)
    assert torch.equal(feat, ref) and bool((ref < 0).any())


# ---------------------------------------------------------------------------------------------------- gradients


def test_student_features_carry_gradients_like_the_manual_computation() -> None:
    model, x = SmallCNN(), torch.randn(4, 2, 16)
    target = torch.randn(4, 6, 8)
    manual = copy.deepcopy(model)
    with Taps(model, ["block"]) as taps:
        logits = model(x)
        feat = taps.pop()["block"]
    assert feat.requires_grad
    (F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + F.mse_loss(feat, target)).backward()

    h = manual.block(torch.relu(manual.stem(x)))
    ref_logits = manual.head(h.mean(dim=-1))
    (F.cross_entropy(ref_logits, torch.tensor([0, 1, 2, 3])) + F.mse_loss(h, target)).backward()
    for (name, p), q in zip(model.named_parameters(), manual.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name


# ----------------------------------------------------------------------------------------------- feature shapes


def test_feature_shapes_and_mode_restored() -> None:
    model, x = SmallCNN(), torch.randn(2, 2, 16)
    seen: list[bool] = []
    model.block.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    model.block[1].eval()  # a mixed state comes back as it was
    shapes = feature_shapes(model, ["stem", "block", "head"], x)
    assert shapes == {"stem": torch.Size([4, 16]), "block": torch.Size([6, 8]), "head": torch.Size([4])}
    assert seen == [False]  # ran in eval mode
    assert model.training and model.block.training and model.block[0].training and not model.block[1].training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert feature_shapes(model, ["head"], x, inputs=True) == {"head": torch.Size([6])}
    assert not any(m.training for m in model.modules())
    assert len(model.block._forward_pre_hooks) == 1 and not model.block._forward_hooks  # only the test's own hook
    with pytest.raises(ValueError, match=r"cannot run on an example of shape \(2, 3, 16\)"):
        feature_shapes(model, ["stem"], torch.randn(2, 3, 16))
    assert not model.training
    model.train()
    with pytest.raises(ValueError, match="cannot run"):
        feature_shapes(model, ["stem"], torch.randn(2, 3, 16))
    assert all(m.training for m in model.modules())
    _assert_no_hooks(model.stem)


# --------------------------------------------------------------------------------------------------- projectors


@pytest.mark.parametrize(
    ("kind", "s", "t"),
    [("linear", (5,), (9,)), ("linear", (7, 5), (7, 9)), ("conv1x1", (3, 10), (8, 10)),
     ("conv1x1", (3, 4, 5), (6, 4, 5)), ("mlp", (5,), (9,)), ("mlp", (7, 5), (7, 2))],
)
def test_projector_maps_shapes_and_trains(kind: str, s: tuple[int, ...], t: tuple[int, ...]) -> None:
    proj = build_projector(kind, s, t)
    assert isinstance(proj, Projector) and proj.student_shape == s and proj.teacher_shape == t
    x = torch.randn(2, *s)
    y = proj(x)
    assert y.shape == (2, *t)
    params = list(proj.parameters())
    assert params and all(p.requires_grad for p in params)
    y.square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_projector_formulas() -> None:
    x = torch.randn(2, 3, 10)
    conv = build_projector("conv1x1", (3, 10), (4, 10))
    w, b = conv.net.weight, conv.net.bias  # [4, 3, 1], [4]
    assert torch.allclose(conv(x), torch.einsum("oc,bcl->bol", w[:, :, 0], x) + b[None, :, None], atol=1e-6)
    mlp = build_projector("mlp", (5,), (3,))
    assert mlp.net[0].out_features == 5  # hidden defaults to max(in, out)
    assert build_projector("mlp", (5,), (3,), hidden=11).net[0].out_features == 11


def test_projector_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"kind 'conv' is not one of 'linear', 'conv1x1', 'mlp'"):
        build_projector("conv", (3, 10), (4, 10))
    assert PROJECTOR_KINDS == ("linear", "conv1x1", "mlp", "head")
    with pytest.raises(ValueError, match=r"student shape \(3, 10\) and teacher shape \(4, 8\)"):
        build_projector("conv1x1", (3, 10), (4, 8))
    with pytest.raises(ValueError, match=r"got student shape \(5,\); use 'linear'"):
        build_projector("conv1x1", (5,), (4,))
    with pytest.raises(ValueError, match=r"student shape \(3, 10\) and teacher shape \(8,\)"):
        build_projector("linear", (3, 10), (8,))
    with pytest.raises(ValueError, match=r"hidden=8 applies only to projector kind 'mlp' or 'head', not 'linear'"):
        build_projector("linear", (3,), (8,), hidden=8)
    with pytest.raises(ValueError, match=r"positive integers .* got \(0, 3\)"):
        build_projector("linear", (0, 3), (0, 4))
    with pytest.raises(ValueError, match=r"expects features of shape \[B, 3, 10\], got \(2, 3, 9\)"):
        build_projector("conv1x1", (3, 10), (4, 10))(torch.randn(2, 3, 9))


def test_projectors_holder_end_to_end_fitnet_step() -> None:
    student, teacher = models.CNN1d(channels=3), models.CNN1d(channels=8)
    x = torch.randn(4, 40)
    names = ["conv2", "classifier"]
    s_shapes, t_shapes = feature_shapes(student, names, x), feature_shapes(teacher, names, x)
    assert s_shapes["conv2"] == (3, 10) and t_shapes["conv2"] == (8, 10)
    projectors = Projectors.from_shapes({"conv2": ("conv1x1", s_shapes["conv2"], t_shapes["conv2"]),
                                         "classifier": ("mlp", s_shapes["classifier"], t_shapes["classifier"])},
                                        hidden=16)
    assert list(projectors) == names and len(projectors) == 2 and "conv2" in projectors
    assert projectors["classifier"].net[0].out_features == 16
    assert not set(projectors.state_dict()) & set(student.state_dict())  # kept out of the exported student

    frozen = teachers.Frozen(teacher)
    with Taps(student, names) as s_taps, Taps(teacher, names) as t_taps:
        frozen.targets(x)
        t_feats = t_taps.pop()
        student(x)
        s_feats = projectors(s_taps.pop())
    assert list(s_feats) == names
    loss = sum(F.mse_loss(s_feats[n], t_feats[n]) for n in names)
    assert isinstance(loss, Tensor)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in projectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    ref = projectors["conv2"].net(student.conv2(torch.relu(student.conv1(x.reshape(4, 1, -1)))))
    assert torch.equal(s_feats["conv2"], ref)


def test_projectors_holder_dotted_names_and_errors() -> None:
    projectors = Projectors.from_shapes({"features.1": ("linear", (5,), (7,))})
    assert "maps.features__1.net.weight" in projectors.state_dict()
    passthrough = torch.randn(2, 3)
    out = projectors({"extra": passthrough, "features.1": torch.randn(2, 5)})
    assert list(out) == ["extra", "features.1"] and out["extra"] is passthrough and out["features.1"].shape == (2, 7)
    with pytest.raises(KeyError, match=r"lack \['features.1'\]"):
        projectors({"features.2": torch.randn(2, 5)})
    with pytest.raises(KeyError, match="no projector for 'x'"):
        projectors["x"]
    with pytest.raises(ValueError, match="already exists"):
        projectors.add("features.1", nn.Linear(5, 7))
    with pytest.raises(ValueError, match=r"projector for 'f': projector kind 'lin' is not one of"):
        Projectors.from_shapes({"f": ("lin", (5,), (7,))})
