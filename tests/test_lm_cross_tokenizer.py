"""A teacher with another tokenizer in the loop (:mod:`mentor.lm.cross`, recipe ``cross_tokenizer_kd``).

* the boundary rule by hand (offsets -> aligned positions), the decoding of ids to text with character offsets
  (byte pieces of one character, special tokens, padding), token bytes of byte-level and SentencePiece tokenizers;
* the docstring's worked example end to end with two hand-made tokenizers: aligned positions, the teacher's logits
  and carried losses at them;
* the same tokenizer on both sides: every target position aligned, the aligned logits equal the teacher's own,
  the carried loss is the teacher's own per-token loss;
* the per-sequence excess-loss selection and the guided cross-entropy against hand computations;
* ``train.fit`` with two locally trained tokenizers (270 and 320 tokens): finite losses, ULD and the CE go down,
  the teacher gets no gradient; a vocabulary mismatch without the recipe is refused naming both sizes;
* the config route (``teacher.tokenizer``) is checked, and a tiny ``mentor.run.run`` trains end to end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mentor import losses, recipes, teachers
from mentor.lm.align import guided_cross_entropy, next_token_alignment, top_share
from mentor.lm.cross import (
    CrossTokenizer,
    Special,
    byte_level_alphabet,
    decode_with_offsets,
    special_roles,
    token_bytes,
)
from mentor.lm.data import arithmetic, encode_task, train_tokenizer
from mentor.lm.loop import LMData, shift_labels
from mentor.lm.models import tiny_llama
from mentor.method import Method, Term
from mentor.train import Optim, fit


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _hand_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the 256 byte tokens, <pad>/<s>/</s> = 0/1/2, and only the given merges."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return _wrap(tok)


_TEXTS = [p + a for p, a in zip(*(lambda t: (t.prompts, t.answers))(arithmetic(400, seed=11)), strict=True)]


@pytest.fixture(scope="module")
def tokenizers_270_320() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(student, teacher): two byte-level BPEs trained here on 400 arithmetic strings."""
    return _wrap(train_tokenizer(_TEXTS, 270)), _wrap(train_tokenizer(_TEXTS, 320))


def _task_data(tok: PreTrainedTokenizerFast, n: int, seed: int, ops: str = "+-") -> LMData:
    enc = encode_task(arithmetic(n, seed=seed, ops=ops), tok)
    return LMData(enc.input_ids, shift_labels(enc.labels), eos_id=2, pad_id=0, max_new_tokens=4)


def _lm(vocab: int, seed: int, *, sharpen: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = tiny_llama(1, 32, vocab, heads=2, intermediate=48, seed=seed, use_cache=False).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


# ----------------------------------------------------------------------------------------------- alignment rules


def test_next_token_alignment_by_hand() -> None:
    # the docstring's example: "12+7=19", student 12|+|7|=|19, teacher 1|2+|7|=|1|9
    student = [(0, 2), (2, 3), (3, 4), (4, 5), (5, 7)]
    teacher = [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert next_token_alignment(student, teacher).tolist() == [-1, 1, 2, 3, -1]
    # the other way round: "2+" starts at 1, where no 12|+|7|=|19 token starts; "9" starts inside "19"
    assert next_token_alignment(teacher, student).tolist() == [-1, 1, 2, 3, -1, -1]
    # "é" split into two byte pieces sharing its span (2, 3): only the first piece starts at a boundary
    student = [(0, 1), (1, 2), (2, 3), (2, 3), (3, 4)]  # a|b|é1|é2|c
    teacher = [(0, 2), (2, 3), (3, 4)]  # ab|é|c
    assert next_token_alignment(student, teacher).tolist() == [-1, 0, -1, 1, -1]
    # a teacher that splits the same character: both first pieces start at a boundary
    assert next_token_alignment(student, student).tolist() == [0, 1, -1, 3, -1]


def test_decoding_ids_keeps_character_offsets() -> None:
    table = [b"", b"", b"", b"1", b"2", b"+", b"\xc3", b"\xaf", b"\xc3\xaf=", b"x"]
    roles = {0: "pad", 1: "bos", 2: "eos"}
    ids = [1, 3, 4, 6, 7, 5, 8, 2, 0, 0]  # <s> 1 2 ï(2 pieces) + ï= </s> <pad> <pad>
    parts, offsets = decode_with_offsets(ids, table, roles)
    assert parts == [Special("bos"), "12ï+ï=", Special("eos")]
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5), (5, 7), (7, 8), (8, 8), (8, 8)]
    # a row cut inside a character: the lone continuation byte decodes to U+FFFD, one character
    parts, offsets = decode_with_offsets([7, 9], table, roles)
    assert parts == ["\ufffdx"] and offsets == [(0, 1), (1, 2)]


