"""Tests of mentor.views: the integer hash against a pure-Python reference, per-item seed determinism, shapes and
dtypes, the statistical property of each augmentation, batch-level mixing and the third-party transform adapter."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mentor import views as V

M64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15


def ref_mix64(v: int) -> int:
    """SplitMix64's output function in plain Python integers, reduced modulo 2^64 at every step."""
    v &= M64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & M64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & M64
    return v ^ (v >> 31)


def as_int64(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def ref_derive(seed: int, *words: int) -> int:
    h = ref_mix64((seed & M64) + GAMMA)
    for w in words:
        h = ref_mix64(((h ^ (w & M64)) + GAMMA) & M64)
    return as_int64(h)


def ref_uniform(seed: int, stream: int, j: int) -> float:
    key = ref_mix64(((seed & M64) ^ ref_mix64(stream + 0x5851F42D4C957F2D)) + GAMMA)
    return ((ref_mix64(key + (j + 1) * GAMMA) >> 41) + 0.5) / 2**23


def signals(b: int, *shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=torch.float64).to(dtype)


EDGE_SEEDS = [0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1, -(2**63), -123456789012345]


# ----------------------------------------------------------------------------------------------------------------
# the counter-based generator
# ----------------------------------------------------------------------------------------------------------------


def test_splitmix64_matches_python_reference_without_overflow() -> None:
    rng = np.random.default_rng(0)
    values = [*EDGE_SEEDS, *rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64).tolist()]
    got = V.splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [as_int64(ref_mix64(v)) for v in values]
    # the standard SplitMix64 sequence from state 0: 0xE220A8397B1DCDAF is its first output
    assert V.splitmix64(torch.tensor([as_int64(GAMMA)])).tolist() == [as_int64(0xE220A8397B1DCDAF)]


def test_derive_seeds_and_uniform_match_python_reference() -> None:
    seeds = torch.tensor(EDGE_SEEDS, dtype=torch.int64)
    got = V.derive_seeds(seeds, 7, -3, 2**40).tolist()
    assert got == [ref_derive(s, 7, -3, 2**40) for s in EDGE_SEEDS]
    u = V.uniform(seeds, stream=5, count=3)
    want = [[ref_uniform(s, 5, j) for j in range(3)] for s in EDGE_SEEDS]
    assert u.tolist() == want


def test_item_seeds_is_the_documented_function_and_separates_its_arguments() -> None:
    index = torch.arange(100)
    s = V.item_seeds(index, epoch=3, seed=42, view=1)
    assert s.tolist() == [ref_derive(i, 42, 3, 1) for i in range(100)]
    others = [V.item_seeds(index, 4, 42, 1), V.item_seeds(index, 3, 43, 1), V.item_seeds(index, 3, 42, 0)]
    for o in others:
        assert not bool((o == s).any())
    assert len(set(s.tolist())) == 100
    assert V.batch_seed(42, 3, 1) == ref_derive(42, 3, 1)


def test_uniform_and_randint_statistics() -> None:
    seeds = torch.arange(4000)
    u = V.uniform(seeds, stream=0, count=50)
    assert u.dtype == torch.float32 and u.shape == (4000, 50)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # neighbouring seeds, streams and counters are uncorrelated
    flat = u.double()
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1, 0], flat[1:, 0]]))[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([flat[:, 0], flat[:, 1]]))[0, 1])) < 0.05
    other = V.uniform(seeds, stream=1, count=1)[:, 0].double()
    assert abs(float(torch.corrcoef(torch.stack([flat[:, 0], other]))[0, 1])) < 0.05
    # a prefix of a longer request is the shorter request
    assert torch.equal(V.uniform(seeds[:5], 0, 3), u[:5, :3])
    r = V.randint(seeds, 0, 7, count=10)
    counts = torch.bincount(r.flatten(), minlength=7).double()
    assert int(r.min()) == 0 and int(r.max()) == 6
    expected = r.numel() / 7
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 6 degrees of freedom: p < 1e-4


def test_draws_leave_global_generators_alone() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    V.strong("signal")(signals(4, 2, 30), torch.arange(4))
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------------------------
# per-item determinism, shapes and dtypes
# ----------------------------------------------------------------------------------------------------------------

