"""insert_qdq: exact quantized values, numerics against float, and what onnxruntime fuses.

Ranges come from running the float model on the test's own inputs (min/max), so the only
error left is rounding: outputs must stay within a few int8 steps of the float output
(step = the output's range / 255), and onnxruntime's fused int8 kernels (ORT_ENABLE_ALL)
must compute what the QDQ graph says (ORT_DISABLE_ALL runs every Q and DQ literally).
The fusion itself is read from the optimized model onnxruntime writes.
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

import onnxopt
from onnxopt import runtime
from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.passes import _qdq_math as qm
from onnxopt.passes.insert_qdq import (
    ActivationType,
    InsertQDQPass,
    QuantConfig,
    QuantTarget,
    TensorRange,
    ensure_opset,
    plan_quantization,
)
from tests import graphs, numerics

F32 = np.float32
MODELS = Path(__file__).resolve().parents[2] / "models"
UINT8 = QuantConfig(activation_type=ActivationType.UINT8)
TRT = QuantConfig(target=QuantTarget.TENSORRT)


# ---------------------------------------------------------------- helpers

def ort_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime runs (ORT_ENABLE_ALL), read back from its optimized model file."""
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def ort_ops(model: onnx.ModelProto) -> collections.Counter:
    """Op histogram of the graph onnxruntime runs."""
    return collections.Counter(n.op_type for n in ort_optimized(model).graph.node)


def minmax_ranges(model: onnx.ModelProto, batches, names) -> dict[str, TensorRange]:
    """Min/max of each named tensor over ``batches``, from the float model with those tensors exposed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    exposed = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in exposed)
    sess = runtime.session(m, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feeds in batches:
        values = {**runtime.run(sess, feeds), **feeds}
        for n in names:
            lo[n] = min(lo.get(n, np.inf), float(values[n].min()))
            hi[n] = max(hi.get(n, -np.inf), float(values[n].max()))
    return {n: TensorRange(n, lo[n], hi[n]) for n in names}


def quantize(model: onnx.ModelProto, feeds=None, config: QuantConfig | None = None, ranges=None):
    """(graph, result, plan): the plan's ranges measured on ``feeds``, then the pass."""
    config = config or QuantConfig()
    feeds = feeds if feeds is not None else numerics.random_feeds(model)
    g = gs.import_onnx(model)
    plan = plan_quantization(g, config)
    ranges = ranges if ranges is not None else minmax_ranges(model, [feeds], plan.tensors)
    return g, InsertQDQPass(ranges, config)(g), plan


def export(g: gs.Graph) -> onnx.ModelProto:
    return numerics.to_model(g.copy())


def run_fused(g: gs.Graph, feeds) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(export(g)), feeds)


def assert_quantized_close(model, g, feeds, *, steps: float = 4.0, min_cosine: float = 0.999) -> None:
    """Within ``steps`` int8 steps of float, and onnxruntime's fused kernels within 2 steps of the QDQ graph."""
    ref, qdq, fused = numerics.run(model, feeds), numerics.run(g, feeds), run_fused(g, feeds)
    for name, a in ref.items():
        step = (max(a.max(), 0) - min(a.min(), 0)) / 255
        b, c = qdq[name], fused[name]
        cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos >= min_cosine, f"{name}: cosine {cos}"
        assert np.abs(a - b).max() <= steps * step, f"{name}: {np.abs(a - b).max()} > {steps} x {step}"
        assert np.abs(b - c).max() <= 2 * step, f"{name}: fused {np.abs(b - c).max()} vs step {step}"


def node(g: gs.Graph, name: str) -> gs.Node:
    return next(n for n in g.nodes if n.name == name)


def dq_inputs(g: gs.Graph, consumer: str, i: int):
    """(values, scale, zero point, axis) of the DequantizeLinear feeding input ``i`` of ``consumer``."""
    dq = node(g, consumer).inputs[i].inputs[0]
    assert dq.op == "DequantizeLinear"
    vals = [x.values if isinstance(x, gs.Constant) else None for x in dq.inputs]
    return vals[0], vals[1], vals[2], dq.attrs.get("axis")


def producer_dq(t: gs.Tensor) -> tuple[np.ndarray, np.ndarray]:
    dq = t.inputs[0]
    assert dq.op == "DequantizeLinear" and dq.inputs[0].inputs[0].op == "QuantizeLinear"
    return dq.inputs[1].values, dq.inputs[2].values


