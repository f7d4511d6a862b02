"""Language models in the one loop (:func:`mentor.train.fit`, :mod:`mentor.lm.loop`, the LM recipes).

* layout: shifted labels, prompts cut from sequences, generations moved to the right-padded layout, by hand;
  right padding needs no attention mask (causal model);
* token normalisers: micro-batch 8 x 1 == 2 x 4 == 4 x 2 (logged losses, weights) with sequences of unequal
  target counts; step 1's logged KD and CE equal a hand computation over the global batch's target tokens;
* an all-masked batch gives a zero loss, no NaN, unchanged weights; the teacher never receives gradients;
* on-policy (GKD): step 1's loss equals a hand computation on the student's own samples (seeded by step,
  micro-batch's place; normalised by the generated tokens of the whole step); the same seed gives the same run,
  and a resumed run equals an uninterrupted one bit for bit; SKD runs in the loop;
* a top-k teacher cache with k = vocabulary gives the online lm_kd step;
* every LM recipe trains a tiny student end to end through ``mentor train`` (slow).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from mentor import losses, recipes, teachers
from mentor.lm.generate import sample, speculative_sample
from mentor.lm.loop import (
    LMData,
    OnPolicy,
    _mix_seed,
    evaluate_lm,
    prompts_of,
    shift_labels,
    to_training,
)
from mentor.lm.models import tiny_llama
from mentor.method import BatchContext
from mentor.train import Optim, fit

V = 24
EOS, PAD, BOS = 2, 0, 1


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _model(seed: int, dtype: torch.dtype = torch.float64, layers: int = 1, width: int = 32) -> torch.nn.Module:
    model = tiny_llama(layers, width, V, heads=2, intermediate=48, seed=seed, use_cache=False)
    return model.to(dtype)


def _data(n: int, seed: int = 0, width: int = 10) -> LMData:
    """``<s> prompt answer </s>`` rows, right-padded, prompts of 1-4 and answers of 1-3 tokens (plus eos)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, width), PAD)
    hf = torch.full((n, width), -100)
    for i in range(n):
        p = int(torch.randint(1, 5, (), generator=g))
        a = int(torch.randint(1, 4, (), generator=g))
        row = [BOS, *torch.randint(3, V, (p,), generator=g).tolist()]
        ans = [*torch.randint(3, V, (a,), generator=g).tolist(), EOS]
        x[i, : len(row) + len(ans)] = torch.tensor(row + ans)
        hf[i, len(row) : len(row) + len(ans)] = torch.tensor(ans)
    return LMData(x, shift_labels(hf), eos_id=EOS, pad_id=PAD, max_new_tokens=4)


def _train_rows(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("split") == "train"]


# ------------------------------------------------------------------------------------------------------ layout


def test_shift_prompts_and_generation_layout_by_hand() -> None:
    labels = torch.tensor([[-100, -100, 7, 8, 2, -100], [-100, 5, 2, -100, -100, -100]])
    assert shift_labels(labels).tolist() == [[-100, 7, 8, 2, -100, -100], [5, 2, -100, -100, -100, -100]]
    x = torch.tensor([[1, 9, 7, 8, 2, 0], [1, 5, 2, 0, 0, 0]])
    ids, mask = prompts_of(x, shift_labels(labels), pad_id=0)
    assert ids.tolist() == [[1, 9], [0, 1]] and mask.tolist() == [[1, 1], [0, 1]]
    # a generation: left-padded prompt, completion, right padding after eos (labels in the HF convention)
    gen_ids = torch.tensor([[1, 9, 4, 2, 0], [0, 1, 6, 6, 2]])
    gen_mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    gen_labels = torch.tensor([[-100, -100, 4, 2, -100], [-100, -100, 6, 6, 2]])
    xs, ys = to_training(gen_ids, gen_mask, gen_labels, pad_id=0)
    assert xs.tolist() == [[1, 9, 4, 2], [1, 6, 6, 2]]
    assert ys.tolist() == [[-100, 4, 2, -100], [6, 6, 2, -100]]


def test_right_padding_needs_no_attention_mask() -> None:
    """A causal model's logits at the real positions of a right-padded row are those of the row alone."""
    model = _model(0).eval()
    data = _data(6)
    with torch.no_grad():
        padded = model(data.x).logits
        masked = model(data.x, attention_mask=(data.x != PAD).long()).logits
        for i in range(6):
            length = int((data.x[i] != PAD).sum())
            alone = model(data.x[i : i + 1, :length]).logits[0]
            assert torch.allclose(padded[i, :length], alone, atol=1e-10)
            assert torch.allclose(masked[i, :length], alone, atol=1e-10)


