"""Causal-LM distillation on Hugging Face ``transformers`` models (the ``mentor[lm]`` extra).

* :mod:`mentor.lm.losses`: token-level KD over target positions (forward / reverse KL, generalised JSD, skew KL,
  TVD, all from :mod:`mentor.losses`), chunked along the sequence, with an explicit normaliser.
* :mod:`mentor.lm.vocab`: vocabulary checks and truncation of padded output rows.
* :mod:`mentor.lm.data`: a built-in corpus (standard-library docstrings), a locally trained byte-level BPE
  tokenizer, packing, a prompt/answer task with exact match, local Hugging Face datasets.
* :mod:`mentor.lm.models`: tiny Llama-style teacher and student (needs ``transformers``).

Importing ``mentor.lm`` needs only torch; :mod:`mentor.lm.models` and the tokenizer need ``transformers`` and
``tokenizers``.
"""

from mentor.lm import data, losses, vocab
from mentor.lm.losses import count_targets, divergence, token_kd, token_kd_from_logits
from mentor.lm.vocab import shared_vocab_size

__all__ = ["count_targets", "data", "divergence", "losses", "shared_vocab_size", "token_kd",
           "token_kd_from_logits", "vocab"]
