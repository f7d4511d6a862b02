"""Tests of mentor.mvq (multi-codebook vector quantisation) and losses.codebook_cross_entropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mentor import losses, recipes, teachers
from mentor.data import TensorData
from mentor.models import MLP, CNN1d
from mentor.mvq import (
    MultiCodebookQuantizer,
    QuantizedTeacher,
    code_dtype,
    with_code_prediction,
    with_decoded_regression,
)
from mentor.train import Optim, fit


def _structured(n: int = 1500, dim: int = 12, seed: int = 0) -> torch.Tensor:
    """Low-rank signal through a ReLU, plus a little noise: vectors with structure a codebook sum can capture."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    a = torch.randn(4, dim, generator=g)
    return torch.relu(z @ a) + 0.05 * torch.randn(n, dim, generator=g)


# ------------------------------------------------------------------------------------------- quantizer basics


def test_encode_decode_shapes_and_dtypes() -> None:
    x = _structured(300, 12)
    q = MultiCodebookQuantizer(12, num_codebooks=3, codebook_size=16).fit(x, iters=2, seed=0)
    codes = q.encode(x)
    assert codes.shape == (300, 3) and codes.dtype == torch.uint8
    assert int(codes.max()) < 16
    assert q.bytes_per_vector == 3
    rec = q.decode(codes)
    assert rec.shape == (300, 12) and rec.dtype == torch.float32
    # leading dimensions are kept; any integer dtype decodes the same
    assert q.encode(x.reshape(3, 100, 12)).shape == (3, 100, 3)
    assert torch.equal(q.decode(codes.reshape(3, 100, 3)).reshape(300, 12), rec)
    assert torch.equal(q.decode(codes.long()), rec)
    assert torch.equal(q.decode(codes.to(torch.int16)), rec)
    # float64 input is coded like its float32 copy
    assert torch.equal(q.encode(x.double()), codes)


def test_code_dtype_is_the_smallest_that_fits() -> None:
    assert code_dtype(2) == code_dtype(256) == torch.uint8
    assert code_dtype(257) == code_dtype(32768) == torch.int16
    assert code_dtype(32769) == torch.int32
    q = MultiCodebookQuantizer(4, num_codebooks=2, codebook_size=300).fit(_structured(400, 4), iters=1, seed=0)
    assert q.encode(_structured(10, 4)).dtype == torch.int16 and q.bytes_per_vector == 4
    assert MultiCodebookQuantizer(8, 16, 256).bytes_per_vector == 16  # the 16 bytes per vector


def test_error_falls_with_codebooks_and_beats_single_codebook_kmeans() -> None:
    x = _structured()
    errors = {m: MultiCodebookQuantizer(12, m, 16).fit(x, iters=4, seed=0).relative_error(x) for m in (1, 2, 4, 8)}
    assert errors[1] > errors[2] > errors[4] > errors[8]
    assert errors[8] < 0.25 * errors[1], errors  # 8 bytes per vector vs one byte of plain k-means
    assert errors[1] < 1.0


def test_refinement_never_increases_training_error() -> None:
    x = _structured()
    q = MultiCodebookQuantizer(12, 4, 16).fit(x, iters=6, seed=1)
    assert len(q.history) == 7
    assert all(b <= a + 1e-6 for a, b in zip(q.history, q.history[1:], strict=False)), q.history
    assert q.history[-1] < q.history[0]


def test_relative_error_matches_its_formula() -> None:
    x = _structured(400)
    q = MultiCodebookQuantizer(12, 2, 8).fit(x, iters=2, seed=0)
    rec = q.decode(q.encode(x)).double()
    xd = x.double()
    expected = ((xd - rec) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert q.relative_error(x) == pytest.approx(float(expected), rel=1e-5)


def test_fit_is_deterministic_given_the_seed() -> None:
    x = _structured(500)
    a = MultiCodebookQuantizer(12, 3, 16).fit(x, iters=3, seed=7)
    b = MultiCodebookQuantizer(12, 3, 16).fit(x, iters=3, seed=7)
    c = MultiCodebookQuantizer(12, 3, 16).fit(x, iters=3, seed=8)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.mean, b.mean)
    assert torch.equal(a.encode(x), b.encode(x))
    assert not torch.equal(a.codebooks, c.codebooks)


