"""EliminateNoopsPass: every rule checked against onnxruntime, with the cases it must refuse."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.passes.eliminate_noops import EliminateNoopsPass
from tests import graphs, numerics

F32 = np.float32
I64_MAX = np.iinfo(np.int64).max
INF = np.float32(np.inf)


def i64(*v):
    return np.array(v, np.int64)


def noop_model(nodes, inits=(), *, shape=(2, 3, 4), opset=17, dtype=F32, infer=False):
    """x -> nodes (the last writes t) -> Neg -> y: the candidate reads a graph input, writes an inner tensor.

    y's type comes from onnx shape inference; ``infer`` also keeps the inferred value_info.
    """
    x = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))
    g = helper.make_graph([*nodes, helper.make_node("Neg", ["t"], ["y"])], "test", [x],
                          [onnx.ValueInfoProto(name="y")],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    m.graph.output[0].CopyFrom(inferred.graph.output[0])
    m = inferred if infer else m
    onnx.checker.check_model(m, full_check=True)
    return m


def run_pass(model):
    g = gs.import_onnx(model)
    return g, EliminateNoopsPass()(g)


def assert_removed(model, ops_after, stats, feeds=None):
    g, res = run_pass(model)
    assert res.modified and dict(res.stats) == stats
    assert [n.op for n in g.nodes] == ops_after
    assert [t.name for t in g.inputs] == [t.name for t in model.graph.input]
    assert [t.name for t in g.outputs] == [t.name for t in model.graph.output]
    numerics.assert_same_outputs(model, g, feeds)
    assert not EliminateNoopsPass()(g).modified, "not idempotent"
    return g, res


def assert_untouched(model):
    g, res = run_pass(model)
    assert not res.modified and not res.stats
    assert [n.op for n in g.nodes] == [n.op_type for n in model.graph.node]
    return res


def node(op, inputs, out="t", **attrs):
    return helper.make_node(op, inputs, [out], **attrs)


# (id, nodes, initializers, opset, input shape, stats key)
REMOVED = [
    ("identity", [node("Identity", ["x"])], [], 17, (2, 3, 4), "identity"),
    ("dropout_opset11_ratio_attr", [helper.make_node("Dropout", ["x"], ["t", "mask"], ratio=0.5)], [], 11,
     (2, 3, 4), "dropout"),
    ("dropout_opset17_ratio_input", [node("Dropout", ["x", "r"])], [("r", F32(0.3))], 17, (2, 3, 4),
     "dropout"),
    ("dropout_training_false", [helper.make_node("Dropout", ["x", "r", "tm"], ["t", "mask"])],
     [("r", F32(0.3)), ("tm", np.array(False))], 17, (2, 3, 4), "dropout"),
    ("cast_same_dtype", [node("Cast", ["x"], to=TensorProto.FLOAT)], [], 17, (2, 3, 4), "cast"),
    ("castlike_same_dtype", [node("CastLike", ["x", "like"])], [("like", F32(0))], 17, (2, 3, 4), "cast"),
    ("reshape_same_static", [node("Reshape", ["x", "s"])], [("s", i64(2, 3, 4))], 17, (2, 3, 4), "reshape"),
    ("reshape_copy_and_infer", [node("Reshape", ["x", "s"])], [("s", i64(0, 3, -1))], 17, ("N", 3, 4),
     "reshape"),
    ("expand_broadcast_only", [node("Expand", ["x", "s"])], [("s", i64(3, 1))], 17, (2, 3, 4), "expand"),
    ("flatten_rank2", [node("Flatten", ["x"], axis=1)], [], 17, (6, 4), "flatten"),
    ("squeeze_opset11_no_ones", [node("Squeeze", ["x"])], [], 11, (2, 3, 4), "squeeze"),
    ("squeeze_opset17_no_ones", [node("Squeeze", ["x"])], [], 17, (2, 3, 4), "squeeze"),
    ("tile_ones", [node("Tile", ["x", "r"])], [("r", i64(1, 1, 1))], 17, (2, 3, 4), "tile"),
    ("slice_full_opset11", [node("Slice", ["x", "s", "e", "a"])],
     [("s", i64(0, -9)), ("e", i64(I64_MAX, 4)), ("a", i64(0, -1))], 11, ("N", 3, 4), "slice"),
    ("slice_full_opset17_steps", [node("Slice", ["x", "s", "e", "a", "st"])],
     [("s", i64(0)), ("e", i64(2**31 - 1)), ("a", i64(1)), ("st", i64(1))], 17, (2, "C", 4), "slice"),
    ("pad_zeros", [node("Pad", ["x", "p"], mode="reflect")], [("p", i64(0, 0, 0, 0, 0, 0))], 17, (2, 3, 4),
     "pad"),
    ("transpose_identity_perm", [node("Transpose", ["x"], perm=[0, 1, 2])], [], 17, (2, 3, 4), "transpose"),
    ("concat_single", [node("Concat", ["x"], axis=1)], [], 17, (2, 3, 4), "single_input"),
    ("sum_single", [node("Sum", ["x"])], [], 17, (2, 3, 4), "single_input"),
    ("max_single", [node("Max", ["x"])], [], 17, (2, 3, 4), "single_input"),
    ("mean_single", [node("Mean", ["x"])], [], 17, (2, 3, 4), "single_input"),
    ("split_one_output_opset11", [node("Split", ["x"], axis=2, split=[4])], [], 11, (2, 3, 4),
     "single_input"),
    ("split_one_output_opset17", [node("Split", ["x", "sp"], axis=2)], [("sp", i64(4))], 17, (2, 3, 4),
     "single_input"),
    ("mul_one_scalar", [node("Mul", ["x", "c"])], [("c", F32(1))], 17, (2, 3, 4), "neutral_operand"),
    ("one_mul_x", [node("Mul", ["c", "x"])], [("c", np.ones((1, 4), F32))], 17, (2, 3, 4), "neutral_operand"),
    ("div_one_row", [node("Div", ["x", "c"])], [("c", np.ones(4, F32))], 17, ("N", 3, 4), "neutral_operand"),
    ("add_zero", [node("Add", ["c", "x"])], [("c", np.zeros((3, 1), F32))], 17, (2, 3, 4), "neutral_operand"),
    ("sub_zero", [node("Sub", ["x", "c"])], [("c", F32(0))], 17, (2, 3, 4), "neutral_operand"),
    ("pow_one", [node("Pow", ["x", "c"])], [("c", F32(1))], 17, (2, 3, 4), "neutral_operand"),
    ("clip_inf_bounds_opset17", [node("Clip", ["x", "lo", "hi"])], [("lo", -INF), ("hi", INF)], 17, (2, 3, 4),
     "clip"),
    ("clip_inf_bounds_opset11", [node("Clip", ["x", "lo", "hi"])], [("lo", -INF), ("hi", INF)], 11, (2, 3, 4),
     "clip"),
]


@pytest.mark.parametrize("case", REMOVED, ids=[c[0] for c in REMOVED])
def test_removes_noop(case):
    _, nodes, inits, opset, shape, kind = case
    assert_removed(noop_model(nodes, inits, shape=shape, opset=opset), ["Neg"], {kind: 1})


def test_clip_without_bounds_on_integers():
    assert_removed(noop_model([node("Clip", ["x"])], dtype=np.int32, opset=13), ["Neg"], {"clip": 1})


def test_constants_from_constant_nodes():
    shape = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(i64(2, 3, 4)))
    one = helper.make_node("Constant", [], ["one"], value_float=1.0)
    nodes = [shape, node("Reshape", ["x", "s"], "r"), one, node("Mul", ["r", "one"])]
    assert_removed(noop_model(nodes), ["Neg"], {"reshape": 1, "neutral_operand": 1})


def test_cast_after_relu_uses_inferred_dtype():
    nodes = [node("Relu", ["x"], "r"), node("Cast", ["r"], to=TensorProto.FLOAT)]
    assert_removed(noop_model(nodes), ["Relu", "Neg"], {"cast": 1})  # Relu's output type is its input's
    assert_removed(noop_model(nodes, infer=True), ["Relu", "Neg"], {"cast": 1})


def test_cast_of_a_custom_op_output_is_never_guessed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Mystery", ["x"], ["r"], domain="custom"), node("Cast", ["r"], "y", to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "test", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    graph = gs.import_onnx(m)
    assert not EliminateNoopsPass()(graph).modified
    assert [n.op for n in graph.nodes] == ["Mystery", "Cast"]


def test_shape_arithmetic_casts_are_removed():
    """TorchScript's Cast(x.size(0), int64) and Cast(bool mask, bool): the dtype follows from the ops."""
    nodes = [node("Shape", ["x"], "s"), node("Gather", ["s", "zero"], "n", axis=0),
             node("Cast", ["n"], "n64", to=TensorProto.INT64), node("Cast", ["n64"], "nf", to=TensorProto.FLOAT),
             node("Greater", ["x", "nf"], "m"), node("Cast", ["m"], "mb", to=TensorProto.BOOL),
             node("Where", ["mb", "x", "nf"])]
    assert_removed(noop_model(nodes, [("zero", i64(0))], shape=(3, 4)),
                   ["Shape", "Gather", "Cast", "Greater", "Where", "Neg"], {"cast": 2})


