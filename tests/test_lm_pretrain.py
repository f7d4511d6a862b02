"""Pre-training distillation of a causal LM from a per-token top-k teacher cache (issue 6, point 2).

A tiny random teacher's per-token top-k log-probabilities over a slice of the built-in corpus (the standard
library's docstrings packed into blocks, ``lm_stdlib``) are cached by :func:`mentor.cache.build`; a student from a
random initialisation then trains on them in :func:`mentor.train.fit` (``lm_kd``, chunked, forward KL with the
"rest" bucket):

* every logged loss is finite, and each cached item is read exactly once per epoch (the dry run reads items 0, 1);
* the KD loss of step 0 equals a float64 computation by hand on that step's batch from the teacher's own logits:
  ``sum_{i in top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)`` per target token, divided by the batch's
  target tokens (exactly, given the cache's fp16 rounding of the log-probabilities; within that rounding from
  the unrounded ones);
* the shipped configs (``configs/lm_stdlib_*.yaml``) run through ``mentor train`` / ``mentor cache build`` with
  tiny overrides, and the evaluation reports held-out perplexity.
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
from mentor.cache import CacheSpec, TeacherCache, build, use_sparse_targets
from mentor.lm.loop import LMData, lm_corpus_data
from mentor.lm.losses import chunked_loss
from mentor.lm.models import tiny_llama
from mentor.train import Optim, fit

V, BLOCK, K = 512, 32, 16
N_TRAIN, BATCH, EPOCHS = 24, 8, 2
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="module")
def corpus() -> tuple[LMData, LMData]:
    """The first 24 training and 8 held-out blocks of 32 tokens of the docstring corpus."""
    return lm_corpus_data(block_size=BLOCK, vocab_size=V, num_train=N_TRAIN, num_test=8)


def _model(seed: int) -> torch.nn.Module:
    return tiny_llama(1, 32, V, heads=2, intermediate=48, seed=seed, use_cache=False)


class _Recording(teachers.Cached):
    """A cached teacher that remembers the item indices of every read."""

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__(cache, dense=False)
        self.calls: list[torch.Tensor] = []

    def targets(self, inputs: torch.Tensor, index: torch.Tensor | None = None, epoch: int = 0):  # type: ignore[override]
        assert index is not None
        self.calls.append(index.clone())
        return super().targets(inputs, index=index, epoch=epoch)


def _sparse_kl_by_hand(student_logits: torch.Tensor, top_log_p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(teacher || student)`` over the buckets "each of the teacher's top-K classes" and
    "everything else", float64: ``sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)``."""
    log_q = F.log_softmax(student_logits.double(), dim=-1)
    top_p, top_q = top_log_p.double(), log_q.gather(-1, index)
    p, q = top_p.exp(), top_q.exp()
    rest_p, rest_q = 1.0 - p.sum(-1), 1.0 - q.sum(-1)
    kl = (p * (top_p - top_q)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return kl.sum() / kl.numel()


def test_pretraining_from_a_topk_cache_reads_each_item_once_per_epoch_and_step0_is_the_sparse_kl(
    tmp_path: Path, corpus: tuple[LMData, LMData]
) -> None:
    train_data, test_data = corpus
    assert train_data.x.shape == (N_TRAIN, BLOCK) and bool((train_data.y[:, :-1] >= 0).all())
    teacher_model = _model(100)
    head = teacher_model.get_submodule("lm_head")
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():  # a peaked teacher: its top-K holds a good part of the mass, not all of it
        head.weight.mul_(25.0)
    build(teacher_model, train_data.x, tmp_path / "cache", spec=CacheSpec(k=K, shard_size=10, batch_size=5),
          progress=False)
    cache = TeacherCache(tmp_path / "cache", count_reads=True)
    assert cache.k == K and cache.num_classes == V
    teacher = _Recording(cache)
    method = use_sparse_targets(recipes.lm_kd(chunk_size=100), tail="rest")  # 8 x 31 targets: 3 chunks a step
    (kd,) = method.terms
    assert kd.loss is chunked_loss and kd.kwargs["loss"] is losses.sparse_kl_div and kd.kwargs["tail"] == "rest"
    student0 = _model(1).double()  # float64: the hand computation below is exact up to the cache's fp16 values
    result = fit(copy.deepcopy(student0), method, train_data, teacher=teacher, eval_data=test_data, epochs=EPOCHS,
                 batch_size=BATCH, optim=Optim(lr=1e-2), log_every=1, progress=False, seed=3)

    rows = [r for r in result.history if r.get("split") == "train"]
    steps_per_epoch = N_TRAIN // BATCH
    assert result.steps == len(rows) == EPOCHS * steps_per_epoch
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss/kd"]])).all() for r in rows)
    assert rows[-1]["loss/kd"] < rows[0]["loss/kd"]  # the student moves towards the teacher
    assert result.metrics["perplexity"] > 1 and torch.isfinite(torch.tensor(result.metrics["perplexity"]))

    # each item once per epoch: the dry run before training reads items 0 and 1, then every step one batch
    assert torch.equal(teacher.calls[0], torch.arange(2))
    assert len(teacher.calls) == 1 + EPOCHS * steps_per_epoch
    assert cache.reads is not None
    dry = torch.zeros(N_TRAIN, dtype=torch.long)
    dry[:2] = 1
    assert torch.equal(torch.from_numpy(cache.reads) - dry, torch.full((N_TRAIN,), EPOCHS))
    for epoch in range(EPOCHS):
        seen = torch.cat(teacher.calls[1 + epoch * steps_per_epoch: 1 + (epoch + 1) * steps_per_epoch])
        assert torch.equal(seen.sort().values, torch.arange(N_TRAIN)), epoch

    # step 0's KD loss, by hand in float64 from the teacher's own logits on that step's batch
    first = teacher.calls[1]
    x, y = train_data.x[first], train_data.y[first]
    keep = y >= 0
    with torch.no_grad():
        t_logits = copy.deepcopy(teacher_model).double()(x).logits[keep]
        s_logits = student0(x).logits[keep]
    log_p = F.log_softmax(t_logits, dim=-1)
    top_log_p, top_index = log_p.topk(K, dim=-1)
    stored = cache.get(first)
    values, index = stored["values"][keep].double(), stored["indices"][keep]
    assert torch.equal(index, top_index)  # the teacher's top-K, largest first
    # the stored values are the teacher's log-probabilities rounded to fp16 (2^-11 relative, plus float32's error)
    assert torch.allclose(values, top_log_p, rtol=2.0**-11, atol=1e-6)
    rest = 1 - top_log_p.exp().sum(-1)
    assert 0.05 < float(rest.mean()) < 0.95 and float(rest.min()) > 0  # the "rest" bucket matters
    step0 = rows[0]["loss/kd"]
    assert step0 > 0.5
    assert step0 == pytest.approx(float(_sparse_kl_by_hand(s_logits, values, index)), rel=1e-10)  # as stored
    assert step0 == pytest.approx(float(_sparse_kl_by_hand(s_logits, top_log_p, top_index)), rel=1e-4)  # unrounded


def test_shipped_configs_run_through_the_cli_with_tiny_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/lm_stdlib_teacher.yaml, then `mentor cache build` and `mentor train` on
    configs/lm_stdlib_kd_cached.yaml, and the scratch baseline, shrunk by overrides; held-out perplexity."""
    import functools

    from mentor.cli import main
    from mentor.config import load_config
    from mentor.lm import data as lm_data
    from mentor.run import run

    # the corpus is tokenised once for the whole test, not once per command (about 1.5 s each)
    monkeypatch.setattr(lm_data, "stdlib_blocks", functools.lru_cache(lm_data.stdlib_blocks))
    tiny = ["data.num_train=16", "data.num_test=4", "data.block_size=32", f"train.out={tmp_path}",
            "train.batch_size=8", "train.max_steps=4", "train.log_every=1", "train.eval_every=100",
            "train.progress=false", "student.args.layers=1", "student.args.width=32"]
    run(load_config(REPO / "configs/lm_stdlib_teacher.yaml", tiny), report=False)  # what `mentor train` runs
    cached = str(REPO / "configs/lm_stdlib_kd_cached.yaml")
    where = [f"teacher.run={tmp_path / 'lm_stdlib_teacher'}", f"teacher.cache={tmp_path / 'cache'}"]
    assert main(["cache", "build", cached, *tiny, *where, "--quiet"]) == 0
    manifest = TeacherCache(tmp_path / "cache").manifest
    assert manifest["dataset"]["num_items"] == 16 and manifest["stored"]["logits"]["k"] == K
    assert main(["train", cached, *tiny, *where]) == 0
    run(load_config(REPO / "configs/lm_stdlib_scratch.yaml", tiny), report=False)
    for name in ("lm_stdlib_teacher", "lm_stdlib_kd_cached", "lm_stdlib_scratch"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["split"] == "train"]
        assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train), name
        metrics = json.loads((tmp_path / name / "result.json").read_text())["metrics"]
        assert metrics["perplexity"] > 1 and 0 <= metrics["token_accuracy"] <= 1, name
        assert metrics["target_tokens"] == 4 * 31 and "exact_match" not in metrics, name  # held-out blocks
    kd = json.loads((tmp_path / "lm_stdlib_kd_cached" / "result.json").read_text())["metrics"]
    assert "agreement" in kd and "kl_to_teacher" in kd  # teacher.run scores the held-out blocks
    kd_rows = [json.loads(line) for line in (tmp_path / "lm_stdlib_kd_cached" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all("loss/kd" in r and "loss/ce" not in r for r in kd_rows if r["split"] == "train")
    assert "perplexity" in (tmp_path / "lm_stdlib_kd_cached" / "report.md").read_text()
