"""``ofa``: One-for-All KD, student stages projected into the logit space and distilled there.

Hao et al. 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
https://arxiv.org/abs/2310.19444. Intermediate features of teacher and student of different families (CNN, MLP,
ViT) live in different spaces, so OFA compares them where every architecture agrees: the logit space. Each student
stage gets a small branch (a projector of kind ``"head"``: for a feature map a kernel-1 convolution, ReLU, global
average pooling and a linear layer to the classes; for a vector an MLP) whose logits are distilled against the
teacher's final logits with :func:`mentor.losses.ofa_loss`, the cross-entropy with the teacher's distribution whose
class weights are raised to ``eps`` after the label is added (adaptive target enhancement). The loss is
``ce_weight * CE + kd_weight * OFA(logits) + ofa_weight * sum_stages OFA(branch_k)``, the authors' defaults all 1
with ``eps = 1`` and ``T = 1`` (``eps = 1.5`` for some of their ImageNet pairs).

The branches are :class:`mentor.method.Feature` s without a teacher module: they train with the student, are saved
beside it (``projectors.safetensors``) and are left out of the exported student, like projectors. The authors'
branches for CNN students stack depthwise-separable convolutions that downsample to the last stage's resolution;
the ``"head"`` branch here is their minimal form (one kernel-1 convolution), adequate for small 1-D models.

The defaults tap the three convolutions of :class:`mentor.models.CNN1d`; for :class:`mentor.models.MLP` students
name its hidden activations, e.g. ``stages=["features.1", "features.3", "features.5"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mentor import losses
from mentor.method import Feature, Method, Term


def ofa(
    stages: Sequence[str] = ("conv1", "conv2", "conv3"),
    eps: float | Sequence[float] = 1.0,
    temperature: float = 1.0,
    ofa_weight: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    hidden: int | None = None,
    inputs: bool = False,
) -> Method:
    """Cross-entropy, OFA on the final logits, and OFA on a logit branch of each named student stage.

    Args:
        stages: Student modules whose outputs (or inputs, with ``inputs``) feed a branch into the logit space.
        eps: Target-enhancement exponent (> 0): one for every branch and the final logits, or one per stage plus
            one for the final logits (``len(stages) + 1`` values, the last for the logits).
        temperature: Softmax temperature (> 0) of the OFA terms.
        ofa_weight: Weight of each branch's OFA term (>= 0).
        kd_weight: Weight of the OFA term on the student's own logits (>= 0).
        ce_weight: Weight of the cross-entropy on labels (>= 0).
        hidden: Hidden width of each branch (``None``: ``max(channels, classes)``).
        inputs: Tap the stages' inputs instead of their outputs.
    """
    if isinstance(stages, str):
        raise TypeError(f"stages must be a list of module names, got the single string {stages!r} "
                        f"(write [{stages!r}])")
    stages = list(stages)
    if not stages:
        raise ValueError("stages is empty; expected at least one student module name")
    eps_list = [float(eps)] * (len(stages) + 1) if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if len(eps_list) != len(stages) + 1:
        raise ValueError(f"eps must be one number or {len(stages) + 1} numbers (one per stage, then one for the "
                         f"logits), got {list(eps)!r} for {len(stages)} stages")  # type: ignore[arg-type]
    for value in eps_list:
        if not value > 0:
            raise ValueError(f"eps must be > 0, got {value}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, value in (("ofa_weight", ofa_weight), ("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
        raise ValueError(f"hidden must be a positive integer or null, got {hidden!r}")
    features = tuple(Feature(f"ofa{i}", student=stage, teacher=None, projector="head", inputs=inputs, hidden=hidden)
                     for i, stage in enumerate(stages))

    def ofa_term(name: str, student: str, e: float, weight: float) -> Term:
        return Term(name, losses.ofa_loss, student=student, target="teacher.logits", items="labelled",
                    extra={"target": "label"}, kwargs={"eps": e, "temperature": temperature}, weight=weight)

    terms = [Term("ce", losses.cross_entropy, target="label", items="labelled", weight=ce_weight),
             ofa_term("kd", "logits", eps_list[-1], kd_weight)]
    terms += [ofa_term(f.name, f"feat.{f.name}", e, ofa_weight) for f, e in zip(features, eps_list, strict=False)]
    return Method(
        name="ofa",
        terms=tuple(terms),
        features=features,
        description="labels + OFA loss on the logits and on logit branches of student stages (Hao et al. 2023)",
    )