def test_identity_writing_graph_output_keeps_its_name():
    m = graphs.model([node("Relu", ["x"], "r"), node("Identity", ["r"], "y")],
                     [("x", F32, [2, 3])], [("y", F32, [None, None])])
    g, _ = assert_removed(m, ["Relu"], {"identity": 1})
    assert g.nodes[0].outputs[0].name == "y"


def test_identity_chain_collapses():
    nodes = [node("Identity", ["x"], "a"), node("Identity", ["a"], "b"), node("Identity", ["b"])]
    assert_removed(noop_model(nodes), ["Neg"], {"identity": 3})


def test_transposes_that_cancel_are_removed():
    nodes = [node("Transpose", ["x"], "a", perm=[0, 2, 1]), node("Transpose", ["a"], perm=[0, 2, 1])]
    assert_removed(noop_model(nodes), ["Neg"], {"merge_transposes": 1, "transpose": 1})


def test_cancelling_transposes_from_input_to_output_leave_one_identity_transpose():
    m = graphs.model([node("Transpose", ["x"], "a", perm=[1, 0]), node("Transpose", ["a"], "y", perm=[1, 0])],
                     [("x", F32, [2, 3])], [("y", F32, [2, 3])])
    g, res = assert_removed(m, ["Transpose"], {"merge_transposes": 1})
    assert list(g.nodes[0].attrs["perm"]) == [0, 1] and g.nodes[0].inputs[0].name == "x"
    assert [s.op for s in res.skipped] == ["Transpose"]  # x -> y cannot vanish without a rename