def test_token_bytes_of_byte_level_and_sentencepiece_tokenizers() -> None:
    assert set(byte_level_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = _hand_tokenizer([("1", "2")])
    table = token_bytes(tok)
    ids = tok("12 ï", add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == "12 ï".encode()
    assert table[0] == table[1] == table[2] == b"" and special_roles(tok) == {0: "pad", 1: "bos", 2: "eos"}
    # SentencePiece style: "▁" is a space, <0xNN> a byte
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("\u2581", "a", "b", "\u2581a"):
        vocab[piece] = len(vocab)
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens(["<pad>", "<s>", "</s>"])
    spt = _wrap(sp)
    ids = spt("a bï", add_special_tokens=False)["input_ids"]
    assert [token_bytes(spt)[i] for i in ids] == [b" a", b" ", b"b", b"\xc3", b"\xaf"]


# ------------------------------------------------------------------------------------------- the teacher, by hand


def test_worked_example_with_two_hand_made_tokenizers() -> None:
    student_tok = _hand_tokenizer([])  # one token per character
    teacher_tok = _hand_tokenizer([("1", "2"), ("1", "9")])  # "12" and "19" are single tokens
    row = [1, *student_tok("12+7=19", add_special_tokens=False)["input_ids"], 2, 0]
    assert len(row) == 10
    x = torch.tensor([row, [1, *student_tok("12+7=1", add_special_tokens=False)["input_ids"], 2, 0, 0]])
    net = _lm(len(teacher_tok), seed=3, dtype=torch.float64)
    teacher = CrossTokenizer(net, teacher_tok, student_tok)
    teacher_ids, teacher_offsets, student_offsets = teacher.teacher_inputs(x[:1])
    assert teacher_tok.convert_ids_to_tokens(teacher_ids[0]) == ["<s>", "12", "+", "7", "=", "19", "</s>"]
    assert teacher_offsets[0] == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 9)]
    assert student_offsets[0] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 9)]

    out = teacher.targets(x)
    assert set(out) == {"logits", "aligned", "token_loss", "token_loss_mean", "covered", "sequence"}
    assert out["logits"].shape == (2, 10, len(teacher_tok))
    assert out["aligned"][0].tolist() == [1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    own = net(torch.tensor([teacher_ids[0]])).logits[0]
    for t, j in {0: 0, 2: 1, 3: 2, 4: 3, 5: 4, 7: 5}.items():
        torch.testing.assert_close(out["logits"][0, t], own[j])
    assert bool((out["logits"][0, [1, 6, 8, 9]] == 0).all())
    # carried losses: position t's student token overlaps the teacher token(s) covering its characters
    t_loss = F.cross_entropy(own[:-1], torch.tensor(teacher_ids[0][1:]), reduction="none")
    want = {0: t_loss[0], 1: t_loss[0], 2: t_loss[1], 3: t_loss[2], 4: t_loss[3], 5: t_loss[4], 6: t_loss[4],
            7: t_loss[5]}
    for t, value in want.items():
        torch.testing.assert_close(out["token_loss"][0, t], value.float())
    assert out["covered"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert out["sequence"].tolist() == [[0] * 10, [1] * 10]
    # second row "<s>12+7=1</s>": the student's last "1" starts where the teacher's "1" does
    assert out["aligned"][1].tolist() == [1, 0, 1, 1, 1, 1, 1, 0, 0, 0]


def test_same_tokenizer_aligns_every_target_with_the_teachers_own_logits(
    tokenizers_270_320: tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast],
) -> None:
    tok = tokenizers_270_320[0]
    data = _task_data(tok, 48, seed=4, ops="+")  # "=" never merges with a digit, so re-tokenizing is stable
    net = _lm(len(tok), seed=5, dtype=torch.float64)
    out = CrossTokenizer(net, tok, tok).targets(data.x)
    target = data.y >= 0
    real_next = torch.zeros_like(target)
    real_next[:, :-1] = data.x[:, 1:] != 0
    assert bool((out["aligned"].bool() == real_next).all()) and bool(out["aligned"][target].bool().all())
    with torch.no_grad():
        own = net(data.x).logits
    torch.testing.assert_close(out["logits"][target], own[target])
    per_token = F.cross_entropy(own[target], data.y[target], reduction="none")
    torch.testing.assert_close(out["token_loss"][target], per_token.float())
    torch.testing.assert_close(out["token_loss_mean"][target], per_token.float())


# ------------------------------------------------------------------------------------------- guided weights, loss


def test_top_share_selects_per_sequence() -> None:
    score = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 0.0, 4.0, 1.0])
    keep = torch.tensor([True, True, True, True, True, False, True, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: 4 candidates, ceil(0.5 * 4) = 2: 3.0, then 2.0 at index 2 (earlier of the tie); group 1: 3 -> 2
    assert top_share(score, keep, 0.5, groups).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    # select 0.3: group 0 keeps ceil(1.2) = 2, group 1 ceil(0.9) = 1; as one group, ceil(2.1) = 3: 5, 4, 3
    assert top_share(score, keep, 0.3, groups).tolist() == [1, 0, 1, 0, 1, 0, 0, 0]
    assert top_share(score, keep, 0.3).tolist() == [1, 0, 0, 0, 1, 0, 1, 0]
    assert top_share(score, keep, 1.0, groups).tolist() == keep.float().tolist()
    assert top_share(torch.ones(5), torch.ones(5, dtype=torch.bool), 0.6).sum() == 3  # not ceil(3.0000000000000004)


def test_guided_cross_entropy_against_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 11, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3, 1, -100, 7, 0, 2, 5, 9])
    teacher_loss = torch.rand(8, generator=g, dtype=torch.float64) * 3
    covered = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1.0])
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    got = guided_cross_entropy(logits, target, teacher_loss=teacher_loss, covered=covered, sequence=sequence,
                               select=0.5, num_items=7)
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none").detach()
    excess = ce - teacher_loss
    w = torch.zeros(8, dtype=torch.float64)
    for rows in ([0, 1], [4, 5, 6, 7]):  # candidates: covered with a target
        ranked = sorted(rows, key=lambda i: -float(excess[i]))
        for i in ranked[: -(-len(rows) // 2)]:
            w[i] = 1.0
    want = (w * F.cross_entropy(logits, target.clamp(min=0), reduction="none")).sum() / 7
    torch.testing.assert_close(got, want)
    all_covered = guided_cross_entropy(logits, target, teacher_loss=teacher_loss, covered=covered, num_items=7)
    keep = covered.bool() & (target >= 0)
    torch.testing.assert_close(all_covered, losses.cross_entropy(logits[keep], target[keep], num_items=7))


# -------------------------------------------------------------------------------------------------- in the loop


def _fit(method, student, teacher, data: LMData, steps: int, **kw):
    return fit(student, method, data, teacher=teacher, max_steps=steps, epochs=100, batch_size=16,
               optim=Optim(lr=3e-3), log_every=1, progress=False, seed=0, **kw)


def test_fit_with_two_tokenizers_trains_and_the_teacher_stays_frozen(
    tokenizers_270_320: tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast],
) -> None:
    student_tok, teacher_tok = tokenizers_270_320
    assert len(student_tok) == 270 and len(teacher_tok) == 320
    data = _task_data(student_tok, 96, seed=1)
    test = _task_data(student_tok, 16, seed=2)
    net = _lm(len(teacher_tok), seed=7, sharpen=30.0)  # a confident teacher: ULD has something to match
    before = copy.deepcopy(net.state_dict())
    teacher = CrossTokenizer(net, teacher_tok, student_tok)
    result = _fit(recipes.cross_tokenizer_kd(select=0.6), _lm(len(student_tok), seed=8), teacher, data, 30,
                  eval_data=test)
    rows = [r for r in result.history if r.get("split") == "train"]
    assert len(rows) == 30
    for row in rows:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "loss/uld", "loss/ce"))
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss/uld") < 0.8 * mean(first, "loss/uld")
    assert mean(last, "loss/ce") < 0.8 * mean(first, "loss/ce")
    for name, p in net.named_parameters():
        assert p.grad is None and not p.requires_grad, name
        assert torch.equal(p, before[name]), name
    assert not net.training
    # the evaluation does not compare the two vocabularies token for token
    final = result.metrics
    assert "perplexity" in final and "agreement" not in final and "kl_to_teacher" not in final


