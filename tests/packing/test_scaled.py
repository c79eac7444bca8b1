"""Format 1.1: input-channel scales (encodings 3, 4), row-grouped indices, the xz skeleton."""

import hashlib
import lzma
import struct
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxopt import validate
from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.packing import container, groups, huffman, native, scales, sharing
from onnxopt.packing import pack as P
from onnxopt.packing import search as SR
from onnxopt.packing.container import Encoding
from onnxopt.packing.policy import TensorSetting as S
from tests import graphs

FEATURE_RMS = np.geomspace(0.05, 8.0, 48).astype(np.float32)  # a few loud input features, as BERT's


def mlp(dtype=np.float32) -> onnx.ModelProto:
    """x * rms -> MatMul(w1) -> Relu -> Gemm(w2, transB) -> Conv 1x1 (w3) after a reshape: three scale sites."""
    nodes = [helper.make_node("Mul", ["x", "rms"], ["xs"]), helper.make_node("MatMul", ["xs", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["g"], transB=1),
             helper.make_node("Reshape", ["g", "shape"], ["g4"]), helper.make_node("Conv", ["g4", "w3"], ["y"])]
    inits = [("rms", FEATURE_RMS), ("w1", graphs.rand(48, 256, seed=1)), ("w2", graphs.rand(40, 256, seed=2)),
             ("shape", np.array([-1, 40, 1, 1], np.int64)), ("w3", graphs.rand(32, 40, 1, 1, seed=3))]
    inits = [(n, a.astype(dtype) if a.dtype == np.float32 else a) for n, a in inits]
    outputs = [("y", dtype, ["n", 32, 1, 1]), ("h", dtype, ["n", 256])]
    return graphs.model(nodes, [("x", dtype, ["n", 48])], outputs, inits)


def samples(n=64, seed=0, dtype=np.float32) -> list[dict]:
    return [{"x": np.random.default_rng(seed + i).standard_normal((n, 48)).astype(dtype)} for i in range(2)]


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_sites_and_multipliers_follow_the_input_moments():
    model = mlp()
    sites = scales.find_sites(model)
    assert {n: (s.axis, s.input_axis) for n, s in sites.items()} == {"w1": (0, -1), "w2": (1, -1), "w3": (1, 1)}
    found = scales.scales(model, samples())
    a = np.mean([np.mean(np.square(f["x"] * FEATURE_RMS), axis=0) for f in samples()], axis=0)
    r = found["w1"].multipliers
    assert r.dtype == np.float32 and abs(float(np.mean(np.log(r)))) < 1e-5  # geometric mean 1
    np.testing.assert_allclose(np.log(r), -0.25 * (np.log(a) - np.log(a).mean()), atol=1e-5)
    assert r[-1] < 0.5 * r[0]  # the loud feature gets the finer grid


def test_dead_inputs_and_shared_weights():
    r = scales.multipliers(np.array([4.0, 1.0, 0.0]))
    assert np.isfinite(r).all() and r[2] == r.max()  # floored, not infinite
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    shared = graphs.model(nodes, [("x", np.float32, [2, 8])], [("y", np.float32, [2, 8])],
                          [("w", graphs.rand(8, 8, seed=1))])
    assert scales.find_sites(shared) == {}  # two consumers with different inputs: no scales


def test_depthwise_conv_scales_each_output_by_its_input_channel():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])]
    model = graphs.model(nodes, [("x", np.float32, [1, 4, 5, 5])], [("y", np.float32, [1, 8, 5, 5])],
                         [("w", graphs.rand(8, 1, 3, 3, seed=1))])
    loud = np.array([1, 1, 10, 1], np.float32)[None, :, None, None]
    feeds = [{"x": graphs.rand(1, 4, 5, 5, seed=2) * loud}]
    r = scales.scales(model, feeds)["w"]
    assert r.axis == 0 and r.multipliers.shape == (8,)
    assert r.multipliers[4] == r.multipliers[5] < r.multipliers[0]  # outputs 4, 5 read input channel 2


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 12])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_zero_grid_levels(bits, axis):
    w = graphs.rand(30, 50, seed=bits) * np.geomspace(0.01, 5, 50, dtype=np.float32)
    w[3, :] = 0.0  # pruned whole: its row keeps one level
    mask = np.abs(w) > 0.002
    codebook, sizes, idx = sharing.zero_grid(w, bits, axis=axis, mask=mask)
    assert sizes.max() <= 1 << bits and codebook.size == sizes.sum()
    rebuilt = P._rebuild(codebook, sizes, idx, mask, axis)
    rows = sharing._to_rows(np.abs(rebuilt - np.where(mask, w, 0)), axis)
    spans = [np.ptp(r[k]) if k.any() else 0 for r, k in zip(sharing._to_rows(w, axis), sharing._to_rows(mask, axis))]
    assert np.all(rows.max(axis=1) <= np.array(spans) / max((1 << bits) - 2, 1) / 2 * (1 + 1e-5) + 1e-7)
    if axis is None and bits > 1:  # zero is a level: a kept weight within half a step of it rebuilds exactly 0
        step = (w[mask].max() - w[mask].min()) / ((1 << bits) - 2)
        near = mask & (np.abs(w) < 0.499 * step)
        assert near.any() and np.all(rebuilt[near] == 0.0)