def test_encoding_a_sum_of_entries_recovers_its_indices() -> None:
    g = torch.Generator().manual_seed(3)
    m, k, d = 4, 32, 24
    # each codebook in its own subspace: the code of a sum is unique, and greedy encoding finds it
    books = torch.zeros(m, k, d)
    for i in range(m):
        books[i, :, 6 * i:6 * i + 6] = torch.randn(k, 6, generator=g)
    mean = torch.randn(d, generator=g)
    q = MultiCodebookQuantizer.from_codebooks(books, mean)
    codes = torch.randint(0, k, (200, m), generator=g)
    x = mean + torch.stack([books[i, codes[:, i]] for i in range(m)]).sum(0)
    assert torch.equal(q.encode(x).long(), codes)
    # shared space, each codebook ten times smaller than the one before (residual structure)
    books = torch.randn(m, k, d, generator=g) * (0.1 ** torch.arange(m)).view(m, 1, 1)
    q = MultiCodebookQuantizer.from_codebooks(books)
    x = torch.stack([books[i, codes[:, i]] for i in range(m)]).sum(0)
    assert torch.equal(q.encode(x).long(), codes)
    assert torch.allclose(q.decode(codes), x, atol=1e-5)


def test_trained_codebooks_reencode_their_own_decodings() -> None:
    x = _structured()
    q = MultiCodebookQuantizer(12, 4, 16).fit(x, iters=3, seed=0)
    codes = q.encode(x)
    again = q.encode(q.decode(codes))
    # encoding is approximate for trained (not orthogonal) codebooks, but a decoded vector, which has an exact
    # code, is coded far better than the original vectors, mostly with that very code
    assert q.relative_error(q.decode(codes)) < 0.2 * q.relative_error(x)
    assert (again == codes).float().mean() > 0.8


def test_expected_decode_and_onehot() -> None:
    x = _structured(200)
    q = MultiCodebookQuantizer(12, 3, 8).fit(x, iters=1, seed=0)
    codes = q.encode(x)
    onehot = q.onehot(codes)
    assert onehot.shape == (200, 24) and torch.equal(onehot.sum(1), torch.full((200,), 3.0))
    assert torch.equal(onehot.reshape(200, 3, 8).argmax(-1), codes.long())
    # very confident logits decode to the coded vector, flat or [N, M, K]
    assert torch.allclose(q.expected_decode(onehot * 100.0), q.decode(codes), atol=1e-4)
    assert torch.allclose(q.expected_decode((onehot * 100.0).reshape(200, 3, 8)), q.decode(codes), atol=1e-4)
    # uniform logits give the mean of each codebook
    uniform = q.expected_decode(torch.zeros(1, 24))
    assert torch.allclose(uniform[0], q.mean + q.codebooks.mean(1).sum(0), atol=1e-5)


# ------------------------------------------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = _structured(400)
    q = MultiCodebookQuantizer(12, 3, 16).fit(x, iters=2, seed=0)
    path = tmp_path / "sub" / "q.safetensors"
    q.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["q.safetensors"]  # no temporary file left behind
    r = MultiCodebookQuantizer.load(path)
    assert (r.dim, r.num_codebooks, r.codebook_size) == (12, 3, 16)
    assert torch.equal(r.codebooks, q.codebooks) and torch.equal(r.mean, q.mean)
    assert torch.equal(r.encode(x), q.encode(x))
    assert r.metadata() == q.metadata()
    assert q.metadata()["bytes_per_vector"] == 3 and q.metadata()["code_dtype"] == "uint8"


def test_load_rejects_foreign_or_inconsistent_files(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a mentor MVQ file"):
        MultiCodebookQuantizer.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MultiCodebookQuantizer.load(garbage)
    q = MultiCodebookQuantizer(4, 2, 4).fit(_structured(50, 4), iters=1, seed=0)
    meta = {"mentor.mvq": '{"format": "mentor.mvq", "version": 1, "dim": 5, "num_codebooks": 2, '
                          '"codebook_size": 4}'}
    bad = tmp_path / "bad.safetensors"
    save_file({"codebooks": q.codebooks, "mean": q.mean}, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="do not match the metadata"):
        MultiCodebookQuantizer.load(bad)
    with pytest.raises(RuntimeError, match="fit"):
        MultiCodebookQuantizer(4, 2, 4).save(tmp_path / "unfitted.safetensors")
    assert not (tmp_path / "unfitted.safetensors").exists()


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"dim": 0}, "dim"), ({"dim": 2.5}, "dim"), ({"num_codebooks": 0}, "num_codebooks"),
     ({"codebook_size": 1}, "codebook_size"), ({"codebook_size": True}, "codebook_size")],
)
def test_bad_sizes_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"dim": 4, "num_codebooks": 2, "codebook_size": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        MultiCodebookQuantizer(**args)  # type: ignore[arg-type]