def test_vocabulary_mismatch_without_the_recipe_is_refused_naming_both_sizes(
    tokenizers_270_320: tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast],
) -> None:
    student_tok, teacher_tok = tokenizers_270_320
    data = _task_data(student_tok, 32, seed=1)
    net = _lm(len(teacher_tok), seed=7)
    with pytest.raises(ValueError, match="teacher has 320 output classes but the student has 270"):
        _fit(recipes.lm_kd(), _lm(270, seed=8), teachers.Frozen(net), data, 1)
    # a cross-tokenizer teacher under a class-by-class divergence: refused too, both sizes named
    cross = CrossTokenizer(net, teacher_tok, student_tok)
    with pytest.raises(ValueError, match=r"teacher has 320 logits .* student 270: term 'kd' "):
        _fit(recipes.lm_kd(), _lm(270, seed=8), cross, data, 1)
    plain_kd = Method("kd", (Term("kd", losses.kl_div, target="teacher.logits", items="labelled"),))
    with pytest.raises(ValueError, match=r"teacher has 320 logits .* student 270: term 'kd' .* 'kl_div'"):
        _fit(plain_kd, _lm(270, seed=8), cross, data, 1)


# --------------------------------------------------------------------------------------------------- the config


def _lm_cfg(tmp_path: Path, name: str, **changes) -> dict:
    cfg = {
        "name": name,
        "data": {"name": "lm_arithmetic", "num_train": 64, "num_test": 8, "vocab_size": 300, "max_new_tokens": 4},
        "student": {"model": "tiny_llama", "args": {"layers": 1, "width": 32, "vocab": 300, "heads": 2,
                                                     "intermediate": 48}},
        "recipe": {"name": "cross_tokenizer_kd"},
        "optim": {"lr": 0.003},
        "train": {"max_steps": 2, "batch_size": 16, "log_every": 1, "eval_every": 1, "progress": False,
                  "out": str(tmp_path)},
    }
    cfg.update(changes)
    return cfg


