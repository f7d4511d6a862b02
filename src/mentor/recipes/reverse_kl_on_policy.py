"""``reverse_kl_on_policy``: MiniLLM-style distillation: the student's own samples and the reverse KL.

MiniLLM (Gu et al. 2024, https://arxiv.org/abs/2306.08543) minimises the sequence-level reverse KL
``KL(p_student || p_teacher)`` with a policy gradient. Its simplest token-level form, used here, trains on the
student's own samples every step (:class:`mentor.lm.loop.OnPolicy` with ``lmbda = 1``) with the reverse KL of each
generated token's next-token distribution (mode-seeking: the student is pushed away from what the teacher finds
unlikely); this equals GKD with ``lambda = 1`` and ``beta = 1``. MiniLLM's policy-gradient terms (the
sequence-level reward, its teacher-mixed sampling and length normalisation) are not reproduced.
"""

from __future__ import annotations

from mentor.lm.loop import OnPolicy
from mentor.method import Method
from mentor.recipes.lm_kd import token_terms

__all__ = ["reverse_kl_on_policy"]


def reverse_kl_on_policy(
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    sample_temperature: float = 1.0,
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
    """Reverse KL on the student's own samples, every step.

    Args:
        temperature: Softmax temperature of the loss.
        max_new_tokens: Most tokens the student generates per prompt.
        sample_temperature: The student's sampling temperature (0: greedy).
        top_p: Nucleus filtering while sampling, or ``None``.
        ce_weight: Weight of a cross-entropy on the sampled tokens (0: none).
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
    hook = OnPolicy(lmbda=1.0, max_new_tokens=max_new_tokens, temperature=sample_temperature, top_p=top_p,
                    eos_id=eos_id, pad_id=pad_id)
    return Method(
        name="reverse_kl_on_policy",
        terms=token_terms("reverse_kl", temperature, None, None, 1.0, ce_weight, chunk_size, token_weighting,
                          uncertainty, hard_fraction, easy_weight),
        batch_hook=hook,
        description="causal LM: MiniLLM-style, reverse KL on the student's own samples every step",
    )
