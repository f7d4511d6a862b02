"""Built-in data and models: MNIST-1D equals the mnist1d package's own generator; the transfer set is disjoint from
the test set and prefix-stable; models build from short names and dotted paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mentor import data, models


def test_standard_split_equals_mnist1d_make_dataset() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    train, test = data.mnist1d("train"), data.mnist1d("test")
    assert train.x.shape == (4000, 40) and test.x.shape == (1000, 40)
    np.testing.assert_allclose(train.x.numpy(), ref["x"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(test.x.numpy(), ref["x_test"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(train.y.numpy(), ref["y"])
    np.testing.assert_array_equal(test.y.numpy(), ref["y_test"])


def test_num_labelled_takes_a_prefix() -> None:
    full, part = data.mnist1d("train"), data.mnist1d("train", num_labelled=123)
    assert len(part) == 123
    assert torch.equal(part.x, full.x[:123])


def test_transfer_set_is_unlabelled_disjoint_and_prefix_stable() -> None:
    transfer = data.mnist1d_transfer(6000, seed=3)
    assert len(transfer) == 6000
    assert bool((transfer.y == data.UNLABELLED).all())
    test = data.mnist1d("test").x
    # No transfer sample equals (or nearly equals) a test sample: nearest distance is far from zero.
    dists = torch.cdist(transfer.x.double(), test.double())
    assert float(dists.min()) > 1e-3
    smaller = data.mnist1d_transfer(1000, seed=3)
    assert torch.equal(smaller.x, transfer.x[:1000])
    other = data.mnist1d_transfer(1000, seed=4)
    assert not torch.equal(other.x, smaller.x)
    labelled = data.mnist1d_transfer(1000, seed=3, with_labels=True)
    assert set(labelled.y.tolist()) == set(range(10))
    # Same normalisation as the standard set: overall mean near 0 and std near 1.
    assert abs(float(transfer.x.mean())) < 0.1 and abs(float(transfer.x.std()) - 1.0) < 0.1


def test_generation_leaves_global_rngs_untouched(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path))
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    data.mnist1d_transfer(10, seed=9)
    assert np.random.rand() == expected
    assert not list(tmp_path.glob("*.tmp"))


def test_check_data_messages() -> None:
    x = torch.zeros(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*item 2"):
        data.check_data(data.TensorData(x, torch.zeros(4, dtype=torch.long)), "train data")
    with pytest.raises(ValueError, match=r"label 10, out of range: expected 0\.\.9"):
        data.check_data(data.TensorData(torch.zeros(2, 3), torch.tensor([1, 10])), "train data", 10)
    with pytest.raises(ValueError, match="empty"):
        data.check_data(data.TensorData(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "train data")


@pytest.mark.parametrize(("name", "params"), [("mlp", 15210), ("cnn", 5210), ("gru", 3690)])
def test_builtin_models_shapes_and_sizes(name: str, params: int) -> None:
    model = models.build_model(name)
    out = model(torch.randn(3, 40))
    assert out.shape == (3, 10)
    # MLP: 40*100+100 + 100*100+100 + 100*10+10; CNN: 1*25*5+25 + 2*(25*25*3+25) + 125*10+10;
    # GRU: 3*32*(1+32) + 2*3*32 biases, + 32*10+10.
    assert models.count_parameters(model) == params


def test_dotted_path_model_and_errors() -> None:
    model = models.build_model("torch.nn.Linear", {"in_features": 40, "out_features": 10})
    assert isinstance(model, torch.nn.Linear)
    model = models.build_model("mentor.models:MLP", {"hidden": [8]})
    assert model(torch.randn(2, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        models.build_model("no_such_pkg.Model")
    with pytest.raises(ValueError, match="does not accept arguments"):
        models.build_model("mlp", {"widht": 3})
    with pytest.raises(ValueError, match="neither a built-in name"):
        models.build_model("resnet")
