"""Chunked LM terms in the one loop (:func:`mentor.train.fit` with ``chunk_size`` in the LM recipes).

* the chunked terms (hidden states + output layers, :func:`mentor.lm.losses.chunked_loss`) give the loss
  trajectory and final weights of the full-logits terms (float32, 1e-5): lm_kd (forward KL and JSD, with CE),
  GKD with lambda = 1 (on-policy samples), a top-k teacher cache (sparse forward KL, and JSD on the dense rows);
* micro-batch 4 x 1 == 2 x 2 == 1 x 4 with chunking;
* no tensor of the training steps is as large as the full logits: a dispatch mode sees every tensor with the
  vocabulary as last dimension, and none has more than two chunks' worth of rows (the full-logits run has them
  all), and neither model's ``lm_head`` module runs in a training step;
* an all-masked step gives exactly 0, no NaN, unchanged weights;
* evaluation sees the plain model (its logits), the export is the plain model's weights, checkpoints resume;
* ``Term.shared`` arguments reach the loss unselected; ``recipe.args.chunk_size`` is validated by the config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from mentor import losses, recipes, teachers
from mentor.lm.loop import LMData, evaluate_lm, shift_labels
from mentor.lm.losses import chunked_loss
from mentor.lm.models import HiddenHead, tiny_llama
from mentor.method import Method, Term, compute_terms
from mentor.train import Optim, fit

V, WIDTH = 24, 32
EOS, PAD, BOS = 2, 0, 1
CHUNK = 3  # smaller than the target tokens of any micro-batch below (>= 2 per row): several chunks run
TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _model(seed: int) -> torch.nn.Module:
    return tiny_llama(1, WIDTH, V, heads=2, intermediate=48, seed=seed, use_cache=False)


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


def _rows(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("split") == "train"]


def _run(method: Method, teacher, data: LMData, micro: int = 4, accum: int = 1, **kwargs):
    # Plain SGD: the weights then differ by lr times the gradients' difference. Adam divides tiny gradient entries
    # by their own size and magnifies float32 rounding (micro-batch 4 x 1 vs 2 x 2 differs by 3e-5 under AdamW
    # with chunking and 7e-6 without, 1e-7 under SGD with either).
    kwargs = {"epochs": 1, "optim": Optim(name="sgd", lr=0.5, momentum=0.0), "log_every": 1, "progress": False,
              **kwargs}
    return fit(_model(1), method, data, teacher=teacher, batch_size=micro, grad_accum=accum, **kwargs)


def _assert_same_run(a, b, keys: tuple[str, ...] = ("loss", "loss/kd"), tol: float = TOL) -> None:
    rows_a, rows_b = _rows(a.history), _rows(b.history)
    assert len(rows_a) == len(rows_b) == a.steps == b.steps > 1
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], abs=tol), (ra["step"], key)
    for (name, wa), wb in zip(a.student.state_dict().items(), b.student.state_dict().values(), strict=True):
        assert torch.allclose(wa, wb, rtol=0, atol=tol), name


def _frozen(seed: int = 100) -> teachers.Frozen:
    return teachers.Frozen(_model(seed))


# ------------------------------------------------------------------------------------------ equal to full logits


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_lm_kd_equals_the_full_logits_run(divergence: str) -> None:
    data = _data(24)
    assert int((data.y >= 0).sum(dim=1).min()) * 4 > CHUNK  # every micro-batch of 4 rows runs several chunks
    args = {"divergence": divergence, "temperature": 2.0, "ce_weight": 0.5}
    chunked = recipes.lm_kd(**args, chunk_size=CHUNK)
    assert chunked.terms[0].loss is chunked_loss and chunked.terms[0].student == "hidden"
    assert chunked.terms[0].kwargs["loss"] is (losses.kl_div if divergence == "forward_kl" else losses.generalized_jsd)
    full = _run(recipes.lm_kd(**args, chunk_size=None), _frozen(), data)
    _assert_same_run(full, _run(chunked, _frozen(), data), keys=("loss", "loss/kd", "loss/ce"))


def test_chunked_gkd_on_policy_equals_the_full_logits_run() -> None:
    data = _data(16)
    args = {"lmbda": 1.0, "beta": 0.3, "max_new_tokens": 4}
    full = _run(recipes.gkd(**args, chunk_size=None), _frozen(), data, micro=2, accum=2)
    chunked = _run(recipes.gkd(**args, chunk_size=CHUNK), _frozen(), data, micro=2, accum=2)
    _assert_same_run(full, chunked)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_cached_teacher_equals_the_full_logits_run(tmp_path: Path, divergence: str) -> None:
    """A per-position top-k cache (k = 8 < V): forward KL becomes the chunked sparse KL (sparse_kl_div per chunk),
    JSD reads the cache's dense rows chunk by chunk; both equal the full-logits run on the same cache."""
    from mentor.cache import CacheSpec, build, use_sparse_targets

    data = _data(16)
    build(_model(100), data.x, tmp_path / "cache", spec=CacheSpec(k=8), progress=False)
    methods = [use_sparse_targets(recipes.lm_kd(divergence=divergence, chunk_size=c)) for c in (None, CHUNK)]
    kd = methods[1].terms[0]
    assert kd.loss is chunked_loss and kd.shared == {"student_head": "head"}
    if divergence == "forward_kl":
        assert kd.kwargs["loss"] is losses.sparse_kl_div and kd.target == "teacher.topk_values"
        assert methods[0].terms[0].loss is losses.sparse_kl_div
    else:
        assert kd.target == "teacher.logits"
    dense = divergence != "forward_kl"
    full, chunked = (_run(m, teachers.Cached(tmp_path / "cache", dense=dense), data, micro=2, accum=2)
                     for m in methods)
    _assert_same_run(full, chunked)


