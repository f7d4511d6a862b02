"""``born_again``: self-distillation over generations.

Furlanello et al. 2018, "Born-Again Neural Networks", https://arxiv.org/abs/1805.04770. Generation 1 is trained
from the given teacher (or, with no teacher, on labels alone); the student of generation ``k`` then teaches the
student of generation ``k + 1``, which has the same architecture and a fresh initialisation. Each generation is a
full run of the loop and is reported on its own (``runs/<name>/gen<k>/``).
"""

from __future__ import annotations

from mentor import losses
from mentor.method import Method, Term


def born_again(generations: int = 3, temperature: float = 1.0, alpha: float = 0.5) -> Method:
    """Labels plus KD from the previous generation.

    Args:
        generations: Number of generations (>= 1).
        temperature: KD temperature (> 0); the paper uses 1.
        alpha: Weight of the KD term in ``[0, 1]`` (the cross-entropy gets ``1 - alpha``).
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    return Method(
        name="born_again",
        terms=(
            Term("ce", losses.cross_entropy, target="label", items="labelled", weight=1.0 - alpha),
            Term("kd", losses.kl_div, target="teacher.logits", weight=alpha, kwargs={"temperature": temperature}),
        ),
        generations=generations,
        description="self-distillation over N generations: generation k teaches k+1 (Furlanello et al. 2018)",
    )