def test_zero_grid_constant_rows_are_exact():
    w = np.array([[0.5, 0.5], [0.0, 0.0], [-3.0, -3.0]], np.float32)
    codebook, sizes, idx = sharing.zero_grid(w, 4, axis=0)
    assert np.array_equal(P._rebuild(codebook, sizes, idx, None, 0), w)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sparsity,per_channel", [(0.0, False), (0.0, True), (0.4, False), (0.6, True)])
def test_scaled_unpack_equals_quantize_model_bit_for_bit(dtype, sparsity, per_channel):
    model = mlp(dtype)
    found = scales.scales(model, samples(dtype=dtype))
    settings = {n: S(5, sparsity, per_channel, iters=0, scaled=True) for n in found}
    q, stats = P.quantize_model(model, settings, found)
    data, _ = P.pack(model, settings, found)
    _, records = container.read(data)
    want = Encoding.SPARSE_SHARED_SCALED if sparsity else Encoding.SHARED_SCALED
    assert {r.encoding for r in records} == {want} and data[10:12] == b"\x01\x01"
    assert {s.encoding for s in stats.values()} == {want}
    got, ref = values(P.unpack(data)), values(q)
    for name in found:
        assert got[name].dtype == dtype and got[name].tobytes() == ref[name].tobytes()


def test_scaled_grid_is_finer_where_inputs_are_loud():
    """At equal bytes (same bits), the scaled form moves the layer's output less than the plain grid."""
    model = mlp()
    found = scales.scales(model, samples())
    feeds = samples(seed=7)  # held out

    def error(setting) -> float:
        q, _ = P.quantize_model(model, {"w1": setting}, found)
        report = validate.compare(model, q, feeds, budget=validate.Budget(lossy=True))
        return next(o.rel_l2 for o in report.outputs if o.name == "h")  # the layer's own output

    def size(setting) -> int:
        return P.pack(model, {"w1": setting}, found)[1]["tensors"]["w1"]["huffman_bytes"]

    plain, scaled = S(5, 0.0, False, iters=0), S(6, 0.0, False, iters=0, scaled=True)
    assert error(scaled) < 0.6 * error(plain) and size(scaled) < 1.05 * size(plain)


def test_scaled_settings_need_valid_scales():
    model = mlp()
    with pytest.raises(UserError, match="'w1': a scaled setting needs the weight's input scales"):
        P.pack(model, {"w1": S(4, scaled=True)})
    for bad in (np.ones(5, np.float32), np.full(48, -1, np.float32), np.ones(48)):
        with pytest.raises(UserError, match="input scales must be 48 positive finite float32"):
            P.quantize_model(model, {"w1": S(4, scaled=True)}, {"w1": scales.Scale(0, bad)})
    with pytest.raises(UserError, match="need weight sharing"):
        S(None, scaled=True)


def test_corrupt_scales_are_one_line_errors():
    model = mlp()
    found = scales.scales(model, samples())
    data, _ = P.pack(model, {"w1": S(4, per_channel=False, scaled=True)}, found)
    skeleton, records = container.read(data)
    cases = {"scales must be positive": {"scales": struct.pack("<48f", *([-1.0] * 48))},
             "bytes of scales for 48": {"scales": b"\0" * 8}}
    for match, streams in cases.items():
        r = records[0]
        bad = container.Record(r.name, r.data_type, r.dims, r.encoding, r.meta, {**r.streams, **streams})
        with pytest.raises(UnsupportedModelError, match=f"corrupt onnxz file: record 'w1': .*{match}"):
            P.unpack(container.write(skeleton, [bad]))


def test_row_groups_pay_on_rows_of_unlike_spread_and_round_trip():
    rng = np.random.default_rng(0)
    spread = np.where(np.arange(400) % 3 == 0, 40.0, 2.0)
    idx = np.clip(np.rint(128 + rng.standard_normal((400, 64)) * spread[:, None]), 0, 255).astype(np.uint8)
    streams, count = groups.encode(idx, 256)
    assert count > 1 and "indices" not in streams
    assert sum(map(len, streams.values())) < 0.95 * len(huffman.encode(idx, 256))

    def blob(name, n):
        out = huffman.decode(streams[name])
        assert out.size == n
        return out

    assert np.array_equal(groups.decode(streams, idx.shape, count, blob), idx)
    same = np.full((400, 64), 7, np.uint8)
    assert groups.encode(same, 256)[1] == 1  # nothing to gain: the 1.0 way


