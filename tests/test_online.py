"""Teachers that learn alongside: Deep Mutual Learning (cohort, detached sources), multi-teacher ensembles
(confidence weights, router) and Noisy Student (pseudo-labels, generations), checked against hand computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mentor import losses, recipes, teachers, train
from mentor.config import ConfigError, config_from_dict
from mentor.data import UNLABELLED, TensorData
from mentor.method import Method, Term, compute_terms
from mentor.models import MLP
from mentor.recipes.dml import Cohort
from mentor.recipes.noisy_student import pseudo_label_teacher
from mentor.run import load_teacher, run
from mentor.views import Views, item_seeds, strong


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def tiny(seed: int, classes: int = 4, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, classes)).double()


def batch(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    y[1] = UNLABELLED
    return x, y


# ------------------------------------------------------------------------------------------------------------ DML


def test_cohort_outputs_every_peer_and_logits_is_peer0() -> None:
    peers = [tiny(s) for s in range(3)]
    x, _ = batch()
    out = Cohort(peers)(x)
    assert sorted(out) == ["logits", "peer0", "peer1", "peer2"]
    for i, p in enumerate(peers):
        assert torch.equal(out[f"peer{i}"], p(x))
    assert torch.equal(out["logits"], out["peer0"])
    with pytest.raises(ValueError, match="at least 2 peers"):
        Cohort(peers[:1])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dml_terms_match_hand_computation(temperature: float) -> None:
    k = 3
    peers = [tiny(s) for s in range(k)]
    x, y = batch()
    out = Cohort(peers)(x)
    method = recipes.dml(peers=k, temperature=temperature, kl_weight=0.8)
    total, values = compute_terms(method, out, None, y, step=0)
    logp = [np_log_softmax(out[f"peer{i}"].detach().numpy() / temperature) for i in range(k)]
    expected_total = 0.0
    labelled = (y != UNLABELLED).numpy()
    for i in range(k):
        raw = np_log_softmax(out[f"peer{i}"].detach().numpy())
        ce = -raw[labelled, y.numpy()[labelled]].mean()
        assert float(values[f"ce{i}"].detach()) == pytest.approx(ce, rel=1e-10)
        expected_total += ce
        for j in range(k):
            if j == i:
                continue
            kl = temperature**2 * (np.exp(logp[j]) * (logp[j] - logp[i])).sum(axis=-1).mean()  # KL(p_j || p_i)
            assert float(values[f"kl{i}_{j}"].detach()) == pytest.approx(kl, rel=1e-10)
            expected_total += 0.8 / (k - 1) * kl
    assert float(total.detach()) == pytest.approx(expected_total, rel=1e-10)
    assert [t.weight_at(0) for t in method.terms if t.name.startswith("kl")] == [0.4] * 6


def test_dml_peers_get_no_gradient_through_each_others_targets() -> None:
    k = 3
    peers = [tiny(s) for s in range(k)]
    cohort = Cohort(peers)
    x, y = batch()
    method = recipes.dml(peers=k, temperature=2.0)
    # One mimicry term alone: only its own peer moves; the target peer gets no gradient at all.
    kl01 = Method("one", tuple(t for t in method.terms if t.name == "kl0_1"))
    total, _ = compute_terms(kl01, cohort(x), None, y, step=0)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peers[0].parameters())
    assert all(p.grad is None for q in peers[1:] for p in q.parameters())
    # The summed DML loss gives every peer exactly the gradient of its own loss L_k, with the others' predictions
    # as constants computed by hand.
    cohort.zero_grad(set_to_none=True)
    total, _ = compute_terms(method, cohort(x), None, y, step=0)
    total.backward()
    for i in range(k):
        own = peers[i](x)
        others = [peers[j](x).detach() for j in range(k) if j != i]
        loss = losses.cross_entropy(own, y)
        for z in others:
            loss = loss + 0.5 * losses.kl_div(own, z, temperature=2.0)
        grads = torch.autograd.grad(loss, list(peers[i].parameters()))
        for p, g in zip(peers[i].parameters(), grads, strict=True):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_detached_source_validation() -> None:
    Term("ok", losses.kl_div, student="peer0", target="detached.peer1")
    with pytest.raises(ValueError, match=r"'label', 'teacher\.<key>' or 'detached\.<key>'"):
        Term("bad", losses.kl_div, target="peer1")
    with pytest.raises(ValueError, match="needs an output key after the dot"):
        Term("bad", losses.kl_div, target="detached.")
    method = Method("m", (Term("kl", losses.kl_div, student="peer0", target="detached.peer7"),))
    x, y = batch()
    with pytest.raises(KeyError, match="peer7"):
        compute_terms(method, Cohort([tiny(0), tiny(1)])(x), None, y, step=0)
    assert not method.needs_teacher


def test_dml_recipe_arguments() -> None:
    assert len(recipes.dml(peers=[{"model": "mlp"}, {"model": "cnn", "args": {"channels": 4}}]).terms) == 4
    for bad in (1, True, [{"model": "mlp"}], [{"name": "mlp"}, {"model": "cnn"}]):
        with pytest.raises(ValueError):
            recipes.dml(peers=bad)  # type: ignore[arg-type]


def _cfg(tmp_path: Path, name: str, recipe: dict, **extra: object) -> dict:
    cfg = {"name": name, "seed": 0, "data": {"num_labelled": 400},
           "student": {"model": "mlp", "args": {"hidden": [16]}},
           "recipe": recipe, "optim": {"lr": 0.01},
           "train": {"epochs": 1, "batch_size": 50, "out": str(tmp_path), "progress": False, "log_every": 4}}
    cfg.update(extra)
    return cfg


def test_dml_run_exports_and_reports_every_peer(tmp_path: Path) -> None:
    cfg = config_from_dict(_cfg(tmp_path, "dml", {"name": "dml", "args": {"peers": 3}}))
    result = run(cfg, report=False)
    out = tmp_path / "dml"
    saved = json.loads((out / "result.json").read_text())
    from mentor.data import mnist1d
    from mentor.eval import evaluate

    test = mnist1d("test")
    cohort = result.final.student
    assert isinstance(cohort, Cohort) and len(cohort.peers) == 3
    for i in range(3):
        peer = MLP(hidden=(16,))
        train.load_model_weights(peer, out / f"peer{i}.safetensors")
        assert evaluate(peer, test)["accuracy"] == saved["metrics"]["peers"][i]["accuracy"]
        for a, b in zip(peer.state_dict().values(), cohort.peers[i].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    # Peer i starts from seed + i: different peers, peer 0 as a plain student of this seed would start.
    torch.manual_seed(0)
    fresh0 = MLP(hidden=(16,))
    assert not torch.equal(fresh0.classifier.weight, cohort.peers[0].classifier.weight)  # it trained
    assert saved["metrics"]["accuracy"] == saved["metrics"]["peers"][0]["accuracy"]
    # A DML run as a teacher teaches with peer 0.
    teacher = load_teacher(config_from_dict({"teacher": {"run": str(out)}}).teacher)  # type: ignore[arg-type]
    assert torch.equal(teacher.classifier.weight, cohort.peers[0].classifier.weight)  # type: ignore[union-attr]


def test_dml_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="can only be the main recipe"):
        config_from_dict(_cfg(tmp_path, "x", {"name": "supervised", "plus": [{"name": "dml"}]}))
    with pytest.raises(ConfigError, match="at least 2 peers"):
        config_from_dict(_cfg(tmp_path, "x", {"name": "dml", "args": {"peers": 1}}))


# ---------------------------------------------------------------------------------------------- multi-teacher


def test_confidence_weights_match_hand_computation() -> None:
    g = torch.Generator().manual_seed(3)
    members = torch.randn(5, 3, 4, generator=g, dtype=torch.float64) * 2
    logp = np_log_softmax(members.numpy())
    p = np.exp(logp)
    top = p.max(axis=-1)
    np.testing.assert_allclose(teachers.confidence_weights(members, "max_prob").numpy(),
                               top / top.sum(axis=1, keepdims=True), rtol=1e-12)
    neg_h = (p * logp).sum(axis=-1)
    e = np.exp(neg_h - neg_h.max(axis=1, keepdims=True))
    np.testing.assert_allclose(teachers.confidence_weights(members, "entropy").numpy(),
                               e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    # The ensemble's target is the per-item mixture of probabilities with those weights.
    ens = teachers.Ensemble([teachers.Callable(lambda x, i=i: members[:, i]) for i in range(3)], by="max_prob")
    out = ens.targets(torch.zeros(5, 1))
    w = top / top.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["logits"].numpy(), np.log((w[..., None] * p).sum(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(out["weights"].sum(dim=1).numpy(), 1.0, rtol=1e-6)  # float32 members
    with pytest.raises(ValueError, match="weights apply to by='fixed' only"):
        teachers.Ensemble([ens.teachers[0], ens.teachers[1]], weights=[1, 2], by="entropy")


def test_router_weights_sum_to_one_and_start_as_the_mean() -> None:
    router = teachers.Router(6, 3, hidden=5)
    x, _ = batch(9)
    w0 = router.weights(x)
    torch.testing.assert_close(w0, torch.full((9, 3), 1 / 3, dtype=torch.float32))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    w = router.weights(x)
    assert w.shape == (9, 3) and bool((w > 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(9))
    assert float((w - w.mean(dim=0)).abs().max().detach()) > 1e-3  # per item, not one global weight
    members = torch.randn(9, 3, 4)
    out = router(x, members)
    torch.testing.assert_close(out["route.logits"], teachers.mix(members, w))
    with pytest.raises(ValueError, match="by='router' needs router"):
        teachers.Ensemble([teachers.Callable(lambda x: x)] * 3, by="router")


def _teacher_nets() -> list[nn.Module]:
    return [tiny(10 + i).float() for i in range(3)]


def _data(n: int = 64) -> TensorData:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    return TensorData(x, torch.randint(0, 4, (n,), generator=g))


def test_router_trains_with_the_student_and_not_through_distillation(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    nets = _teacher_nets()
    router = teachers.Router(6, 3, hidden=8)
    ens = teachers.Ensemble([teachers.Frozen(m) for m in nets], by="router", router=router)
    student = tiny(1).float()
    x, y = _data().x[:16], _data().y[:16]
    # Gradients: the router term reaches the router (not the teachers); the KD term does not reach the router.
    t_out = ens.targets(x)
    s_out = dict(logits=student(x), **router(x, t_out["members"]))
    for name, reaches in (("kd", False), ("router", True)):
        router.zero_grad(set_to_none=True)
        m = recipes.multi_teacher(router=True)
        total, _ = compute_terms(Method("one", tuple(t for t in m.terms if t.name == name)), s_out, t_out, y, 0)
        total.backward(retain_graph=True)
        got = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in router.parameters()]
        assert any(got) == reaches
    assert all(p.grad is None for n in nets for p in n.parameters())
    # In the loop: the router's parameters are in the optimiser, move, and are checkpointed as the teacher state.
    seen: list[list[nn.Parameter]] = []
    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda params, optim: (seen.append(list(params)),
                                                                          real(params, optim))[1])
    router.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    teacher_before = [p.clone() for n in nets for p in n.parameters()]
    train.fit(student, recipes.multi_teacher(router=True), _data(), teacher=ens, epochs=2, batch_size=16,
              progress=False, out=tmp_path / "r", optim=train.Optim(lr=0.05))
    ids = {id(p) for p in seen[0]}
    assert all(id(p) in ids for p in router.parameters())
    assert not any(id(p) in ids for n in nets for p in n.parameters())
    assert any(not torch.equal(before[k], v) for k, v in router.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, [p for n in nets for p in n.parameters()],
                                                 strict=True))
    ckpt = tmp_path / "r" / "checkpoints" / (tmp_path / "r" / "checkpoints" / "latest").read_text().strip()
    stored = load_file(str(ckpt / "teacher.safetensors"))
    assert sorted(stored) == sorted(router.state_dict())
    assert all(torch.equal(stored[k], v) for k, v in router.state_dict().items())
    assert not any(k.startswith("net.") for k in load_file(str(tmp_path / "r" / "student.safetensors")))


def test_router_resumes_exactly(tmp_path: Path) -> None:
    def setup() -> tuple[nn.Module, teachers.Ensemble]:
        router = teachers.Router(6, 3, hidden=8)
        return tiny(1).float(), teachers.Ensemble([teachers.Frozen(m) for m in _teacher_nets()], by="router",
                                                  router=router)

    kwargs = {"batch_size": 16, "progress": False, "optim": train.Optim(lr=0.05)}
    student, ens = setup()
    train.fit(student, recipes.multi_teacher(router=True), _data(), teacher=ens, epochs=2, out=tmp_path / "a",
              **kwargs)  # type: ignore[arg-type]
    s1, e1 = setup()
    train.fit(s1, recipes.multi_teacher(router=True), _data(), teacher=e1, epochs=2, max_steps=5,
              out=tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    s2, e2 = setup()
    train.fit(s2, recipes.multi_teacher(router=True), _data(), teacher=e2, epochs=2, out=tmp_path / "b",
              resume=True, **kwargs)  # type: ignore[arg-type]
    assert e2.router is not None and ens.router is not None
    for a, b in ((student, s2), (ens.router, e2.router)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k


def _teacher_run(tmp_path: Path, name: str, model: str, args: dict) -> str:
    cfg = _cfg(tmp_path, name, {"name": "supervised"}, student={"model": model, "args": args})
    run(config_from_dict(cfg), report=False)
    return str(tmp_path / name)


def test_multi_teacher_config_runs_and_exports_the_router_beside_the_student(tmp_path: Path) -> None:
    runs = [_teacher_run(tmp_path, "t_cnn", "cnn", {"channels": 4}), _teacher_run(tmp_path, "t_mlp", "mlp",
                                                                                   {"hidden": [8]})]
    base = _cfg(tmp_path, "mt", {"name": "multi_teacher", "args": {"router": True}},
                teacher={"runs": runs, "combine": "router", "router_hidden": 8})
    result = run(config_from_dict(base), report=False)
    router = load_file(str(tmp_path / "mt" / "router.safetensors"))
    assert router["net.1.weight"].shape == (8, 40) and router["net.3.weight"].shape == (2, 8)
    assert "agreement" in result.final.metrics
    student = load_file(str(tmp_path / "mt" / "student.safetensors"))
    assert not set(student) & set(router)
    for combine in ("mean", "max_prob", "entropy"):
        config_from_dict(_cfg(tmp_path, "x", {"name": "multi_teacher"}, teacher={"runs": runs, "combine": combine}))
    bad = [({"runs": runs, "combine": "router"}, {"name": "multi_teacher"}, "router: true"),
           ({"runs": runs}, {"name": "multi_teacher", "args": {"router": True}}, "combine = 'router'"),
           ({"runs": runs[:1]}, {"name": "multi_teacher"}, "at least 2"),
           ({"runs": runs, "combine": "weights", "weights": [1.0]}, {"name": "multi_teacher"}, "one per run"),
           ({"runs": runs, "run": runs[0]}, {"name": "multi_teacher"}, "excludes"),
           ({"run": runs[0], "combine": "entropy"}, {"name": "multi_teacher"}, "several teachers"),
           ({"runs": runs}, {"name": "noisy_student"}, "one teacher network")]
    for teacher, recipe, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(_cfg(tmp_path, "x", recipe, teacher=teacher))


# ------------------------------------------------------------------------------------------------ Noisy Student


def test_pseudo_labels_come_from_the_teacher_on_the_clean_input() -> None:
    model = tiny(4, dropout=0.5).float()
    model.train()  # from_model labels in eval mode (no dropout) and restores the mode
    data = _data(20)
    labels = data.y.clone()
    labels[5:] = UNLABELLED
    aug = strong("signal")
    soft = teachers.PseudoLabels.from_model(model, data.x, labels, temperature=2.0, augment=aug, seed=3)
    assert model.training
    model.eval()
    with torch.no_grad():
        clean = torch.log_softmax(model(data.x) / 2.0, dim=-1)
    torch.testing.assert_close(soft.log_probs[5:], clean[5:])
    assert torch.equal(soft.log_probs[:5].argmax(-1), labels[:5])
    assert bool(torch.isinf(soft.log_probs[:5]).sum(dim=1).eq(3).all())  # labelled items: one-hot
    index = torch.tensor([7, 2, 11])
    noised = soft.student_inputs(data.x[index], index, epoch=4)
    assert not torch.allclose(noised, data.x[index])
    torch.testing.assert_close(noised, aug(data.x[index], item_seeds(index, 4, 3, Views.STUDENT)))
    # The targets do not depend on the (noised) input the loop hands over: they are the clean-input ones.
    torch.testing.assert_close(soft.targets(noised, index=index)["logits"], soft.log_probs[index])
    hard = teachers.PseudoLabels.from_model(model, data.x, None, hard=True)
    assert torch.equal(hard.log_probs.argmax(-1), clean.argmax(-1))
    assert bool((hard.log_probs.exp().sum(dim=1) == 1).all())
    # The KL to a one-hot target is the cross-entropy with that label.
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(losses.kl_div(z, soft.log_probs[:5].double()), losses.cross_entropy(z, labels[:5]))


def test_noisy_student_loop_trains_on_noised_inputs() -> None:
    data = _data(32)
    teacher_net = tiny(2).float()
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny(3).float()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(x.detach().clone())
            return self.inner(x)

    pl = pseudo_label_teacher(teacher_net, data.x, data.y, augment="strong", seed=0)
    train.fit(Spy(), recipes.noisy_student(), data, teacher=pl, epochs=1, batch_size=32, progress=False)
    rows = {tuple(r.tolist()) for r in data.x}
    assert len(seen) == 1 and not any(tuple(r.tolist()) in rows for r in seen[0])


def test_noisy_student_generations_chain_exact_weights(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "ns", {"name": "noisy_student", "args": {"generations": 2, "augment": "weak"}},
               data={"num_labelled": 100, "train": "both", "transfer_size": 100})
    result = run(config_from_dict(cfg), report=False)
    out = tmp_path / "ns"
    assert result.first_generation == 0 and len(result.generations) == 3
    summary = json.loads((out / "result.json").read_text())["generations"]
    assert [g["generation"] for g in summary] == [0, 1, 2]
    from mentor.run import load_data

    train_data, _ = load_data(config_from_dict(cfg))
    for gen in (1, 2):
        prev = MLP(hidden=(16,))
        train.load_model_weights(prev, out / f"gen{gen - 1}" / "student.safetensors")
        for a, b in zip(prev.state_dict().values(), result.generations[gen - 1].student.state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)
        expected = teachers.PseudoLabels.from_model(prev, train_data.x, train_data.y).log_probs
        stored = load_file(str(out / f"gen{gen}" / "pseudo_labels.safetensors"))["log_probs"]
        assert torch.equal(stored, expected)
    # gen0 trained on the 100 labelled items alone, for as many steps as a generation (200 items / 50 per step).
    rows = [json.loads(line) for line in (out / "gen0" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4


def test_noisy_student_with_a_semi_supervised_pool_labels_the_whole_pool(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "ns_semi", {"name": "noisy_student", "args": {"generations": 1, "hard": True}},
               data={"num_labelled": 100, "train": "semi", "unlabelled": "rest"})
    cfg["train"]["max_steps"] = 3
    result = run(config_from_dict(cfg), report=False)
    stored = load_file(str(tmp_path / "ns_semi" / "gen1" / "pseudo_labels.safetensors"))["log_probs"]
    assert stored.shape == (4000, 10)  # 100 labelled items + the other 3900 training items
    assert bool((stored.exp().sum(dim=1) == 1).all())  # hard pseudo-labels and labels: one-hot rows
    assert [r.steps for r in result.generations] == [3, 3]
