"""_symbolic_shapes.Facts: what it derives, and that onnxruntime agrees on every tensor for every size."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.passes._symbolic_shapes import Facts, Sym, broadcast_dim, solve_minus_one
from tests import graphs

F32 = np.float32
A, B = Sym("a"), Sym("b")


def node(op, inputs, out, **attrs):
    return helper.make_node(op, inputs, [out], **attrs)


def const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def run_all(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every tensor of the model, as onnxruntime computes it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for n in m.graph.node:
        m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in n.output if o and o not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {**feeds, **dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))}


def assert_facts_hold(model: onnx.ModelProto, *feeds: dict) -> Facts:
    """Static dims and values match, a symbol means one value throughout, dtypes match."""
    graph = gs.import_onnx(model)
    facts = Facts(graph)
    tensors = graph.tensors()
    for feed in feeds:
        env: dict[Sym, int] = {}
        for name, arr in run_all(model, feed).items():
            t = tensors[name]
            dims, value = facts.dims(t), facts.value(t)
            if facts.dtype(t) is not None:
                assert helper.tensor_dtype_to_np_dtype(facts.dtype(t)) == arr.dtype, name
            if dims is None:
                continue
            assert len(dims) == arr.ndim, (name, dims, arr.shape)
            pairs = list(zip(dims, arr.shape, strict=True))
            if value is not None:
                pairs += list(zip(value, arr.reshape(-1).tolist(), strict=True))
            for d, actual in pairs:
                if isinstance(d, Sym):
                    assert env.setdefault(d, actual) == actual, (name, d, env[d], actual)
                else:
                    assert d == actual, (name, dims, value, arr)
    return facts


# --- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "expected"), [
    (A, A, A), (A, 1, A), (1, B, B), (3, 3, 3), (3, A, 3), (A, 3, 3),  # a valid run has A in (1, 3)
    (A, B, None), (3, 4, None),
])
def test_broadcast_dim(a, b, expected):
    assert broadcast_dim(a, b) == expected


@pytest.mark.parametrize(("in_dims", "known", "expected"), [
    ((A, B, 64), [A, B, 16], 4),
    ((A, B, 64), [A, 64], B),
    ((A, 4, 16), [A], 64),
    ((A, B, 64), [A, 48], None),   # 64 B / 48 is not a dim we can name
    ((A, B), [B, 1], A),
    ((A, B), [A, A], None),
])
def test_solve_minus_one(in_dims, known, expected):
    assert solve_minus_one(in_dims, known) == expected


# --- facts checked against onnxruntime -------------------------------------------------------


def test_attention_rows_and_masks():
    """softmax(q k + mask) v: rows are q's dim 2, the mask broadcasts, the view is solved."""
    nodes = [node("MatMul", ["q", "k"], "sc"), node("Add", ["sc", "mask"], "scm"),
             node("Softmax", ["scm"], "p", axis=-1), node("MatMul", ["p", "v"], "x"),
             node("Transpose", ["x"], "xt", perm=[0, 2, 1, 3]), node("Shape", ["xt"], "s"),
             const("two", np.array([0, 1], np.int64)), node("Gather", ["s", "two"], "lead", axis=0),
             const("m1", np.array([-1], np.int64)), node("Concat", ["lead", "m1"], "target", axis=0),
             node("Reshape", ["xt", "target"], "y")]
    inputs = [("q", F32, ["N", 4, "S", 8]), ("k", F32, ["N", 4, 8, "T"]), ("v", F32, ["N", 4, "T", 8]),
              ("mask", F32, ["N", 1, 1, "T"])]
    model = graphs.model(nodes, inputs, [("y", F32, ["n", "s", "c"])], opset=13)
    feeds = [{"q": graphs.rand(n, 4, s, 8), "k": graphs.rand(n, 4, 8, t), "v": graphs.rand(n, 4, t, 8),
              "mask": graphs.rand(n, 1, 1, t)} for n, s, t in ((2, 3, 5), (1, 1, 1), (3, 6, 1))]
    facts = assert_facts_hold(model, *feeds)
    g = gs.import_onnx(model).tensors()
    q, x, y = facts.dims(g["q"]), facts.dims(g["x"]), facts.dims(g["y"])
    assert x[2] == q[2] and x[1:] == (4, q[2], 8)
    assert y == (x[0], q[2], 32)  # the -1 of (xt.size(0), xt.size(1), -1) is 4 * 8


