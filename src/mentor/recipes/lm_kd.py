"""``lm_kd``: token-level distillation of a causal LM over the target positions of the data (off-policy).

Per target token (label >= 0; prompt and padding carry ``-100``) the student's next-token distribution is compared
with the teacher's by a divergence of :mod:`mentor.losses` (chosen as in :func:`mentor.lm.losses.divergence`):
forward KL (Hinton-style word-level KD, Kim & Rush 2016, https://arxiv.org/abs/1606.07947), reverse KL,
generalised JSD(beta) (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649), skew forward / reverse KL
(DistiLLM, Ko et al. 2024, https://arxiv.org/abs/2402.03898) or TVD. The sum over target tokens is divided by the
number of target tokens in the whole optimiser step, so gradient accumulation does not change the loss.

    loss = kd_weight * sum_tokens D(p_teacher, p_student) / N  +  ce_weight * sum_tokens CE(student, token) / N

**Chunked (the default, ``chunk_size`` target positions at a time).** The terms read the student's final hidden
states and output layer (``"hidden"``, ``"head"``) and the teacher's (``"teacher.hidden"``, ``"teacher.head"``)
instead of logits: the loop runs both models without their output layer (:class:`mentor.lm.models.HiddenHead`)
and :func:`mentor.lm.losses.chunked_loss` computes the same divergence of :mod:`mentor.losses` (and the
cross-entropy) chunk by chunk, so at most one ``[chunk_size, vocab]`` float32 logits block per model is alive at a
time and the full ``[tokens, vocab]`` logits never exist. ``chunk_size=None`` is the full-logits form (terms on
``"logits"``; needed for a teacher that gives only logits, e.g. ``teachers.Callable``).

With a teacher cache (``teacher.cache``, per-position top-k) the forward KL reads the top-k directly
(:func:`mentor.cache.use_sparse_targets` -> :func:`mentor.losses.sparse_kl_div`, chunked like the rest); other
divergences read the dense reconstruction.

**Token weighting** (``token_weighting``, in the spirit of ATKD, Zhong et al. 2024,
https://arxiv.org/abs/2404.14827; exact rules in :mod:`mentor.lm.weighting`). Each target token's KD divergence
is weighted by the teacher's uncertainty there: ``uncertainty="target"`` is ``1 - p_teacher(y)`` (the teacher's
probability of the data's next token, at temperature 1), ``"entropy"`` the teacher's normalised entropy.
``"hard_easy"`` is ATKD's split: the ``hard_fraction`` most uncertain tokens are hard, the rest easy, and the KD
term becomes ``easy_weight * mean_easy(D) + (1 - easy_weight) * mean_hard(D)``; ``"proportional"`` weights each
token by ``u / mean(u)``. The weights have mean 1, so the loss keeps its scale. Only the KD term is weighted (not
the cross-entropy). The term (:func:`mentor.lm.weighting.uncertainty_weighted`) first walks the target tokens'
teacher rows under no grad for the uncertainties (chunked: ``chunk_size`` rows at a time from the teacher's hidden
states, so the full logits still never exist), then runs the usual loss with the weights as its float mask.

The split and the mean are taken over the tokens of **one micro-batch** (of one process): the loop computes each
micro-batch's terms on its own. Without accumulation (and on one process) that is the step's batch. Under gradient
accumulation or data parallelism each micro-batch is split into its own hard and easy halves, so the step's
gradient is not that of one large batch split once (which micro-batch a token falls in changes its weight); the
normaliser is still the step's target-token count. Not available with a teacher cache (the top-k does not give
the teacher's full distribution).
"""

from __future__ import annotations

import numbers

from mentor import losses
from mentor.lm import weighting
from mentor.lm.losses import DIVERGENCES, chunked_loss
from mentor.lm.losses import divergence as make_divergence
from mentor.method import Method, Term

__all__ = ["lm_kd", "token_terms", "ce_term", "check_chunk_size", "STUDENT_HEAD", "HEADS"]