def conv(x, y, w, b=None, name=None, **attrs):
    return helper.make_node("Conv", [x, w, *([b] if b else [])], [y], name=name or f"{y}_conv", pads=[1] * 4,
                            **attrs)


def conv_relu_conv(opset=13, act="Relu", clip=(0.0, 6.0), extra_out=False):
    """x -> Conv(w, b) -> act -> Conv(w2) -> o."""
    act_inputs = ["y", "lo", "hi"] if act == "Clip" else ["y"]
    nodes = [conv("x", "y", "w", "b", name="conv"), helper.make_node(act, act_inputs, ["z"], name="act"),
             conv("z", "o", "w2", name="conv2")]
    inits = [("w", graphs.rand(4, 3, 3, 3, seed=1)), ("b", graphs.rand(4, seed=2)),
             ("w2", graphs.rand(5, 4, 3, 3, seed=3))]
    if act == "Clip":
        inits += [("lo", np.array(clip[0], F32)), ("hi", np.array(clip[1], F32))]
    outs = [("o", F32, [2, 5, 8, 8])] + ([("z", F32, [2, 4, 8, 8])] if extra_out else [])
    return graphs.model(nodes, [("x", F32, [2, 3, 8, 8])], outs, inits, opset=opset)


def feeds_for(model, scale=1.0):
    return {k: v * scale for k, v in numerics.random_feeds(model, seed=5).items()}


X3 = [("x", F32, [1, 3, 8, 8])]
O4 = [("o", F32, [1, 4, 8, 8])]
TWO_OUTS = [("o1", F32, [1, 4, 8, 8]), ("o2", F32, [1, 4, 8, 8])]


def ws(*shape, seed):
    return graphs.rand(*shape, seed=seed)


# ---------------------------------------------------------------- Conv, weights and bias

def test_conv_relu_conv_runs_as_qlinearconv_with_the_relu_absorbed():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    assert res.modified and not res.skipped
    assert dict(res.stats) == {"quantize_conv": 2, "absorb_relu": 1, "activation_quantizers": 3}
    assert plan.nodes == ("conv", "conv2") and plan.tensors == ("x", "z", "o")
    assert [n.op for n in g.nodes if n.op not in ("QuantizeLinear", "DequantizeLinear")] == ["Conv", "Relu", "Conv"]
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and not {"Conv", "Relu", "FusedConv"} & set(ops)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # graph input and output only
    assert_quantized_close(model, g, feeds)
    assert not InsertQDQPass({}, QuantConfig())(g).modified