def test_bad_fit_encode_decode_arguments_name_the_argument() -> None:
    q = MultiCodebookQuantizer(4, 2, 4)
    x = _structured(50, 4)
    with pytest.raises(RuntimeError, match="fit"):
        q.encode(x)
    with pytest.raises(ValueError, match="features"):
        q.fit(_structured(50, 5))
    with pytest.raises(ValueError, match="features"):
        q.fit(x.long())
    with pytest.raises(ValueError, match="at least 2"):
        q.fit(x[:1])
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q.fit(bad)
    with pytest.raises(ValueError, match="iters"):
        q.fit(x, iters=-1)
    with pytest.raises(ValueError, match="kmeans_iters"):
        q.fit(x, kmeans_iters=0)
    with pytest.raises(ValueError, match="seed"):
        q.fit(x, seed=1.5)  # type: ignore[arg-type]
    q.fit(x, iters=1)
    with pytest.raises(ValueError, match="refine_iters"):
        q.encode(x, refine_iters=-1)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4\]"):
        q.encode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.3"):
        q.decode(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="codes must have shape"):
        q.decode(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="codes must be an integer tensor"):
        q.decode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="logits"):
        q.expected_decode(torch.zeros(2, 7))


# ------------------------------------------------------------------------------------------------------- loss


