"""A teacher whose **tokenizer differs from the student's**, for :func:`mentor.train.fit`.

:class:`CrossTokenizer` takes the student's batch (input ids ``[B, T]`` in the loop's layout, see
:mod:`mentor.lm.loop`), turns every row back into text with the student's tokenizer while keeping each token's
character span, tokenizes that text with the teacher's tokenizer, runs the frozen teacher on it and returns its
outputs **at the student's positions**:

* ``"logits"`` ``[B, T, Vt]``: at student position ``t`` the teacher's logits at the teacher position whose next
  token starts at the same character as the student's next token (the boundary rule of
  :func:`mentor.lm.align.next_token_alignment`); zeros where there is none;
* ``"aligned"`` ``[B, T]``: 1 where such a teacher position exists, else 0;
* ``"token_loss"`` / ``"token_loss_mean"`` ``[B, T]``: the teacher's own next-token losses on its tokens, carried to
  the student token that position ``t`` predicts through the character overlaps and aggregated by max / mean
  (VocAgnoLM, Shin et al. 2025, https://arxiv.org/abs/2503.19123; :func:`mentor.lm.align.aligned_teacher_loss`);
* ``"covered"`` ``[B, T]``: 1 where some teacher token with a loss overlaps that student token;
* ``"sequence"`` ``[B, T]``: the row of each position, so that a term can select tokens per sequence after the
  loop has gathered the target positions (:func:`mentor.lm.align.guided_cross_entropy`).

The teacher-guided *weights* need the student's own per-token loss at the current step (the excess
``l_s - l_t``), which a teacher does not see: the term computes them from ``token_loss`` and ``covered``
(recipe :func:`mentor.recipes.cross_tokenizer_kd.cross_tokenizer_kd`). Positions whose label is ``-100`` (prompt,
padding) get outputs like any other; the loop's terms never read them.

**Worked example.** One student row ``<s> 1 2 + 7 = 1 9 </s> <pad>`` (one token per character; ``<s>``, ``</s>``
count as one character each, see below) and a teacher that writes ``12+7=19`` as ``12|+|7|=|19``::

    character      0    1   2   3   4   5   6   7   8
    text          <s>   1   2   +   7   =   1   9  </s>
    student       <s>   1   2   +   7   =   1   9  </s>  <pad>    positions 0..9
    teacher       <s>   12      +   7   =   19     </s>          positions 0..6

    student t=0 predicts "1" (starts at 1) -> teacher position 0 predicts "12" (starts at 1): aligned, j = 0
    student t=1 predicts "2" (starts at 2) -> no teacher token starts at 2: not aligned
    student t=2 predicts "+" (3) -> j = 1;  t=3 "7" (4) -> j = 2;  t=4 "=" (5) -> j = 3;  t=5 "1" (6) -> j = 4
    student t=6 predicts "9" (7) -> not aligned;  t=7 "</s>" (8) -> j = 5;  t=8 "<pad>", t=9 nothing -> not aligned

With the arithmetic task's labels (targets on ``1``, ``9``, ``</s>``: positions 5, 6, 7) the ULD term compares the
student with the teacher at positions 5 and 7; position 6 is a target the teacher cannot score token for token
(its ``"19"`` covers two student tokens), but it still gets the teacher's loss on ``"19"`` through the overlap
for the teacher-guided weights.

**Special tokens.** Both sides map special tokens *by role* (bos, eos, unk, sep, cls, mask; other special tokens
by their string): each counts as one character of its own, and the text between two special tokens is tokenized
by the teacher separately, so no teacher token crosses a special token; a role the teacher lacks becomes nothing
on its side (student positions predicting it are not aligned). Padding (the student's pad token, where it is not
also its eos) produces nothing. Rows are re-padded on the right for the teacher (a causal model needs no mask).

**Decoding.** The student's ids become bytes token by token (byte-level BPE, as :func:`mentor.lm.data.tokenizer`
and GPT-2-style tokenizers; or SentencePiece-style ``▁`` pieces with ``<0xNN>`` byte fallback, as Llama 2's), so a
character split over several byte tokens is handled: its pieces share the character's span (only the first starts
at a boundary). Invalid UTF-8 (a block cut inside a character) decodes to U+FFFD per byte run, consistently on both
sides. The teacher's spans come from its tokenizer's ``return_offsets_mapping`` (a fast tokenizer, whose offsets
must cover the text: one that trims spaces from its offsets leaves those characters without a teacher token). A
SentencePiece student text keeps the leading space of its first word.

**Limits.** The teacher re-tokenizes the whole text, so where the student's data was tokenized in parts (prompt and
answer encoded separately, :func:`mentor.lm.data.encode_task`) a teacher token may cross that border, and the
first answer position is then not aligned. Every step decodes and re-tokenizes on the CPU (Python, a few
microseconds per token), and the teacher's sequences are as long as its tokenizer makes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mentor import losses
from mentor.lm.align import aligned_teacher_loss, next_token_alignment, offsets_overlap
from mentor.teachers import Frozen

__all__ = ["CrossTokenizer", "OUTPUTS", "VOCABULARY_AGNOSTIC", "token_bytes", "special_roles", "decode_with_offsets",
           "byte_level_alphabet"]

VOCABULARY_AGNOSTIC: tuple[Any, ...] = (losses.uld_distance,)
"""The losses that may compare the student's logits with a :class:`CrossTokenizer` teacher's: they do not pair
classes one to one (the two vocabularies differ)."""

OUTPUTS = ("logits", "aligned", "token_loss", "token_loss_mean", "covered", "sequence")
"""The keys of :meth:`CrossTokenizer.targets`."""

_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def byte_level_alphabet() -> dict[str, int]:
    """The printable character that byte-level BPE uses for each byte (GPT-2's convention), inverted: char -> byte.

    Bytes ``!``..``~``, ``¡``..``¬`` and ``®``..``ÿ`` stand for themselves; the other 68 bytes, in increasing
    order, are written as the characters ``U+0100``, ``U+0101``, ...
    """
    own = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if b in own:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"a cross-tokenizer teacher needs fast tokenizers (with backend_tokenizer and offsets), got "
                        f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str()).get("decoder") or {}
    found: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "type" in node:
                found.add(str(node["type"]))
            stack.extend(node.get("decoders") or [])
    return found


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes of every token id of a fast tokenizer (special tokens: ``b""``).

    Args:
        tokenizer: A ``transformers`` fast tokenizer whose decoder is byte-level (``ByteLevel``) or SentencePiece
            style (``Metaspace`` / ``Replace("▁", " ")`` with ``ByteFallback``).

    Returns:
        ``len(tokenizer)`` byte strings.

    Raises:
        ValueError: Another decoder (its types are named).
    """
    kinds = _decoder_types(tokenizer)
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    out: list[bytes] = []
    if "ByteLevel" in kinds:
        alphabet = byte_level_alphabet()
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                out.append(b"")
            elif i in added:
                out.append(added[i].encode("utf-8"))
            else:
                out.append(b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in piece))
        return out
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                out.append(b"")
            elif i in added:
                out.append(added[i].encode("utf-8"))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out
    raise ValueError(f"cannot read token bytes from a tokenizer with decoder {sorted(kinds) or 'none'}: expected a "
                     "byte-level BPE (ByteLevel) or SentencePiece-style (Metaspace / ByteFallback) decoder")


