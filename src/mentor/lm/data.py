"""Language-model data that needs no download: a corpus, a tokenizer, packing, a prompt/answer task.

* **Corpus.** :func:`stdlib_docstrings`: the docstrings of the running Python's standard library (modules, classes,
  functions and methods). Pure-Python modules are read with :mod:`ast` from their source files, never imported, so
  no module's import side effects run (``antigravity`` opens a browser, ``this`` prints); built-in and extension
  modules with public names (``math``, ``itertools``, ...) are imported and read with :mod:`inspect`. GUI, test and
  demo packages are skipped (:data:`STDLIB_SKIP`). The walk is in sorted order, texts are de-duplicated (first
  occurrence kept) and split by a hash of the text: about 5% go to ``"valid"``, so a text's split never depends on
  the rest of the corpus. The same Python version gives the same corpus on any machine; other versions give a
  similar but not identical one. Cached as JSON under ``mentor.data.cache_dir() / "lm"``, keyed by the exact
  Python version. (CPython 3.11.7: about 6600 texts, 1.6 M characters.)
* **Tokenizer.** :func:`tokenizer`: a byte-level BPE (any text encodes, no unknown token) of ``vocab_size`` tokens
  (512 by default: 256 bytes, 3 special tokens, 253 merges) trained with the ``tokenizers`` library on the
  corpus's train split, cached by corpus fingerprint and size, and returned as a ``transformers``
  ``PreTrainedTokenizerFast`` with ``<pad>`` (id 0), ``<s>`` (bos, 1) and ``</s>`` (eos, 2). Encoding adds no
  special token by itself.
* **Packing.** :func:`pack`: documents as ``<s> text </s>`` in one stream, cut into blocks of ``block_size``
  tokens. Labels equal the input ids (the loss shifts them, the Hugging Face convention); the padded tail of an
  incomplete last block, when kept, has label ``-100`` and attention mask 0.
* **Prompt/answer task.** :func:`arithmetic` (``"12+7="`` -> ``"19"``) and :func:`reversal`
  (``"reverse abc:"`` -> ``"cba"``), drawn from a seed, with a train/test split by a hash of the prompt so a test
  prompt never appears in training. :func:`encode_task` gives training sequences ``<s> prompt answer </s>`` whose
  labels are ``-100`` on the prompt and the padding, plus left-padded prompts for generation;
  :func:`exact_match` scores generated answers.
* **Hugging Face datasets** from a local path: :func:`load_text_dataset` (needs the optional ``datasets`` package).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mentor import atomic
from mentor.data import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "STDLIB_SKIP",
    "SPECIAL_TOKENS",
    "stdlib_docstrings",
    "collect_stdlib_docstrings",
    "train_tokenizer",
    "tokenizer",
    "TokenBlocks",
    "pack",
    "encode_corpus",
    "stdlib_blocks",
    "PromptTask",
    "TaskData",
    "arithmetic",
    "reversal",
    "encode_task",
    "decode_completions",
    "exact_match",
    "load_text_dataset",
]

IGNORE_INDEX = -100

STDLIB_SKIP = frozenset(
    {
        # side effects on import, or GUI / demo / test code
        "antigravity", "this", "tkinter", "_tkinter", "idlelib", "turtle", "turtledemo", "test", "tests",
        "__phello__", "__hello__", "ensurepip", "pydoc_data", "readline", "ossaudiodev", "nis", "spwd",
        "xxsubtype", "xxlimited", "xxlimited_35", "lib2to3", "site-packages", "dist-packages",
    }
)  # fmt: skip
"""Names of standard-library modules, packages and folders the corpus skips (at any depth)."""

_CORPUS_VERSION = 1
_MIN_CHARS = 32
_VALID_PERMILLE = 50

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
"""Pad, bos and eos: ids 0, 1 and 2 of every tokenizer trained here."""

Split = Literal["train", "valid", "all"]


# ----------------------------------------------------------------------------------------------------------- corpus


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _source_files(root: Path) -> Iterator[Path]:
    """``.py`` files of the standard library in sorted order: top-level modules and packages (folders with an
    ``__init__.py``), skipping :data:`STDLIB_SKIP` at any depth."""
    for entry in sorted(root.iterdir()):
        stem = entry.name[:-3] if entry.name.endswith(".py") else entry.name
        if stem in STDLIB_SKIP or not stem.isidentifier():
            continue
        if entry.is_file() and entry.suffix == ".py":
            yield entry
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            yield from _source_files(entry)


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _ast_docstrings(source: str) -> Iterator[str]:
    """Docstrings of a module, its classes and functions (nested ones, and ones under ``if``/``try``/... included),
    depth first in source order. Only statement lists are walked: expressions cannot hold a docstring."""
    stack: list[ast.AST] = [ast.parse(source)]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc:
                yield doc
        children: list[ast.AST] = []
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                children.extend(v for v in value if isinstance(v, ast.stmt | ast.excepthandler | ast.match_case))
        stack.extend(reversed(children))


def _compiled_module_names() -> list[str]:
    """Public built-in and extension modules (``math``, ``itertools``, ...): they have no source to parse."""
    names = set(sys.builtin_module_names)
    dynload = Path(sysconfig.get_paths()["stdlib"]) / "lib-dynload"
    if dynload.is_dir():
        names.update(p.name.split(".")[0] for p in dynload.iterdir() if p.suffix in (".so", ".pyd"))
    return sorted(n for n in names if not n.startswith("_") and n not in STDLIB_SKIP)


def _object_docstrings(module: Any) -> Iterator[str]:
    """The module's own docstring, then those of the public functions and classes it defines (and the classes'
    members), by sorted name. Only ``__doc__`` strings set on the object itself count (no inherited ones)."""

    def own(obj: Any) -> str | None:
        doc = getattr(obj, "__doc__", None)
        return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None

    if doc := own(module):
        yield doc
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported, or injected at run time (an interactive shell adds names to builtins)
        if doc := own(obj):
            yield doc
        if inspect.isclass(obj):
            for member in sorted(vars(obj)):
                if not member.startswith("_") and (doc := own(vars(obj)[member])):
                    yield doc


def collect_stdlib_docstrings() -> list[str]:
    """Walk the standard library (no cache) and return its de-duplicated docstrings in walk order.

    Source files that do not parse and compiled modules that fail to import are skipped.
    """
    seen: set[str] = set()
    texts: list[str] = []

    def add(docs: Iterable[str]) -> None:
        for doc in docs:
            text = doc.strip()
            if len(text) >= _MIN_CHARS and text not in seen:
                seen.add(text)
                texts.append(text)

    for path in _source_files(Path(sysconfig.get_paths()["stdlib"])):
        try:
            add(_ast_docstrings(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
    for name in _compiled_module_names():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        add(_object_docstrings(module))
    return texts


def _split_of(text: str) -> Literal["train", "valid"]:
    return "valid" if _hash_int(text) % 1000 < _VALID_PERMILLE else "train"


def _corpus_path() -> Path:
    version = sys.implementation.name + "-".join(str(v) for v in sys.version_info[:3])
    return cache_dir() / "lm" / f"stdlib_docstrings_{version}_v{_CORPUS_VERSION}.json"


def stdlib_docstrings(split: Split = "train") -> list[str]:
    """The standard-library docstring corpus (see the module docstring), built once and cached.

    Args:
        split: ``"train"`` (about 95%), ``"valid"`` (about 5%) or ``"all"`` (both, in walk order).

    Returns:
        The texts of the split, in walk order.
    """
    if split not in ("train", "valid", "all"):
        raise ValueError(f"split must be 'train', 'valid' or 'all', got {split!r}")
    path = _corpus_path()
    texts: list[str] | None = None
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("version") == _CORPUS_VERSION and isinstance(stored.get("texts"), list):
                texts = [str(t) for t in stored["texts"]]
        except (OSError, ValueError, AttributeError):
            texts = None  # unreadable: rebuild
    if texts is None:
        texts = collect_stdlib_docstrings()
        payload = {"version": _CORPUS_VERSION, "python": sys.version.split()[0], "texts": texts}
        atomic.write_text(path, json.dumps(payload, ensure_ascii=False))
    if split == "all":
        return texts
    return [t for t in texts if _split_of(t) == split]


# -------------------------------------------------------------------------------------------------------- tokenizer


def _require(package: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"mentor.lm needs the {package!r} package: pip install 'mentor[lm]' (transformers and tokenizers)"
        ) from err


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) on ``texts``.

    Args:
        texts: Training texts.
        vocab_size: Total tokens: 256 byte tokens, the :data:`SPECIAL_TOKENS`, and merges up to this size
            (at least 259).

    Returns:
        The trained ``tokenizers.Tokenizer``.
    """
    _require("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an integer >= {minimum} (bytes + special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap(path: Path) -> PreTrainedTokenizerFast:
    _require("transformers")
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=pad, bos_token=bos, eos_token=eos)


