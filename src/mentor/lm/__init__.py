"""Causal-LM distillation on Hugging Face ``transformers`` models (the ``mentor[lm]`` extra).

* :mod:`mentor.lm.losses`: token-level KD over target positions (forward / reverse KL, generalised JSD, skew KL,
  TVD, all from :mod:`mentor.losses`), chunked along the sequence, with an explicit normaliser and optional
  per-token weights; :func:`~mentor.lm.losses.token_kd_topk` for sparse (top-k, cached) teachers.
* :mod:`mentor.lm.generate`: on-policy sampling with a KV cache, GKD's on/off-policy choice, speculative KD's
  interleaved sampling.
* :mod:`mentor.lm.weighting`: ATKD-style per-token weights from the teacher's uncertainty.
* :mod:`mentor.lm.align`: teacher and student with different tokenizers: alignment through character offsets and
  teacher-guided token weights (``mentor.losses.uld_distance`` is the other option).
* :mod:`mentor.lm.cross`: ``CrossTokenizer``, a teacher with its own tokenizer for the loop: the student's rows
  decoded to text, re-tokenized, the teacher's outputs returned at the student's positions (recipe
  ``cross_tokenizer_kd``).
* :mod:`mentor.lm.vocab`: vocabulary checks and truncation of padded output rows.
* :mod:`mentor.lm.data`: a built-in corpus (standard-library docstrings), a locally trained byte-level BPE
  tokenizer, packing, a prompt/answer task with exact match, local Hugging Face datasets.
* :mod:`mentor.lm.models`: tiny Llama-style teacher and student (needs ``transformers``).
* :mod:`mentor.lm.loop`: LM data in mentor's one loop (shifted labels), on-policy batches (``OnPolicy``, a
  ``Method.batch_hook``), sequence-level KD data, and the LM evaluation (perplexity, agreement, exact match).

Importing ``mentor.lm`` needs only torch; :mod:`mentor.lm.models` and the tokenizer need ``transformers`` and
``tokenizers``; :mod:`mentor.lm.generate` runs any model with the ``transformers`` causal-LM call signature.
"""

from mentor.lm import align, cross, data, generate, loop, losses, vocab, weighting
from mentor.lm.generate import (
    Generation,
    SpeculativeGeneration,
    choose_on_policy,
    on_policy_at,
    sample,
    speculative_sample,
)
from mentor.lm.losses import (
    count_targets,
    divergence,
    token_kd,
    token_kd_from_logits,
    token_kd_topk,
    token_kd_topk_from_logits,
)
from mentor.lm.vocab import shared_vocab_size

__all__ = [
    "Generation",
    "SpeculativeGeneration",
    "align",
    "choose_on_policy",
    "count_targets",
    "cross",
    "data",
    "divergence",
    "generate",
    "loop",
    "losses",
    "on_policy_at",
    "sample",
    "shared_vocab_size",
    "speculative_sample",
    "token_kd",
    "token_kd_from_logits",
    "token_kd_topk",
    "token_kd_topk_from_logits",
    "vocab",
    "weighting",
]