def special_roles(tokenizer: Any) -> dict[int, str]:
    """``{special token id: role}``: ``"bos"``, ``"eos"``, ``"unk"``, ``"sep"``, ``"cls"``, ``"mask"``, ``"pad"``,
    or ``"token:<string>"`` for other special tokens. An id with several roles keeps the first non-pad one."""
    roles: dict[int, str] = {}
    for token_id in tokenizer.all_special_ids:
        roles[int(token_id)] = "token:" + str(tokenizer.convert_ids_to_tokens(int(token_id)))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        roles[int(pad)] = "pad"
    for attr in reversed(_ROLES):  # the first role in _ROLES wins
        token_id = getattr(tokenizer, f"{attr}_id", None)
        if token_id is not None:
            roles[int(token_id)] = attr.removesuffix("_token")
    return roles


def _role_ids(tokenizer: Any) -> dict[str, int]:
    """The teacher's id for each role a student special token may have."""
    out: dict[str, int] = {}
    vocab = tokenizer.get_vocab()
    for token_id in tokenizer.all_special_ids:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        out["token:" + str(piece)] = int(token_id)
    for attr in _ROLES:
        token_id = getattr(tokenizer, f"{attr}_id", None)
        if token_id is not None:
            out[attr.removesuffix("_token")] = int(token_id)
    return {k: v for k, v in out.items() if not k.startswith("token:") or k[6:] in vocab}


