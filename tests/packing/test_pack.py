import dataclasses
import gzip
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import io
from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.packing import container, huffman, sharing, sparse
from onnxopt.packing import pack as P
from onnxopt.packing.container import Encoding
from onnxopt.packing.native import codebook_gather, sparse_initializers
from onnxopt.packing.policy import Policy, default_settings, find_weights
from tests import graphs

MODELS = Path(__file__).resolve().parents[2] / "models"
S = P.TensorSetting
WEIGHTS = ("conv_w", "fc_w", "mm_w", "emb", "zeros_w", "const_w")


def tiny_model(dtype=np.float32) -> onnx.ModelProto:
    """Conv -> Gemm(transB) -> Relu -> MatMul, and Gather embedding -> MatMul(all zeros) -> MatMul(one value)."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("MatMul", ["r", "mm_w"], ["y"]),
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "zeros_w"], ["z0"]),
        helper.make_node("Add", ["z0", "e8"], ["z1"]),
        helper.make_node("MatMul", ["z1", "const_w"], ["z"]),
    ]
    inits = [("conv_w", graphs.rand(8, 3, 3, 3, seed=1)), ("conv_b", graphs.rand(8, seed=2)),
             ("fc_w", graphs.rand(16, 8 * 4 * 4, seed=3) * np.linspace(0.1, 3, 16, dtype=np.float32)[:, None]),
             ("fc_b", graphs.rand(16, seed=4)), ("mm_w", graphs.rand(16, 5, seed=5)),
             ("emb", graphs.rand(40, 12, seed=6)), ("zeros_w", np.zeros((12, 6), np.float32)),
             ("e8", graphs.rand(6, seed=7)), ("const_w", np.full((6, 4), 0.37, np.float32))]
    inits = [(n, a.astype(dtype)) for n, a in inits]
    return graphs.model(nodes, [("x", dtype, [2, 3, 4, 4]), ("ids", np.int64, [2, 3])],
                        [("y", dtype, [2, 5]), ("z", dtype, [2, 3, 4])], inits)


def feeds(dtype=np.float32) -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, 3, 4, 4)).astype(dtype), "ids": rng.integers(0, 40, (2, 3))}


def run(model: onnx.ModelProto, inputs: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def settings(bits=8, sparsity=0.0, per_channel=True, names=WEIGHTS) -> dict:
    return {n: S(bits, sparsity, per_channel) for n in names}


def inits(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def one_line_error(data: bytes, match: str = "") -> str:
    with pytest.raises(UnsupportedModelError, match=match) as e:
        P.unpack(data)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("bits,sparsity,per_channel", [
    (8, 0.0, True), (8, 0.5, False), (2, 0.95, True), (5, 0.5, True), (3, 0.0, False), (4, 0.95, False), (1, 0.0, True),
])
def test_unpack_equals_quantize_model_bit_for_bit(model, bits, sparsity, per_channel):
    s = settings(bits, sparsity, per_channel)
    data, report = P.pack(model, s)
    unpacked, (quantized, stats) = P.unpack(data), P.quantize_model(model, s)
    for name, t in inits(quantized).items():
        assert inits(unpacked)[name].raw_data == t.raw_data, name
    assert unpacked == quantized  # graph, every other field, initializer order
    for name in ("conv_b", "fc_b", "e8"):  # no setting: untouched
        assert inits(unpacked)[name] == inits(model)[name]
    assert report["tensors"]["fc_w"].get("axis") == (0 if per_channel else None)  # Gemm transB: rows
    assert report["tensors"]["mm_w"].get("axis") == (1 if per_channel else None)
    assert report["tensors"]["emb"].get("axis") == (1 if per_channel else None)  # features, not tokens
    want = Encoding.SPARSE_SHARED if sparsity else Encoding.SHARED
    assert {n: st.encoding for n, st in stats.items() if n not in ("zeros_w", "const_w")} == dict.fromkeys(
        ("conv_w", "fc_w", "mm_w", "emb"), want)
    fc = numpy_helper.to_array(inits(unpacked)["fc_w"])
    assert len(np.unique(fc[fc != 0])) <= (16 if per_channel else 1) << bits
    assert np.mean(fc == 0) == pytest.approx(sparsity, abs=0.01)


def test_degenerate_tensors_are_exact(model):
    data, report = P.pack(model, settings(3, 0.0))
    got = inits(P.unpack(data))
    assert not numpy_helper.to_array(got["zeros_w"]).any()
    assert np.all(numpy_helper.to_array(got["const_w"]) == np.float32(0.37))
    _, records = container.read(data)
    const = next(r for r in records if r.name == "const_w")
    assert const.meta == {"axis": 1, "bits": 3}
    assert np.frombuffer(const.streams["codebook"], "<f4").tolist() == [np.float32(0.37)] * 4  # 1 per column
    assert huffman.decode(const.streams["codebook_sizes"]).tolist() == [0, 0, 0, 0]
    assert report["tensors"]["const_w"]["shared_bytes"] == -(-24 * 3 // 8) + 16


def test_few_distinct_values_are_lossless():
    w = np.array([[-1.5, 0.25, 0.25, 2.0], [-1.5, 2.0, 7.0, 0.25]], np.float32)
    m = graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, [1, 2])],
                     [("y", np.float32, [1, 4])], [("w", w)])
    quantized, stats = P.quantize_model(m, {"w": S(2, per_channel=False)})
    assert numpy_helper.to_array(inits(quantized)["w"]).tolist() == w.tolist()
    assert stats["w"].rel_error == 0 and stats["w"].centroids == 4


def test_rebuild_equals_sharing_reconstruct():
    w = graphs.rand(6, 50, seed=9) * np.arange(1, 7, dtype=np.float32)[:, None]
    for axis, sparsity in [(None, 0.0), (0, 0.0), (1, 0.6), (None, 0.6)]:
        q = P.quantize_tensor(w, S(3, sparsity), axis)
        mask = sharing.prune(w, sparsity) if sparsity else None
        expect = sharing.reconstruct(sharing.share(w, 3, axis=axis, mask=mask))
        assert q.values.tobytes() == expect.tobytes()


def test_sparse_streams_match_the_documented_example(monkeypatch):
    w = np.zeros(30, np.float32)
    w[[0, 6, 7, 20]] = [1.0, -2.0, 3.0, 4.0]
    m = graphs.model([helper.make_node("Mul", ["x", "w"], ["y"])], [("x", np.float32, [30])],
                     [("y", np.float32, [30])], [("w", w)])
    monkeypatch.setattr(P, "INDEX_BITS", range(2, 3))
    data, _ = P.pack(m, {"w": S(2, 0.5)})
    record = container.read(data)[1][0]
    assert record.encoding is Encoding.SPARSE_SHARED
    assert record.meta == {"bits": 2, "entries": 10, "index_bits": 2, "kept": 4}
    assert huffman.decode(record.streams["gaps"]).tolist() == [0, 3, 1, 0, 3, 3, 3, 0, 3, 3]
    assert np.frombuffer(record.streams["codebook"], "<f4").tolist() == [-2.0, 1.0, 3.0, 4.0]
    assert huffman.decode(record.streams["indices"]).tolist() == [1, 4, 0, 2, 4, 4, 4, 3, 4, 4]  # 4: filler
    assert numpy_helper.to_array(inits(P.unpack(data))["w"]).tolist() == w.tolist()


def test_index_width_is_the_smallest_huffman_total():
    mask = np.random.default_rng(1).random(4000) < 0.07
    q = P.quantize_tensor(graphs.rand(4000, seed=2) * mask, S(4, 0.93), None)
    sizes = {}
    for bits in P.INDEX_BITS:
        gaps, values = sparse.to_streams(q.indices, q.mask, bits, 16)
        tail = (q.mask.size - 1 - np.flatnonzero(q.mask)[-1]) >> bits
        gaps = np.concatenate([gaps, np.full(tail, (1 << bits) - 1, gaps.dtype)])
        values = np.concatenate([values, np.full(tail, 16, values.dtype)])
        sizes[bits] = len(huffman.encode(gaps, 1 << bits)) + len(huffman.encode(values, 17))
    assert sizes[P._choose_index_bits(q)] <= min(sizes.values()) + 2  # estimate_size: exact but ~1 byte per block


def test_raw_settings_keep_values_and_normalise_to_raw_data():
    m = tiny_model()
    t = inits(m)["conv_b"]
    t.ClearField("raw_data")
    t.float_data.extend(graphs.rand(8, seed=2).tolist())
    s = {"conv_b": S(None), "fc_w": S(None), "mm_w": S(6)}
    data, report = P.pack(m, s)
    unpacked, (quantized, _) = P.unpack(data), P.quantize_model(m, s)
    assert unpacked == quantized
    for name in ("conv_b", "fc_w"):
        assert inits(unpacked)[name].HasField("raw_data")
        np.testing.assert_array_equal(numpy_helper.to_array(inits(unpacked)[name]),
                                      numpy_helper.to_array(inits(m)[name]))
        assert report["tensors"][name]["encoding"] == "RAW"


def test_report_matches_the_file(model):
    data, report = P.pack(model, settings(5, 0.5) | {"conv_b": S(None)})
    _, records = container.read(data)
    assert report["file_bytes"] == len(data) and report["original_file_bytes"] == model.ByteSize()
    for r in records:
        row = report["tensors"][r.name]
        assert row["huffman_bytes"] == sum(len(s) for s in r.streams.values())
        assert row["ratio"] == pytest.approx(row["original_bytes"] / row["huffman_bytes"])
        assert row["bits_per_weight"] == pytest.approx(8 * row["huffman_bytes"] / row["numel"])
        if r.encoding is Encoding.SPARSE_SHARED:
            assert row["kept"] == r.meta["kept"] < row["numel"] and row["entries"] >= row["kept"]
            assert row["pruned_bytes"] == -(-row["entries"] * (32 + r.meta["index_bits"]) // 8)
    total = report["total"]
    assert total["huffman_bytes"] == sum(r["huffman_bytes"] for r in report["tensors"].values())
    assert total["original_bytes"] == sum(r["original_bytes"] for r in report["tensors"].values())
    assert report["tensors"]["conv_b"]["huffman_bytes"] == 32


def test_pack_is_deterministic_and_smaller(model):
    s = settings(4, 0.5)
    assert P.pack(model, s)[0] == P.pack(model, s)[0]
    assert len(P.pack(model, s)[0]) < model.ByteSize() / 2


def test_unpacked_model_runs_close_to_the_original(model):
    data, _ = P.pack(model, settings(8))
    want, got = run(model, feeds()), run(P.unpack(data), feeds())
    assert run(P.quantize_model(model, settings(8))[0], feeds())[0].tobytes() == got[0].tobytes()
    for a, b in zip(want, got):
        assert np.abs(a - b).max() <= 0.02 * np.abs(a).max() + 1e-6


def test_float16_round_trip():
    m = tiny_model(np.float16)
    s = settings(6, 0.5)
    unpacked = P.unpack(P.pack(m, s)[0])
    assert unpacked == P.quantize_model(m, s)[0]
    assert inits(unpacked)["fc_w"].data_type == TensorProto.FLOAT16
    run(unpacked, feeds(np.float16))


def test_external_data_model(tmp_path):
    model = tiny_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = io.load_model(tmp_path / "m.onnx")
    unpacked = P.unpack(P.pack(loaded, settings(5))[0])
    assert unpacked == P.quantize_model(loaded, settings(5))[0]
    assert not any(t.external_data for t in unpacked.graph.initializer if t.name in WEIGHTS)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(UserError, match="external data"):
        P.pack(unloaded, settings(5))


def test_find_weights_and_default_settings(model):
    weights = find_weights(model)
    assert {n: (w.kind.value, w.axis) for n, w in weights.items()} == {
        "conv_w": ("conv", 0), "fc_w": ("fc", 0), "mm_w": ("fc", 1), "emb": ("embedding", 1),
        "zeros_w": ("fc", 1), "const_w": ("fc", 1)}
    policy = Policy(min_elements=100)
    # per-channel codebooks would cost more than the indices here
    assert default_settings(model, policy) == {"conv_w": S(8, 0.0, False), "fc_w": S(5, 0.0, False),
                                                 "emb": S(4, 0.0, False)}
    assert default_settings(model) == {"fc_w": S(5, 0.0, False)}  # the only one of 1024 elements or more


@pytest.mark.parametrize("op,attrs,shape,axis", [
    ("ConvTranspose", {}, (4, 6, 3, 3), 1), ("ConvTranspose", {"group": 2}, (4, 3, 3, 3), 0),
    ("Gemm", {}, (8, 6), 1), ("Gather", {"axis": 1}, (8, 6), 0),
])
def test_channel_axis_per_consumer(op, attrs, shape, axis):
    node = helper.make_node(op, ["a", "w"] if op != "Gather" else ["w", "a"], ["y"], **attrs)
    weight = numpy_helper.from_array(np.zeros(shape, np.float32), "w")
    m = helper.make_model(helper.make_graph([node], "g", [], [], [weight]))
    assert find_weights(m)["w"].axis == axis


def test_consumers_that_disagree_share_per_tensor(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.append(helper.make_node("Gather", ["mm_w", "ids"], ["unused"]))  # (16, 5): features are axis 1
    m.graph.node.append(helper.make_node("MatMul", ["fc_w", "fc_w"], ["unused2"]))  # as A: rows, axis 0
    weights = find_weights(m)
    assert weights["mm_w"].axis == 1 and weights["fc_w"].axis is None


def test_bad_settings():
    for kwargs in ({"bits": 0}, {"bits": 17}, {"bits": 4, "sparsity": 1.5}, {"bits": None, "sparsity": 0.5}):
        with pytest.raises(UserError):
            S(**kwargs)
    m = tiny_model()
    with pytest.raises(UserError, match="no initializer named 'nope'"):
        P.pack(m, {"nope": S(4)})
    m.graph.initializer.append(numpy_helper.from_array(np.arange(2000), "ints"))
    with pytest.raises(UserError, match="float32 or float16"):
        P.quantize_model(m, {"ints": S(4)})


def test_non_finite_weights_are_refused_by_name():
    m = tiny_model()
    w = numpy_helper.to_array(inits(m)["mm_w"]).copy()
    w[3, 2] = np.nan
    inits(m)["mm_w"].CopyFrom(numpy_helper.from_array(w, "mm_w"))
    with pytest.raises(UnsupportedModelError, match="'mm_w': .*NaN"):
        P.pack(m, settings(4))


def test_unpack_rejects_foreign_and_truncated_files(model):
    data, _ = P.pack(model, settings(4, 0.5))
    one_line_error(b"", "empty")
    one_line_error(model.SerializeToString(), "bad magic")
    one_line_error(gzip.compress(data), "gzip")
    one_line_error(data[:-7], "truncated")
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    one_line_error(bytes(damaged), "corrupt")


def repack(data: bytes, edit_record=None, edit_skeleton=None, drop: str | None = None) -> bytes:
    """Re-frame a valid file after editing a record or the skeleton: checksums pass, content is wrong."""
    skeleton, records = container.read(data)
    model = onnx.ModelProto.FromString(skeleton)
    if edit_skeleton:
        edit_skeleton(model)
    records = [edit_record(r) if edit_record else r for r in records if r.name != drop]
    return container.write(model.SerializeToString(), records)


def with_streams(r, **streams):
    return dataclasses.replace(r, streams={**r.streams, **streams})


def test_unpack_rejects_inconsistent_records(model):
    dense, _ = P.pack(model, settings(4, per_channel=False))
    sparse_data, _ = P.pack(model, settings(4, 0.9, per_channel=False))

    def only(name, fn):
        return lambda r: fn(r) if r.name == name else r

    def shrink_codebook(r):  # a single centroid: the stored indices point past it
        return with_streams(r, codebook=r.streams["codebook"][:4], codebook_sizes=huffman.encode([0], 16))

    one_line_error(repack(dense, only("fc_w", shrink_codebook)), "past a codebook")
    too_few = huffman.encode(np.arange(1000) % 16, 16)
    one_line_error(repack(dense, only("fc_w", lambda r: with_streams(r, indices=too_few))),
                   "holds 1000 symbols, expected 2048")
    one_line_error(repack(dense, only("fc_w", lambda r: with_streams(r, indices=too_few[:100]))),
                   "2048 symbols cannot fit the 100-byte stream")
    one_line_error(repack(dense, only("fc_w", lambda r: dataclasses.replace(r, meta={"bits": 0}))), "'bits'")
    one_line_error(repack(dense, only("fc_w", lambda r: dataclasses.replace(r, meta={"bits": True}))), "'bits'")
    one_line_error(repack(dense, only("fc_w", lambda r: dataclasses.replace(r, streams={}))), "no stream")
    one_line_error(repack(dense, only("fc_w", lambda r: dataclasses.replace(r, dims=(2048,)))), "placeholder")
    one_line_error(repack(dense, only("fc_w", lambda r: dataclasses.replace(r, name="zz"))), "placeholder")
    one_line_error(repack(dense, drop="fc_w"), "no record for the placeholder 'fc_w'")
    one_line_error(repack(dense, only("mm_w", lambda r: with_streams(
        r, codebook=np.full(len(r.streams["codebook"]) // 4, np.nan, "<f4").tobytes()))), "NaN")

    def past_the_end(r):  # the first gap pushes every entry beyond the tensor
        gaps = huffman.decode(r.streams["gaps"]).astype(np.int64)
        gaps[0] = (1 << r.meta["index_bits"]) - 1
        gaps[1:] = gaps[0]
        return with_streams(r, gaps=huffman.encode(gaps, 1 << r.meta["index_bits"]))

    one_line_error(repack(sparse_data, only("fc_w", past_the_end)), "past the tensor's end")


def test_unpack_bounds_the_tensor_before_allocating(model):
    """Huge dims in both the placeholder and the record: refused from the stream sizes, nothing allocated."""
    for sparsity in (0.0, 0.9):
        data, _ = P.pack(model, settings(4, sparsity, per_channel=False))

        def huge_skeleton(m):
            t = inits(m)["fc_w"]
            del t.dims[:]
            t.dims.extend([1 << 40, 1 << 20])

        def huge_record(r):
            return dataclasses.replace(r, dims=(1 << 40, 1 << 20)) if r.name == "fc_w" else r

        one_line_error(repack(data, huge_record, huge_skeleton), "cannot fit|of a 1152921504606846976-weight")


def assert_gather_form(model, s, inputs) -> onnx.ModelProto:
    quantized, gathered = P.quantize_model(model, s)[0], codebook_gather(model, s)
    onnx.checker.check_model(gathered, full_check=True)
    for a, b in zip(run(quantized, inputs), run(gathered, inputs)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert gathered.ByteSize() < quantized.ByteSize()
    return gathered


def test_codebook_gather_runs_and_matches_quantize_model(model):
    for s in (settings(8, 0.0, False), settings(5, 0.9, False), settings(8, 0.5, False)):
        gathered = assert_gather_form(model, s, feeds())
        assert not {"fc_w", "emb"} & set(inits(gathered))
        # 216 weights, each its own centroid at 8 bits: a codebook as large as the tensor, so it stays dense
        assert ("conv_w" in inits(gathered)) == (s["conv_w"] == S(8, 0.0, False))
    assert inits(gathered)["fc_w_indices"].data_type == TensorProto.UINT8


def test_codebook_gather_widens_indices_for_the_pruned_zero():
    w = np.random.default_rng(5).permutation(np.concatenate([np.repeat(np.arange(1, 257) / 64, 8), np.zeros(2048)]))
    m = graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, [3, 64])],
                     [("y", np.float32, [3, 64])], [("w", w.astype(np.float32).reshape(64, 64))])
    gathered = assert_gather_form(m, {"w": S(8, 0.5, False)}, {"x": graphs.rand(3, 64, seed=4)})
    assert inits(gathered)["w_indices"].data_type == TensorProto.UINT16  # 256 centroids and the zero
    assert numpy_helper.to_array(inits(gathered)["w_codebook"]).tolist() == [*(np.arange(1, 257) / 64), 0.0]


def test_codebook_gather_per_channel():
    w = graphs.rand(64, 256, seed=3) * np.linspace(0.1, 4, 256, dtype=np.float32)
    m = graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, [3, 64])],
                     [("y", np.float32, [3, 256])], [("w", w)])
    gathered = assert_gather_form(m, {"w": S(4, 0.5)}, {"x": graphs.rand(3, 64, seed=4)})
    assert [n.op_type for n in gathered.graph.node] == ["Cast", "Add", "Gather", "MatMul"]
    assert inits(gathered)["w_indices"].data_type == TensorProto.UINT8
    assert list(inits(gathered)["w_off"].dims) == [1, 256]


def test_sparse_initializers_run_where_smaller(model):
    s = settings(6, 0.95)
    quantized, sparse_model = P.quantize_model(model, s)[0], sparse_initializers(model, s)
    assert {t.values.name for t in sparse_model.graph.sparse_initializer} >= {"fc_w", "conv_w"}
    onnx.checker.check_model(sparse_model)  # strict shape inference does not know sparse initializers
    for a, b in zip(run(quantized, feeds()), run(sparse_model, feeds())):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert sparse_model.ByteSize() < quantized.ByteSize()
    half = sparse_initializers(model, settings(6, 0.5)).graph.sparse_initializer
    assert [t.values.name for t in half] == ["zeros_w"]  # all pruned; the others: 12 bytes per kept, larger


def test_digits_cnn_top1_within_a_point_at_8_bits():
    m = io.load_model(MODELS / "digits_cnn.onnx")
    s = default_settings(m, Policy(fc_bits=8))
    assert set(s) == {"conv2.weight", "fc1.weight", "fc2.weight"}
    data, report = P.pack(m, s)
    unpacked = P.unpack(data)
    assert unpacked == P.quantize_model(m, s)[0]
    images = np.load(MODELS / "digits_cnn.test.npz")["image"]
    labels = np.load(MODELS / "digits_cnn.test_labels.npy")
    acc = [np.mean(run(x, {"image": images})[0].argmax(1) == labels) for x in (m, unpacked)]
    assert acc[1] >= acc[0] - 0.01
    assert report["file_ratio"] > 3


def test_tiny_bert_round_trip():
    m = io.load_model(MODELS / "tiny_bert.onnx")
    s = default_settings(m)
    assert s["embeddings.word_embeddings.weight"] == S(4, 0.0, True)
    data, report = P.pack(m, s)
    unpacked = P.unpack(data)
    assert unpacked == P.quantize_model(m, s)[0]
    inputs = dict(np.load(MODELS / "tiny_bert.calib.npz"))
    want, got = run(m, inputs)[0], run(unpacked, inputs)[0]
    cosine = np.sum(want * got, -1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cosine.mean() > 0.95
    assert report["file_ratio"] > 2.5