def tokenizer(vocab_size: int = 512, *, texts: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally, cached, as a ``transformers.PreTrainedTokenizerFast``.

    Args:
        vocab_size: Total tokens (see :func:`train_tokenizer`).
        texts: Training texts; by default the train split of :func:`stdlib_docstrings`.

    Returns:
        The tokenizer, with ``pad_token="<pad>"`` (id 0), ``bos_token="<s>"`` (1), ``eos_token="</s>"`` (2).
        ``len(tokenizer) == vocab_size`` unless the texts are too small to learn that many merges.
    """
    texts = stdlib_docstrings("train") if texts is None else list(texts)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    path = cache_dir() / "lm" / f"tokenizer_bpe{vocab_size}_{digest.hexdigest()[:16]}_v{_CORPUS_VERSION}.json"
    if not path.exists():
        trained = train_tokenizer(texts, vocab_size)
        with atomic.replacing(path) as tmp:
            trained.save(str(tmp))
    return _wrap(path)


# ---------------------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class TokenBlocks:
    """Fixed-length token blocks for causal-LM training.

    Attributes:
        input_ids: ``[N, L]`` int64.
        labels: ``[N, L]`` int64: the input ids (unshifted), ``-100`` where there is nothing to learn.
        attention_mask: ``[N, L]`` int64: 1 for real tokens, 0 for padding.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.input_ids, self.labels, self.attention_mask)}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(
                f"input_ids, labels and attention_mask must share one shape [N, L], got "
                f"{tuple(self.input_ids.shape)}, {tuple(self.labels.shape)}, {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int | slice | Tensor) -> TokenBlocks:
        """The blocks at ``index`` (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return TokenBlocks(self.input_ids[index], self.labels[index], self.attention_mask[index])


def pack(
    documents: Iterable[Sequence[int]],
    block_size: int,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    drop_last: bool = True,
) -> TokenBlocks:
    """Concatenate tokenised documents into one stream and cut it into blocks of ``block_size`` tokens.

    Each document becomes ``[bos] ids [eos]`` (each marker only when its id is given). A document may span two
    blocks; attention does not stop at document boundaries (the usual packing of pre-training).

    Args:
        documents: Token ids of each document.
        block_size: Tokens per block (> 1).
        bos_id: Id put before each document, if any.
        eos_id: Id put after each document, if any.
        pad_id: Id of padding in an incomplete last block.
        drop_last: Drop the incomplete last block (default) instead of padding it (labels ``-100``, mask 0).

    Returns:
        The blocks; labels equal the input ids except on padding.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    stream: list[int] = []
    for doc in documents:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(int(i) for i in doc)
        if eos_id is not None:
            stream.append(eos_id)
    full, rest = divmod(len(stream), block_size)
    ids = torch.tensor(stream[: full * block_size], dtype=torch.long).reshape(full, block_size)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    if rest and not drop_last:
        tail = torch.full((1, block_size), pad_id, dtype=torch.long)
        tail[0, :rest] = torch.tensor(stream[full * block_size :], dtype=torch.long)
        tail_labels = torch.full((1, block_size), IGNORE_INDEX, dtype=torch.long)
        tail_labels[0, :rest] = tail[0, :rest]
        tail_mask = torch.zeros((1, block_size), dtype=torch.long)
        tail_mask[0, :rest] = 1
        ids, labels, mask = torch.cat([ids, tail]), torch.cat([labels, tail_labels]), torch.cat([mask, tail_mask])
    return TokenBlocks(ids, labels, mask)


def encode_corpus(
    texts: Sequence[str], tok: PreTrainedTokenizerFast, block_size: int, *, drop_last: bool = True
) -> TokenBlocks:
    """Tokenise ``texts`` (no special tokens added by the tokenizer) and :func:`pack` them with the tokenizer's bos
    and eos around each text."""
    encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
    return pack(
        encoded,
        block_size,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        drop_last=drop_last,
    )


def stdlib_blocks(split: Split = "train", block_size: int = 128, vocab_size: int = 512) -> TokenBlocks:
    """The standard-library docstring corpus, tokenised with :func:`tokenizer` and packed into blocks."""
    return encode_corpus(stdlib_docstrings(split), tokenizer(vocab_size), block_size)


# ----------------------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class PromptTask:
    """Prompt/answer pairs (strings); the model must generate ``answer`` after ``prompt``."""

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.answers)} answers")

    def __len__(self) -> int:
        return len(self.prompts)


