"""``fitnet``: hints from an intermediate teacher layer, through a learned projector.

Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", https://arxiv.org/abs/1412.6550. The student's feature at
``student_layer`` is mapped by a projector (the paper's regressor) to the shape of the teacher's feature at
``teacher_layer``, and ``hint_mse`` pulls them together, next to the cross-entropy on labels and, optionally, KD on
the logits. The paper trains the hint first and KD second; this recipe trains them jointly (as RepDistiller and
mdistiller do), with separate weights. The projector trains with the student and is not part of the exported student.

The defaults tap the *inputs* of both models' ``classifier`` layer (the penultimate features): that works for any
pair of mentor's reference models, across architecture families (for ``CNN1d`` the input of ``classifier`` is the
flattened last feature map).
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Feature, Method, Term


def fitnet(
    student_layer: str = "classifier",
    teacher_layer: str = "classifier",
    inputs: bool = True,
    projector: str = "linear",
    hint_weight: float = 1.0,
    alpha: float = 0.0,
    temperature: float = 4.0,
) -> Method:
    """Cross-entropy plus a projected hint, and optionally KD.

    Args:
        student_layer: Student module whose output (or input, with ``inputs``) is the hint's student side.
        teacher_layer: Teacher module that gives the hint.
        inputs: Tap the modules' inputs instead of their outputs.
        projector: ``"linear"``, ``"conv1x1"`` or ``"mlp"``.
        hint_weight: Weight of the hint term (>= 0).
        alpha: Weight of the KD term in ``[0, 1]``; the cross-entropy gets ``1 - alpha``. 0 leaves KD out.
        temperature: KD temperature (> 0).
    """
    if hint_weight < 0:
        raise ValueError(f"hint_weight must be >= 0, got {hint_weight}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    terms = [
        Term("ce", losses.cross_entropy, target="label", items="labelled", weight=1.0 - alpha),
        Term("hint", losses.hint_mse, student="feat.hint", target="teacher.feat.hint", weight=hint_weight),
    ]
    if alpha > 0:
        terms.append(Term("kd", losses.kl_div, target="teacher.logits", weight=alpha,
                          kwargs={"temperature": temperature}))
    return Method(
        name="fitnet",
        terms=tuple(terms),
        features=(Feature("hint", student=student_layer, teacher=teacher_layer, projector=projector, inputs=inputs),),
        description="labels + an intermediate teacher feature through a learned projector (Romero et al. 2015)",
    )
