"""``rkd``: Relational Knowledge Distillation, distances and angles between the items' embeddings.

Park et al. 2019, "Relational Knowledge Distillation", https://arxiv.org/abs/1904.05068. Loss:
``CE + distance_weight * RKD-D + angle_weight * RKD-A`` on embeddings tapped from both models (default: the
penultimate features, the inputs of ``classifier``); the widths may differ, no projector is needed. The paper's
weights are 25 (distance) and 50 (angle).
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Feature, Method, Term


def rkd(
    student_layer: str = "classifier",
    teacher_layer: str = "classifier",
    inputs: bool = True,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Method:
    """Cross-entropy plus distance- and angle-wise relations of embeddings.

    Args:
        student_layer: Student module whose output (or input, with ``inputs``) is the embedding.
        teacher_layer: Teacher module that gives the embedding.
        inputs: Tap the modules' inputs instead of their outputs.
        distance_weight: Weight of RKD-D (>= 0).
        angle_weight: Weight of RKD-A (>= 0).
    """
    for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return Method(
        name="rkd",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled"),
            Term("rkd_distance", losses.rkd_distance, student="feat.emb", target="teacher.feat.emb",
                 reduction="batch", weight=distance_weight),
            Term("rkd_angle", losses.rkd_angle, student="feat.emb", target="teacher.feat.emb",
                 reduction="batch", weight=angle_weight),
        ),
        features=(Feature("emb", student=student_layer, teacher=teacher_layer, inputs=inputs),),
        description="labels + distances and angles between the items' embeddings (Park et al. 2019)",
    )