OPS: dict[str, V.Augmentation] = {
    "identity": V.Identity(),
    "noise": V.GaussianNoise(0.3),
    "noise_rel": V.GaussianNoise(0.3, relative=True),
    "shift": V.Shift(5),
    "shift_zeros": V.Shift(0.2, mode="zeros"),
    "scale": V.Scale(0.5, 1.5),
    "flip": V.Flip(0.5),
    "cutout": V.Cutout(4),
    "mask": V.RandomMask(0.3),
    "compose": V.Compose([V.Shift(3), V.GaussianNoise(0.1)]),
    "choice": V.RandomChoice([V.Shift(3), V.Scale(), V.Cutout(0.2)], weights=[1, 2, 1]),
    "randaug_signal": V.RandAugment(V.signal_ops(0.7), n=3),
    "randaug_image": V.RandAugment(V.image_ops(0.7), n=3),
    "weak_signal": V.weak("signal"),
    "strong_signal": V.strong("signal"),
    "weak_image": V.weak("image"),
    "strong_image": V.strong("image"),
}
SHAPES = {"signal_2d": (40,), "signal_3d": (3, 40), "image": (3, 12, 10)}


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("op_name", list(OPS))
def test_per_item_seed_determinism(op_name: str, shape_name: str) -> None:
    op, shape = OPS[op_name], SHAPES[shape_name]
    x = signals(8, *shape, seed=1)
    seeds = V.item_seeds(torch.arange(8), epoch=0, seed=9, view=1)
    out = op(x, seeds)
    assert out.shape == x.shape and out.dtype == x.dtype
    # the same items in another order, inside a larger batch with other items, under another global RNG state
    torch.manual_seed(1234)
    others = signals(5, *shape, seed=2)
    order = torch.tensor([5, 2, 7, 0, 3, 1, 6, 4])
    big_x = torch.cat([others[:3], x[order], others[3:]])
    big_s = torch.cat([torch.arange(100, 103), seeds[order], torch.arange(103, 105)])
    big = op(big_x, big_s)
    assert torch.equal(big[3:11], out[order])
    for i in (0, 6):  # batch of one
        assert torch.equal(op(x[i : i + 1], seeds[i : i + 1]), out[i : i + 1])
    # the input is never modified in place
    assert torch.equal(x, signals(8, *shape, seed=1))


@pytest.mark.parametrize("op_name", [k for k in OPS if k != "identity"])
def test_different_seeds_give_different_outputs(op_name: str) -> None:
    op = OPS[op_name]
    x = signals(32, 3, 12, 10, seed=3) if "image" in op_name else signals(32, 3, 40, seed=3)
    a = op(x, torch.arange(32))
    b = op(x, torch.arange(32) + 1000)
    changed = [not torch.equal(a[i], b[i]) for i in range(32)]
    assert sum(changed) >= 8  # a flip with p=0.5 agrees for about half the items


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op_name", ["noise", "noise_rel", "shift", "scale", "cutout", "mask", "strong_signal"])
def test_dtypes_preserved(op_name: str, dtype: torch.dtype) -> None:
    x = signals(4, 2, 16, dtype=dtype)
    out = OPS[op_name](x, torch.arange(4))
    assert out.dtype == dtype and out.shape == x.shape and bool(torch.isfinite(out.float()).all())


def test_integer_inputs() -> None:
    x = torch.arange(2 * 20).reshape(2, 20)
    assert V.Shift(3)(x, torch.arange(2)).dtype == torch.int64
    assert V.Cutout(4)(x, torch.arange(2)).dtype == torch.int64
    with pytest.raises(TypeError, match="floating-point"):
        V.GaussianNoise(0.1)(x, torch.arange(2))


# ----------------------------------------------------------------------------------------------------------------
# statistical properties of each augmentation
# ----------------------------------------------------------------------------------------------------------------


def test_gaussian_noise_std_and_independence() -> None:
    x = torch.zeros(64, 2, 500)
    noise = V.GaussianNoise(0.3)(x, torch.arange(64))
    assert abs(float(noise.std()) - 0.3) < 0.003
    assert abs(float(noise.mean())) < 0.003
    flat = noise.reshape(64, -1).double()
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(64, dtype=torch.bool)]
    # independent rows: the sample correlations spread like 1 / sqrt(n) around 0
    assert abs(float(off.mean())) < 0.01 and abs(float(off.std()) * 1000**0.5 - 1.0) < 0.1
    z = (flat / 0.3).flatten()
    assert abs(float((z**4).mean()) - 3.0) < 0.1  # Gaussian kurtosis


def test_relative_noise_scales_with_the_item() -> None:
    scales = torch.tensor([0.5, 1.0, 4.0])
    x = signals(3, 2000, seed=4) * scales[:, None]
    out = V.GaussianNoise(0.2, relative=True)(x, torch.arange(3))
    noise_std = (out - x).double().std(dim=1)
    item_std = x.double().std(dim=1)
    assert torch.allclose(noise_std / item_std, torch.full((3,), 0.2, dtype=torch.float64), rtol=0.05)


