"""``lm_kd``: token-level distillation of a causal LM over the target positions of the data (off-policy).

Per target token (label >= 0; prompt and padding carry ``-100``) the student's next-token distribution is compared
with the teacher's by a divergence of :mod:`mentor.losses` (chosen as in :func:`mentor.lm.losses.divergence`):
forward KL (Hinton-style word-level KD, Kim & Rush 2016, https://arxiv.org/abs/1606.07947), reverse KL,
generalised JSD(beta) (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649), skew forward / reverse KL
(DistiLLM, Ko et al. 2024, https://arxiv.org/abs/2402.03898) or TVD. The sum over target tokens is divided by the
number of target tokens in the whole optimiser step, so gradient accumulation does not change the loss.

    loss = kd_weight * sum_tokens D(p_teacher, p_student) / N  +  ce_weight * sum_tokens CE(student, token) / N

With a teacher cache (``teacher.cache``, per-position top-k) the forward KL reads the top-k directly
(:func:`mentor.cache.use_sparse_targets` -> :func:`mentor.losses.sparse_kl_div`); other divergences read the dense
reconstruction.
"""

from __future__ import annotations

from mentor import losses
from mentor.lm.losses import DIVERGENCES
from mentor.lm.losses import divergence as make_divergence
from mentor.method import Method, Term

__all__ = ["lm_kd", "token_terms"]


def token_terms(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    skew: float | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[Term, ...]:
    """The token-level KD term (``"kd"``, over target positions) and, with ``ce_weight > 0``, the cross-entropy
    on the data's tokens (``"ce"``). Arguments as in :func:`lm_kd`."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    fn = make_divergence(divergence, temperature=float(temperature), beta=beta, alpha=skew)  # validates beta / skew
    kwargs = dict(fn.keywords)  # type: ignore[attr-defined]
    if divergence == "forward_kl":
        kwargs.pop("reverse", None)  # plain kl_div(temperature=T): what a teacher cache turns into sparse_kl_div
    terms = [Term("kd", fn.func, target="teacher.logits", items="labelled",  # type: ignore[attr-defined]
                  weight=float(kd_weight), kwargs=kwargs)]
    if ce_weight > 0:
        terms.append(Term("ce", losses.cross_entropy, target="label", items="labelled", weight=float(ce_weight)))
    return tuple(terms)


def lm_kd(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    skew: float | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> Method:
    """Token-level KD of a causal LM on the data's sequences.

    Args:
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``, ``skew_reverse_kl`` or ``tvd``.
        temperature: Softmax temperature of both models (the loss is scaled by ``T^2``).
        beta: ``jsd`` only: the interpolation in ``[0, 1]`` (default 0.5; 0 is forward, 1 reverse KL).
        skew: The skew divergences only: the skew in ``[0, 1)`` (default 0.1).
        kd_weight: Weight of the KD term.
        ce_weight: Weight of the cross-entropy on the data's target tokens (0: none).
    """
    return Method(
        name="lm_kd",
        terms=token_terms(divergence, temperature, beta, skew, kd_weight, ce_weight),
        description="causal LM: token-level KD over target positions (forward/reverse KL, JSD, skew KL, TVD)",
    )