_TEST_BUCKETS = 10  # one prompt in ten (by hash) belongs to the test split


def _draw(name: str, n: int, split: str, seed: int, make: Any) -> PromptTask:
    """``n`` pairs from ``make(rng) -> (prompt, answer)`` whose prompt hashes into ``split``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"{name}/{seed}")
    prompts: list[str] = []
    answers: list[str] = []
    for _ in range(1000 * n + 1000):
        if len(prompts) == n:
            break
        prompt, answer = make(rng)
        in_test = _hash_int(f"{name}:{prompt}") % _TEST_BUCKETS == 0
        if in_test == (split == "test"):
            prompts.append(prompt)
            answers.append(answer)
    else:
        raise ValueError(f"could not draw {n} {split} prompts for {name!r}: the problem space is too small")
    return PromptTask(name, tuple(prompts), tuple(answers))


def arithmetic(
    n: int, *, split: Literal["train", "test"] = "train", seed: int = 0, max_operand: int = 99, ops: str = "+-"
) -> PromptTask:
    """Generated arithmetic: ``"12+7="`` -> ``"19"``, ``"3-8="`` -> ``"-5"``.

    Operands are drawn uniformly from ``[0, max_operand]`` and the operator from ``ops`` with ``random.Random``
    seeded by ``seed``. A prompt belongs to the test split when its hash falls in one of 10 buckets, so the splits
    never share a prompt (prompts may repeat within a split).

    Args:
        n: Number of pairs.
        split: ``"train"`` or ``"test"``.
        seed: Draw seed.
        max_operand: Largest operand (>= 0).
        ops: Operators to draw from, a subset of ``"+-*"``.

    Returns:
        The task.
    """
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 0:
        raise ValueError(f"max_operand must be a non-negative integer, got {max_operand!r}")

    def make(rng: random.Random) -> tuple[str, str]:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a}{op}{b}=", str(value)

    return _draw("arithmetic", n, split, seed, make)


def reversal(
    n: int,
    *,
    split: Literal["train", "test"] = "train",
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 8,
    alphabet: str = "abcdefghij",
) -> PromptTask:
    """String reversal: ``"reverse abcd:"`` -> ``"dcba"``, split like :func:`arithmetic`.

    Args:
        n: Number of pairs.
        split: ``"train"`` or ``"test"``.
        seed: Draw seed.
        min_len: Shortest string (>= 1).
        max_len: Longest string (>= ``min_len``).
        alphabet: Characters to draw from.

    Returns:
        The task.
    """
    if not (1 <= min_len <= max_len) or not alphabet:
        raise ValueError(
            f"need 1 <= min_len <= max_len and a non-empty alphabet, got {min_len}, {max_len}, {alphabet!r}"
        )

    def make(rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        return f"reverse {word}:", word[::-1]

    return _draw("reversal", n, split, seed, make)


@dataclass(frozen=True)
class TaskData:
    """A tokenised :class:`PromptTask`.

    Attributes:
        input_ids: ``[N, L]``: ``<s> prompt answer </s>``, right-padded with ``<pad>``.
        labels: ``[N, L]``: the answer's ids and ``</s>``; ``-100`` on ``<s>``, the prompt and the padding.
        attention_mask: ``[N, L]``: 1 on real tokens.
        prompt_ids: ``[N, P]``: ``<s> prompt``, **left**-padded, for generation.
        prompt_mask: ``[N, P]``: 1 on real prompt tokens.
        answers: The answer strings, for :func:`exact_match`.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    answers: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def blocks(self) -> TokenBlocks:
        """The training sequences as :class:`TokenBlocks`."""
        return TokenBlocks(self.input_ids, self.labels, self.attention_mask)