def _recover_roll(row: torch.Tensor, src: torch.Tensor, max_shift: int) -> int:
    matches = [s for s in range(-max_shift, max_shift + 1) if torch.equal(torch.roll(src, s, dims=-1), row)]
    assert len(matches) == 1
    return matches[0]


def test_circular_shift_is_a_roll_within_range_and_covers_it() -> None:
    n, m = 300, 4
    x = signals(n, 2, 40, seed=5)
    out = V.Shift(m)(x, torch.arange(n))
    shifts = [_recover_roll(out[i], x[i], m) for i in range(n)]
    assert set(shifts) == set(range(-m, m + 1))
    counts = np.bincount(np.array(shifts) + m)
    assert counts.min() > n / (2 * m + 1) / 2
    # a fraction of the length: round(0.1 * 40) = 4
    frac = V.Shift(0.1)(x, torch.arange(n))
    assert {_recover_roll(frac[i], x[i], 4) for i in range(n)} == set(range(-4, 5))


def test_zero_padded_shift() -> None:
    x = torch.arange(1, 21, dtype=torch.float32).repeat(200, 1)
    out = V.Shift(5, mode="zeros")(x, torch.arange(200))
    for i in range(200):
        row = out[i]
        zeros = int((row == 0).sum())
        assert zeros <= 5
        s = int(row[row != 0][0]) - 1  # first kept value tells the shift
        shift = zeros if row[0] == 0 else -s
        assert torch.equal(row, torch.cat([torch.zeros(shift), x[i, : 20 - shift]]) if shift >= 0
                           else torch.cat([x[i, -shift:], torch.zeros(-shift)]))


def test_image_shift_translates_both_axes() -> None:
    x = signals(100, 3, 8, 9, seed=6)
    out = V.Shift(2)(x, torch.arange(100))
    pairs = set()
    for i in range(100):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(x[i], (dy, dx), dims=(-2, -1)), out[i])]
        assert len(found) == 1
        pairs.add(found[0])
    assert len(pairs) > 15  # of 25 possible (dy, dx)


def test_scale_range() -> None:
    x = torch.ones(2000, 1, 5)
    out = V.Scale(0.7, 1.3)(x, torch.arange(2000))
    factors = out[:, 0, 0]
    assert torch.equal(out, factors[:, None, None].expand_as(out))
    assert float(factors.min()) >= 0.7 and float(factors.max()) <= 1.3
    assert float(factors.min()) < 0.71 and float(factors.max()) > 1.29
    assert abs(float(factors.mean()) - 1.0) < 0.01


def test_flip_probability() -> None:
    x = torch.arange(10.0).repeat(4000, 1)
    out = V.Flip(0.3)(x, torch.arange(4000))
    flipped = (out[:, 0] == 9).double()
    assert torch.equal(out[flipped.bool()], x[flipped.bool()].flip(-1))
    assert torch.equal(out[~flipped.bool()], x[~flipped.bool()])
    assert abs(float(flipped.mean()) - 0.3) < 0.03


def test_cutout_signal_length_and_position() -> None:
    x = torch.ones(500, 3, 40)
    out = V.Cutout(7)(x, torch.arange(500))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # all channels at the same positions
    starts = []
    for i in range(500):
        pos = torch.nonzero(zero[i, 0]).flatten()
        assert pos.numel() == 7 and int(pos[-1] - pos[0]) == 6  # one contiguous span
        starts.append(int(pos[0]))
    assert min(starts) == 0 and max(starts) == 33
    assert int((V.Cutout(0.25)(x, torch.arange(500)) == 0)[:, 0].sum(dim=1).unique()) == 10


def test_cutout_image_square() -> None:
    x = torch.ones(200, 2, 10, 12)
    out = V.Cutout(4, value=-1.0)(x, torch.arange(200))
    for i in range(200):
        cut = out[i, 0] == -1
        assert torch.equal(cut, out[i, 1] == -1)
        rows, cols = torch.nonzero(cut, as_tuple=True)
        assert cut.sum() == 16 and int(rows.max() - rows.min()) == 3 and int(cols.max() - cols.min()) == 3


def test_random_mask_fraction_and_spread() -> None:
    x = torch.ones(1000, 2, 50)
    out = V.RandomMask(0.3)(x, torch.arange(1000))
    masked = out == 0
    assert torch.equal(masked, masked[:, :1].expand_as(masked))
    assert torch.equal(masked[:, 0].sum(dim=1), torch.full((1000,), 15))
    per_position = masked[:, 0].double().mean(dim=0)
    assert float((per_position - 0.3).abs().max()) < 0.07
    img = V.RandomMask(0.25)(torch.ones(50, 3, 8, 8), torch.arange(50))
    assert torch.equal((img == 0).sum(dim=(2, 3)), torch.full((50, 3), 16))


