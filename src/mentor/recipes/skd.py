"""``skd``: speculative knowledge distillation (Xu et al. 2024, https://arxiv.org/abs/2410.11325).

On an on-policy step (probability ``lmbda``, 1 by default as in the paper) the student proposes each token of the
continuation of a training prompt; a proposal outside the teacher's top-``top_k`` tokens at that position is
replaced by the teacher's own sample (:func:`mentor.lm.generate.speculative_sample`, both models with a KV cache).
The student then trains on the interleaved sequence with a token divergence against the teacher (forward KL by
default), so it learns on its own distribution where that is good enough and on the teacher's elsewhere.
"""

from __future__ import annotations

from mentor.lm.loop import OnPolicy
from mentor.method import Method
from mentor.recipes.lm_kd import token_terms

__all__ = ["skd"]


def skd(
    top_k: int = 25,
    lmbda: float = 1.0,
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    sample_temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_p: float | None = None,
    ce_weight: float = 0.0,
    eos_id: int = 2,
    pad_id: int = 0,
    chunk_size: int | None = 1024,
    token_weighting: str | None = None,
    uncertainty: str = "target",
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
) -> Method:
    """Speculative KD: interleaved student proposals and teacher corrections, then token-level KD.

    Args:
        top_k: The teacher's acceptance set: a student proposal outside its top-``k`` is replaced.
        lmbda: Fraction of steps on interleaved samples (the others use the data's sequences).
        divergence: Token divergence (see :func:`mentor.recipes.lm_kd.lm_kd`).
        beta: ``jsd`` only.
        temperature: Softmax temperature of the loss.
        max_new_tokens: Most tokens per prompt.
        sample_temperature: The student's proposal temperature.
        teacher_temperature: The teacher's replacement temperature (default ``sample_temperature``).
        top_p: Nucleus filtering for both samplers, or ``None``.
        ce_weight: Weight of a cross-entropy on the batch's tokens (0: none).
        eos_id: End-of-sequence id (built-in tokenizer: 2).
        pad_id: Padding id (built-in: 0).
        chunk_size: Target positions per chunk of the losses, computed from both models' hidden states (the full
            logits never exist; see :mod:`mentor.recipes.lm_kd`), or ``None`` for the terms on the full logits.
        token_weighting: Weight each token's divergence by the teacher's uncertainty: ``None`` (off),
            ``"hard_easy"`` or ``"proportional"``; with ``uncertainty``, ``hard_fraction``, ``easy_weight`` as in
            :func:`mentor.recipes.lm_kd.lm_kd` (split per micro-batch; on sampled steps the targets are the
            samples' tokens).
        uncertainty: ``"target"`` or ``"entropy"``.
        hard_fraction: ``hard_easy``: share of hard tokens, in ``(0, 1]``.
        easy_weight: ``hard_easy``: the easy tokens' share of the KD term, in ``[0, 1]``.
    """
    hook = OnPolicy(lmbda=lmbda, max_new_tokens=max_new_tokens, temperature=sample_temperature, top_p=top_p,
                    speculative_top_k=top_k, teacher_temperature=teacher_temperature, eos_id=eos_id, pad_id=pad_id)
    return Method(
        name="skd",
        terms=token_terms(divergence, temperature, beta, None, 1.0, ce_weight, chunk_size, token_weighting,
                          uncertainty, hard_fraction, easy_weight),
        batch_hook=hook,
        description="causal LM: speculative KD, student proposals replaced outside the teacher's top-k (Xu 2024)",
    )