@dataclass(frozen=True)
class Special:
    """A special token in a decoded row (one character wide in the offsets)."""

    role: str


def _utf8_chunks(data: bytes) -> tuple[str, list[int], list[int]]:
    """The text of ``data`` and, per byte, the character span of the character it belongs to.

    The bytes are cut before every byte that is not a UTF-8 continuation byte; each piece decodes on its own
    (``errors="replace"``), so valid text decodes as a whole would, and an invalid piece gives U+FFFD characters.
    """
    cuts = [i for i, b in enumerate(data) if i == 0 or (b & 0xC0) != 0x80]
    text_parts: list[str] = []
    start = [0] * len(data)
    end = [0] * len(data)
    chars = 0
    for n, a in enumerate(cuts):
        b = cuts[n + 1] if n + 1 < len(cuts) else len(data)
        piece = data[a:b].decode("utf-8", errors="replace")
        text_parts.append(piece)
        for i in range(a, b):
            start[i], end[i] = chars, chars + len(piece)
        chars += len(piece)
    return "".join(text_parts), start, end


def decode_with_offsets(
    ids: Sequence[int], table: Sequence[bytes], roles: Mapping[int, str]
) -> tuple[list[str | Special], list[tuple[int, int]]]:
    """One row of ids -> its parts (texts and special tokens, in order) and each token's character span.

    Characters are counted over the whole row, a special token counting as one; padding tokens (role ``"pad"``)
    have an empty span at the current character and produce nothing.

    Args:
        ids: The row's token ids.
        table: Each id's bytes (:func:`token_bytes`).
        roles: Special ids' roles (:func:`special_roles`).

    Returns:
        ``(parts, offsets)``: ``parts`` alternate texts and :class:`Special` markers; ``offsets`` has one
        ``(start, end)`` per id.
    """
    parts: list[str | Special] = []
    offsets: list[tuple[int, int]] = [(0, 0)] * len(ids)
    pos = 0
    buffer = bytearray()
    pending: list[tuple[int, int, int]] = []  # (token index, first byte, end byte) within the buffer

    def flush() -> None:
        nonlocal pos, buffer, pending
        if not buffer:
            return
        text, start, end = _utf8_chunks(bytes(buffer))
        for index, a, b in pending:
            offsets[index] = (pos + start[a], pos + end[b - 1])
        parts.append(text)
        pos += len(text)
        buffer, pending = bytearray(), []

    for index, token_id in enumerate(ids):
        role = roles.get(int(token_id))
        if role == "pad":
            flush()
            offsets[index] = (pos, pos)
        elif role is not None:
            flush()
            parts.append(Special(role))
            offsets[index] = (pos, pos + 1)
            pos += 1
        else:
            piece = table[int(token_id)]
            if not piece:
                flush()
                offsets[index] = (pos, pos)
                continue
            pending.append((index, len(buffer), len(buffer) + len(piece)))
            buffer.extend(piece)
    flush()
    return parts, offsets


