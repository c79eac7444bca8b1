"""RemoveDeadOutputsPass: output selection, dead nodes, optional outputs, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxopt.config import OptimizeConfig
from onnxopt.errors import UserError
from onnxopt.passes.remove_dead_outputs import RemoveDeadOutputsPass
from tests import graphs, numerics

F32 = np.float32


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs if isinstance(outputs, list) else [outputs], **attrs)


def two_heads():
    """x -> Relu -> a; head 1: a @ W -> y1; head 2: Sigmoid(a * c) -> y2."""
    return graphs.model(
        [node("Relu", ["x"], "a"), node("MatMul", ["a", "w"], "y1"), node("Mul", ["a", "c"], "m"),
         node("Sigmoid", ["m"], "y2")],
        [("x", F32, [2, 8])], [("y1", F32, [2, 4]), ("y2", F32, [2, 8])],
        [("w", graphs.rand(8, 4, seed=1)), ("c", graphs.rand(8, seed=2))],
    )


def run_pass(model, outputs=None):
    g = gs.import_onnx(model)
    return g, RemoveDeadOutputsPass(outputs)(g)


def assert_kept_outputs_equal(before, after: gs.Graph, feeds=None):
    """The outputs ``after`` still has are the ones ``before`` computed."""
    feeds = feeds if feeds is not None else numerics.random_feeds(before)
    want, got = numerics.run(before, feeds), numerics.run(after, feeds)
    assert list(got) == [o.name for o in after.outputs]
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def assert_idempotent(g, outputs=None):
    again = RemoveDeadOutputsPass(outputs)(g)
    assert not again.modified and not again.stats


def test_outputs_prunes_the_other_head():
    m = two_heads()
    g, res = run_pass(m, ["y1"])
    assert res.modified and res.stats == {"graph_outputs": 1, "nodes": 2, "initializers": 1}
    assert [n.op for n in g.nodes] == ["Relu", "MatMul"] and [o.name for o in g.outputs] == ["y1"]
    assert_kept_outputs_equal(m, g)
    assert_idempotent(g, ["y1"])


def test_outputs_keep_the_graph_order():
    g, res = run_pass(two_heads(), ["y2", "y1"])
    assert not res.modified and not res.stats
    assert [o.name for o in g.outputs] == ["y1", "y2"]


def test_from_config_reads_outputs():
    p = RemoveDeadOutputsPass.from_config(OptimizeConfig(outputs=("y2",)))
    g = gs.import_onnx(two_heads())
    assert p(g).modified and [o.name for o in g.outputs] == ["y2"]
    assert RemoveDeadOutputsPass.from_config(OptimizeConfig()).outputs is None


@pytest.mark.parametrize("wanted", [["y1", "nope"], []])
def test_bad_output_name_is_a_user_error(wanted):
    g = gs.import_onnx(two_heads())
    with pytest.raises(UserError) as e:
        RemoveDeadOutputsPass(wanted)(g)
    msg = str(e.value)
    assert "\n" not in msg and "y1, y2" in msg and ("'nope'" in msg or not wanted)
    assert len(g.nodes) == 4 and [o.name for o in g.outputs] == ["y1", "y2"]


def test_dead_chain_and_its_weight_go_but_unused_graph_input_stays():
    m = graphs.model(
        [node("Relu", ["x"], "y"), node("Add", ["x", "b"], "d1"), node("Exp", ["d1"], "d2")],
        [("x", F32, [2, 3]), ("unused", F32, [1])], [("y", F32, [2, 3])], [("b", graphs.rand(3))],
    )
    g, res = run_pass(m)
    assert res.stats == {"nodes": 2, "initializers": 1}
    assert [n.op for n in g.nodes] == ["Relu"] and [i.name for i in g.inputs] == ["x", "unused"]
    assert_kept_outputs_equal(m, g)
    assert_idempotent(g)


def test_clean_graph_is_not_modified():
    g, res = run_pass(two_heads())
    assert not res.modified and not res.stats and len(g.nodes) == 4


@pytest.mark.parametrize("opset", [11, 17])
def test_unused_dropout_mask_is_dropped(opset):
    ratio = {"ratio": 0.25} if opset < 12 else {}
    inputs = ["x"] if opset < 12 else ["x", "r"]
    m = graphs.model([node("Dropout", inputs, ["t", "mask"], **ratio), node("Neg", ["t"], "y")],
                     [("x", F32, [2, 3])], [("y", F32, [2, 3])], [("r", F32(0.25))] if opset >= 12 else [],
                     opset=opset)
    g, res = run_pass(m)
    assert res.stats == {"node_outputs": 1}
    assert [o.name for o in g.nodes[0].outputs] == ["t"]
    assert_kept_outputs_equal(m, g)
    assert_idempotent(g)


def test_read_dropout_mask_stays():
    m = graphs.model([node("Dropout", ["x"], ["t", "mask"]), node("Not", ["mask"], "y")],
                     [("x", F32, [2, 3])], [("y", np.bool_, [2, 3])])
    g, res = run_pass(m)
    assert not res.modified and len(g.nodes[0].outputs) == 2


def lstm_model(outputs, graph_outputs):
    hidden, inp = 3, 4
    return graphs.model(
        [node("LSTM", ["x", "w", "r", "b"], outputs, hidden_size=hidden)],
        [("x", F32, [5, 2, inp])], graph_outputs,
        [("w", graphs.rand(1, 4 * hidden, inp, seed=1)), ("r", graphs.rand(1, 4 * hidden, hidden, seed=2)),
         ("b", graphs.rand(1, 8 * hidden, seed=3))],
    )


def test_lstm_unused_y_becomes_empty_before_read_y_h():
    m = lstm_model(["Y", "Y_h", "Y_c"], [("Y_h", F32, [1, 2, 3])])
    g, res = run_pass(m)
    assert res.stats == {"node_outputs": 2}
    assert [o.name for o in g.nodes[0].outputs] == ["", "Y_h"]
    assert_kept_outputs_equal(m, g)
    assert_idempotent(g)


def test_lstm_unused_trailing_outputs_are_removed():
    m = lstm_model(["Y", "Y_h", "Y_c"], [("Y", F32, [5, 1, 2, 3])])
    g, res = run_pass(m)
    assert res.stats == {"node_outputs": 2} and [o.name for o in g.nodes[0].outputs] == ["Y"]
    assert_kept_outputs_equal(m, g)


def test_maxpool_unused_indices_are_dropped():
    m = graphs.model([node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])],
                     [("x", F32, [1, 2, 4, 4])], [("y", F32, [1, 2, 3, 3])])
    g, res = run_pass(m)
    assert res.stats == {"node_outputs": 1} and len(g.nodes[0].outputs) == 1
    assert_kept_outputs_equal(m, g)


def test_required_outputs_are_never_trimmed():
    m = graphs.model([node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                     [("x", F32, [2, 5])], [("v", F32, [2, 2])], [("k", np.array([2], np.int64))])
    g, res = run_pass(m)
    assert not res.modified and [o.name for o in g.nodes[0].outputs] == ["v", "i"]


def test_training_batchnorm_before_opset14_is_left_and_reported():
    c = 3
    m = graphs.model(
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv", "sm", "sv"], epsilon=1e-2)],
        [("x", F32, [2, c, 4, 4])], [("y", F32, [2, c, 4, 4])],
        [("s", graphs.positive(c)), ("b", graphs.rand(c)), ("m", graphs.rand(c, seed=1)),
         ("v", graphs.positive(c, seed=2))], opset=12,
    )
    g, res = run_pass(m)
    assert not res.modified and len(g.nodes[0].outputs) == 5
    assert [s.op for s in res.skipped] == ["BatchNormalization"]


def if_model():
    """t = Neg(x) is read only inside the then-branch; Exp(x) is dead."""
    f = TensorProto.FLOAT
    then_g = helper.make_graph([node("Add", ["t", "x"], "ty")], "then", [],
                               [helper.make_tensor_value_info("ty", f, [3])])
    else_g = helper.make_graph([node("Relu", ["x"], "ey")], "else", [],
                               [helper.make_tensor_value_info("ey", f, [3])])
    return graphs.model(
        [node("Neg", ["x"], "t"), node("Exp", ["x"], "dead"),
         node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        [("x", F32, [3]), ("c", np.bool_, [])], [("y", F32, [3])],
    )


def test_tensor_read_inside_if_branch_keeps_its_producer():
    m = if_model()
    g, res = run_pass(m)
    assert res.stats == {"nodes": 1} and [n.op for n in g.nodes] == ["Neg", "If"]
    for c in (True, False):
        assert_kept_outputs_equal(m, g, {"x": graphs.rand(3), "c": np.array(c)})
    assert_idempotent(g)


def test_dead_node_inside_a_branch_is_removed():
    f = TensorProto.FLOAT
    then_g = helper.make_graph([node("Neg", ["x"], "ty"), node("Exp", ["x"], "inner_dead")], "then", [],
                               [helper.make_tensor_value_info("ty", f, [3])])
    else_g = helper.make_graph([node("Relu", ["x"], "ey")], "else", [],
                               [helper.make_tensor_value_info("ey", f, [3])])
    m = graphs.model([node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [("x", F32, [3]), ("c", np.bool_, [])], [("y", F32, [3])])
    g, res = run_pass(m)
    assert res.stats == {"nodes": 1}
    assert [n.op for n in g.nodes[0].attrs["then_branch"].nodes] == ["Neg"]
    assert_kept_outputs_equal(m, g, {"x": graphs.rand(3), "c": np.array(True)})


def test_custom_domain_node_with_read_output_stays_untrimmed():
    m = graphs.model([node("Foo", ["x"], ["y", "extra"], domain="com.example")],
                     [("x", F32, [2])], [("y", F32, [2])], extra_opsets=[("com.example", 1)])
    g, res = run_pass(m)
    assert not res.modified and [o.name for o in g.nodes[0].outputs] == ["y", "extra"]


def test_unused_initializer_listed_as_graph_input_is_removed():
    m = graphs.model([node("Relu", ["x"], "y")], [("x", F32, [2, 3])], [("y", F32, [2, 3])])
    g = gs.import_onnx(m)
    g.inputs.append(gs.Constant("old_weight", graphs.rand(3)))  # an IR < 4 style weight input
    res = RemoveDeadOutputsPass()(g)
    assert res.stats == {"graph_inputs": 1, "initializers": 1} and [i.name for i in g.inputs] == ["x"]
    assert_kept_outputs_equal(m, g)


def test_dropout_mask_read_only_inside_a_branch_stays():
    b = TensorProto.BOOL
    then_g = helper.make_graph([node("Not", ["mask"], "ty")], "then", [],
                               [helper.make_tensor_value_info("ty", b, [3])])
    else_g = helper.make_graph([node("Identity", ["mask"], "ey")], "else", [],
                               [helper.make_tensor_value_info("ey", b, [3])])
    m = graphs.model([node("Dropout", ["x"], ["t", "mask"]),
                      node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [("x", F32, [3]), ("c", np.bool_, [])], [("y", np.bool_, [3])])
    g, res = run_pass(m)
    assert not res.modified and [o.name for o in g.nodes[0].outputs] == ["t", "mask"]
