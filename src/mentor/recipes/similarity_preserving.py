"""``similarity_preserving``: the student keeps the teacher's pairwise similarities between items.

Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", https://arxiv.org/abs/1907.09682. Loss:
``CE + weight * ||G_s - G_t||_F^2 / B^2`` with ``G`` the row-normalised ``B x B`` Gram matrices of tapped features
(default: the penultimate features, the inputs of ``classifier``; widths may differ). The paper (and RepDistiller)
use a weight of 3000.
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Feature, Method, Term


def similarity_preserving(
    student_layer: str = "classifier", teacher_layer: str = "classifier", inputs: bool = True, weight: float = 3000.0
) -> Method:
    """Cross-entropy plus similarity preservation.

    Args:
        student_layer: Student module whose output (or input, with ``inputs``) is compared.
        teacher_layer: Teacher module to compare with.
        inputs: Tap the modules' inputs instead of their outputs.
        weight: Weight of the SP term (>= 0).
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    return Method(
        name="similarity_preserving",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("sp", losses.similarity_preserving, student="feat.sp", target="teacher.feat.sp",
                 reduction="batch", weight=weight),
        ),
        features=(Feature("sp", student=student_layer, teacher=teacher_layer, inputs=inputs),),
        description="labels + the teacher's pairwise similarities between items (Tung & Mori 2019)",
    )
