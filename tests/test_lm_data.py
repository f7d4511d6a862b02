"""Tests of mentor.lm.data: the standard-library corpus, the local tokenizer, packing, the prompt/answer task, local
Hugging Face datasets."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mentor.lm import data

# ----------------------------------------------------------------------------------------------------------- corpus


@pytest.mark.slow
def test_corpus_walk_is_deterministic() -> None:
    cached = data.stdlib_docstrings("all")
    assert data.collect_stdlib_docstrings() == cached  # a second walk gives the same texts, as the cache holds them


def test_corpus_is_deduplicated_and_split_by_hash() -> None:
    cached = data.stdlib_docstrings("all")
    assert len(cached) > 1000 and len(set(cached)) == len(cached)
    assert all(len(t) >= 32 and t == t.strip() for t in cached)
    train, valid = data.stdlib_docstrings("train"), data.stdlib_docstrings("valid")
    assert not set(train) & set(valid) and len(train) + len(valid) == len(cached)
    assert 0.03 < len(valid) / len(cached) < 0.08
    # a pure-Python function's docstring (read with ast) and a C function's (read with inspect)
    assert any(t.startswith("Remove any common leading whitespace") for t in cached)  # textwrap.dedent
    assert any(t.startswith("Return the cosine of x") for t in cached)  # math.cos
    # modules with import side effects were never imported, skipped packages contribute nothing
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    files = list(data._source_files(Path(sysconfig.get_paths()["stdlib"])))
    assert len(files) > 300 and any(f.name == "textwrap.py" for f in files)
    for f in files:
        assert not {part.removesuffix(".py") for part in f.parts} & data.STDLIB_SKIP, f


def test_corpus_cache_is_rebuilt_when_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path))
    calls = []

    def fake() -> list[str]:
        calls.append(1)
        return [f"docstring number {i} with enough characters to be kept" for i in range(40)]

    monkeypatch.setattr(data, "collect_stdlib_docstrings", fake)
    first = data.stdlib_docstrings("all")
    assert data.stdlib_docstrings("all") == first and len(calls) == 1  # read from the cache
    (path,) = (tmp_path / "lm").glob("stdlib_docstrings_*.json")
    assert json.loads(path.read_text())["texts"] == first
    assert not list((tmp_path / "lm").glob(".*tmp"))  # written atomically, no temporary left
    path.write_text("{ truncated")
    assert data.stdlib_docstrings("all") == first and len(calls) == 2
    with pytest.raises(ValueError, match="split must be"):
        data.stdlib_docstrings("test")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_packages() -> None:
    pytest.importorskip("tokenizers", reason="the tokenizer needs the 'tokenizers' package (mentor[lm])")
    pytest.importorskip("transformers", reason="the tokenizer is a transformers PreTrainedTokenizerFast (mentor[lm])")


def test_tokenizer_is_byte_level_with_special_tokens() -> None:
    _tokenizer_packages()
    tok = data.tokenizer()
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ["Return the cosine of x.", "12+7=19", "reverse abc:cba", "ünïcødé → 漢字 🙂\n\ttabs"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < 512 for i in ids) and 0 not in ids  # bytes cover everything: no unknown, no pad
        assert tok.decode(ids) == text
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # adds nothing by itself


def test_tokenizer_training_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tokenizer_packages()
    texts = data.stdlib_docstrings("train")[:800]
    a = data.train_tokenizer(texts, 300).to_str()
    b = data.train_tokenizer(texts, 300).to_str()
    assert a == b
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path))
    tok = data.tokenizer(300, texts=texts)
    assert len(tok) == 300

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    again = data.tokenizer(300, texts=texts)
    assert again.get_vocab() == tok.get_vocab()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 259"):
        data.train_tokenizer(texts, 100)


# ---------------------------------------------------------------------------------------------------------- packing


def test_pack_concatenates_documents_and_cuts_blocks() -> None:
    docs = [[10, 11, 12], [20], [30, 31]]
    blocks = data.pack(docs, 4, bos_id=1, eos_id=2)
    # stream: 1 10 11 12 2 1 20 2 1 30 31 2 -> three full blocks
    assert blocks.input_ids.tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 2]]
    assert torch.equal(blocks.labels, blocks.input_ids) and blocks.attention_mask.all()
    padded = data.pack(docs, 5, bos_id=1, eos_id=2, pad_id=0, drop_last=False)
    assert padded.input_ids.tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 1, 30], [31, 2, 0, 0, 0]]
    assert padded.labels[-1].tolist() == [31, 2, -100, -100, -100]
    assert padded.attention_mask[-1].tolist() == [1, 1, 0, 0, 0]
    assert data.pack(docs, 5, bos_id=1, eos_id=2).input_ids.shape == (2, 5)
    assert len(padded[1:]) == 2 and padded[0].input_ids.shape == (1, 5)
    with pytest.raises(ValueError, match="block_size"):
        data.pack(docs, 1)


def test_corpus_blocks_use_the_tokenizer_markers() -> None:
    _tokenizer_packages()
    blocks = data.stdlib_blocks("valid", block_size=64)
    assert blocks.input_ids.shape[1] == 64 and len(blocks) > 50
    assert blocks.input_ids[0, 0] == 1 and (blocks.input_ids == 2).any()
    assert int(blocks.input_ids.max()) < 512


# ----------------------------------------------------------------------------------------------------------- task


def test_arithmetic_answers_are_correct_and_splits_disjoint() -> None:
    train = data.arithmetic(500, seed=0)
    test = data.arithmetic(200, split="test", seed=0)
    for prompt, answer in zip(train.prompts, train.answers, strict=True):
        a, op, b = prompt[:-1].partition("+") if "+" in prompt[:-1] else prompt[:-1].partition("-")
        assert prompt.endswith("=") and int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert not set(train.prompts) & set(test.prompts)
    assert data.arithmetic(500, seed=0) == train and data.arithmetic(500, seed=1) != train
    assert data.arithmetic(50, seed=0).prompts == train.prompts[:50]
    times = data.arithmetic(20, ops="*", max_operand=9)
    assert all(int(a) == int(p[0]) * int(p[2]) for p, a in zip(times.prompts, times.answers, strict=True))
    with pytest.raises(ValueError, match="ops"):
        data.arithmetic(3, ops="/")
    with pytest.raises(ValueError, match="too small"):
        data.arithmetic(5, split="test", max_operand=0, ops="+")


def test_reversal_task() -> None:
    task = data.reversal(100, seed=3)
    for prompt, answer in zip(task.prompts, task.answers, strict=True):
        word = prompt.removeprefix("reverse ").removesuffix(":")
        assert answer == word[::-1] and 3 <= len(word) <= 8
    assert not set(task.prompts) & set(data.reversal(100, split="test", seed=3).prompts)


def test_encode_task_masks_prompt_and_padding() -> None:
    _tokenizer_packages()
    tok = data.tokenizer()
    task = data.arithmetic(16, seed=2)
    enc = data.encode_task(task, tok)
    assert len(enc) == 16
    for i, (prompt, answer) in enumerate(zip(task.prompts, task.answers, strict=True)):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        n = 1 + len(p) + len(a) + 1
        assert enc.input_ids[i, :n].tolist() == [1, *p, *a, 2]
        assert enc.labels[i].tolist() == [-100] * (1 + len(p)) + [*a, 2] + [-100] * (enc.labels.shape[1] - n)
        assert enc.attention_mask[i].sum() == n and (enc.input_ids[i, n:] == 0).all()
        real = enc.prompt_ids[i][enc.prompt_mask[i].bool()]
        assert real.tolist() == [1, *p] and enc.prompt_mask[i, -1] == 1  # left-padded
        assert tok.decode(enc.labels[i][enc.labels[i] >= 0].tolist(), skip_special_tokens=True) == answer
    assert enc.answers == task.answers and enc.blocks().labels is enc.labels


def test_exact_match_and_decoding() -> None:
    assert data.exact_match(["19", " -5 ", "7"], ["19", "-5", "8"]) == pytest.approx(2 / 3)
    assert data.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        data.exact_match(["a", "b"], ["a"])
    _tokenizer_packages()
    tok = data.tokenizer()
    ids19 = tok("19", add_special_tokens=False)["input_ids"]
    ids5 = tok("-5", add_special_tokens=False)["input_ids"]
    width = max(len(ids19), len(ids5)) + 3
    rows = torch.tensor([
        [*ids19, 2] + [7] * (width - len(ids19) - 1),  # tokens after eos are dropped
        [*ids5, 2] + [0] * (width - len(ids5) - 1),
    ])
    assert data.decode_completions(tok, rows) == ["19", "-5"]


# ------------------------------------------------------------------------------------------------ local HF datasets


def test_load_text_dataset_from_local_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}", "id": i}) for i in range(5)) + "\n")
    assert data.load_text_dataset(path) == [f"document {i}" for i in range(5)]
    with pytest.raises(KeyError, match="column 'body'"):
        data.load_text_dataset(path, text_field="body")
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"valid": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(saved))
    assert data.load_text_dataset(saved, split="valid") == ["a", "b"]
    with pytest.raises(KeyError, match="split 'train'"):
        data.load_text_dataset(saved)


def test_load_text_dataset_errors_without_the_package_or_path(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            data.load_text_dataset(tmp_path)
        return
    with pytest.raises(FileNotFoundError, match="no dataset"):
        data.load_text_dataset(tmp_path / "missing")