@pytest.mark.parametrize("dims,group", [(2, 4), (1, 1), (3, 2)], ids=["depthwise", "1d", "3d-grouped"])
def test_grouped_and_other_rank_convs(dims, group):
    k = [3] * dims
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, pads=[1] * 2 * dims),
             helper.make_node("Relu", ["y"], ["o"])]
    model = graphs.model(nodes, [("x", F32, [2, 4, *[6] * dims])], [("o", F32, [2, 4, *[6] * dims])],
                         [("w", ws(4, 4 // group, *k, seed=1)), ("b", ws(4, seed=2))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds)
    assert res.stats == {"quantize_conv": 1, "absorb_relu": 1, "activation_quantizers": 2}
    assert dq_inputs(g, "conv", 1)[1].shape == (4,)
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 1 and not {"Conv", "Relu"} & set(ops)
    assert_quantized_close(model, g, feeds)


def test_weights_are_per_channel_int8_and_the_bias_int32_with_input_times_weight_scale():
    model = conv_relu_conv()
    g, _, _ = quantize(model, feeds_for(model))
    w = graphs.rand(4, 3, 3, 3, seed=1)
    wq, sw, zw, axis = dq_inputs(g, "conv", 1)
    assert wq.dtype == np.int8 and axis == 0 and zw.dtype == np.int8 and not zw.any() and sw.shape == (4,)
    np.testing.assert_allclose(sw, np.abs(w).reshape(4, -1).max(1) / 127, rtol=1e-6)
    err = np.abs(wq * sw[:, None, None, None] - w)
    assert (err <= sw[:, None, None, None] / 2 + 1e-7).all()
    assert np.abs(wq).max() == 127
    sx, _ = producer_dq(node(g, "conv").inputs[0])
    bq, sb, zb, baxis = dq_inputs(g, "conv", 2)
    assert bq.dtype == np.int32 and zb.dtype == np.int32 and not zb.any() and baxis == 0
    np.testing.assert_array_equal(sb, F32(sx) * sw)
    np.testing.assert_array_equal(bq, np.round(graphs.rand(4, seed=2).astype(np.float64) / sb))


def test_activation_scales_and_zero_points_follow_the_ranges():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    g, _, plan = quantize(model, feeds)
    r = minmax_ranges(model, [feeds], plan.tensors)
    sx, zx = producer_dq(node(g, "conv").inputs[0])
    lo, hi = min(r["x"].min, 0), max(r["x"].max, 0)
    assert zx.dtype == np.int8 and sx == F32((hi - lo) / 255) and int(zx) == round(-128 - lo / sx)
    sz, zz = producer_dq(node(g, "conv2").inputs[0])  # the Relu output: [0, max], zero point qmin
    assert int(zz) == -128 and sz == F32(r["z"].max / 255)


def test_uint8_activations():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds, UINT8)
    sz, zz = producer_dq(node(g, "conv2").inputs[0])
    assert zz.dtype == np.uint8 and int(zz) == 0
    assert dq_inputs(g, "conv", 1)[0].dtype == np.int8  # weights stay int8
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and "Relu" not in ops and "Conv" not in ops
    assert_quantized_close(model, g, feeds)


def test_tensorrt_is_symmetric_with_the_relu_kept_between_dq_and_q():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds, TRT)
    zps = [n.inputs[2].values for n in g.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    r = minmax_ranges(model, [feeds], plan.tensors)
    sx, _ = producer_dq(node(g, "conv").inputs[0])
    assert sx == F32(max(-r["x"].min, r["x"].max) / 127)
    relu = node(g, "act")
    assert relu.inputs[0].inputs[0].op == "Conv" and relu.outputs[0].outputs[0].op == "QuantizeLinear"
    assert node(g, "conv").inputs[2].name == "b"  # TensorRT takes the bias in float
    assert node(g, "conv2").outputs[0].name == "o" and plan.tensors == ("x", "z")  # no Q after the last Conv
    assert_quantized_close(model, g, feeds, steps=6)


def test_tensorrt_refuses_uint8():
    with pytest.raises(UserError, match="tensorrt"):
        InsertQDQPass({}, QuantConfig(target=QuantTarget.TENSORRT, activation_type=ActivationType.UINT8))


# 7.9813337 / 255 rounds so that scale * 255 exceeds it in float32: the scale must be nudged down.
@pytest.mark.parametrize("top", [6.0, 7.9813337])
def test_clip_0_c_is_absorbed_and_its_top_stays_within_c(top):
    model = conv_relu_conv(act="Clip", clip=(0.0, top))
    feeds = feeds_for(model, 4.0)  # so that the Clip does clip at its top
    g, res, _ = quantize(model, feeds)
    assert res.stats["absorb_clip"] == 1
    s, z = producer_dq(node(g, "conv2").inputs[0])
    assert int(z) == -128 and s * F32(255) <= F32(top) and s > np.nextafter(F32(top / 255), F32(0)) * 0.9999
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and not {"Clip", "Conv", "FusedConv"} & set(ops)
    assert_quantized_close(model, g, feeds)


def test_clip_not_at_zero_is_not_absorbed():
    model = conv_relu_conv(act="Clip", clip=(-1.0, 1.0))
    g, res, _ = quantize(model, feeds_for(model))
    assert "absorb_clip" not in res.stats
    assert node(g, "act").inputs[0].inputs[0].op == "DequantizeLinear"


def test_a_weight_shared_by_two_convs_is_stored_once():
    nodes = [conv("x", "o1", "w", name="c1"), conv("x", "o2", "w", name="c2")]
    model = graphs.model(nodes, X3, TWO_OUTS, [("w", ws(4, 3, 3, 3, seed=1))])
    g, res, _ = quantize(model, config=UINT8)
    assert res.stats["quantize_conv"] == 2
    assert node(g, "c1").inputs[1].inputs[0].inputs[0] is node(g, "c2").inputs[1].inputs[0].inputs[0]
    assert sum(t.values.dtype == np.int8 for t in g.tensors().values() if isinstance(t, gs.Constant)) == 2
    assert ort_ops(export(g))["QLinearConv"] == 2


def test_per_tensor_weights():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    g, _, _ = quantize(model, feeds, QuantConfig(per_channel=False))
    wq, sw, _, axis = dq_inputs(g, "conv", 1)
    assert sw.shape == () and axis is None and sw == F32(np.abs(graphs.rand(4, 3, 3, 3, seed=1)).max() / 127)
    assert ort_ops(export(g))["QLinearConv"] == 2
    assert_quantized_close(model, g, feeds)


def test_bias_too_large_for_int32_raises_that_channels_weight_scale():
    w = ws(2, 3, 3, 3, seed=1)
    w[1] *= 1e-9
    b = np.array([0.5, 3.0], F32)
    model = graphs.model([conv("x", "o", "w", "b", name="conv")], X3, [("o", F32, [1, 2, 8, 8])],
                         [("w", w), ("b", b)])
    feeds = feeds_for(model)
    g, _, _ = quantize(model, feeds)
    bq, sb, _, _ = dq_inputs(g, "conv", 2)
    _, sw, _, _ = dq_inputs(g, "conv", 1)
    assert np.abs(bq.astype(np.int64)).max() < 2**31 - 1 and sw[1] > np.abs(w[1]).max() / 127
    assert (np.abs(bq * sb.astype(np.float64) - b) <= sb / 2).all()
    assert_quantized_close(model, g, feeds)


def test_clip_top_nudges_the_scale_down_in_float32():
    c = F32(7.9813337)
    assert F32(c / 255) * F32(255) > c  # the naive scale would overshoot the Clip
    p = qm.activation_qparams(0.0, float(c), np.int8, symmetric=False, clip_max=float(c))
    assert p.scale * F32(255) <= c and p.zero_point == -128


def test_scales_are_never_zero():
    p = qm.activation_qparams(0.0, 0.0, np.int8, symmetric=False)
    assert p.scale > 0 and p.zero_point == -128
    assert qm.activation_qparams(-1e-30, 1e-30, np.int8, symmetric=True).scale > 0
    assert (qm.weight_scale(np.zeros((3, 2), F32), 0) > 0).all()
    assert qm.activation_qparams(-2.0, -1.0, np.uint8, symmetric=False).zero_point == 255  # widened to 0


# ---------------------------------------------------------------- MatMul and Gemm

@pytest.mark.parametrize("shape", [(4, 16), (2, 4, 16)], ids=["2d", "3d"])
def test_matmul_with_float_output_runs_as_matmul_integer_to_float(shape):
    model = graphs.model([helper.make_node("MatMul", ["x", "w"], ["o"], name="mm")], [("x", F32, list(shape))],
                         [("o", F32, [*shape[:-1], 8])], [("w", ws(16, 8, seed=1))])
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    assert dict(res.stats) == {"quantize_matmul": 1, "activation_quantizers": 1} and plan.tensors == ("x",)
    wq, sw, _, axis = dq_inputs(g, "mm", 1)
    assert axis == 1 and sw.shape == (8,)
    np.testing.assert_allclose(sw, np.abs(ws(16, 8, seed=1)).max(0) / 127, rtol=1e-6)
    ops = ort_ops(export(g))
    assert ops["MatMulIntegerToFloat"] == 1 and "MatMul" not in ops and "DequantizeLinear" not in ops
    assert_quantized_close(model, g, feeds)


def test_matmul_relu_matmul_runs_as_qlinearmatmul():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"]),
             helper.make_node("MatMul", ["z", "w2"], ["o"], name="mm2")]
    model = graphs.model(nodes, [("x", F32, [2, 4, 16])], [("o", F32, [2, 4, 8])],
                         [("w", ws(16, 8, seed=1)), ("w2", ws(8, 8, seed=2))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds)
    ops = ort_ops(export(g))
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1 and not {"MatMul", "Relu"} & set(ops)
    assert_quantized_close(model, g, feeds)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_relu_gemm_runs_as_qgemm(trans_b):
    w1 = ws(16, 8, seed=1)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g1", transB=trans_b),
             helper.make_node("Relu", ["y"], ["z"]), helper.make_node("Gemm", ["z", "w2", "b2"], ["o"], name="g2")]
    model = graphs.model(nodes, [("x", F32, [4, 16])], [("o", F32, [4, 5])],
                         [("w", w1.T.copy() if trans_b else w1), ("b", ws(8, seed=2)), ("w2", ws(8, 5, seed=3)),
                          ("b2", ws(1, 5, seed=4))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds)
    assert dict(res.stats) == {"quantize_gemm": 2, "absorb_relu": 1, "activation_quantizers": 2}
    _, sw, _, axis = dq_inputs(g, "g1", 1)
    assert axis == (0 if trans_b else 1)
    np.testing.assert_allclose(sw, np.abs(w1).max(0) / 127, rtol=1e-6)
    bq, sb, _, baxis = dq_inputs(g, "g2", 2)
    assert bq.shape == (1, 5) and baxis == 1 and bq.dtype == np.int32
    ops = ort_ops(export(g))
    assert ops["QGemm"] == 2 and not {"Gemm", "Relu", "FusedGemm"} & set(ops)
    assert_quantized_close(model, g, feeds)


def test_gemm_alpha_and_matmul_of_two_activations_stay_float():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="g", alpha=0.5),
             helper.make_node("MatMul", ["y", "t"], ["o"], name="mm")]
    model = graphs.model(nodes, [("x", F32, [4, 4]), ("t", F32, [4, 4])], [("o", F32, [4, 4])],
                         [("w", ws(4, 4, seed=1))])
    g, res, plan = quantize(model)
    assert not res.modified and not plan.nodes
    assert {(s.node, s.reason) for s in res.skipped} == {
        ("g", "alpha 0.5 != 1"), ("mm", "both operands are activations: left in float")}


# ---------------------------------------------------------------- ops on int8 inputs

def two_convs_then(op_nodes, outs=O4, extra_inits=()):
    """x -> conv a, conv b (both reading x) -> ``op_nodes`` reading a and b."""
    nodes = [conv("x", "a", "wa", name="ca"), conv("x", "b", "wb", name="cb"), *op_nodes]
    inits = [("wa", ws(4, 3, 3, 3, seed=1)), ("wb", ws(4, 3, 3, 3, seed=2)), *extra_inits]
    return graphs.model(nodes, X3, outs, inits)


@pytest.mark.parametrize("config", [QuantConfig(), UINT8], ids=["int8", "uint8"])
@pytest.mark.parametrize("op", ["Add", "Mul", "Concat"])
def test_binary_and_concat_run_as_qlinear_ops(op, config):
    attrs = {"axis": 1} if op == "Concat" else {}
    cin = 8 if op == "Concat" else 4
    model = two_convs_then([helper.make_node(op, ["a", "b"], ["s"], name="op", **attrs), conv("s", "o", "wc")],
                           extra_inits=[("wc", ws(4, cin, 3, 3, seed=3))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds, config)
    assert res.stats[f"quantize_{op.lower()}"] == 1 and res.stats["quantize_conv"] == 3
    ops = ort_ops(export(g))
    assert ops[f"QLinear{op}"] == 1 and ops["QLinearConv"] == 3 and not {"Conv", op} & set(ops)
    assert ops["QuantizeLinear"] == (2 if config is not UINT8 else 1)  # int8: x once per reader
    assert_quantized_close(model, g, feeds)


@pytest.mark.parametrize("op,attrs,fused", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, None),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, "QLinearAveragePool"),
    ("Resize", {"mode": "nearest"}, None),
    ("LeakyRelu", {"alpha": 0.1}, "QLinearLeakyRelu"),
    ("Sigmoid", {}, "QLinearSigmoid"),
])
def test_pooling_resize_and_unary_ops_run_on_int8(op, attrs, fused):
    inputs = ["r", "", "sc"] if op == "Resize" else ["r"]
    hw = {"Resize": 16, "MaxPool": 4, "AveragePool": 4}.get(op, 8)
    nodes = [conv("x", "y", "wa", name="c1"), helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node(op, inputs, ["p"], name="op", **attrs), conv("p", "o", "wc", name="c2")]
    model = graphs.model(nodes, X3, [("o", F32, [1, 4, hw, hw])],
                         [("wa", ws(4, 3, 3, 3, seed=1)), ("wc", ws(4, 4, 3, 3, seed=2)),
                          ("sc", np.array([1, 1, 2, 2], F32))])
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and "Conv" not in ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # nothing between runs in float
    if fused:
        assert ops[fused] == 1 and "p" in plan.tensors
    else:  # the data-movement op keeps its input's scale and zero point: no range of its own
        assert "p" not in plan.tensors
        assert [c.name for c in node(g, "c2").inputs[0].inputs[0].inputs[1:]] == \
            [c.name for c in node(g, "op").inputs[0].inputs[0].inputs[1:]]
    assert_quantized_close(model, g, feeds)


