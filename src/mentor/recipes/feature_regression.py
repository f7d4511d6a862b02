"""``feature_regression``: the student learns to predict the teacher's features; its error is an anomaly score.

As in EfficientAD (Batzner et al. 2024, https://arxiv.org/abs/2303.14535) and student-teacher anomaly detection: a
student trained to regress a frozen teacher's features on normal data reproduces them well there and badly on
inputs unlike its training data, so the per-item discrepancy (:func:`mentor.eval.feature_discrepancy`) scores
anomalies. No labels are used; train it on unlabelled (normal) data. The projector maps the student's feature to
the teacher's shape and is part of the scorer (saved as ``projectors.safetensors`` beside the student).
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Feature, Method, Term


def feature_regression(
    student_layer: str = "classifier", teacher_layer: str = "classifier", inputs: bool = True,
    projector: str | None = "linear",
) -> Method:
    """Regress teacher features with ``hint_mse``.

    Args:
        student_layer: Student module whose output (or input, with ``inputs``) predicts the teacher's feature.
        teacher_layer: Teacher module whose feature is predicted.
        inputs: Tap the modules' inputs instead of their outputs.
        projector: ``"linear"``, ``"conv1x1"``, ``"mlp"``, or ``None`` when the shapes already agree.
    """
    return Method(
        name="feature_regression",
        terms=(Term("regress", losses.hint_mse, student="feat.f", target="teacher.feat.f"),),
        features=(Feature("f", student=student_layer, teacher=teacher_layer, projector=projector, inputs=inputs),),
        description="the student predicts teacher features; its per-item error scores anomalies (EfficientAD)",
    )