def np_codebook_ce(logits: np.ndarray, codes: np.ndarray, mask: np.ndarray | None = None,
                   num_items: float | None = None) -> float:
    """float64 reference: sum over codebooks of -log softmax at the code, summed over kept items, / N."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_p, codes[..., None].astype(np.int64), axis=-1)[..., 0]
    per_item = -picked.sum(axis=-1)
    keep = np.ones(per_item.shape, bool) if mask is None else mask
    n = max(int(keep.sum()), 1) if num_items is None else num_items
    return float(per_item[keep].sum() / n)


@pytest.mark.parametrize("lead", [(6,), (2, 5)])
def test_codebook_cross_entropy_matches_numpy(lead: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    m, k = 4, 7
    logits = torch.randn(*lead, m, k, generator=g, dtype=torch.float64) * 3
    codes = torch.randint(0, k, (*lead, m), generator=g).to(torch.uint8)
    ref = np_codebook_ce(logits.numpy(), codes.numpy())
    assert losses.codebook_cross_entropy(logits, codes).item() == pytest.approx(ref, rel=1e-12)
    # flat [..., M * K] logits (codebook-major) give the same value
    flat = logits.reshape(*lead, m * k)
    assert losses.codebook_cross_entropy(flat, codes).item() == pytest.approx(ref, rel=1e-12)
    # mask and explicit normaliser
    mask = torch.rand(lead, generator=g) > 0.4
    mask.view(-1)[0] = True
    ref_masked = np_codebook_ce(logits.numpy(), codes.numpy(), mask.numpy(), num_items=11.0)
    got = losses.codebook_cross_entropy(logits, codes.long(), mask=mask, num_items=11.0)
    assert got.item() == pytest.approx(ref_masked, rel=1e-12)
    got_t = losses.codebook_cross_entropy(logits, codes, mask=mask, num_items=torch.tensor(11.0))
    assert got_t.item() == pytest.approx(ref_masked, rel=1e-12)
    ref_default = np_codebook_ce(logits.numpy(), codes.numpy(), mask.numpy())
    assert losses.codebook_cross_entropy(logits, codes, mask=mask).item() == pytest.approx(ref_default, rel=1e-12)
    # without a mask, num_items=2 * items halves the mean
    items = int(np.prod(lead))
    assert losses.codebook_cross_entropy(logits, codes, num_items=2 * items).item() == pytest.approx(ref / 2)


def test_codebook_cross_entropy_half_precision_and_gradient_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 3, 5, generator=g)
    codes = torch.randint(0, 5, (8, 3), generator=g)
    out = losses.codebook_cross_entropy(logits.to(torch.bfloat16), codes)
    assert out.dtype == torch.float32
    ref = np_codebook_ce(logits.to(torch.bfloat16).float().numpy(), codes.numpy())
    assert out.item() == pytest.approx(ref, rel=1e-5)
    # two micro-batches normalised by the whole batch give the gradient of one batch
    a = logits.clone().requires_grad_(True)
    losses.codebook_cross_entropy(a, codes).backward()
    b = logits.clone().requires_grad_(True)
    for part in (slice(0, 3), slice(3, 8)):
        losses.codebook_cross_entropy(b[part], codes[part], num_items=8).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_codebook_cross_entropy_bad_arguments() -> None:
    logits = torch.zeros(4, 3, 5)
    codes = torch.zeros(4, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="codes"):
        losses.codebook_cross_entropy(logits, codes.float())
    with pytest.raises(ValueError, match="student_logits shape"):
        losses.codebook_cross_entropy(torch.zeros(4, 2, 5), codes)
    with pytest.raises(ValueError, match="student_logits shape"):
        losses.codebook_cross_entropy(torch.zeros(4, 16), codes)
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.4"):
        losses.codebook_cross_entropy(logits, codes + 5)
    with pytest.raises(ValueError, match="mask shape"):
        losses.codebook_cross_entropy(logits, codes, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_items"):
        losses.codebook_cross_entropy(logits, codes, num_items=0)


# -------------------------------------------------------------------------------------------- in the loop


def _teacher_and_quantizer() -> tuple[CNN1d, MultiCodebookQuantizer, TensorData]:
    torch.manual_seed(1)
    teacher = CNN1d(channels=4).eval()
    g = torch.Generator().manual_seed(2)
    data = TensorData(torch.randn(96, 40, generator=g), torch.full((96,), -1))
    with torch.no_grad():
        h = data.x.reshape(96, 1, -1)
        for conv in (teacher.conv1, teacher.conv2, teacher.conv3):
            h = torch.relu(conv(h))
    q = MultiCodebookQuantizer(20, num_codebooks=4, codebook_size=8).fit(h.flatten(1), iters=2, seed=0)
    return teacher, q, data


def test_quantized_teacher_outputs_codes_of_its_feature() -> None:
    teacher, q, data = _teacher_and_quantizer()
    wrapped = QuantizedTeacher(teacher, "classifier", q, inputs=True)
    out = teachers.Frozen(wrapped).targets(data.x[:10])
    with torch.no_grad():
        h = data.x[:10].reshape(10, 1, -1)
        for conv in (teacher.conv1, teacher.conv2, teacher.conv3):
            h = torch.relu(conv(h))
        logits = teacher(data.x[:10])
    assert torch.equal(out["logits"], logits)
    assert out["codes"].dtype == torch.uint8 and torch.equal(out["codes"], q.encode(h.flatten(1)))
    with pytest.raises(ValueError, match="fitted"):
        QuantizedTeacher(teacher, "classifier", MultiCodebookQuantizer(20, 4, 8))


def test_code_prediction_and_decoded_regression_train_in_the_loop() -> None:
    teacher, q, data = _teacher_and_quantizer()
    frozen = teachers.Frozen(QuantizedTeacher(teacher, "classifier", q, inputs=True))
    for method in (with_code_prediction(recipes.transfer_kd(4.0), "features", weight=0.25),
                   with_decoded_regression(recipes.transfer_kd(4.0), "features", weight=0.1)):
        torch.manual_seed(0)
        student = MLP(hidden=(32,))
        result = fit(student, method, data, teacher=frozen, epochs=15, batch_size=32, optim=Optim(lr=1e-2),
                     log_every=1, progress=False, seed=0)
        name = method.terms[-1].name
        rows = [r for r in result.history if r.get("split") == "train"]
        first, last = rows[0][f"loss/{name}"], rows[-1][f"loss/{name}"]
        assert last < 0.7 * first, (name, first, last)
        assert result.projectors is not None
        width = 4 * 8 if name == "mvq_ce" else 20
        assert result.projectors[name].net.out_features == width  # type: ignore[index, union-attr]