def test_random_choice_weights() -> None:
    x = torch.zeros(3000, 4)
    marks: list[V.Augmentation] = [V.Scale(1.0, 1.0), V.Compose([V.Cutout(4, value=2.0)]), V.Cutout(4, value=3.0)]
    out = V.RandomChoice(marks, weights=[1.0, 0.0, 3.0])(x, torch.arange(3000))
    values = out[:, 0]
    assert int((values == 2).sum()) == 0
    assert abs(float((values == 3).double().mean()) - 0.75) < 0.03


def test_presets_and_magnitude_zero() -> None:
    x = signals(6, 2, 40, seed=7)
    assert torch.equal(V.RandAugment(V.signal_ops(0.0), n=2)(x, torch.arange(6)), x)
    assert len(V.strong("image").ops) == 4 and len(V.weak("signal").ops) == 2


# ----------------------------------------------------------------------------------------------------------------
# views
# ----------------------------------------------------------------------------------------------------------------


def test_views_reproduce_across_calls_and_differ_between_views() -> None:
    views = V.Views(teacher=V.weak("signal"), student=V.strong("signal"))
    x = signals(16, 1, 40, seed=8)
    index = torch.arange(100, 116)
    t1, s1 = views(x, index, epoch=2, seed=0)
    t2, s2 = views(x.clone(), index, epoch=2, seed=0)
    assert torch.equal(t1, t2) and torch.equal(s1, s2)
    assert torch.equal(t1, V.weak("signal")(x, V.item_seeds(index, 2, 0, V.Views.TEACHER)))
    assert torch.equal(s1, V.strong("signal")(x, V.item_seeds(index, 2, 0, V.Views.STUDENT)))
    t3, _ = views(x, index, epoch=3, seed=0)
    assert not torch.equal(t1, t3)
    assert V.Views().view(V.Views.TEACHER, x, index, 0, 0) is x
    same = V.Views(teacher=V.GaussianNoise(0.1), student=V.GaussianNoise(0.1))
    a, b = same(x, index, 0, 0)
    assert not torch.equal(a, b)  # same augmentation, different view ids
    with pytest.raises(ValueError, match="which"):
        views.view(2, x, index, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# batch-level mixing
# ----------------------------------------------------------------------------------------------------------------


def test_mixup_mixes_inputs_and_targets_consistently() -> None:
    x = signals(10, 2, 20, seed=9)
    mixed = V.mixup(x, alpha=0.4, seed=11)
    assert 0.0 <= mixed.lam <= 1.0 and sorted(mixed.perm.tolist()) == list(range(10))
    assert torch.allclose(mixed.inputs, mixed.lam * x + (1 - mixed.lam) * x[mixed.perm])
    again = V.mixup(x, alpha=0.4, seed=11)
    assert torch.equal(again.inputs, mixed.inputs) and again.lam == mixed.lam
    assert V.mixup(x, alpha=0.4, seed=12).lam != mixed.lam
    labels = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(0))
    target = V.mix_targets(labels, mixed, num_classes=4)
    assert torch.allclose(target.sum(dim=1), torch.ones(10))
    logits = signals(10, 4, seed=10)
    soft_ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    mixed_ce = mixed.lam * F.cross_entropy(logits, labels) + (1 - mixed.lam) * F.cross_entropy(
        logits, labels[mixed.perm]
    )
    assert torch.allclose(soft_ce, mixed_ce, atol=1e-6)
    probs = torch.softmax(logits, dim=1)
    assert torch.allclose(V.mix_targets(probs, mixed), mixed.lam * probs + (1 - mixed.lam) * probs[mixed.perm])


@pytest.mark.parametrize("shape", [(40,), (2, 40), (3, 16, 12)])
def test_cutmix_lambda_is_the_kept_fraction(shape: tuple[int, ...]) -> None:
    b = 12
    # item i holds the value i everywhere, so each output element tells which item it came from
    x = torch.arange(b, dtype=torch.float32).reshape(b, *([1] * len(shape))).expand(b, *shape).clone()
    seen_lams = set()
    for seed in range(20):
        mixed = V.cutmix(x, alpha=1.0, seed=seed)
        own = mixed.inputs == x
        other = mixed.inputs == x[mixed.perm]
        assert bool((own | other).all())
        moved = (~own).reshape(b, -1).double().mean(dim=1)
        fixed = mixed.perm == torch.arange(b)  # an item mixed with itself shows no change
        assert torch.allclose(moved[~fixed], torch.full_like(moved[~fixed], 1 - mixed.lam))
        seen_lams.add(round(mixed.lam, 3))
        t = torch.eye(b)
        assert torch.allclose(V.mix_targets(t, mixed).sum(dim=1), torch.ones(b))
    assert len(seen_lams) > 5