STUDENT_HEAD = {"student_head": "head"}
"""The ``shared`` arguments of a chunked term that reads only the student's output layer."""
HEADS = {"student_head": "head", "teacher_head": "teacher.head"}
"""The ``shared`` arguments of a chunked term against the teacher's hidden states."""


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` checked: a positive integer, or ``None`` (the full-logits terms)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size = {chunk_size!r}: expected a positive integer (target positions per chunk) "
                         "or None / null (full logits)")
    return None if chunk_size is None else int(chunk_size)


def ce_term(weight: float = 1.0, chunk_size: int | None = 1024) -> Term:
    """The cross-entropy on the batch's target tokens (``"ce"``, over target positions): on the logits, or chunked
    from the student's hidden states (``chunk_size``)."""
    chunk = check_chunk_size(chunk_size)
    if chunk is None:
        return Term("ce", losses.cross_entropy, target="label", items="labelled", weight=float(weight))
    return Term("ce", chunked_loss, student="hidden", target="label", items="labelled", weight=float(weight),
                kwargs={"loss": losses.cross_entropy, "chunk_size": chunk}, shared=STUDENT_HEAD)


def token_terms(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    skew: float | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = 1024,
    token_weighting: str | None = None,
    uncertainty: str = "target",
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
) -> tuple[Term, ...]:
    """The token-level KD term (``"kd"``, over target positions) and, with ``ce_weight > 0``, the cross-entropy
    on the data's tokens (``"ce"``). Arguments as in :func:`lm_kd`.

    With ``chunk_size`` the KD term is ``chunked_loss(student "hidden", "teacher.hidden", loss=<the divergence's
    mentor.losses function>, chunk_size=..., <its hyper-parameters>)`` with the two output layers as ``shared``
    arguments; without it, the divergence on ``"logits"`` and ``"teacher.logits"``. With ``token_weighting`` the
    KD term's loss is :func:`mentor.lm.weighting.uncertainty_weighted` instead (same outputs and arguments, plus
    the weighting options and the target token ids, ``extra={"labels": "label"}``)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    chunk = check_chunk_size(chunk_size)
    weighting.check_options(token_weighting, uncertainty, hard_fraction, easy_weight)
    fn = make_divergence(divergence, temperature=float(temperature), beta=beta, alpha=skew)  # validates beta / skew
    kwargs = dict(fn.keywords)  # type: ignore[attr-defined]
    if divergence == "forward_kl":
        kwargs.pop("reverse", None)  # plain kl_div(temperature=T): what a teacher cache turns into sparse_kl_div
    if chunk is None:
        kd = Term("kd", fn.func, target="teacher.logits", items="labelled",  # type: ignore[attr-defined]
                  weight=float(kd_weight), kwargs=kwargs)
    else:
        kd = Term("kd", chunked_loss, student="hidden", target="teacher.hidden", items="labelled",
                  weight=float(kd_weight), kwargs={"loss": fn.func, **kwargs, "chunk_size": chunk},  # type: ignore[attr-defined]
                  shared=HEADS)
    if token_weighting is not None:
        options = {"rule": token_weighting, "measure": uncertainty, "hard_fraction": float(hard_fraction),
                   "easy_weight": float(easy_weight)}
        inner = {**kd.kwargs, "loss": kd.kwargs.get("loss", kd.loss)}
        kd = Term("kd", weighting.uncertainty_weighted, student=kd.student, target=kd.target, items="labelled",
                  weight=float(kd_weight), kwargs={**inner, **options}, extra={"labels": "label"}, shared=kd.shared)
    terms = [kd]
    if ce_weight > 0:
        terms.append(ce_term(ce_weight, chunk))
    return tuple(terms)


def lm_kd(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    skew: float | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = 1024,
    token_weighting: str | None = None,
    uncertainty: str = "target",
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
) -> Method:
    """Token-level KD of a causal LM on the data's sequences.

    Args:
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``, ``skew_reverse_kl`` or ``tvd``.
        temperature: Softmax temperature of both models (the loss is scaled by ``T^2``).
        beta: ``jsd`` only: the interpolation in ``[0, 1]`` (default 0.5; 0 is forward, 1 reverse KL).
        skew: The skew divergences only: the skew in ``[0, 1)`` (default 0.1).
        kd_weight: Weight of the KD term.
        ce_weight: Weight of the cross-entropy on the data's target tokens (0: none).
        chunk_size: Target positions per chunk of the losses (from hidden states; the full logits never exist), or
            ``None`` for the terms on the full logits.
        token_weighting: Weight each token's KD divergence by the teacher's uncertainty (see the module
            docstring): ``None`` (off, the default), ``"hard_easy"`` (ATKD's split) or ``"proportional"``. The
            split is per micro-batch (see the module docstring for what that means under accumulation).
        uncertainty: ``"target"`` (``1 - p_teacher(y)``, ATKD's) or ``"entropy"`` (normalised teacher entropy).
        hard_fraction: ``hard_easy``: the share of each micro-batch's target tokens that are hard, in ``(0, 1]``.
        easy_weight: ``hard_easy``: the easy tokens' share of the KD term, in ``[0, 1]`` (0: hard tokens only).
    """
    return Method(
        name="lm_kd",
        terms=token_terms(divergence, temperature, beta, skew, kd_weight, ce_weight, chunk_size, token_weighting,
                          uncertainty, hard_fraction, easy_weight),
        description="causal LM: token-level KD over target positions (forward/reverse KL, JSD, skew KL, TVD)",
    )
