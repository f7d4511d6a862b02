"""``gkd``: generalised knowledge distillation, on-policy (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649).

Per optimiser step, with probability ``lmbda`` the student continues the training prompts itself (KV cache,
``temperature``, ``max_new_tokens``; :class:`mentor.lm.loop.OnPolicy`), the teacher scores those samples in one
forward pass, and the student trains on its own samples; otherwise it trains on the data's sequences. The loss is
the generalised JSD(beta) per generated (or target) token, divided by the step's target tokens:

    loss = sum_tokens JSD_beta(p_teacher || p_student) / N

``beta = 0`` is forward KL, ``beta = 1`` reverse KL (the paper's and TRL's convention). The choice of a step is
drawn from ``(seed, step)`` and the samples from ``(seed, step, micro-batch's place in the global batch)``, so a
resumed run samples the same sequences, and so does a run on several processes.
"""

from __future__ import annotations

from mentor.lm.loop import OnPolicy
from mentor.method import Method
from mentor.recipes.lm_kd import token_terms

__all__ = ["gkd"]


def gkd(
    lmbda: float = 0.5,
    beta: float = 0.5,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    sample_temperature: float = 1.0,
    top_p: float | None = None,
    divergence: str = "jsd",
    ce_weight: float = 0.0,
    eos_id: int = 2,
    pad_id: int = 0,
    chunk_size: int | None = 1024,
    token_weighting: str | None = None,
    uncertainty: str = "target",
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
) -> Method:
    """GKD: on-policy student samples with probability ``lmbda``, generalised JSD.

    Args:
        lmbda: Fraction of on-policy steps in ``[0, 1]``.
        beta: The JSD's interpolation in ``[0, 1]`` (with ``divergence="jsd"``).
        temperature: Softmax temperature of the loss.
        max_new_tokens: Most tokens the student generates per prompt.
        sample_temperature: The student's sampling temperature (0: greedy).
        top_p: Nucleus filtering while sampling, or ``None``.
        divergence: Token divergence (see :func:`mentor.recipes.lm_kd.lm_kd`); ``jsd`` is GKD's.
        ce_weight: Weight of a cross-entropy on the batch's target tokens (the samples' own tokens on an on-policy
            step); 0: none.
        eos_id: End-of-sequence id of the tokenizer (built-in: 2).
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
                    eos_id=eos_id, pad_id=pad_id)
    return Method(
        name="gkd",
        terms=token_terms(divergence, temperature, beta if divergence == "jsd" else None, None, 1.0, ce_weight,
                          chunk_size, token_weighting, uncertainty, hard_fraction, easy_weight),
        batch_hook=hook,
        description="causal LM: on-policy GKD, student samples with prob. lambda + generalised JSD (Agarwal 2024)",
    )