def encode_task(task: PromptTask, tok: PreTrainedTokenizerFast) -> TaskData:
    """Tokenise a task for supervised / distillation training and for generation.

    Prompt and answer are encoded separately (no BPE merge crosses the boundary), so the tokens a model is asked to
    generate after the prompt are exactly the trained ones.

    Args:
        task: The prompt/answer pairs.
        tok: A tokenizer with bos, eos and pad tokens (:func:`tokenizer`).

    Returns:
        The tokenised task.
    """
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    if bos is None or eos is None or pad is None:
        raise ValueError(f"the tokenizer needs bos, eos and pad tokens, got ids {bos}, {eos}, {pad}")
    prompts = tok(list(task.prompts), add_special_tokens=False)["input_ids"]
    answers = tok(list(task.answers), add_special_tokens=False)["input_ids"]
    seqs = [[bos, *p, *a, eos] for p, a in zip(prompts, answers, strict=True)]
    length = max((len(s) for s in seqs), default=1)
    width = max((len(p) + 1 for p in prompts), default=1)
    n = len(seqs)
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    prompt_ids = torch.full((n, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (seq, p) in enumerate(zip(seqs, prompts, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) + 1 : len(seq)] = torch.tensor(seq[len(p) + 1 :])
        prompt_ids[i, width - len(p) - 1 :] = torch.tensor([bos, *p])
        prompt_mask[i, width - len(p) - 1 :] = 1
    return TaskData(input_ids, labels, mask, prompt_ids, prompt_mask, task.answers)


def decode_completions(tok: PreTrainedTokenizerFast, completions: Tensor) -> list[str]:
    """Decode generated continuations ``[N, G]`` (prompt removed) up to the first eos, without special tokens."""
    eos = tok.eos_token_id
    out: list[str] = []
    for row in completions.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        out.append(str(tok.decode(row, skip_special_tokens=True)))
    return out


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of predictions equal to their answer after stripping surrounding whitespace (0 when empty)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=True)) / len(answers)