def test_grouped_records_round_trip_and_set_their_flag():
    w = graphs.rand(600, 32, seed=4) * np.where(np.arange(600) % 4 == 0, 20.0, 1.0).astype(np.float32)[:, None]
    model = graphs.model([helper.make_node("Gather", ["emb", "ids"], ["y"])], [("ids", np.int64, [3])],
                         [("y", np.float32, [3, 32])], [("emb", w)])
    settings = {"emb": S(6, 0.0, False, iters=0)}
    data, _ = P.pack(model, settings)
    head = container._HEAD.unpack(data[: container._HEAD.size])
    _, records = container.read(data)
    assert records[0].meta["groups"] > 1 and head[3] & container.ROW_GROUPS and head[2] == 1
    assert values(P.unpack(data))["emb"].tobytes() == values(P.quantize_model(model, settings)[0])["emb"].tobytes()
    skeleton, records = container.read(data)
    r = records[0]
    bad = container.Record(r.name, r.data_type, r.dims, r.encoding, {**r.meta, "groups": 99}, r.streams)
    with pytest.raises(UnsupportedModelError, match="metadata 'groups' is 99"):
        P.unpack(container.write(skeleton, [bad], flags=container.ROW_GROUPS))
    bad = container.Record(r.name, r.data_type, r.dims, r.encoding, r.meta,
                           {k: v for k, v in r.streams.items() if k != "indices.1"})
    with pytest.raises(UnsupportedModelError, match="no stream 'indices.1'"):
        P.unpack(container.write(skeleton, [bad], flags=container.ROW_GROUPS))


def test_xz_skeleton_round_trip_and_bounds():
    skeleton = b"onnx model bytes " * 500
    data = container.write(skeleton, [], compress=True)
    assert len(data) < len(skeleton) / 5 and data[10:12] == b"\x01\x01"
    assert container.read(data)[0] == skeleton
    assert container.write(b"ab", [], compress=True)[10:12] == b"\x01\x00"  # not smaller: stored as 1.0
    packed = lzma.compress(skeleton)
    for size in (len(skeleton) - 1, len(skeleton) + 1):
        match = f"holds 8500 bytes, not the {size}"
        bad = _with_flag(struct.pack("<Q", size) + packed)
        with pytest.raises(UnsupportedModelError, match=f"compressed skeleton {match}"):
            container.read(bad)
    with pytest.raises(UnsupportedModelError, match="states 18446744073709551615 bytes"):
        container.read(_with_flag(struct.pack("<Q", (1 << 64) - 1) + packed))
    with pytest.raises(UnsupportedModelError, match="does not decompress"):
        container.read(_with_flag(struct.pack("<Q", 10) + b"not xz at all"))
    with pytest.raises(ValueError, match="only the records' features"):
        container.write(b"", [], flags=container.XZ_SKELETON)


def _with_flag(body: bytes) -> bytes:
    """A valid container whose skeleton section holds ``body`` and whose header sets XZ_SKELETON."""
    plain = bytearray(container.write(body, []))
    head = container._HEAD.unpack(bytes(plain[: container._HEAD.size]))
    plain[: container._HEAD.size] = container._HEAD.pack(head[0], 1, 1, container.XZ_SKELETON, *head[4:])
    plain[container._HEAD.size : container.HEADER_SIZE] = struct.pack("<I", zlib.crc32(plain[: container._HEAD.size]))
    plain[-32:] = hashlib.sha256(bytes(plain[:-32])).digest()
    return bytes(plain)


def test_search_with_scales_meets_the_budget_held_out():
    model = mlp()
    budget = validate.Budget(lossy=True, min_cosine=0.995)
    found = SR.search(model, samples(), budget, SR.SearchConfig(scaled=True))
    assert found.met and set(found.scales) == {"w1", "w2", "w3"}
    assert any(s.scaled for s in found.settings.values())
    q, _ = P.quantize_model(model, found.settings, found.scales)
    assert validate.compare(model, q, samples(seed=11), budget=budget).passed
    unpacked = P.unpack(P.pack(model, found.settings, found.scales)[0])
    feeds = samples(seed=11)[0]
    ref = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(unpacked.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(ref[0], got[0])
    plain = SR.search(model, samples(), budget, SR.SearchConfig())
    assert not plain.scales and not any(s.scaled for s in plain.settings.values())


def test_codebook_gather_of_scaled_weights_equals_quantize_model():
    model = mlp()
    found = scales.scales(model, samples())
    settings = {"w1": S(5, 0.0, False, iters=0, scaled=True), "w2": S(4, 0.5, True, iters=0, scaled=True)}
    q, _ = P.quantize_model(model, settings, found)
    out = native.codebook_gather(model, settings, found)
    onnx.checker.check_model(out, full_check=True)
    assert {n.op_type for n in out.graph.node} >= {"Gather", "Mul"} and not {"w1", "w2"} & set(values(out))
    feeds = samples(seed=3)[0]
    ref = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    sparse = native.sparse_initializers(model, {"w2": S(4, 0.8, True, iters=0, scaled=True)}, found)
    assert [s.values.name for s in sparse.graph.sparse_initializer] == ["w2"]
