"""Mixed precision on the CPU (bf16), and several fits with different precisions in one Python session."""

from __future__ import annotations

import torch

from mentor import recipes, teachers, train
from mentor.data import TensorData
from mentor.models import MLP


def _data() -> TensorData:
    g = torch.Generator().manual_seed(3)
    return TensorData(torch.randn(256, 40, generator=g), torch.randint(0, 10, (256,), generator=g))


def _fit(mixed_precision: str) -> train.FitResult:
    torch.manual_seed(0)
    teacher = MLP(hidden=[32])
    torch.manual_seed(1)
    return train.fit(MLP(hidden=[64]), recipes.hinton_kd(temperature=2.0, alpha=0.5), _data(),
                     teacher=teachers.Frozen(teacher), epochs=3, batch_size=32, optim=train.Optim(lr=1e-2),
                     mixed_precision=mixed_precision, log_every=1, progress=False)


def test_bf16_tracks_fp32_and_precisions_can_alternate_in_one_session() -> None:
    # No Accelerate state reset in this file: fit itself must allow bf16, then fp32, then bf16 again.
    bf16 = _fit("bf16")
    fp32 = _fit("no")
    bf16_again = _fit("bf16")
    first = {r: [h["loss"] for h in res.history if h["split"] == "train"] for r, res in
             (("bf16", bf16), ("fp32", fp32), ("bf16_again", bf16_again))}
    # Step 1: the same weights and batch; bf16 matmuls (8-bit mantissa) move the loss by well under 1%.
    assert abs(first["bf16"][0] - first["fp32"][0]) / first["fp32"][0] < 1e-2
    assert first["bf16"] == first["bf16_again"]  # deterministic on the CPU
    # The losses themselves are float32 (losses upcast half precision), and training still makes progress.
    assert first["bf16"][-1] < 0.8 * first["bf16"][0]
    assert all(p.dtype == torch.float32 for p in bf16.student.parameters())