# ------------------------------------------------------------------------------------------------- normalisers


def _lm_run(micro: int, accum: int, data: LMData, teacher_model: torch.nn.Module, method=None, **kwargs):
    method = method or recipes.lm_kd(temperature=2.0, ce_weight=0.5)
    return fit(_model(1), method, data, teacher=teachers.Frozen(copy.deepcopy(teacher_model)),
               epochs=kwargs.pop("epochs", 2), batch_size=micro, grad_accum=accum, optim=Optim(lr=1e-2),
               log_every=1, progress=False, **kwargs)


def test_grad_accum_with_token_normalisers_equals_one_large_batch() -> None:
    data = _data(32)
    counts = (data.y >= 0).sum(dim=1)
    assert len(set(counts.tolist())) > 1  # rows with unequal target counts: per-micro-batch means would differ
    teacher_model = _model(100)
    big = _lm_run(8, 1, data, teacher_model)
    assert big.steps == 8
    for micro, accum in [(2, 4), (4, 2)]:
        small = _lm_run(micro, accum, data, teacher_model)
        for rb, rs in zip(_train_rows(big.history), _train_rows(small.history), strict=True):
            for key in ("loss", "loss/ce", "loss/kd"):
                assert rs[key] == pytest.approx(rb[key], abs=1e-9), (micro, accum, rb["step"], key)
        for (name, pb), ps in zip(big.student.state_dict().items(), small.student.state_dict().values(), strict=True):
            assert torch.allclose(pb, ps, rtol=0, atol=1e-9), (micro, accum, name)


def test_logged_token_losses_are_global_batch_formulas() -> None:
    """One global batch holds all 8 sequences: step 1's KD and CE are sums over every target token of the batch
    divided by their number, computed by hand here (whatever the micro-batch split)."""
    data = _data(8)
    teacher_model, student0 = _model(100), _model(1)
    temp = 2.0
    with torch.no_grad():
        s, t = student0(data.x).logits, teacher_model(data.x).logits
        keep = data.y >= 0
        n = int(keep.sum())
        log_s, log_t = F.log_softmax(s[keep] / temp, -1), F.log_softmax(t[keep] / temp, -1)
        kd = temp**2 * (log_t.exp() * (log_t - log_s)).sum() / n
        ce = F.cross_entropy(s[keep], data.y[keep], reduction="sum") / n
    for micro, accum in [(8, 1), (2, 4), (1, 8)]:
        row = _train_rows(_lm_run(micro, accum, data, teacher_model, epochs=1).history)[0]
        assert row["loss/kd"] == pytest.approx(float(kd), abs=1e-10), (micro, accum)
        assert row["loss/ce"] == pytest.approx(float(ce), abs=1e-10), (micro, accum)


def test_all_masked_batch_gives_zero_loss_and_no_nan() -> None:
    """The items of step 1 (the first 8 of epoch 0's order) have no target at all: that step's loss is exactly 0,
    finite, and leaves the weights as they were (zero gradient, AdamW without decay); step 2 trains."""
    data = _data(16)
    first = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:8]
    y = data.y.clone()
    y[first] = -100
    masked = LMData(data.x, y, eos_id=EOS, pad_id=PAD)
    student = _model(1)
    before = copy.deepcopy(student.state_dict())
    method = recipes.lm_kd(divergence="jsd", beta=0.5, ce_weight=1.0)
    result = fit(student, method, masked, teacher=teachers.Frozen(_model(100)), epochs=1, max_steps=1,
                 batch_size=4, grad_accum=2, log_every=1, progress=False, optim=Optim(lr=1e-2))
    row = _train_rows(result.history)[0]
    assert row["loss"] == 0.0 and row["loss/kd"] == 0.0 and row["loss/ce"] == 0.0
    for name, value in result.student.state_dict().items():
        assert torch.equal(value, before[name]), name
    result = fit(_model(1), method, masked, teacher=teachers.Frozen(_model(100)), epochs=1, batch_size=4,
                 grad_accum=2, log_every=1, progress=False, optim=Optim(lr=1e-2))
    second = _train_rows(result.history)[1]
    assert second["loss/kd"] > 0 and second["loss/ce"] > 0


