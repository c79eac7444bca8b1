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
    assert_untouched(noop_model(nodes))  # no value_info: the dtype of r is unknown, never guessed
    assert_removed(noop_model(nodes, infer=True), ["Relu", "Neg"], {"cast": 1})


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