def test_split_outputs_share_the_input_scale():
    nodes = [conv("x", "y", "wa", name="c1"), helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("Split", ["r", "sp"], ["s1", "s2"], name="split", axis=1),
             conv("s1", "o1", "w1", name="c2"), conv("s2", "o2", "w2", name="c3")]
    model = graphs.model(nodes, X3, TWO_OUTS, [("wa", ws(4, 3, 3, 3, seed=1)), ("w1", ws(4, 2, 3, 3, seed=2)),
                                                ("w2", ws(4, 2, 3, 3, seed=3)), ("sp", np.array([2, 2]))])
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    assert res.stats["quantize_split"] == 1 and plan.tensors == ("x", "r", "o1", "o2")
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 3 and ops["Split"] == 1 and ops["QuantizeLinear"] == 1 and "Conv" not in ops
    assert_quantized_close(model, g, feeds)


def test_global_average_pool_flatten_gemm():
    nodes = [conv("x", "y", "wa", name="c1"), helper.make_node("GlobalAveragePool", ["y"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "wg"], ["o"], name="fc")]
    model = graphs.model(nodes, X3, [("o", F32, [1, 5])], [("wa", ws(4, 3, 3, 3, seed=1)), ("wg", ws(4, 5, seed=2))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds)
    ops = ort_ops(export(g))
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1 and ops["QLinearConv"] == 1
    assert not {"Conv", "Gemm", "GlobalAveragePool", "DequantizeLinear"} & set(ops)
    assert_quantized_close(model, g, feeds)


def test_ops_on_float_inputs_are_not_quantized():
    nodes = [helper.make_node("Add", ["x", "c"], ["s"], name="add"), helper.make_node("MaxPool", ["s"], ["o"],
                                                                                      kernel_shape=[2, 2])]
    model = graphs.model(nodes, X3, [("o", F32, [1, 3, 7, 7])], [("c", ws(1, 3, 1, 1, seed=1))])
    g, res, plan = quantize(model)
    assert not res.modified and not res.skipped and not plan.nodes


def test_an_input_quantized_for_a_conv_does_not_make_its_other_readers_int8():
    # x is quantized for conv c1, but the MaxPool on x stays float: int8 made by a Q of float
    # data saves nothing there, and onnxruntime's NCHW int8 MaxPool is far slower than float.
    nodes = [conv("x", "o1", "w1", name="c1"), helper.make_node("MaxPool", ["x"], ["p"], name="pool",
                                                                 kernel_shape=[3, 3], pads=[1] * 4),
             conv("p", "o2", "w2", name="c2")]
    model = graphs.model(nodes, X3, TWO_OUTS, [("w1", ws(4, 3, 3, 3, seed=1)), ("w2", ws(4, 3, 3, 3, seed=2))])
    g, res, plan = quantize(model)
    assert plan.nodes == ("c1", "c2") and plan.tensors == ("x", "o1", "p", "o2")
    assert node(g, "pool").inputs[0].name == "x"


# ---------------------------------------------------------------- shared tensors

FAN_WEIGHTS = [("wa", ws(4, 3, 3, 3, seed=1)), ("w1", ws(4, 4, 3, 3, seed=2)), ("w2", ws(4, 4, 3, 3, seed=3))]


def shared_model():
    """x -> conv a -> relu r -> conv o1, conv o2 (r read by two convs)."""
    nodes = [conv("x", "a", "wa", name="ca"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("r", "o1", "w1", name="c1"), conv("r", "o2", "w2", name="c2")]
    return graphs.model(nodes, X3, TWO_OUTS, FAN_WEIGHTS)


def test_uint8_quantizes_a_shared_tensor_once():
    model = shared_model()
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds, UINT8)
    q = [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0].name.startswith("r")]
    assert len(q) == 1 and len(q[0].outputs[0].outputs) == 1  # one Q, one DQ read by both convs
    assert {n.name for n in q[0].outputs[0].outputs[0].outputs[0].outputs} == {"c1", "c2"}
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 3 and "Conv" not in ops and "Relu" not in ops
    assert_quantized_close(model, g, feeds)


