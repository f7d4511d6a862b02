"""``simkd``: the student's penultimate feature, projected to the teacher's width, feeds the teacher's classifier.

Chen et al. 2022, "Knowledge Distillation with the Reused Teacher Classifier", https://arxiv.org/abs/2203.14001.
A projector maps the student's penultimate feature to the teacher's penultimate width and is trained (with the
student's backbone) to reproduce the teacher's penultimate feature (``hint_mse``); the teacher's classifier is
reused, frozen, on top. What SimKD deploys, and therefore what is evaluated and exported, is the composite
*student backbone -> projector -> teacher classifier*.

The composite is a model of its own, built before training by :func:`simkd_student`: a copy of the student whose
classifier module (``student_layer``) is replaced by a :class:`SimKDHead` (the projector, then a frozen copy of the
teacher's classifier at ``teacher_layer``). It is what ``fit`` trains and evaluates and what ``student.safetensors``
holds; ``mentor train`` builds it when ``recipe.name`` is ``simkd`` (:func:`mentor.run.build_student`)::

    student = simkd_student(MLP(), teacher_net, train_data.x[:2])          # composite
    result = fit(student, simkd(), train_data, teacher=Frozen(teacher_net))

The method's one feature compares the input of the composite's ``<student_layer>.teacher_head`` (the projected
feature) with the input of the teacher's ``teacher_layer``; fitting a plain student with it fails naming the
missing module. The paper trains with the feature loss alone (``ce_weight=0``), which needs no labels.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from mentor import losses
from mentor.method import Feature, Method, Term
from mentor.taps import PROJECTOR_KINDS, Taps, build_projector, feature_shapes

__all__ = ["SimKDHead", "simkd", "simkd_student"]


class SimKDHead(nn.Module):
    """``teacher_head(projector(f))``: the classifier of a SimKD student, the teacher's part frozen.

    ``train()`` keeps ``teacher_head`` in eval mode (its normalisation or dropout layers, if any, stay as the
    teacher used them), and its parameters never require gradients.

    Args:
        projector: Maps the student's penultimate feature ``[B, *s]`` to the teacher's ``[B, *t]``.
        teacher_head: The teacher's classifier (a copy; frozen here).
    """

    def __init__(self, projector: nn.Module, teacher_head: nn.Module) -> None:
        super().__init__()
        self.projector = projector
        self.teacher_head = teacher_head
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.teacher_head.eval()

    def forward(self, feature: Tensor) -> Tensor:
        """``[B, *s] -> [B, num_classes]``."""
        return self.teacher_head(self.projector(feature))

    def train(self, mode: bool = True) -> SimKDHead:
        super().train(mode)
        self.teacher_head.eval()
        return self


def simkd_student(
    student: nn.Module,
    teacher: nn.Module,
    example: Tensor,
    *,
    student_layer: str = "classifier",
    teacher_layer: str = "classifier",
    projector: str = "mlp",
    hidden: int | None = None,
) -> nn.Module:
    """The SimKD composite: a copy of ``student`` with its classifier replaced by projector + teacher classifier.

    Args:
        student: The plain student (not modified).
        teacher: The teacher network (not modified; its classifier is copied and frozen).
        example: A batch both models accept, ``[B, ...]``, for the feature widths.
        student_layer: The student's classifier module; its input is the penultimate feature.
        teacher_layer: The teacher's classifier module, reused; its input is the teacher's penultimate feature.
        projector: ``"linear"`` or ``"mlp"`` (the paper's projector is a small non-linear bottleneck), or any
            kind of :func:`mentor.taps.build_projector` that maps the two shapes.
        hidden: Hidden width of an ``"mlp"`` projector.

    Returns:
        The composite student (float32, on the CPU like the inputs), with ``<student_layer>`` a :class:`SimKDHead`.

    Raises:
        ValueError: A layer name is not a module of its model (the message lists the valid names), or the
            projector cannot map the shapes.
    """
    s_name = Taps(student, [student_layer]).resolved[student_layer]
    t_name = Taps(teacher, [teacher_layer]).resolved[teacher_layer]
    s_shape = feature_shapes(student, [s_name], example, inputs=True)[s_name]
    t_shape = feature_shapes(teacher, [t_name], example, inputs=True)[t_name]
    head = copy.deepcopy(teacher.get_submodule(t_name))
    proj = build_projector(projector, s_shape, t_shape, hidden=hidden if projector in ("mlp", "head") else None)
    composite = copy.deepcopy(student)
    composite.set_submodule(s_name, SimKDHead(proj, head))
    return composite


def simkd(
    student_layer: str = "classifier",
    teacher_layer: str = "classifier",
    projector: str = "mlp",
    hidden: int | None = None,
    weight: float = 1.0,
    ce_weight: float = 0.0,
) -> Method:
    """SimKD's feature loss on the projected penultimate feature (train a :func:`simkd_student` composite with it).

    Args:
        student_layer: The student's classifier module (its input is the penultimate feature).
        teacher_layer: The teacher's classifier module, reused frozen.
        projector: Projector kind of the composite (read by :func:`simkd_student`; see there).
        hidden: Hidden width of an ``"mlp"`` projector (read by :func:`simkd_student`).
        weight: Weight of the feature term (>= 0).
        ce_weight: Weight of a cross-entropy on the composite's logits (>= 0; the paper: 0).
    """
    if weight < 0 or ce_weight < 0:
        raise ValueError(f"weight and ce_weight must be >= 0, got {weight} and {ce_weight}")
    if weight == 0 and ce_weight == 0:
        raise ValueError("weight and ce_weight are both 0: nothing would train")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
        raise ValueError(f"hidden must be a positive integer or null, got {hidden!r}")
    if projector not in PROJECTOR_KINDS:
        raise ValueError(f"projector {projector!r} is not one of {', '.join(repr(k) for k in PROJECTOR_KINDS)}")
    terms = []
    if weight > 0:
        terms.append(Term("simkd", losses.hint_mse, student="feat.simkd", target="teacher.feat.simkd", weight=weight))
    if ce_weight > 0:
        terms.append(Term("ce", losses.cross_entropy, target="label", items="labelled", weight=ce_weight))
    return Method(
        name="simkd",
        terms=tuple(terms),
        features=(Feature("simkd", student=f"{student_layer}.teacher_head", teacher=teacher_layer, inputs=True),),
        description="student feature projected into the teacher's frozen classifier (Chen et al. 2022)",
    )
