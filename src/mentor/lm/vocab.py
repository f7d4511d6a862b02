"""Vocabulary checks between a student and a teacher causal LM that share one tokenizer.

Two models trained with the same tokenizer often have output layers of different sizes: one pads its embedding
matrix to a multiple of 64 or 128 for speed (a teacher with 520 logits and a student with 512, for a tokenizer of
512 tokens). The rows past the tokenizer's length are never the id of a real token, so the distributions are
compared over the **shared range** ``[0, vocab_size)``: both models' logits are truncated to the first
``vocab_size`` entries (equivalently: the first ``vocab_size`` rows of each ``lm_head`` weight) and each softmax is
taken over that range only. The padded rows then get no distillation gradient.

Truncation is only done when asked for, by passing ``vocab_size`` (the tokenizer's length, ``len(tokenizer)``):
without it, output sizes that differ are refused with an error that names both, because two genuinely different
vocabularies (different tokenizers) of nearly equal size are not comparable row by row. Different tokenizers need
token alignment: :class:`mentor.lm.cross.CrossTokenizer` with the recipe ``cross_tokenizer_kd``.
"""

from __future__ import annotations

import numbers

__all__ = ["shared_vocab_size"]


def shared_vocab_size(student_size: int, teacher_size: int, vocab_size: int | None = None) -> int:
    """The number of leading logits that the student and the teacher are compared over.

    Args:
        student_size: Rows of the student's output layer (its logits' last dimension).
        teacher_size: Rows of the teacher's output layer.
        vocab_size: The shared tokenizer's length. When given, both models must have at least this many logits and
            both are truncated to it (extra rows are padding). When ``None``, the two sizes must be equal.

    Returns:
        The size of the shared range.

    Raises:
        ValueError: The sizes differ and no ``vocab_size`` was given, or a model has fewer logits than
            ``vocab_size``, or ``vocab_size`` is not a positive integer.
    """
    if vocab_size is None:
        if student_size != teacher_size:
            raise ValueError(
                f"student has {student_size} logits but teacher has {teacher_size}: vocabularies differ. If both "
                f"use the same tokenizer and the extra rows are padding, pass vocab_size=len(tokenizer) to compare "
                f"the shared range [0, vocab_size); models with different tokenizers need token alignment "
                f"(recipe cross_tokenizer_kd with a mentor.lm.cross.CrossTokenizer teacher)"
            )
        return int(student_size)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer (the tokenizer's length), got {vocab_size!r}")
    for name, size in (("student", student_size), ("teacher", teacher_size)):
        if size < vocab_size:
            raise ValueError(
                f"{name} has {size} logits, fewer than vocab_size={vocab_size} (student {student_size}, teacher "
                f"{teacher_size}): its output layer does not cover the tokenizer"
            )
    return int(vocab_size)