def test_int8_gives_each_reader_its_own_pair():
    model = shared_model()
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    # The Relu is not absorbed (its output has two readers): ca's own output is quantized instead.
    assert plan.nodes == ("ca", "c1", "c2") and plan.tensors == ("x", "a", "r", "o1", "o2") and not res.skipped
    pairs = [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "r"]
    assert len(pairs) == 2 and pairs[0].inputs[1] is not pairs[1].inputs[1]
    assert pairs[0].inputs[1].values == pairs[1].inputs[1].values  # one range, constants of their own
    assert all(len(q.outputs[0].outputs) == 1 and len(q.outputs[0].outputs[0].outputs[0].outputs) == 1
               for q in pairs)
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 3 and "Conv" not in ops and ops["Relu"] == 1
    assert_quantized_close(model, g, feeds)


def test_int8_keeps_a_conv_read_by_two_nodes_float():
    nodes = [conv("x", "a", "wa", name="ca"), conv("a", "o1", "w1", name="c1"), conv("a", "o2", "w2", name="c2")]
    model = graphs.model(nodes, X3, TWO_OUTS, FAN_WEIGHTS)
    feeds = feeds_for(model)
    g, res, plan = quantize(model, feeds)
    assert plan.nodes == ("c1", "c2") and [s.node for s in res.skipped] == ["ca"]
    assert "2 readers" in res.skipped[0].reason and "uint8" in res.skipped[0].reason
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 1
    assert_quantized_close(model, g, feeds)
    g, res, plan = quantize(model, feeds, UINT8)
    assert plan.nodes == ("ca", "c1", "c2") and ort_ops(export(g))["QLinearConv"] == 3