@pytest.mark.parametrize("recipe", ["lm_kd", "gkd"])
def test_teacher_never_receives_gradients(recipe: str) -> None:
    teacher_model = _model(100)
    before = copy.deepcopy(teacher_model.state_dict())
    method = recipes.lm_kd() if recipe == "lm_kd" else recipes.gkd(lmbda=1.0, max_new_tokens=3)
    fit(_model(1), method, _data(16), teacher=teachers.Frozen(teacher_model), epochs=1, batch_size=4,
        progress=False)
    for name, p in teacher_model.named_parameters():
        assert p.grad is None and not p.requires_grad, name
        assert torch.equal(p, before[name]), name


# -------------------------------------------------------------------------------------------------- on-policy


def test_gkd_step_is_the_jsd_on_the_students_own_samples() -> None:
    """lambda = 1, micro-batch 2 x 2: step 1 samples each micro-batch's prompts with the seed of (seed, step,
    micro-batch's place in the global batch), and the logged loss is the JSD summed over the generated tokens of
    both micro-batches divided by their total number."""
    data, seed = _data(4), 7
    teacher_model, student0 = _model(100), _model(1)
    method = recipes.gkd(lmbda=1.0, beta=0.3, max_new_tokens=4)
    result = fit(copy.deepcopy(student0), method, data, teacher=teachers.Frozen(copy.deepcopy(teacher_model)),
                 epochs=1, batch_size=2, grad_accum=2, optim=Optim(lr=1e-2), log_every=1, progress=False, seed=seed)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed * 1_000_003))
    total, tokens = 0.0, 0
    for m in range(2):
        idx = perm[2 * m : 2 * m + 2]
        ids, mask = prompts_of(data.x[idx], data.y[idx], PAD)
        gen = sample(student0, ids, mask, max_new_tokens=4, temperature=1.0, seed=_mix_seed(seed, 0, m),
                     eos_id=EOS, pad_id=PAD)
        x, y = to_training(gen.input_ids, gen.attention_mask, gen.labels, PAD)
        assert int((y >= 0).sum()) == gen.num_tokens
        with torch.no_grad():
            s, t = student0(x).logits, teacher_model(x).logits
        total += float(losses.generalized_jsd(s, t, beta=0.3, mask=y >= 0, num_items=1))
        tokens += gen.num_tokens
    assert _train_rows(result.history)[0]["loss/kd"] == pytest.approx(total / tokens, abs=1e-10)


def test_on_policy_hook_is_reproducible_and_off_policy_steps_keep_the_data() -> None:
    data = _data(8)
    student, teacher_model = _model(1), _model(100)
    hook = OnPolicy(lmbda=0.5, max_new_tokens=4)
    choices = []
    for step in range(12):
        ctx = BatchContext(student=student, teacher=teachers.Frozen(teacher_model), step=step, micro=0, rank=0,
                           seed=3)
        a, b = hook(data.x, data.y, ctx), hook(data.x, data.y, ctx)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        on = not (a[0].shape == data.x.shape and torch.equal(a[0], data.x))
        choices.append(on)
    assert any(choices) and not all(choices)
    skd = OnPolicy(lmbda=1.0, max_new_tokens=4, speculative_top_k=2)
    ctx = BatchContext(student=student, teacher=teachers.Frozen(teacher_model), step=0, micro=1, rank=0, seed=3)
    x, _ = skd(data.x, data.y, ctx)
    ids, mask = prompts_of(data.x, data.y, PAD)
    ref = speculative_sample(student, teacher_model, ids, mask, max_new_tokens=4, top_k=2, temperature=1.0,
                             seed=_mix_seed(3, 0, 1), eos_id=EOS, pad_id=PAD)
    assert torch.equal(x, to_training(ref.input_ids, ref.attention_mask, ref.labels, PAD)[0])


def _gkd_run(out: Path | None, seed: int = 0, **kwargs):
    return fit(_model(1), recipes.gkd(lmbda=0.5, max_new_tokens=4), _data(32),
               teacher=teachers.Frozen(_model(100)), epochs=1, batch_size=2, grad_accum=2, optim=Optim(lr=1e-2),
               log_every=1, progress=False, seed=seed, out=out, **kwargs)