def test_config_checks_of_the_cross_tokenizer_teacher(tmp_path: Path) -> None:
    from mentor.config import ConfigError, config_from_dict, load_config

    ok = config_from_dict(_lm_cfg(tmp_path, "ok", teacher={"checkpoint": "t.safetensors", "model": "tiny_llama",
                                                            "tokenizer": 512}))
    assert ok.teacher is not None and ok.teacher.tokenizer == 512
    with pytest.raises(ConfigError, match=r"needs 'teacher\.tokenizer'"):
        config_from_dict(_lm_cfg(tmp_path, "x", teacher={"checkpoint": "t.safetensors", "model": "tiny_llama"}))
    with pytest.raises(ConfigError, match=r"teacher\.tokenizer = 512 applies to recipe 'cross_tokenizer_kd'"):
        config_from_dict(_lm_cfg(tmp_path, "x", teacher={"run": "r", "tokenizer": 512},
                                 recipe={"name": "lm_kd"}))
    with pytest.raises(ConfigError, match="expected the size of the built-in tokenizer"):
        config_from_dict(_lm_cfg(tmp_path, "x", teacher={"run": "r", "tokenizer": 100}))
    with pytest.raises(ConfigError, match="only the main recipe"):
        config_from_dict(_lm_cfg(tmp_path, "x", teacher={"run": "r"},
                                 recipe={"name": "lm_kd", "plus": [{"name": "cross_tokenizer_kd"}]}))
    with pytest.raises(ConfigError, match=r"no 'teacher\.cache'"):
        config_from_dict(_lm_cfg(tmp_path, "x", teacher={"cache": "c"}))
    shipped = Path(__file__).resolve().parent.parent / "configs" / "lm_arithmetic_cross_tokenizer.yaml"
    cfg = load_config(shipped)
    assert cfg.recipe.name == "cross_tokenizer_kd" and cfg.teacher is not None and cfg.teacher.tokenizer == 512
    assert cfg.data.vocab_size == cfg.student.args["vocab"] == 384


def test_run_from_a_config_with_a_teacher_run_of_another_vocabulary(tmp_path: Path) -> None:
    """A teacher run trained on the 512-token built-in tokenizer teaches a student on the 300-token one; the
    teacher's tokenizer comes from its run's data.vocab_size."""
    import yaml

    from mentor.config import config_from_dict
    from mentor.run import run
    from mentor.train import save_model

    teacher_dir = tmp_path / "teacher"
    teacher_cfg = _lm_cfg(tmp_path, "teacher", recipe={"name": "supervised"})
    teacher_cfg["data"]["vocab_size"] = 512
    teacher_cfg["student"]["args"]["vocab"] = 512
    teacher_dir.mkdir()
    (teacher_dir / "config.yaml").write_text(yaml.safe_dump(teacher_cfg))
    save_model(_lm(512, seed=1), teacher_dir / "student.safetensors")

    cfg = config_from_dict(_lm_cfg(tmp_path, "cross", teacher={"run": str(teacher_dir)}))
    result = run(cfg, report=True)
    rows = [r for r in result.final.history if r.get("split") == "train"]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/uld"])) for r in rows)
    assert (tmp_path / "cross" / "student.safetensors").is_file()
    assert "perplexity" in result.final.metrics and "agreement" not in result.final.metrics
    report = (tmp_path / "cross" / "report.md").read_text()  # no token-for-token agreement across vocabularies
    assert "| token agreement with the teacher (top-1) | n/a |" in report
    # the same teacher under lm_kd: refused, both vocabulary sizes named
    with pytest.raises(ValueError, match="teacher has 512 output classes but the student has 300"):
        run(config_from_dict(_lm_cfg(tmp_path, "plain", teacher={"run": str(teacher_dir)},
                                     recipe={"name": "lm_kd"})), report=False)
