"""Token weighting by the teacher's uncertainty (ATKD-style) in the LM recipes (``token_weighting``).

* the weighted KD loss of the first step of :func:`mentor.train.fit` equals a float64 computation by hand (the
  teacher's uncertainty, the weights, the per-token forward KL) for ``hard_easy`` and ``proportional``;
* chunked (chunk smaller than the target count) and full-logits terms give the same loss (1e-6) and trajectory;
* the weights never bring back the full logits on the chunked path (no ``lm_head`` call in a training step);
* bad option values are refused before training, by the recipe and by the config, naming the option;
* weighting off is the old method exactly; ``hard_fraction = 1`` (all weights 1) gives the unweighted loss.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from mentor import recipes, teachers
from mentor.lm.loop import LMData, shift_labels
from mentor.lm.losses import chunked_loss
from mentor.lm.models import tiny_llama
from mentor.lm.weighting import uncertainty_weighted
from mentor.method import Method
from mentor.train import Optim, fit

torch.set_num_threads(1)

V, WIDTH = 24, 32
EOS, PAD, BOS = 2, 0, 1
CHUNK = 3
TEMPERATURE = 2.0


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _model(seed: int) -> torch.nn.Module:
    return tiny_llama(1, WIDTH, V, heads=2, intermediate=48, seed=seed, use_cache=False)


def _teacher() -> torch.nn.Module:
    """A sharper teacher than a random init (output layer x 8): losses far from 0, uncertainties spread out."""
    model = _model(100)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


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


def _run(method: Method, data: LMData, micro: int, **kwargs):
    return fit(_model(1), method, data, teacher=teachers.Frozen(_teacher()), batch_size=micro, epochs=1,
               optim=Optim(name="sgd", lr=0.5, momentum=0.0), log_every=1, progress=False, **kwargs)


def _train_rows(result) -> list[dict]:
    return [r for r in result.history if r.get("split") == "train"]


def _by_hand(data: LMData, rule: str, measure: str, hard_fraction: float, easy_weight: float) -> float:
    """The first step's weighted forward KL(T) over all of ``data`` (one batch), in float64, written out."""
    student, teacher = copy.deepcopy(_model(1)).double(), _teacher().double()
    with torch.no_grad():
        s, t = student(data.x).logits, teacher(data.x).logits
    keep = data.y >= 0
    s, t, y = s[keep], t[keep], data.y[keep]
    n = y.shape[0]
    p = torch.softmax(t, dim=-1)  # the teacher's own distribution (temperature 1) for the uncertainty
    if measure == "target":
        u = 1.0 - p[torch.arange(n), y]
    else:
        u = -(p * torch.log(p)).sum(-1) / math.log(V)
    if rule == "proportional":
        w = u / u.mean()
    else:
        n_hard = math.ceil(hard_fraction * n)
        order = sorted(range(n), key=lambda i: -float(u[i]))
        w = torch.full((n,), easy_weight * n / (n - n_hard), dtype=torch.float64)
        w[order[:n_hard]] = (1.0 - easy_weight) * n / n_hard
    log_pt = torch.log_softmax(t / TEMPERATURE, dim=-1)
    log_ps = torch.log_softmax(s / TEMPERATURE, dim=-1)
    d = TEMPERATURE**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return float((w * d).sum() / n)