def test_transposes_compose_into_one():
    nodes = [node("Transpose", ["x"], "a", perm=[1, 0, 2]), node("Transpose", ["a"], perm=[0, 2, 1])]
    g, _ = assert_removed(noop_model(nodes), ["Transpose", "Neg"], {"merge_transposes": 1})
    assert list(g.nodes[0].attrs["perm"]) == [1, 2, 0]


def test_transpose_with_default_perm_composes():
    nodes = [node("Transpose", ["x"], "a"), node("Transpose", ["a"], perm=[0, 2, 1])]
    g, _ = assert_removed(noop_model(nodes), ["Transpose", "Neg"], {"merge_transposes": 1})
    assert list(g.nodes[0].attrs["perm"]) == [2, 0, 1]


def test_reshapes_merge_and_resolve_a_copied_dim():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"])]
    m = noop_model(nodes, [("s1", i64(6, 4)), ("s2", i64(0, 2, 2))])
    g, _ = assert_removed(m, ["Reshape", "Neg"], {"merge_reshapes": 1})
    assert g.nodes[0].inputs[0].name == "x"
    assert g.nodes[0].inputs[1].values.tolist() == [6, 2, 2]


def test_reshapes_merging_into_the_input_shape_vanish():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"])]
    m = noop_model(nodes, [("s1", i64(0, -1)), ("s2", i64(0, 3, 4))], shape=("N", 3, 4))
    assert_removed(m, ["Neg"], {"merge_reshapes": 1, "reshape": 1})