def test_graph_output_produced_by_a_quantized_conv_keeps_its_name():
    model = conv_relu_conv(extra_out=True, act="Relu")  # z (the Relu output) is also a graph output
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds, UINT8)
    assert [o.name for o in g.outputs] == ["o", "z"]
    assert g.outputs[1].inputs[0].op == "DequantizeLinear"
    assert_quantized_close(model, g, feeds)


# ---------------------------------------------------------------- refusals and the plan

def test_exclusion_by_name_and_by_op_type():
    model = conv_relu_conv()
    g, res, plan = quantize(model, config=QuantConfig(exclude=("conv2",)))
    assert plan.nodes == ("conv",) and [(s.node, s.reason) for s in res.skipped] == [
        ("conv2", "excluded by the configuration")]
    assert node(g, "conv2").inputs[1].name == "w2"
    g, res, plan = quantize(model, config=QuantConfig(exclude=("Conv",)))
    assert not res.modified and not plan.nodes and len(res.skipped) == 2


def test_missing_or_unusable_ranges_leave_the_nodes_float():
    model = conv_relu_conv()
    feeds = feeds_for(model)
    good = minmax_ranges(model, [feeds], plan_quantization(gs.import_onnx(model), QuantConfig()).tensors)

    def run(**changes):
        ranges = {**good, **changes}
        g = gs.import_onnx(model)
        res = InsertQDQPass({k: v for k, v in ranges.items() if v is not None}, QuantConfig())(g)
        return res, [(s.node, s.reason) for s in res.skipped]

    res, skipped = run(o=TensorRange("o", -np.inf, np.inf))
    assert skipped == [("conv2", "output 'o': calibrated range [-inf, inf] is not a finite interval")]
    assert res.stats["quantize_conv"] == 1
    res, skipped = run(z=TensorRange("z", 0.0, 3.0, nonfinite=5))  # e.g. an attention mask's -inf
    assert skipped == [("conv", "output 'y': no calibrated range"),
                       ("conv2", "input 'z': 5 non-finite values seen in calibration")] and not res.modified
    res, skipped = run(x=None)
    assert skipped == [("conv", "input 'x': no calibrated range")] and res.stats["quantize_conv"] == 1


