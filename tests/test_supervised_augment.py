"""``supervised(augment=...)``: the student's seeded input views, for training stronger teachers."""

from __future__ import annotations

import torch

from mentor import recipes, train, views
from mentor.data import TensorData
from mentor.models import MLP


class Recorder(torch.nn.Module):
    """An MLP that keeps every training input it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP(hidden=[8])
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def data(n: int = 32) -> TensorData:
    g = torch.Generator().manual_seed(3)
    return TensorData(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g))


def run(augment: str, seed: int = 0) -> Recorder:
    model = Recorder()
    train.fit(model, recipes.supervised(augment=augment), data(), epochs=2, batch_size=8, seed=seed, progress=False)
    return model


def test_presets_map_to_the_views_module() -> None:
    assert recipes.supervised().views is None
    weak = recipes.supervised(augment="weak").views
    assert isinstance(weak, views.Views) and isinstance(weak.teacher, views.Identity)
    x, seeds = torch.randn(4, 40), torch.arange(4)
    assert torch.equal(weak.student(x, seeds), views.weak("signal")(x, seeds))
    strong = recipes.supervised(augment="strong_image").views
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(strong.student(images, seeds[:2]), views.strong("image")(images, seeds[:2]))


def test_the_student_trains_on_the_seeded_weak_view_of_each_item() -> None:
    plain, augmented, again = run("none"), run("weak"), run("weak")
    assert len(plain.seen) == len(augmented.seen) == 8  # 2 epochs x 4 batches
    raw = data().x
    # Without augmentation every training input is a dataset row; with it, none is (shift and scale move them).
    rows = {tuple(r.tolist()) for r in raw}
    assert all(tuple(r.tolist()) in rows for batch in plain.seen for r in batch)
    assert not any(tuple(r.tolist()) in rows for batch in augmented.seen for r in batch)
    # The same seed gives the same views (a resumed run sees the same inputs); the weak view keeps each row's
    # values up to a circular shift and a scale in [0.9, 1.1]: its sorted absolute values match a row's, scaled.
    assert all(torch.equal(a, b) for a, b in zip(augmented.seen, again.seen, strict=True))
    for batch in augmented.seen:
        for r in batch:
            ratios = [(r.abs().sort().values / row.abs().sort().values) for row in raw]
            assert any(bool((q - q.mean()).abs().max() < 1e-4) and 0.9 - 1e-6 <= float(q.mean()) <= 1.1 + 1e-6
                       for q in ratios)


def test_preset_names_a_bad_preset() -> None:
    import pytest

    with pytest.raises(ValueError, match="augmentation preset 'medium': expected one of weak, strong, weak_image"):
        views.preset("medium")
