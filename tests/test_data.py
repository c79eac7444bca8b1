import numpy as np
import pytest

from onnxopt import data
from onnxopt.errors import DataError


def save(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_batches_along_the_sample_axis(tmp_path, conv_model):
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    batches = data.load_feeds(save(tmp_path, x=x), conv_model)
    assert [b["x"].shape[0] for b in batches] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_limit_and_folder(tmp_path, conv_model):
    x = np.zeros((10, 3, 8, 8), np.float32)
    save(tmp_path, "a.npz", x=x)
    save(tmp_path, "b.npz", x=x)
    assert sum(b["x"].shape[0] for b in data.load_feeds(tmp_path, conv_model)) == 20
    assert sum(b["x"].shape[0] for b in data.load_feeds(tmp_path, conv_model, limit=13)) == 13


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((2, 3, 8, 8), np.float32)}, "has \\['image'\\] which the model does not take"),
        ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "is float64, the model takes float32"),
        ({"x": np.zeros((2, 8, 8), np.float32)}, "has rank 3, the model takes rank 4"),
        ({"x": np.zeros((2, 1, 8, 8), np.float32)}, "dimension 1 must be 3"),
    ],
)
def test_mismatched_data_is_refused(tmp_path, conv_model, arrays, message):
    with pytest.raises(DataError, match=message):
        data.load_feeds(save(tmp_path, **arrays), conv_model)


def test_not_an_npz(tmp_path, conv_model):
    path = tmp_path / "d.npz"
    path.write_text("nope")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_feeds(path, conv_model)