def test_leaves_alone_what_it_does_not_understand():
    nodes = [helper.make_node("Conv", ["x", "wx"], ["y"], name="dyn_w", pads=[1] * 4),
             helper.make_node("ConvTranspose", ["y", "wt"], ["t"], name="convt"),
             helper.make_node("FusedConv", ["t", "wf"], ["o"], name="fused", domain="com.microsoft",
                              activation="Relu")]
    g = graphs.graph(nodes, [*X3, ("wx", F32, [4, 3, 3, 3])], [("o", F32, [1, 4, 9, 9])],
                     [("wt", ws(4, 4, 2, 2, seed=1)), ("wf", ws(4, 4, 1, 1, seed=2))],
                     extra_opsets=[("com.microsoft", 1)])
    res = InsertQDQPass({}, QuantConfig())(g)
    assert not res.modified
    assert {s.node: s.reason for s in res.skipped} == {
        "dyn_w": "weight is not a constant",
        "convt": "onnxruntime has no int8 ConvTranspose kernel: left in float",
        "fused": "custom domain com.microsoft: left in float"}


def test_conv_transpose_for_tensorrt_is_per_channel_on_axis_1():
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["o"], name="ct", strides=[2, 2], group=2)]
    w = ws(4, 3, 2, 2, seed=1)
    model = graphs.model(nodes, [("x", F32, [1, 4, 5, 5])], [("o", F32, [1, 6, 10, 10])],
                         [("w", w), ("b", ws(6, seed=2))])
    feeds = feeds_for(model)
    g, res, _ = quantize(model, feeds, TRT)
    _, sw, _, axis = dq_inputs(g, "ct", 1)
    assert axis == 1 and sw.shape == (3,)
    np.testing.assert_allclose(sw, np.abs(w).max((0, 2, 3)) / 127, rtol=1e-6)
    assert_quantized_close(model, g, feeds, steps=2)