def test_chunked_grad_accum_equals_one_large_batch() -> None:
    data = _data(16)
    method = recipes.lm_kd(divergence="jsd", ce_weight=0.5, chunk_size=CHUNK)
    big = _run(method, _frozen(), data, micro=4, accum=1, epochs=2)
    for micro, accum in ((2, 2), (1, 4)):
        _assert_same_run(big, _run(method, _frozen(), data, micro=micro, accum=accum, epochs=2),
                         keys=("loss", "loss/kd", "loss/ce"), tol=1e-6)


def test_a_method_mixing_chunked_and_logit_terms() -> None:
    """A chunked KD term beside a cross-entropy on the full logits: the student's training forward gives both."""
    data = _data(16)
    kd = recipes.lm_kd(chunk_size=CHUNK).terms
    mixed = Method("mixed", (*kd, Term("ce", losses.cross_entropy, target="label", items="labelled", weight=0.5)))
    full = _run(recipes.lm_kd(ce_weight=0.5, chunk_size=None), _frozen(), data)
    _assert_same_run(full, _run(mixed, _frozen(), data), keys=("loss", "loss/kd", "loss/ce"))


# ---------------------------------------------------------------------------------------------------- memory


class VocabTensors(TorchDispatchMode):
    """Records, once ``active``, the most rows (elements / V) of any tensor an operator produces whose last
    dimension is the vocabulary, other than the output layers' transposed weights ``[D, V]``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self.active:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-1] == V and tuple(t.shape) != (WIDTH, V):
                    self.rows = max(self.rows, t.numel() // V)
        return out


def _watch(student: torch.nn.Module, teacher: torch.nn.Module) -> tuple[VocabTensors, list[int]]:
    """A :class:`VocabTensors` switched on by the student's first forward with gradients (the dry run before
    training and the samplers run without), and the rows of every later call of either model's ``lm_head``."""
    mode = VocabTensors()
    head_rows: list[int] = []

    def start(module, args) -> None:  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            mode.active = True

    def head(module, args) -> None:  # type: ignore[no-untyped-def]
        if mode.active:
            head_rows.append(args[0].numel() // args[0].shape[-1])

    student.model.embed_tokens.register_forward_pre_hook(start)
    for model in (student, teacher):
        model.lm_head.register_forward_pre_hook(head)
    return mode, head_rows


@pytest.mark.parametrize("recipe", ["lm_kd", "gkd"])
def test_training_steps_never_materialise_the_full_logits(recipe: str) -> None:
    """From the first training forward on (the dry run before training computes logits of 2 items), every tensor
    with the vocabulary as last dimension has at most 2 chunks of rows (generalized JSD stacks two [chunk, V]
    blocks; the samplers' next-token logits are [rows, 1, V]), and neither model's ``lm_head`` module is called;
    the same detector sees all the micro-batch's positions in the full-logits run."""
    data = _data(16)
    positions = 4 * data.x.shape[1]  # a micro-batch's positions
    seen = {}
    for chunk in (CHUNK, None):
        method = (recipes.lm_kd(divergence="jsd", ce_weight=1.0, chunk_size=chunk) if recipe == "lm_kd"
                  else recipes.gkd(lmbda=1.0, max_new_tokens=4, chunk_size=chunk))
        student, teacher = _model(1), _model(100)
        mode, head_rows = _watch(student, teacher)
        with mode:
            result = fit(student, method, data, teacher=teachers.Frozen(teacher), epochs=1, batch_size=4,
                         progress=False)
        assert mode.active and result.steps == 4
        seen[chunk] = (mode.rows, head_rows)
    rows, calls = seen[CHUNK]
    assert rows <= 2 * CHUNK < positions, rows
    assert calls == [] or (recipe == "gkd" and max(calls) <= 4), calls  # gkd: the sampler's last positions only
    full_rows, full_calls = seen[None]  # the check can fail: the full-logits run has every position's logits
    least = positions if recipe == "lm_kd" else 4 * 3  # on-policy rows: at least <s>, a prompt token, one sample
    assert full_rows >= least > 2 * CHUNK and max(full_calls) >= least, (full_rows, full_calls)


# ------------------------------------------------------------------------------------------- masked, eval, export


@pytest.mark.parametrize("cached", [False, True])
def test_all_masked_step_gives_zero_and_no_nan(tmp_path: Path, cached: bool) -> None:
    data = _data(16)
    first = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:8]
    y = data.y.clone()
    y[first] = -100
    masked = LMData(data.x, y, eos_id=EOS, pad_id=PAD)
    method = recipes.lm_kd(divergence="jsd", ce_weight=1.0, chunk_size=CHUNK)
    teacher: object = _frozen()
    if cached:
        from mentor.cache import CacheSpec, build, use_sparse_targets

        build(_model(100), data.x, tmp_path / "cache", spec=CacheSpec(k=8), progress=False)
        method = use_sparse_targets(recipes.lm_kd(ce_weight=1.0, chunk_size=CHUNK))
        teacher = teachers.Cached(tmp_path / "cache", dense=False)
    student = _model(1)
    before = copy.deepcopy(student.state_dict())
    result = fit(student, method, masked, teacher=teacher, epochs=1, batch_size=4, grad_accum=2, log_every=1,
                 progress=False, optim=Optim(lr=1e-2))
    first_row, second_row = _rows(result.history)
    assert first_row["loss"] == 0.0 and first_row["loss/kd"] == 0.0 and first_row["loss/ce"] == 0.0
    assert second_row["loss/kd"] > 0 and second_row["loss/ce"] > 0
    one_step = fit(_model(1), method, masked, teacher=teacher, epochs=1, max_steps=1, batch_size=4, grad_accum=2,
                   progress=False, optim=Optim(lr=1e-2))
    for name, value in one_step.student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_evaluation_and_export_see_the_plain_model_and_checkpoints_resume(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, test = _data(16), _data(8, seed=5)
    method = recipes.lm_kd(ce_weight=0.5, chunk_size=CHUNK)
    common = {"eval_data": test, "micro": 2, "accum": 2, "epochs": 2}
    ref = _run(method, _frozen(), data, out=tmp_path / "ref", **common)
    assert type(ref.student).__name__ == "LlamaForCausalLM" and not isinstance(ref.student, HiddenHead)
    assert ref.metrics["perplexity"] == pytest.approx(evaluate_lm(ref.student, test)["perplexity"], rel=1e-9)
    assert {"agreement", "kl_to_teacher", "exact_match"} <= set(ref.metrics)
    exported = load_file(str(tmp_path / "ref" / "student.safetensors"))
    assert set(exported) == set(ref.student.state_dict())
    for name, value in ref.student.state_dict().items():
        assert torch.equal(exported[name], value), name
    run = tmp_path / "run"
    assert _run(method, _frozen(), data, out=run, max_steps=3, **common).steps == 3
    resumed = _run(method, _frozen(), data, out=run, resume=True, **common)
    assert resumed.steps == ref.steps == 8
    for name, value in ref.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_teacher_without_hidden_states_or_a_biased_head_is_refused_before_training() -> None:
    data = _data(8)
    with pytest.raises(ValueError, match=r"recipe 'lm_kd'.*Callable.*chunk_size=None"):
        fit(_model(1), recipes.lm_kd(chunk_size=4), data, teacher=teachers.Callable(lambda x: _model(100)(x).logits),
            epochs=1, batch_size=4, progress=False)
    biased = _model(1)
    biased.lm_head = torch.nn.Linear(WIDTH, V)
    with pytest.raises(ValueError, match="bias"):
        fit(biased, recipes.lm_kd(chunk_size=4), data, teacher=_frozen(), epochs=1, batch_size=4, progress=False)


# --------------------------------------------------------------------------------------------- Term.shared, config


def test_shared_arguments_reach_the_loss_unselected() -> None:
    """A shared tensor whose shape happens to be the labels' [B, T] is passed whole; the student output, target
    and extra arguments are selected at the target positions."""
    labels = torch.tensor([[-100, 3, 4], [5, -100, -100]])
    seen: dict[str, tuple[int, ...]] = {}

    def probe(student: Tensor, target: Tensor, *, num_items=None, table: Tensor, other: Tensor) -> Tensor:
        seen.update(student=tuple(student.shape), target=tuple(target.shape), table=tuple(table.shape),
                    other=tuple(other.shape))
        return student.sum() * 0.0

    term = Term("probe", probe, student="hidden", target="teacher.hidden", items="labelled",
                extra={"other": "teacher.hidden"}, shared={"table": "teacher.table"})
    outputs = {"hidden": torch.zeros(2, 3, 5)}
    teacher_out = {"hidden": torch.zeros(2, 3, 7), "table": torch.zeros(2, 3)}
    compute_terms(Method("m", (term,)), outputs, teacher_out, labels, step=0)
    assert seen == {"student": (3, 5), "target": (3, 7), "table": (2, 3), "other": (3, 7)}
    assert term.uses_teacher and term.sources == ("teacher.hidden", "teacher.hidden", "teacher.table")
    with pytest.raises(ValueError, match="shared"):
        Term("bad", probe, shared={"table": "weighting.mask"}, weighting="x")
    with pytest.raises(ValueError, match="both extra and shared"):
        Term("bad", probe, extra={"table": "teacher.a"}, shared={"table": "teacher.b"})


def test_config_validates_chunk_size_before_any_work() -> None:
    from mentor.config import ConfigError, config_from_dict

    def cfg(recipe: str, value: object) -> dict:
        return {"data": {"name": "lm_arithmetic"}, "recipe": {"name": recipe, "args": {"chunk_size": value}},
                "teacher": {"checkpoint": "t", "model": "tiny_llama"}}

    for recipe in ("lm_kd", "gkd", "skd", "reverse_kl_on_policy", "seq_kd"):
        for bad in (0, -3, 2.5, "big", True):
            with pytest.raises(ConfigError, match=r"chunk_size = .*expected a positive integer"):
                config_from_dict(cfg(recipe, bad))
        config_from_dict(cfg(recipe, None))
        config_from_dict(cfg(recipe, 256))