def test_on_policy_run_is_reproducible_and_resumes_bitwise(tmp_path: Path) -> None:
    ref = _gkd_run(tmp_path / "ref")
    again = _gkd_run(None)
    for name, value in ref.student.state_dict().items():
        assert torch.equal(value, again.student.state_dict()[name]), name
    run = tmp_path / "run"
    assert _gkd_run(run, max_steps=3).steps == 3
    resumed = _gkd_run(run, resume=True)
    assert resumed.steps == ref.steps == 8
    for name, value in ref.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name
    def losses_of(history: list[dict]) -> list[tuple]:
        return [(r["step"], r["loss"], r["loss/kd"]) for r in _train_rows(history)]

    assert losses_of(resumed.history) == losses_of(ref.history)
    other = _gkd_run(None, seed=1)
    assert not torch.equal(other.student.lm_head.weight, ref.student.lm_head.weight)


def test_skd_runs_in_the_loop_and_evaluation_reports_lm_metrics() -> None:
    data, test = _data(16), _data(8, seed=5)
    teacher = teachers.Frozen(_model(100))
    result = fit(_model(1), recipes.skd(top_k=3, max_new_tokens=4), data, teacher=teacher, eval_data=test,
                 epochs=1, batch_size=4, progress=False)
    metrics = result.metrics
    assert {"perplexity", "token_accuracy", "agreement", "kl_to_teacher", "exact_match"} <= set(metrics)
    assert math_isclose(metrics["perplexity"], evaluate_lm(result.student, test)["perplexity"])


def math_isclose(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a))


def test_evaluate_lm_by_hand() -> None:
    """Perplexity, agreement and exact match of a model against hand computations."""
    data = _data(6)
    model, teacher_model = _model(1).eval(), _model(100).eval()
    metrics = evaluate_lm(model, data, teachers.Frozen(teacher_model))
    with torch.no_grad():
        s, t = model(data.x).logits, teacher_model(data.x).logits
    keep = data.y >= 0
    nll = F.cross_entropy(s[keep], data.y[keep])
    assert metrics["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-9)
    assert metrics["agreement"] == pytest.approx(float((s[keep].argmax(-1) == t[keep].argmax(-1)).double().mean()))
    ids, mask = prompts_of(data.x, data.y, PAD)
    gen = sample(model, ids, mask, max_new_tokens=4, temperature=0.0, seed=0, eos_id=EOS, pad_id=PAD)
    hits = [gen.completions[i][gen.completion_mask[i].bool()].tolist() == data.y[i][data.y[i] >= 0].tolist()
            for i in range(6)]
    assert metrics["exact_match"] == pytest.approx(sum(hits) / 6)
    # a teacher that answers its own greedy answers exactly: exact match 1
    own = LMData(*to_training(gen.input_ids, gen.attention_mask, gen.labels, PAD), eos_id=EOS, pad_id=PAD,
                 max_new_tokens=4)
    assert evaluate_lm(model, own)["exact_match"] == 1.0


# ------------------------------------------------------------------------------------------------------- cache


def test_cached_topk_lm_kd_equals_online_lm_kd_at_full_vocabulary(tmp_path: Path) -> None:
    from mentor.cache import CacheSpec, build, use_sparse_targets

    data = _data(16)
    teacher_model = _model(100, dtype=torch.float32)
    build(teacher_model, data.x, tmp_path / "cache", spec=CacheSpec(k=V, values_dtype="float16"), progress=False)
    method = recipes.lm_kd(temperature=1.0, chunk_size=None)  # full logits: a Callable teacher gives only logits
    sparse = use_sparse_targets(method)
    assert sparse.terms[0].loss is losses.sparse_kl_div
    # plain SGD: the weights differ by lr times the gradients' difference (Adam would magnify the fp16 rounding)
    common = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "optim": Optim(name="sgd", lr=0.5, momentum=0.0),
              "log_every": 1, "progress": False}
    exact = fit(_model(1), method, data, teacher=teachers.Frozen(copy.deepcopy(teacher_model).double()), **common)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        """The online teacher with the cache's rounding: log-probabilities as the cache computes them, in fp16."""
        logits = teacher_model(x).logits.float()
        return (logits - logits.logsumexp(dim=-1, keepdim=True)).half().double()

    online = fit(_model(1), method, data, teacher=teachers.Callable(rounded), **common)
    cached = fit(_model(1), sparse, data, teacher=teachers.Cached(tmp_path / "cache", dense=False), **common)
    for re_, ro, rc in zip(_train_rows(exact.history), _train_rows(online.history), _train_rows(cached.history),
                           strict=True):
        assert rc["loss/kd"] == pytest.approx(ro["loss/kd"], rel=1e-9)
        assert rc["loss/kd"] == pytest.approx(re_["loss/kd"], rel=2e-3)  # fp16 log-probabilities
    for name, value in online.student.state_dict().items():
        assert torch.allclose(value, cached.student.state_dict()[name], atol=1e-12), name
        assert not torch.equal(value, _model(1).state_dict()[name]) or "norm" in name, name