def test_requires_opset_13_and_ensure_opset_upgrades():
    model = conv_relu_conv(opset=11)
    with pytest.raises(UnsupportedModelError, match="opset 13"):
        InsertQDQPass({}, QuantConfig())(gs.import_onnx(model))
    upgraded = ensure_opset(model, 13)
    assert upgraded.opset_import[0].version == 13 and ensure_opset(upgraded, 13) is upgraded
    feeds = feeds_for(model)
    g, res, _ = quantize(upgraded, feeds)
    assert res.stats["quantize_conv"] == 2 and ort_ops(export(g))["QLinearConv"] == 2
    assert_quantized_close(model, g, feeds)


@pytest.mark.parametrize("opset", [17, 21])
def test_newer_opsets(opset):
    model = conv_relu_conv(opset=opset, act="Clip")
    feeds = feeds_for(model, 4.0)
    g, res, _ = quantize(model, feeds)
    ops = ort_ops(export(g))
    assert ops["QLinearConv"] == 2 and not {"Clip", "Conv"} & set(ops)
    assert_quantized_close(model, g, feeds)


def test_plan_lists_nodes_tensors_and_exclusions_without_touching_the_graph():
    model = two_convs_then([helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                            helper.make_node("Relu", ["s"], ["r"]), conv("r", "o", "wc", name="cc")],
                           extra_inits=[("wc", ws(4, 4, 3, 3, seed=3))])
    g = gs.import_onnx(model)
    before = gs.export_onnx(g).graph
    plan = plan_quantization(g, QuantConfig(exclude=("cb",)))
    assert gs.export_onnx(g).graph == before
    assert plan.nodes == ("ca", "cc") and plan.tensors == ("x", "a", "r", "o")
    assert [s.node for s in plan.excluded] == ["cb"]


# ---------------------------------------------------------------- the sample CNN

def test_digits_cnn_keeps_its_accuracy_and_runs_int8_kernels():
    model = ensure_opset(onnxopt.optimize(onnx.load(MODELS / "digits_cnn.onnx")), 13)
    calib = np.load(MODELS / "digits_cnn.calib.npz")["image"]
    test = np.load(MODELS / "digits_cnn.test.npz")["image"]
    labels = np.load(MODELS / "digits_cnn.test_labels.npy")
    g = gs.import_onnx(model)
    plan = plan_quantization(g, QuantConfig())
    ranges = minmax_ranges(model, [{"image": calib[i:i + 16]} for i in range(0, len(calib), 16)], plan.tensors)
    res = InsertQDQPass(ranges, QuantConfig())(g)
    assert not res.skipped and res.stats["quantize_conv"] == 2 and res.stats["quantize_gemm"] == 2
    int8 = export(g)
    ops = ort_ops(int8)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2 and not {"Conv", "Gemm", "FusedGemm"} & set(ops)
    accuracy = {}
    for name, m in (("float", model), ("int8", int8)):
        logits = runtime.run(runtime.session(m), {"image": test})["logits"]
        accuracy[name] = float((logits.argmax(1) == labels).mean())
    assert accuracy["int8"] >= accuracy["float"] - 0.005, accuracy  # the issue asks for 0.5 points