# ----------------------------------------------------------------------------------------------------------------
# third-party transforms
# ----------------------------------------------------------------------------------------------------------------


class ShimTransform:
    """Mimics a torchvision / timm transform: draws from torch's, Python's and NumPy's global generators."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        shift = int(torch.randint(-2, 3, ()).item())
        return torch.roll(img, shift, dims=-1) * (1 + random.random()) + float(np.random.rand())


def test_per_item_transform_adapter_with_a_shim() -> None:
    adapter = V.PerItemTransform(ShimTransform())
    x = signals(6, 3, 8, 8, seed=12)
    seeds = V.item_seeds(torch.arange(6), 0, 1, 0)

    def draws() -> tuple[float, float, float]:
        return float(torch.rand(())), random.random(), float(np.random.rand())

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    expected = draws()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    out = adapter(x, seeds)
    assert draws() == expected  # the caller's global generators are left as they were
    order = torch.tensor([3, 0, 5])
    assert torch.equal(adapter(x[order], seeds[order]), out[order])
    assert not torch.equal(adapter(x, seeds + 1), out)
    with pytest.raises(TypeError, match="callable"):
        V.PerItemTransform(3)  # type: ignore[arg-type]


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # an ABI mismatch raises errors other than ImportError
        return False
    return True


@pytest.mark.skipif(
    not _torchvision_available(),
    reason="torchvision is not installed here (PyPI's torchvision does not import beside the local CPU torch 2.13 "
    "build, see DEVELOPERS.md); the adapter is tested with a shim transform above",
)
def test_per_item_transform_with_torchvision() -> None:
    from torchvision.transforms import v2

    adapter = V.PerItemTransform(v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip()]))
    x = signals(5, 3, 8, 8, seed=13)
    seeds = torch.arange(5)
    out = adapter(x, seeds)
    assert out.shape == x.shape
    assert torch.equal(adapter(x[[4, 1]], seeds[[4, 1]]), out[[4, 1]])


# ----------------------------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: V.Shift(-1), "max_shift"),
        (lambda: V.Shift(1.5), "max_shift"),
        (lambda: V.Shift(2, mode="reflect"), "mode"),  # type: ignore[arg-type]
        (lambda: V.Cutout(-2), "size"),
        (lambda: V.Cutout(2.0), "size"),
        (lambda: V.RandomMask(1.5), "fraction"),
        (lambda: V.Scale(2.0, 1.0), "low"),
        (lambda: V.GaussianNoise(-0.1), "std"),
        (lambda: V.Flip(1.2), "p"),
        (lambda: V.RandAugment(V.signal_ops(), n=-1), "n"),
        (lambda: V.Compose([]), "at least one"),
        (lambda: V.RandomChoice([V.Identity()], weights=[1.0, 2.0]), "weights"),
        (lambda: V.signal_ops(1.5), "magnitude"),
        (lambda: V.weak("audio"), "kind"),  # type: ignore[arg-type]
        (lambda: V.strong("audio"), "kind"),  # type: ignore[arg-type]
        (lambda: V.mixup(torch.zeros(2, 3), alpha=0.0, seed=0), "alpha"),
        (lambda: V.cutmix(torch.zeros(2, 3), alpha=-1.0, seed=0), "alpha"),
        (lambda: V.mix_targets(torch.tensor([0, 1]), V.mixup(torch.zeros(2, 3), seed=0)), "num_classes"),
        (lambda: V.Shift(1)(torch.zeros(2, 3), torch.arange(3)), "seeds"),
        (lambda: V.Shift(1)(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64)), "seeds"),
        (lambda: V.Shift(1)(torch.zeros(2, 1, 1, 3, 3), torch.arange(2)), "shape"),
        (lambda: V.randint(torch.arange(2), 0, 0), "high"),
        (lambda: V.item_seeds(torch.arange(2), 2**64, 0, 0), "int64"),
    ],
)
def test_bad_arguments_raise_value_errors(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_seed_types_raise_type_errors() -> None:
    with pytest.raises(TypeError, match="seeds"):
        V.Shift(1)(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(TypeError, match="word"):
        V.derive_seeds(torch.arange(2), 1.5)  # type: ignore[arg-type]