# ------------------------------------------------------------------------------------------------- config / CLI


def test_config_errors_name_the_key() -> None:
    from mentor.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"data\.max_operand"):
        config_from_dict({"data": {"name": "mnist1d", "max_operand": 9}})
    with pytest.raises(ConfigError, match=r"data\.block_size"):
        config_from_dict({"data": {"name": "lm_arithmetic", "block_size": 9}})
    with pytest.raises(ConfigError, match=r"data\.ops"):
        config_from_dict({"data": {"name": "lm_arithmetic", "ops": "+/"}})
    with pytest.raises(ConfigError, match="lm_arithmetic"):
        config_from_dict({"recipe": {"name": "lm_kd"}, "teacher": {"checkpoint": "t", "model": "tiny_llama"}})
    with pytest.raises(ConfigError, match="seq_kd"):
        config_from_dict({"data": {"name": "lm_arithmetic"}, "recipe": {"name": "seq_kd"}})
    with pytest.raises(ConfigError, match="teacher cache"):
        config_from_dict({"data": {"name": "lm_arithmetic"}, "recipe": {"name": "gkd"},
                          "teacher": {"cache": "c"}})
    with pytest.raises(ConfigError, match="lmbda"):
        config_from_dict({"data": {"name": "lm_arithmetic"}, "recipe": {"name": "gkd", "args": {"lmbda": 2}},
                          "teacher": {"checkpoint": "t", "model": "tiny_llama"}})


def _tiny_config(path: Path, name: str, recipe: str, args: dict, teacher: str | None, steps: int) -> Path:
    import yaml

    cfg = {
        "name": name, "seed": 0,
        "data": {"name": "lm_arithmetic", "num_train": 512, "num_test": 32, "max_operand": 9, "max_new_tokens": 4},
        "student": {"model": "tiny_llama", "args": {"layers": 1, "width": 64, "vocab": 512}},
        "recipe": {"name": recipe, "args": args},
        "optim": {"lr": 0.003, "schedule": "constant"},
        "train": {"epochs": 50, "max_steps": steps, "batch_size": 32, "log_every": 5, "progress": False,
                  "out": str(path)},
    }
    if teacher is not None:
        cfg["teacher"] = {"run": teacher}
    out = path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.slow
def test_every_lm_recipe_trains_through_mentor_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from mentor.cli import main
    from mentor.data import cache_dir

    lm_cache = cache_dir() / "lm"  # the corpus and tokenizer are cached there; seq_kd's generations go to a copy
    home = tmp_path / "cache_home"
    (home / "lm").mkdir(parents=True)
    for f in lm_cache.glob("*.json"):
        shutil.copy(f, home / "lm" / f.name)
    monkeypatch.setenv("MENTOR_CACHE", str(home))
    assert main(["train", str(_tiny_config(tmp_path, "teacher", "supervised", {}, None, 60))]) == 0
    teacher = str(tmp_path / "teacher")
    runs = {"lm_kd": {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.5}, "seq_kd": {},
            "gkd": {"lmbda": 0.5, "max_new_tokens": 4}, "skd": {"top_k": 5, "max_new_tokens": 4},
            "reverse_kl_on_policy": {"max_new_tokens": 4}}
    for recipe, args in runs.items():
        assert main(["train", str(_tiny_config(tmp_path, recipe, recipe, args, teacher, 30))]) == 0, recipe
        rows = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
        train = [r["loss"] for r in rows if r["split"] == "train"]
        assert train[-1] < train[0], (recipe, train)
        result = json.loads((tmp_path / recipe / "result.json").read_text())["metrics"]
        assert {"perplexity", "exact_match", "agreement"} <= set(result), recipe
        report = (tmp_path / recipe / "report.md").read_text()
        assert "Generation samples" in report and "perplexity" in report
    assert list((home / "lm" / "seq_kd").glob("teacher_sequences_*.safetensors"))
    assert main(["eval", str(tmp_path / "gkd"), "--json"]) == 0
    # off-policy KD from a per-position top-k cache built by `mentor cache build`
    config = str(_tiny_config(tmp_path, "cached", "lm_kd", {}, teacher, 30))
    cache = f"teacher.cache={tmp_path / 'cache'}"
    assert main(["cache", "build", config, cache, "cache.k=8", "--quiet"]) == 0
    assert main(["train", config, cache]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0]


