"""``attention_transfer``: the student matches the teacher's spatial attention maps at several layers.

Zagoruyko & Komodakis 2017, "Paying More Attention to Attention", https://arxiv.org/abs/1612.03928. Loss:
``CE + weight * sum_layers AT(f_s, f_t)`` (see :func:`mentor.losses.attention_transfer`: per item the squared
distance of the L2-normalised maps ``mean_c |f|^p``, summed over positions). Needs feature maps with the same
spatial size on both sides (channels may differ), e.g. a CNN student of a CNN teacher; the defaults tap the three
convolutions of :class:`mentor.models.CNN1d`.
"""

from __future__ import annotations

from collections.abc import Sequence

from mentor import losses
from mentor.method import Feature, Method, Term


def attention_transfer(
    student_layers: Sequence[str] = ("conv1", "conv2", "conv3"),
    teacher_layers: Sequence[str] = ("conv1", "conv2", "conv3"),
    weight: float = 1.0,
    p: float = 2.0,
) -> Method:
    """Cross-entropy plus attention transfer at pairs of layers.

    Args:
        student_layers: Student modules whose outputs are feature maps ``[B, C, ...]``.
        teacher_layers: Teacher modules paired with them, in order.
        weight: Weight of each layer's AT term (>= 0).
        p: Exponent of the attention map (>= 1); the paper uses 2.
    """
    student_layers, teacher_layers = list(student_layers), list(teacher_layers)
    if not student_layers or len(student_layers) != len(teacher_layers):
        raise ValueError(f"student_layers and teacher_layers must pair up, got {student_layers} and {teacher_layers}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    features = tuple(Feature(f"at{i}", student=s, teacher=t) for i, (s, t) in
                     enumerate(zip(student_layers, teacher_layers, strict=True)))
    terms = [Term("ce", losses.cross_entropy, target="label", items="labelled")]
    terms += [Term(f.name, losses.attention_transfer, student=f"feat.{f.name}", target=f"teacher.feat.{f.name}",
                   reduction="batch", weight=weight, kwargs={"p": p}) for f in features]
    return Method(
        name="attention_transfer",
        terms=tuple(terms),
        features=features,
        description="labels + the teacher's spatial attention maps at several layers (Zagoruyko & Komodakis 2017)",
    )