# ------------------------------------------------------------------------------------------------ local HF datasets

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_text_dataset(path: str | os.PathLike[str], *, split: str = "train", text_field: str = "text") -> list[str]:
    """Texts of a Hugging Face dataset stored locally (never downloaded).

    ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a data file
    (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, ``.txt``) or a folder of such files.

    Args:
        path: Local path.
        split: The split to read (for a ``DatasetDict`` or a data folder).
        text_field: The column holding the text.

    Returns:
        The texts of the split.

    Raises:
        ImportError: ``datasets`` is not installed.
        FileNotFoundError: ``path`` does not exist.
        KeyError: the split or the column is missing (the message lists what exists).
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_text_dataset needs the 'datasets' package: pip install datasets") from err
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no dataset at {str(root)!r}")
    saved = root.is_dir() and ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists())
    if saved:
        loaded: Any = datasets.load_from_disk(str(root))
    elif root.is_file():
        builder = _BUILDERS.get(root.suffix)
        if builder is None:
            raise ValueError(f"unsupported data file {root.name!r}; expected one of {', '.join(sorted(_BUILDERS))}")
        loaded = datasets.load_dataset(builder, data_files={split: str(root)})
    else:
        loaded = datasets.load_dataset(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise KeyError(f"split {split!r} not in the dataset at {str(root)!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise KeyError(f"column {text_field!r} not in the dataset at {str(root)!r}; it has {loaded.column_names}")
    column: list[Any] = list(loaded[text_field])
    return [str(t) for t in column]