@pytest.mark.slow
def test_gkd_on_two_processes_equals_one_process(tmp_path: Path) -> None:
    """On-policy GKD under DDP (gloo, 2 processes x micro-batch 2) equals 1 process x micro-batch 2 x 2
    accumulation steps: the same samples (seeded by the micro-batch's place in the global batch), the normaliser
    summed over processes, the teacher never wrapped or optimised."""
    import test_train_loop as loop_tests

    base = {"case": "lm_gkd", "epochs": 1, "log_every": 1}
    spec = {**base, "batch_size": 2, "out": str(tmp_path / "ddp"), "report_dir": str(tmp_path / "report")}
    procs = loop_tests._spawn_two_processes(spec, tmp_path)
    ref = loop_tests._reference({**base, "batch_size": 2, "grad_accum": 2, "out": str(tmp_path / "ref")})
    for name, proc in procs.items():
        loop_tests._wait(proc, tmp_path, name)
    rows_ref = _train_rows(ref.history)
    assert len(rows_ref) == ref.steps == 8
    for rank in range(2):
        rep = loop_tests._report(tmp_path / "report", rank)
        assert rep["teacher_params_in_optimizer"] == 0 and not rep["teacher_is_ddp"] and rep["teacher_unchanged"]
        for a, b in zip(rows_ref, _train_rows(rep["history"]), strict=True):
            assert b["loss/kd"] == pytest.approx(a["loss/kd"], abs=1e-9), (rank, a["step"])
    from safetensors.torch import load_file

    w_ref = load_file(str(tmp_path / "ref" / "student.safetensors"))
    w_ddp = load_file(str(tmp_path / "ddp" / "student.safetensors"))
    for k in w_ref:
        assert torch.allclose(w_ref[k], w_ddp[k], rtol=0, atol=1e-9), k


def test_an_on_policy_method_is_refused_in_plus() -> None:
    with pytest.raises(ValueError, match="only be the main method"):
        recipes.lm_kd().plus(recipes.gkd())
    combined = recipes.gkd().plus(recipes.lm_kd(ce_weight=1.0))
    assert combined.batch_hook == recipes.gkd().batch_hook and [t.name for t in combined.terms] == ["kd", "ce"]


def test_padded_teacher_vocabulary_is_refused_naming_both_sizes_or_truncated() -> None:
    """A teacher whose output layer has 8 padded rows beyond the shared vocabulary: refused with both sizes named,
    and with ``num_classes`` its first V logits teach exactly as a teacher without the padding."""

    padded = tiny_llama(1, 32, V + 8, heads=2, intermediate=48, seed=100, use_cache=False).double()
    data = _data(16)
    with pytest.raises(ValueError, match=rf"teacher has {V + 8} output classes but the student has {V}"):
        fit(_model(1), recipes.lm_kd(), data, teacher=teachers.Frozen(padded), epochs=1, batch_size=8,
            progress=False)
    runs = []
    for teacher in (teachers.Frozen(padded, num_classes=V), teachers.Callable(lambda x: padded(x).logits[..., :V])):
        runs.append(fit(_model(1), recipes.lm_kd(chunk_size=None), data, teacher=teacher, epochs=2, batch_size=8,
                        optim=Optim(lr=1e-2), log_every=1, progress=False))
    assert [r["loss"] for r in runs[0].history if r["split"] == "train"] == \
        [r["loss"] for r in runs[1].history if r["split"] == "train"]
    # chunked: the teacher's output layer is cut to its first V rows as its logits were
    chunked = fit(_model(1), recipes.lm_kd(chunk_size=5), data, teacher=teachers.Frozen(padded, num_classes=V),
                  epochs=2, batch_size=8, optim=Optim(lr=1e-2), log_every=1, progress=False)
    assert [r["loss"] for r in chunked.history if r["split"] == "train"] == pytest.approx(
        [r["loss"] for r in runs[0].history if r["split"] == "train"], abs=1e-10)
    with pytest.raises(ValueError, match="chunk_size=None"):  # a teacher that gives only logits: said how to run it
        fit(_model(1), recipes.lm_kd(), data, teacher=runs[1].teacher, epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="fewer than num_classes"):
        teachers.Frozen(_model(2), num_classes=V + 1).targets(data.x[:2])