class CrossTokenizer:
    """A frozen causal LM with its own tokenizer, as a teacher of a student with another tokenizer (see the module
    docstring for the alignment rule and the outputs).

    Args:
        model: The teacher network (a causal LM returning ``.logits``); put in eval mode, its parameters frozen.
        teacher_tokenizer: The teacher's fast tokenizer.
        student_tokenizer: The student's fast tokenizer (the one the training data was encoded with).
        num_classes: Keep only the teacher's first ``num_classes`` logits (an output layer padded beyond its
            tokenizer); ``None`` keeps all.
        max_length: Cut the teacher's sequences to this many tokens (student positions past it are not aligned);
            ``None``: no limit.

    Attributes:
        cross_vocabulary: ``True``: the teacher's logits are in another vocabulary, so the loop's evaluation does
            not compare them with the student's (no agreement or KL to the teacher).
    """

    cross_vocabulary = True

    def __init__(self, model: nn.Module, teacher_tokenizer: Any, student_tokenizer: Any, *,
                 num_classes: int | None = None, max_length: int | None = None) -> None:
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
        self.frozen = Frozen(model, num_classes=num_classes)
        self.model = self.frozen.model
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        self._student_bytes = token_bytes(student_tokenizer)
        self._student_roles = special_roles(student_tokenizer)
        self._teacher_roles = _role_ids(teacher_tokenizer)
        pad = getattr(teacher_tokenizer, "pad_token_id", None)
        self._teacher_pad = int(pad) if pad is not None else 0

    # ------------------------------------------------------------------------------------------------ alignment

    def teacher_inputs(self, input_ids: Tensor) -> tuple[list[list[int]], list[list[tuple[int, int]]],
                                                          list[list[tuple[int, int]]]]:
        """The teacher's ids of each row with their character spans, and the student tokens' spans.

        Args:
            input_ids: ``[B, T]`` student ids.

        Returns:
            ``(teacher_ids, teacher_offsets, student_offsets)``, one list per row.
        """
        rows = input_ids.detach().cpu().tolist()
        decoded = [decode_with_offsets(row, self._student_bytes, self._student_roles) for row in rows]
        texts = [p for parts, _ in decoded for p in parts if isinstance(p, str)]
        encoded = self.teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts \
            else {"input_ids": [], "offset_mapping": []}
        k = 0
        teacher_ids: list[list[int]] = []
        teacher_offsets: list[list[tuple[int, int]]] = []
        for parts, _ in decoded:
            ids: list[int] = []
            spans: list[tuple[int, int]] = []
            pos = 0
            for part in parts:
                if isinstance(part, Special):
                    token_id = self._teacher_roles.get(part.role)
                    if token_id is not None:
                        ids.append(token_id)
                        spans.append((pos, pos + 1))
                    pos += 1
                    continue
                ids.extend(int(i) for i in encoded["input_ids"][k])
                spans.extend((pos + int(a), pos + int(b)) for a, b in encoded["offset_mapping"][k])
                pos += len(part)
                k += 1
            if self.max_length is not None:
                ids, spans = ids[: self.max_length], spans[: self.max_length]
            teacher_ids.append(ids)
            teacher_offsets.append(spans)
        return teacher_ids, teacher_offsets, [offsets for _, offsets in decoded]

    # ------------------------------------------------------------------------------------------------- targets

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs at the student's positions (module docstring).

        Args:
            inputs: ``[B, T]`` student input ids (right-padded).

        Returns:
            ``"logits"`` ``[B, T, Vt]``, ``"aligned"``, ``"token_loss"``, ``"token_loss_mean"``, ``"covered"``
            (float ``[B, T]``) and ``"sequence"`` (long ``[B, T]``).
        """
        if inputs.dim() != 2 or inputs.is_floating_point():
            raise ValueError(f"a cross-tokenizer teacher takes student input ids [B, T], got {inputs.dtype} "
                             f"{tuple(inputs.shape)}")
        device = inputs.device
        batch, width = inputs.shape
        teacher_ids, teacher_offsets, student_offsets = self.teacher_inputs(inputs)
        length = max(2, max((len(ids) for ids in teacher_ids), default=0))
        ids = torch.full((batch, length), self._teacher_pad, dtype=torch.long)
        spans = torch.zeros((batch, length, 2), dtype=torch.long)  # span of the token each position predicts
        labels = torch.full((batch, length), -100, dtype=torch.long)  # the token each position predicts
        position = torch.zeros((batch, width), dtype=torch.long)
        aligned = torch.zeros((batch, width), dtype=torch.bool)
        for b, (row, offsets) in enumerate(zip(teacher_ids, teacher_offsets, strict=True)):
            n = len(row)
            if n:
                ids[b, :n] = torch.tensor(row)
            if n > 1:
                labels[b, : n - 1] = torch.tensor(row[1:])
                spans[b, : n - 1] = torch.tensor(offsets[1:])
            if n:
                j = next_token_alignment(student_offsets[b], offsets)
                aligned[b] = j >= 0
                position[b] = j.clamp(min=0)
        student_spans = torch.zeros((batch, width, 2), dtype=torch.long)  # span of the token each position predicts
        for b, offsets in enumerate(student_offsets):
            if width > 1:
                student_spans[b, : width - 1] = torch.tensor(offsets[1:])

        logits = self.frozen.targets(ids.to(device))["logits"]
        token_loss = losses.cross_entropy_per_item(logits, labels.to(device))
        gathered = torch.gather(logits, 1, position.to(device)[..., None].expand(-1, -1, logits.shape[-1]))
        aligned = aligned.to(device)
        overlap = offsets_overlap(student_spans, spans).to(device) & (labels >= 0).to(device)[:, None, :]
        loss_max, covered = aligned_teacher_loss(token_loss, overlap, aggregate="max")
        loss_mean, _ = aligned_teacher_loss(token_loss, overlap, aggregate="mean")
        return {
            "logits": torch.where(aligned[..., None], gathered, torch.zeros((), dtype=gathered.dtype, device=device)),
            "aligned": aligned.float(),
            "token_loss": loss_max.float(),
            "token_loss_mean": loss_mean.float(),
            "covered": covered.float(),
            "sequence": torch.arange(batch, device=device)[:, None].expand(batch, width).contiguous(),
        }

    # -------------------------------------------------------------------------------------------------- checks

    def check_method(self, method: Any, student_classes: int, teacher_classes: int | None) -> None:
        """Refuse terms that would compare the two vocabularies class by class (called by
        :func:`mentor.train.check_setup` before training).

        Raises:
            ValueError: A term reads ``"teacher.logits"`` with a loss outside :data:`VOCABULARY_AGNOSTIC` (the
                message names both vocabulary sizes), a term weighs by the teacher's logits, or the method compares
                intermediate features.
        """
        allowed = ", ".join(sorted(getattr(fn, "__name__", repr(fn)) for fn in VOCABULARY_AGNOSTIC))
        sizes = (f"teacher has {teacher_classes} logits in its own tokenizer's vocabulary and the student "
                 f"{student_classes}")
        for term in method.terms:
            fn = getattr(term.loss, "func", term.loss)
            sources = getattr(term, "sources", (term.target, *term.extra.values()))
            unknown = sorted(s for s in sources if s.startswith("teacher.") and s[len("teacher."):] not in OUTPUTS)
            if unknown:
                raise ValueError(
                    f"{sizes}: term {term.name!r} reads {unknown}, which a cross-tokenizer teacher does not give "
                    f"(it gives teacher.<key> for key in {', '.join(OUTPUTS)}; recipe cross_tokenizer_kd)"
                )
            if "teacher.logits" in sources and fn not in VOCABULARY_AGNOSTIC:
                raise ValueError(
                    f"{sizes}: term {term.name!r} compares them class by class with {getattr(fn, '__name__', fn)!r}; "
                    f"with different tokenizers expected {allowed} (recipe cross_tokenizer_kd)"
                )
            weigh = getattr(term, "weigh", None)
            if weigh is not None and weigh.source == "teacher.logits":
                raise ValueError(f"term {term.name!r} weighs items by the teacher's logits, which are in another "
                                 "vocabulary (a cross-tokenizer teacher)")
        if getattr(method, "features", ()):
            raise ValueError("a cross-tokenizer teacher sees other token positions than the student: intermediate "
                             "features cannot be compared position by position")

    def to(self, device: torch.device | str) -> CrossTokenizer:
        self.frozen.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return self.frozen.parameters()
