import io
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from numpy.lib import format as npy
from onnx import helper

from onnxopt import data
from onnxopt.errors import DataError
from tests import graphs


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


# One large .npz is read a batch at a time (onnxopt.npz_stream); these compare it with np.load.


def identity_model(inputs) -> onnx.ModelProto:
    """Identity per input; ``inputs`` are (name, dtype, shape) triples."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    return graphs.model(nodes, inputs, [(f"{name}_out", dtype, shape) for name, dtype, shape in inputs])


def three_inputs(batch) -> onnx.ModelProto:
    return identity_model(
        [("x", np.float32, [batch, 4]), ("ids", np.int64, [batch, 5]), ("mask", np.bool_, [batch, 5])]
    )


def sample_arrays(n, rows=()):
    rng = np.random.default_rng(n)
    return {
        "x": rng.standard_normal((n, *rows, 4)).astype(np.float32),
        "ids": rng.integers(-(2**40), 2**40, (n, *rows, 5)),
        "mask": rng.random((n, *rows, 5)) < 0.5,
    }


def expected_batches(path, step, limit, per_sample):
    """The batches the whole-file reader gave: np.load's arrays cut at ``step`` rows (or one entry
    each), the batch that passes ``limit`` cut short."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    total = len(arrays["x"])
    cuts = [(i, i + 1) for i in range(total)] if per_sample else [(s, s + step) for s in range(0, total, step)]
    batches, seen = [], 0
    for start, stop in cuts:
        if limit is not None and seen >= limit:
            break
        batch = {k: (a[start] if per_sample else a[start:stop]) for k, a in arrays.items()}
        n = len(batch["x"]) if limit is None else min(len(batch["x"]), limit - seen)
        batches.append({k: v[:n] for k, v in batch.items()})
        seen += n
    return batches


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
            np.testing.assert_array_equal(g[k], w[k])
            assert g[k].flags.owndata and g[k].flags.writeable  # a copy, never a view of a reused buffer


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
@pytest.mark.parametrize("batch, step", [("n", data.DEFAULT_BATCH), (1, 1), (5, 5)])
@pytest.mark.parametrize("limit", [None, 0, 7, 13, 40, 100])
def test_one_file_streams_the_batches_np_load_gives(tmp_path, saver, batch, step, limit):
    path = tmp_path / "d.npz"
    saver(path, **sample_arrays(40))
    got = list(data.iter_feeds(path, three_inputs(batch), limit))
    assert_same_batches(got, expected_batches(path, step, limit, per_sample=False))
    assert sum(len(b["x"]) for b in got) == min(40, 40 if limit is None else limit)


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
@pytest.mark.parametrize("limit", [None, 5, 8])
def test_one_input_per_entry_streams_too(tmp_path, saver, limit):
    path = tmp_path / "d.npz"
    saver(path, **sample_arrays(6, rows=(2,)))  # six entries, each a whole input of batch 2
    got = data.load_feeds(path, three_inputs("n"), limit=limit)
    assert [len(b["x"]) for b in got] == {None: [2] * 6, 5: [2, 2, 1], 8: [2] * 4}[limit]
    assert_same_batches(got, expected_batches(path, None, limit, per_sample=True))


def refusal(path, model):
    with pytest.raises(DataError) as e:
        list(data.iter_feeds(path, model))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_fortran_order_arrays_are_read_whole(tmp_path, conv_model, saver):
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    saver(tmp_path / "f.npz", x=np.asfortranarray(x))
    got = data.load_feeds(tmp_path / "f.npz", conv_model)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), x)
    assert [len(b["x"]) for b in got] == [16, 4]


def test_unreadable_arrays_are_refused_in_one_line(tmp_path, conv_model):
    x = np.zeros((4, 3, 8, 8), np.float32)
    assert "holds Python objects" in refusal(save(tmp_path, "o.npz", x=np.array([None, 1], object)), conv_model)
    (tmp_path / "s.npz").write_bytes(save(tmp_path, "s.npz", x=x).read_bytes()[:-200])
    assert "not a readable .npz file" in refusal(tmp_path / "s.npz", conv_model)  # the file cut short
    scalar_model = identity_model([("x", np.float32, [])])
    assert "is a single value" in refusal(save(tmp_path, "0.npz", x=np.float32(1)), scalar_model)


def test_truncated_member_is_refused_before_any_batch(tmp_path, conv_model):
    npy_bytes = io.BytesIO()
    np.save(npy_bytes, np.ones((40, 3, 8, 8), np.float32))
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", npy_bytes.getvalue()[:-100])  # a consistent zip whose array lacks 100 bytes
    assert "member 'x.npy': it holds" in refusal(path, conv_model)


def test_corrupt_deflated_member_is_refused_when_reached(tmp_path, conv_model):
    x = np.random.default_rng(0).integers(0, 4, (40, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=x)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(range(64))
    path.write_bytes(bytes(raw))
    assert "not a readable .npz file (member 'x.npy'" in refusal(path, conv_model)


def write_big_npz(path, rows, row_shape, compression):
    """An .npz of one float32 array whose row i is all i, written a block at a time (never whole in memory)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *row_shape)}
    with zipfile.ZipFile(path, "w", compression) as z, z.open("x.npy", "w", force_zip64=True) as f:
        npy.write_array_header_1_0(f, header)
        for start in range(0, rows, 256):
            block = np.arange(start, min(start + 256, rows), dtype=np.float32)
            f.write(np.broadcast_to(block.reshape(-1, *[1] * len(row_shape)), (len(block), *row_shape)).tobytes())


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_memory_stays_near_a_batch_however_large_the_file(tmp_path, compression):
    rows, row_shape = 4096, (3, 64, 64)  # 201 MB of float32 once read
    path = tmp_path / "big.npz"
    write_big_npz(path, rows, row_shape, compression)
    model = identity_model([("x", np.float32, ["n", *row_shape])])
    batch_bytes = data.DEFAULT_BATCH * int(np.prod(row_shape)) * 4  # 786 kB
    tracemalloc.start()
    try:
        firsts = [float(b["x"][0, 0, 0, 0]) for b in data.iter_feeds(path, model)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert firsts == [float(s) for s in range(0, rows, data.DEFAULT_BATCH)]  # every batch read, in order
    # the batch being read, the one the consumer holds, read buffers; whole-file reading peaks at 201 MB
    assert peak < 5 * batch_bytes, f"peak {peak / 1e6:.1f} MB for batches of {batch_bytes / 1e6:.1f} MB"