def test_shape_arithmetic_values():
    """TorchScript's mask expand: where(shape == -1, 1, shape) and Range over a dim."""
    nodes = [node("Shape", ["x"], "s"), const("i1", np.array(1, np.int64)), node("Gather", ["s", "i1"], "n", axis=0),
             const("u", np.array([0], np.int64)), node("Unsqueeze", ["n", "u"], "n1"),
             const("m1", np.array([-1], np.int64)), node("Concat", ["m1", "n1"], "shape", axis=0),
             node("Equal", ["shape", "m1"], "eq"), const("ones", np.array([1, 1], np.int64)),
             node("Where", ["eq", "ones", "shape"], "fixed"), node("Cast", ["fixed"], "fixed32", to=TensorProto.INT32),
             const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64)),
             node("Range", ["zero", "n", "one"], "r"), node("Slice", ["s", "i1v", "big"], "tail"),
             node("Expand", ["x", "fixed"], "y")]
    model = graphs.model(nodes, [("x", F32, [1, "S"])], [("y", F32, ["a", "b"]), ("fixed32", np.int32, [2]),
                                                           ("r", np.int64, ["n"]), ("tail", np.int64, [1])],
                         [("i1v", np.array([1], np.int64)), ("big", np.array([2**62], np.int64))], opset=13)
    facts = assert_facts_hold(model, {"x": graphs.rand(1, 5)}, {"x": graphs.rand(1, 1)})
    g = gs.import_onnx(model).tensors()
    s = facts.dims(g["x"])[1]
    assert facts.value(g["eq"]) == (True, False)  # a dim is never -1
    assert facts.value(g["fixed"]) == (1, s) and facts.dtype(g["fixed32"]) == TensorProto.INT32
    assert facts.dims(g["r"]) == (s,) and facts.value(g["tail"]) == (s,)
    assert facts.dims(g["y"]) == (1, s)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_convolutions_pools_and_resize(opset):
    nodes = [node("Conv", ["x", "w"], "c", pads=[1, 1, 1, 1], strides=[2, 2]),
             node("MaxPool", ["c"], "p", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             node("Shape", ["x"], "sx"), node("Shape", ["p"], "sp"),
             node("Slice", ["sp", "z", "two"], "nc"), node("Slice", ["sx", "two", "four"], "hw"),
             node("Concat", ["nc", "hw"], "sizes", axis=0),
             node("Resize", ["p", "roi", "scales", "sizes"] if opset < 13 else ["p", "", "", "sizes"], "r",
                  mode="nearest"),
             node("GlobalAveragePool", ["r"], "g"), node("Flatten", ["g"], "y")]
    inits = [("w", graphs.rand(6, 3, 3, 3)), ("z", np.array([0], np.int64)), ("two", np.array([2], np.int64)),
             ("four", np.array([4], np.int64)), ("roi", np.zeros(0, F32)), ("scales", np.zeros(0, F32))]
    model = graphs.model(nodes, [("x", F32, ["N", 3, "H", "W"])], [("y", F32, ["n", "c"])], inits, opset=opset)
    facts = assert_facts_hold(model, {"x": graphs.rand(2, 3, 17, 9)}, {"x": graphs.rand(1, 3, 8, 8)})
    g = gs.import_onnx(model).tensors()
    n, _, h, w = facts.dims(g["x"])
    assert facts.dims(g["p"])[:2] == (n, 6) and facts.dims(g["r"]) == (n, 6, h, w)
    assert facts.dims(g["y"]) == (n, 6)


def test_static_input_dims_fold_through_the_chain():
    nodes = [node("Conv", ["x", "w"], "c", pads=[0, 0, 0, 0]), node("Shape", ["c"], "s")]
    model = graphs.model(nodes, [("x", F32, [2, 3, 8, 8])], [("s", np.int64, [4])], [("w", graphs.rand(4, 3, 3, 3))])
    facts = assert_facts_hold(model, {"x": graphs.rand(2, 3, 8, 8)})
    assert facts.value(gs.import_onnx(model).tensors()["s"]) == (2, 4, 6, 6)


def test_different_inputs_never_share_a_symbol():
    """Same dim_param, different inputs: onnxruntime runs them with different sizes (and broadcasts)."""
    model = graphs.model([node("Add", ["a", "b"], "y")], [("a", F32, ["N", 2]), ("b", F32, ["N", 2])],
                         [("y", F32, ["n", 2])])
    facts = assert_facts_hold(model, {"a": graphs.rand(1, 2), "b": graphs.rand(3, 2)},
                              {"a": graphs.rand(4, 2), "b": graphs.rand(1, 2)})
    g = gs.import_onnx(model).tensors()
    a, b, y = (facts.dims(g[n])[0] for n in "aby")
    assert len({a, b, y}) == 3


def test_custom_ops_get_no_facts():
    nodes = [helper.make_node("Mystery", ["x"], ["m"], domain="custom"), node("Relu", ["m"], "y")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph = gs.import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                               helper.make_opsetid("custom", 1)]))
    facts = Facts(graph)
    m = graph.tensors()["m"]
    assert facts.dims(m) is None and facts.dtype(m) is None and facts.dims(graph.tensors()["y"]) is None


@pytest.mark.parametrize(("to", "dims_kept", "kept"), [
    (TensorProto.INT32, True, True), (TensorProto.INT64, True, True),
    (TensorProto.UINT8, False, False), (TensorProto.INT16, False, True),
])
def test_a_cast_keeps_shape_values_only_where_the_type_holds_them(to, dims_kept, kept):
    """x.size(1) cast to uint8 wraps at 256 (300 -> 44): it is no longer the dim."""
    np_to = helper.tensor_dtype_to_np_dtype(to)
    nodes = [node("Shape", ["x"], "s"), node("Cast", ["s"], "c", to=to), node("Cast", ["big"], "b", to=to)]
    model = graphs.model(nodes, [("x", F32, [1, "W"])], [("c", np_to, [2]), ("b", np_to, [1])],
                         [("big", np.array([300], np.int64))])
    facts = assert_facts_hold(model, {"x": graphs.rand(1, 300)}, {"x": graphs.rand(1, 3)})
    g = gs.import_onnx(model).tensors()
    w = facts.dims(g["x"])[1]
    assert facts.value(g["c"]) == ((1, w) if dims_kept else None)  # a dim may be any size
    assert facts.value(g["b"]) == ((300,) if kept else None)
