"""``seq_kd``: sequence-level knowledge distillation (Kim & Rush 2016, https://arxiv.org/abs/1606.07947).

The teacher continues every training prompt once (greedy by default, the usual stand-in for the paper's beam
search); the student then trains with cross-entropy on the teacher's text instead of the data's answers. The
generation is done before training by :func:`mentor.lm.loop.cached_teacher_sequences` (stored under
``$MENTOR_CACHE/lm/seq_kd``, keyed by the teacher's and the data's fingerprints, written atomically), so several
students reuse one generation; ``mentor train`` does this when ``recipe.name`` is ``seq_kd``. With
``kd_weight > 0`` a token-level forward KL to the teacher on the same text is added (the paper's combination of
word- and sequence-level KD).
"""

from __future__ import annotations

from mentor.method import Method, Term
from mentor.recipes.lm_kd import ce_term, token_terms

__all__ = ["seq_kd"]


def seq_kd(
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    kd_weight: float = 0.0,
    kd_temperature: float = 1.0,
    chunk_size: int | None = 1024,
) -> Method:
    """Cross-entropy on teacher-generated answers.

    Args:
        max_new_tokens: Longest teacher answer (default: the data's ``max_new_tokens``).
        temperature: The teacher's generation temperature (0: greedy).
        kd_weight: Weight of an added token-level forward KL to the teacher on the teacher's text (0: none).
        kd_temperature: Temperature of that KL.
        chunk_size: Target positions per chunk of the losses, computed from hidden states (the full
            logits never exist; see :mod:`mentor.recipes.lm_kd`), or ``None`` for the terms on the full logits.
    """
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1 or null, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    terms: tuple[Term, ...] = (ce_term(1.0, chunk_size),)
    if kd_weight > 0:
        terms += token_terms("forward_kl", kd_temperature, None, None, kd_weight, 0.0, chunk_size)
    return Method(
        name="seq_kd",
        terms=terms,
        description="causal LM: cross-entropy on the teacher's generated answers (sequence-level KD, Kim & Rush)",
    )