def test_noop_feeding_if_branch_rewires_the_inner_reader():
    then_g = helper.make_graph([node("Neg", ["a"], "ty")], "then", [],
                               [helper.make_tensor_value_info("ty", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([node("Relu", ["a"], "ey")], "else", [],
                               [helper.make_tensor_value_info("ey", TensorProto.FLOAT, [3])])
    m = graphs.model([node("Identity", ["x"], "a"),
                      helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [("x", F32, [3]), ("c", np.bool_, [])], [("y", F32, [3])])
    x = graphs.rand(3, seed=1)
    g, res = run_pass(m)
    assert res.stats == {"identity": 1} and [n.op for n in g.nodes] == ["If"]
    for c in (True, False):
        numerics.assert_same_outputs(m, g, {"x": x, "c": np.array(c)})


# ---- refusals: the graph must come back as it was ----

UNTOUCHED = [
    ("cast_to_other_dtype", [node("Cast", ["x"], to=TensorProto.FLOAT16)], [], 17, (2, 3, 4)),
    ("reshape_other_shape", [node("Reshape", ["x", "s"])], [("s", i64(6, 4))], 17, (2, 3, 4)),
    ("reshape_literal_on_dynamic", [node("Reshape", ["x", "s"])], [("s", i64(2, 3, 4))], 17, ("N", 3, 4)),
    ("reshape_allowzero", [node("Reshape", ["x", "s"], allowzero=1)], [("s", i64(0, 3, 4))], 17, (2, 3, 4)),
    ("expand_grows_rank", [node("Expand", ["x", "s"])], [("s", i64(1, 2, 3, 4))], 17, (2, 3, 4)),
    ("expand_grows_dim", [node("Expand", ["x", "s"])], [("s", i64(2, 3, 4))], 17, (2, 3, 1)),
    ("flatten_rank3", [node("Flatten", ["x"], axis=1)], [], 17, (2, 3, 4)),
    ("squeeze_axes_attr", [node("Squeeze", ["x"], axes=[1])], [], 11, (2, 1, 4)),
    ("squeeze_axes_input", [node("Squeeze", ["x", "a"])], [("a", i64(1))], 17, (2, 1, 4)),
    ("squeeze_a_one", [node("Squeeze", ["x"])], [], 17, (2, 1, 4)),
    ("unsqueeze", [node("Unsqueeze", ["x", "a"])], [("a", i64(0))], 17, (2, 3, 4)),
    ("tile_repeats", [node("Tile", ["x", "r"])], [("r", i64(1, 2, 1))], 17, (2, 3, 4)),
    ("slice_partial", [node("Slice", ["x", "s", "e", "a"])], [("s", i64(0)), ("e", i64(3)), ("a", i64(2))],
     17, (2, 3, 4)),
    ("slice_reversed", [node("Slice", ["x", "s", "e", "a", "st"])],
     [("s", i64(-1)), ("e", i64(-I64_MAX)), ("a", i64(2)), ("st", i64(-1))], 17, (2, 3, 4)),
    ("slice_step2", [node("Slice", ["x", "s", "e", "a", "st"])],
     [("s", i64(0)), ("e", i64(I64_MAX)), ("a", i64(2)), ("st", i64(2))], 17, (2, 3, 4)),
    ("slice_end_unknown_dim", [node("Slice", ["x", "s", "e", "a"])], [("s", i64(0)), ("e", i64(100)),
                                                                       ("a", i64(0))], 17, ("N", 3, 4)),
    ("pad_nonzero", [node("Pad", ["x", "p"])], [("p", i64(0, 0, 0, 0, 0, 1))], 17, (2, 3, 4)),
    ("transpose_perm", [node("Transpose", ["x"], perm=[0, 2, 1])], [], 17, (2, 3, 4)),
    ("concat_two", [node("Concat", ["x", "x"], axis=1)], [], 17, (2, 3, 4)),
    ("sub_from_zero", [node("Sub", ["c", "x"])], [("c", F32(0))], 17, (2, 3, 4)),
    ("mul_almost_one", [node("Mul", ["x", "c"])], [("c", np.array([1, 1, 1, 1.5], F32))], 17, (2, 3, 4)),
    ("mul_one_grows_rank", [node("Mul", ["x", "c"])], [("c", np.ones((1, 1, 1, 1), F32))], 17, (2, 3, 4)),
    ("add_zero_grows_dim", [node("Add", ["x", "c"])], [("c", np.zeros((3, 4), F32))], 17, (2, 3, 1)),
    ("div_into_one", [node("Div", ["c", "x"])], [("c", F32(1))], 17, (2, 3, 4)),
    ("pow_two", [node("Pow", ["x", "c"])], [("c", F32(2))], 17, (2, 3, 4)),
    # Absent float bounds mean lowest/max: onnxruntime turns +-inf into +-FLT_MAX.
    ("clip_no_bounds_float", [node("Clip", ["x"])], [], 17, (2, 3, 4)),
    ("clip_one_sided_opset11", [node("Clip", ["x", "", "hi"])], [("hi", INF)], 11, (2, 3, 4)),
    ("clip_finite_bounds", [node("Clip", ["x", "lo", "hi"])], [("lo", F32(-6)), ("hi", F32(6))], 17,
     (2, 3, 4)),
    ("dropout_training", [node("Dropout", ["x", "r", "tm"])], [("r", F32(0.3)), ("tm", np.array(True))], 17,
     (2, 3, 4)),
]


@pytest.mark.parametrize("case", UNTOUCHED, ids=[c[0] for c in UNTOUCHED])
def test_leaves_non_noop_alone(case):
    _, nodes, inits, opset, shape = case
    assert not assert_untouched(noop_model(nodes, inits, shape=shape, opset=opset)).skipped


def test_squeeze_all_on_dynamic_dims_stays():
    # N may be 1 at run time, and then Squeeze drops it.
    m = graphs.model([node("Squeeze", ["x"], "y")], [("x", F32, ["N", 3, 4])], [("y", F32, [None, 3, 4])])
    assert_untouched(m)


def test_clip_without_bounds_is_not_a_noop_for_infinities():
    m = noop_model([node("Clip", ["x"])])
    x = np.array([np.inf, -np.inf, 1.0] * 8, F32).reshape(2, 3, 4)
    assert np.isfinite(numerics.run(m, {"x": x})["y"]).all()  # why the pass must keep it


def test_identity_from_graph_input_to_graph_output_stays():
    m = graphs.model([node("Identity", ["x"], "y")], [("x", F32, [2, 3])], [("y", F32, [None, None])])
    res = assert_untouched(m)
    assert [s.op for s in res.skipped] == ["Identity"] and "'y'" in res.skipped[0].reason


def test_identity_writing_output_from_shared_tensor_stays():
    m = graphs.model([node("Relu", ["x"], "r"), node("Identity", ["r"], "y"), node("Neg", ["r"], "z")],
                     [("x", F32, [2, 3])], [("y", F32, [None, None]), ("z", F32, [None, None])])
    assert assert_untouched(m).skipped


def test_dropout_with_read_mask_stays():
    m = graphs.model([helper.make_node("Dropout", ["x"], ["t", "mask"], ratio=0.5),
                      node("Neg", ["t"], "y")], [("x", F32, [2, 3])],
                     [("y", F32, [None, None]), ("mask", np.bool_, [None, None])], opset=11)
    res = assert_untouched(m)
    assert [(s.op, "mask" in s.reason) for s in res.skipped] == [("Dropout", True)]


def test_dropout_with_computed_training_mode_stays():
    m = graphs.model([node("Dropout", ["x", "r", "tm"]), node("Neg", ["t"], "y")],
                     [("x", F32, [2, 3]), ("tm", np.bool_, [])], [("y", F32, [None, None])],
                     [("r", F32(0.5))])
    assert "training_mode" in assert_untouched(m).skipped[0].reason


def test_transposes_with_shared_middle_stay():
    m = graphs.model([node("Transpose", ["x"], "a", perm=[1, 0]), node("Transpose", ["a"], "y", perm=[1, 0]),
                      node("Neg", ["a"], "z")],
                     [("x", F32, [2, 3])], [("y", F32, [None, None]), ("z", F32, [None, None])])
    assert_untouched(m)


def test_reshapes_with_unresolvable_copied_dim_stay():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"])]
    assert_untouched(noop_model(nodes, [("s1", i64(-1, 4)), ("s2", i64(0, 2, 2))]))


def test_reshape_with_computed_shape_stays():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Shape", ["x"], "s2"), node("Reshape", ["a", "s2"])]
    assert_untouched(noop_model(nodes, [("s1", i64(6, 4))]))


def test_custom_domain_identity_stays():
    m = graphs.model([helper.make_node("Identity", ["x"], ["t"], domain="com.example"),
                      node("Neg", ["t"], "y")], [("x", F32, [2])], [("y", F32, [None, None])],
                     extra_opsets=[("com.example", 1)])
    assert_untouched(m)


def test_identity_inside_if_branch_is_left_alone():
    then_g = helper.make_graph([node("Identity", ["x"], "ty")], "then", [],
                               [helper.make_tensor_value_info("ty", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([node("Neg", ["x"], "ey")], "else", [],
                               [helper.make_tensor_value_info("ey", TensorProto.FLOAT, [3])])
    m = graphs.model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [("x", F32, [3]), ("c", np.bool_, [])], [("y", F32, [3])])
    assert_untouched(m)


# --- reshapes whose computed target is the input's own shape ----------------------------


def const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def size_of(src: str, j: int, out: str, opset: int) -> list[onnx.NodeProto]:
    """TorchScript's ``src.size(j)`` as a 1-element tensor: Shape -> Gather -> Unsqueeze."""
    nodes = [node("Shape", [src], f"{out}_s"), const(f"{out}_i", np.array(j, np.int64)),
             node("Gather", [f"{out}_s", f"{out}_i"], f"{out}_g", axis=0)]
    if opset < 13:
        return [*nodes, node("Unsqueeze", [f"{out}_g"], out, axes=[0])]
    return [*nodes, const(f"{out}_a", i64(0)), node("Unsqueeze", [f"{out}_g", f"{out}_a"], out)]


def attention_model(opset: int, rows_from: str = "q", rows_dim: int = 2) -> onnx.ModelProto:
    """x = softmax(q k) v, then x.view(x.size(0), -1, rows_from.size(rows_dim), 8), as the SDPA export does.

    The rows of x are q's dim 2 (MatMul keeps the left operand's rows), so with the
    default arguments the view is x's own shape and the Reshape is a no-op.
    """
    nodes = [node("MatMul", ["q", "k"], "sc"), node("Softmax", ["sc"], "p", axis=-1), node("MatMul", ["p", "v"], "x"),
             *size_of("x", 0, "d0", opset), *size_of(rows_from, rows_dim, "d2", opset),
             const("m1", i64(-1)), const("c8", i64(8)),
             node("Concat", ["d0", "m1", "d2", "c8"], "target", axis=0),
             node("Reshape", ["x", "target"], "r"), node("Relu", ["r"], "y")]
    inputs = [("q", F32, ["N", 4, "S", 8]), ("k", F32, ["N", 4, 8, "T"]), ("v", F32, ["N", 4, "T", 8])]
    return graphs.model(nodes, inputs, [("y", F32, ["N", 4, "S", 8])], opset=opset)


def attention_feeds(n: int, s: int, t: int) -> dict[str, np.ndarray]:
    return {"q": graphs.rand(n, 4, s, 8, seed=1), "k": graphs.rand(n, 4, 8, t, seed=2),
            "v": graphs.rand(n, 4, t, 8, seed=3)}


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_reshape_to_dims_that_provably_equal_the_input_is_removed(opset):
    model = attention_model(opset)
    g, res = run_pass(model)
    assert res.modified and res.stats == {"reshape": 1}
    assert [n.op for n in g.nodes] == ["MatMul", "Softmax", "MatMul", "Relu"]  # the Shape chains die with it
    for n, s, t in ((2, 5, 3), (1, 1, 7), (3, 4, 1)):  # every dynamic size, 1 included
        numerics.assert_same_outputs(model, g, attention_feeds(n, s, t))
    assert not EliminateNoopsPass()(g).modified


def test_reshape_to_a_dim_of_an_unrelated_tensor_stays():
    # k's dim 3 (T) is not x's dim 2 (S): they only match for some inputs
    assert_untouched(attention_model(13, rows_from="k", rows_dim=3))


# --- Unsqueeze pairs --------------------------------------------------------------------


def unsqueeze(src: str, out: str, axes: list[int], opset: int) -> list[onnx.NodeProto]:
    if opset < 13:
        return [node("Unsqueeze", [src], out, axes=axes)]
    return [const(f"{out}_axes", i64(*axes)), node("Unsqueeze", [src, f"{out}_axes"], out)]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(("chain", "merged"), [
    ([[1], [2], [3]], [1, 2, 3]),  # torch's mask[:, None, None, :] built one axis at a time
    ([[0], [0], [0]], [0, 1, 2]),
    ([[2], [0], [-1]], [0, 3, 4]),  # negative axes resolve against the known rank
    ([[0, 2], [1]], [0, 1, 3]),
    ([[-1], [1, -1]], [1, 3, 4]),
])
def test_unsqueeze_chain_merges_into_one(opset, chain, merged):
    srcs, outs = ["x", "u1", "u2"], ["u1", "u2", "u3"]
    nodes = [n for i, axes in enumerate(chain) for n in unsqueeze(srcs[i], outs[i], axes, opset)]
    nodes.append(node("Identity", [outs[len(chain) - 1]]))
    model = noop_model(nodes, shape=(2, 3), opset=opset)
    g, res = run_pass(model)
    assert res.modified and res.stats == {"merge_unsqueezes": len(chain) - 1, "identity": 1}
    assert [n.op for n in g.nodes] == ["Unsqueeze", "Neg"]
    u = g.nodes[0]
    axes = u.attrs["axes"] if opset < 13 else u.inputs[1].values.tolist()
    assert list(axes) == merged
    numerics.assert_same_outputs(model, g, {"x": graphs.rand(2, 3)})
    assert not EliminateNoopsPass()(g).modified


def test_unsqueeze_read_by_another_node_is_not_merged():
    nodes = [*unsqueeze("x", "u1", [0], 13), *unsqueeze("u1", "u2", [0], 13), node("Add", ["u1", "u2"])]
    assert_untouched(noop_model(nodes, shape=(2, 3), opset=13))


def test_unsqueeze_with_negative_axes_of_unknown_rank_is_not_merged():
    nodes = [helper.make_node("Mystery", ["x"], ["m"], domain="custom"), *unsqueeze("m", "u1", [-1], 13),
             *unsqueeze("u1", "t", [0], 13), node("Neg", ["t"], "y")]
    g = helper.make_graph(nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("custom", 1)])
    graph = gs.import_onnx(m)
    assert not EliminateNoopsPass()(graph).modified


# --- Squeeze/Unsqueeze and Cast round trips -------------------------------------------------


def squeeze(src: str, out: str, axes: list[int], opset: int) -> list[onnx.NodeProto]:
    if opset < 13:
        return [node("Squeeze", [src], out, axes=axes)]
    return [const(f"{out}_axes", i64(*axes)), node("Squeeze", [src, f"{out}_axes"], out)]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(("first", "a1", "a2"), [("squeeze", [1], [1]), ("squeeze", [1], [-2]),
                                                 ("unsqueeze", [0, 2], [2, 0]), ("unsqueeze", [-1], [3])])
def test_squeeze_and_unsqueeze_on_the_same_axes_cancel(opset, first, a1, a2):
    one, two = (squeeze, unsqueeze) if first == "squeeze" else (unsqueeze, squeeze)
    model = noop_model([*one("x", "a", a1, opset), *two("a", "t", a2, opset)], shape=(2, 1, 4), opset=opset)
    assert_removed(model, ["Neg"], {"squeeze_unsqueeze": 1})


def test_squeeze_then_unsqueeze_elsewhere_stays():
    assert_untouched(noop_model([*squeeze("x", "a", [1], 13), *unsqueeze("a", "t", [0], 13)], shape=(2, 1, 4)))


def shape_cast_model(mid: int) -> onnx.ModelProto:
    """paddle2onnx's x.shape[2:] as int32 and back, used as Resize sizes."""
    nodes = [node("Shape", ["x"], "s"), node("Slice", ["s", "two", "four"], "hw"),
             node("Cast", ["hw"], "hw32", to=mid), node("Cast", ["hw32"], "hw64", to=TensorProto.INT64),
             node("Concat", ["nc", "hw64"], "sizes", axis=0),
             node("Resize", ["x", "", "", "sizes"], "y", mode="nearest")]
    inits = [("two", i64(2)), ("four", i64(4)), ("nc", i64(1, 3))]
    return graphs.model(nodes, [("x", F32, [1, 3, "H", "W"])], [("y", F32, [1, 3, "h", "w"])], inits, opset=13)


def test_shape_values_through_int32_and_back_lose_no_cast():
    model = shape_cast_model(TensorProto.INT32)
    g, _ = assert_removed(model, ["Shape", "Slice", "Concat", "Resize"], {"merge_casts": 1, "cast": 1},
                          {"x": graphs.rand(1, 3, 5, 7)})


def test_shape_values_through_int16_keep_their_casts():
    assert_untouched(shape_cast_model(TensorProto.INT16))  # a dim over 32767 would wrap


@pytest.mark.parametrize(("dtype", "mid", "removed"), [
    (F32, TensorProto.DOUBLE, True), (F32, TensorProto.FLOAT16, False), (F32, TensorProto.INT32, False),
    (np.int32, TensorProto.INT64, True), (np.int64, TensorProto.INT32, False), (np.int64, TensorProto.DOUBLE, False),
    (np.uint8, TensorProto.FLOAT16, True), (np.int16, TensorProto.FLOAT16, False), (np.bool_, TensorProto.FLOAT, True),
])
def test_cast_round_trip_through_a_type_that_holds_every_value(dtype, mid, removed):
    back = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [node("Cast", ["x"], "m", to=mid), node("Cast", ["m"], "t", to=back), node("Identity", ["t"], "y")]
    m = graphs.model(nodes, [("x", dtype, [5])], [("y", dtype, [5])])
    values = [1e-40, 1 / 3, 7e4, -0.0, 1e38] if dtype == F32 else [0, 1, 127, 255, 3]
    feeds = {"x": np.array(values, dtype)}
    if removed:
        assert_removed(m, ["Identity"], {"merge_casts": 1, "cast": 1}, feeds)
    else:
        g, res = run_pass(m)
        assert "merge_casts" not in res.stats and [n.op for n in g.nodes][:2] == ["Cast", "Cast"]