@pytest.mark.parametrize(("rule", "measure", "hard_fraction", "easy_weight"), [
    ("hard_easy", "target", 0.5, 0.2),
    ("hard_easy", "entropy", 0.3, 0.0),
    ("proportional", "target", 0.5, 0.2),
])
def test_first_step_equals_the_hand_computation_chunked_and_full(rule: str, measure: str, hard_fraction: float,
                                                                  easy_weight: float) -> None:
    data = _data(6)
    targets = int((data.y >= 0).sum())
    assert targets > 2 * CHUNK  # several chunks in the one micro-batch
    args = {"temperature": TEMPERATURE, "token_weighting": rule, "uncertainty": measure,
            "hard_fraction": hard_fraction, "easy_weight": easy_weight, "ce_weight": 0.5}
    expected = _by_hand(data, rule, measure, hard_fraction, easy_weight)
    runs = {}
    for chunk in (CHUNK, None):
        method = recipes.lm_kd(**args, chunk_size=chunk)
        kd = method.terms[0]
        assert kd.loss is uncertainty_weighted and kd.extra == {"labels": "label"}
        assert kd.student == ("hidden" if chunk else "logits")
        runs[chunk] = _run(method, data, micro=6, max_steps=1)
        assert _train_rows(runs[chunk])[0]["loss/kd"] == pytest.approx(expected, rel=1e-5, abs=0)
    first = {chunk: _train_rows(run)[0]["loss/kd"] for chunk, run in runs.items()}
    assert first[CHUNK] == pytest.approx(first[None], abs=1e-6, rel=1e-6)
    for (name, a), b in zip(runs[CHUNK].student.state_dict().items(), runs[None].student.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name
    unweighted = _run(recipes.lm_kd(temperature=TEMPERATURE, ce_weight=0.5, chunk_size=CHUNK), data, micro=6,
                      max_steps=1)
    assert _train_rows(unweighted)[0]["loss/kd"] != pytest.approx(expected, rel=1e-3)  # the weights do something


def test_chunked_and_full_trajectories_agree_under_accumulation_with_jsd() -> None:
    data = _data(16)
    args = {"divergence": "jsd", "token_weighting": "hard_easy", "easy_weight": 0.3}
    full, chunked = (_run(recipes.lm_kd(**args, chunk_size=c), data, micro=2, grad_accum=2) for c in (None, CHUNK))
    rows_f, rows_c = _train_rows(full), _train_rows(chunked)
    assert len(rows_f) == len(rows_c) == 4
    for rf, rc in zip(rows_f, rows_c, strict=True):
        assert rc["loss/kd"] == pytest.approx(rf["loss/kd"], abs=1e-5)


class _VocabRows(TorchDispatchMode):
    """Once ``active``: the most rows (elements / V) of any produced tensor whose last dimension is the vocabulary
    (the output layers' transposed weights ``[D, V]`` aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self.active:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and tuple(t.shape) != (WIDTH, V):
                    self.rows = max(self.rows, t.numel() // V)
        return out


def test_weighted_chunked_steps_never_materialise_the_full_logits() -> None:
    """From the first training forward on (the dry run before training has no gradient), no tensor has more than
    two chunks of vocabulary rows and neither model's ``lm_head`` runs: the uncertainty pass reads the teacher's
    hidden rows chunk by chunk."""
    data = _data(8)
    student, teacher = _model(1), _teacher()
    mode, calls = _VocabRows(), []

    def start(module, args) -> None:  # type: ignore[no-untyped-def]
        mode.active = mode.active or torch.is_grad_enabled()

    student.model.embed_tokens.register_forward_pre_hook(start)
    for model in (student, teacher):
        model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(mode.active))
    with mode:
        result = fit(student, recipes.lm_kd(token_weighting="proportional", ce_weight=1.0, chunk_size=CHUNK), data,
                     teacher=teachers.Frozen(teacher), epochs=1, batch_size=4, progress=False)
    assert mode.active and result.steps == 2
    assert 0 < mode.rows <= 2 * CHUNK < int((data.y[:4] >= 0).sum()), mode.rows
    assert not any(calls), calls


def test_weighting_off_is_the_old_method_and_all_ones_is_the_unweighted_loss() -> None:
    for chunk in (CHUNK, None):
        assert recipes.lm_kd(chunk_size=chunk).terms == recipes.lm_kd(chunk_size=chunk, token_weighting=None).terms
        assert recipes.lm_kd(chunk_size=chunk).terms[0].loss is (chunked_loss if chunk else
                                                                   recipes.lm_kd(chunk_size=None).terms[0].loss)
    data = _data(8)
    plain = _run(recipes.lm_kd(chunk_size=CHUNK), data, micro=4)
    ones = _run(recipes.lm_kd(chunk_size=CHUNK, token_weighting="hard_easy", hard_fraction=1.0), data, micro=4)
    for rp, ro in zip(_train_rows(plain), _train_rows(ones), strict=True):
        assert ro["loss/kd"] == pytest.approx(rp["loss/kd"], abs=1e-7)


BAD = [
    ({"token_weighting": "atkd"}, r"token_weighting = 'atkd': expected one of hard_easy, proportional"),
    ({"token_weighting": "hard_easy", "uncertainty": "margin"}, r"uncertainty = 'margin': expected one of target"),
    ({"token_weighting": "hard_easy", "hard_fraction": 0.0}, r"hard_fraction = 0.0: expected a number in \(0, 1\]"),
    ({"token_weighting": "hard_easy", "hard_fraction": 1.5}, r"hard_fraction = 1.5"),
    ({"token_weighting": "hard_easy", "hard_fraction": True}, r"hard_fraction'? = True"),
    ({"token_weighting": "hard_easy", "easy_weight": -0.1}, r"easy_weight = -0.1: expected a number in \[0, 1\]"),
    ({"token_weighting": "proportional", "easy_weight": "x"}, r"easy_weight'? = 'x'"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_options_are_refused_naming_the_option(args: dict, message: str) -> None:
    from mentor.config import ConfigError, config_from_dict

    for recipe in ("lm_kd", "gkd", "skd", "reverse_kl_on_policy"):
        with pytest.raises(ValueError, match=message):
            getattr(recipes, recipe)(**args)
        cfg = {"data": {"name": "lm_arithmetic"}, "recipe": {"name": recipe, "args": args},
               "teacher": {"checkpoint": "t", "model": "tiny_llama"}}
        with pytest.raises(ConfigError, match=message):
            config_from_dict(cfg)


def test_config_accepts_the_options_and_refuses_them_with_a_cache() -> None:
    from mentor.cache import use_sparse_targets
    from mentor.config import ConfigError, config_from_dict

    args = {"token_weighting": "hard_easy", "uncertainty": "entropy", "hard_fraction": 0.4, "easy_weight": 0.1}
    config_from_dict({"data": {"name": "lm_arithmetic"}, "recipe": {"name": "lm_kd", "args": args},
                      "teacher": {"checkpoint": "t", "model": "tiny_llama"}})
    with pytest.raises(ConfigError, match=r"token_weighting = 'hard_easy'.*teacher cache"):
        config_from_dict({"data": {"name": "lm_arithmetic"}, "recipe": {"name": "lm_kd", "args": args},
                          "teacher": {"cache": "somewhere"}})
    with pytest.raises(ValueError, match="token_weighting"):
        use_sparse_targets(recipes.lm_kd(**args))


def test_direct_call_with_a_mask_weights_only_the_kept_rows() -> None:
    """Outside the loop: a bool mask computes the weights over the kept rows (same as passing those rows), a
    float mask multiplies them; chunked equals full logits."""
    from mentor import losses

    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g,
                                                                                   dtype=torch.float64)
    ws, wt = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    keep = torch.rand(2, 5, generator=g) > 0.3
    opts = {"loss": losses.kl_div, "labels": y, "rule": "proportional", "temperature": 2.0, "num_items": 10}
    full = uncertainty_weighted(hs @ ws.T, ht @ wt.T, mask=keep, **opts)
    rows = {**opts, "labels": y[keep]}
    assert float(full) == pytest.approx(float(uncertainty_weighted((hs @ ws.T)[keep], (ht @ wt.T)[keep], **rows)),
                                        rel=1e-12)
    chunked = uncertainty_weighted(hs, ht, mask=keep, student_head=ws, teacher_head=wt, chunk_size=2, **opts)
    assert float(chunked) == pytest.approx(float(full), rel=1e-12)
    half = uncertainty_weighted(hs @ ws.T, ht @ wt.T, mask=keep.double() * 0.5, **opts)
    assert float(half) == pytest.approx(0.5 * float(full), rel=1e-12)
