import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from tests import graphs, numerics

CSE = EliminateCommonSubexpressionsPass


def two_shapes_model():
    """x -> Shape twice -> Gather(1) twice -> Add(both) -> y; the pairs are duplicates."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s1"]),
        helper.make_node("Shape", ["x"], ["s2"]),
        helper.make_node("Gather", ["s1", "i1"], ["g1"], axis=0),
        helper.make_node("Gather", ["s2", "i2"], ["g2"], axis=0),
        helper.make_node("Add", ["g1", "g2"], ["y"]),
    ]
    inits = [("i1", np.array(1, np.int64)), ("i2", np.array(1, np.int64))]
    return graphs.model(nodes, [("x", np.float32, ["N", "S"])], [("y", np.int64, [])], inits)


def test_duplicate_chains_merge_in_one_sweep():
    model = two_shapes_model()
    graph = gs.import_onnx(model)
    result = CSE()(graph)
    assert result.stats == {"constants": 1, "nodes": 2}
    assert [n.op for n in graph.nodes] == ["Shape", "Gather", "Add"]
    add = graph.nodes[-1]
    assert add.inputs[0] is add.inputs[1]
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(3, 7)}, rtol=0, atol=0)
    assert not CSE()(graph).modified


def test_different_attributes_or_inputs_stay_apart():
    nodes = [
        helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
        helper.make_node("LeakyRelu", ["x"], ["b"], alpha=0.2),
        helper.make_node("Relu", ["x"], ["c"]),
        helper.make_node("Relu", ["z"], ["d"]),
        helper.make_node("Sum", ["a", "b", "c", "d"], ["y"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, [4]), ("z", np.float32, [4])], [("y", np.float32, [4])])
    assert not CSE()(gs.import_onnx(model)).modified


def test_constants_differing_in_dtype_or_value_stay_apart():
    nodes = [helper.make_node("Add", ["x", "c1"], ["a"]), helper.make_node("Add", ["a", "c2"], ["y"])]
    for c2 in (np.array([1.0], np.float32) + 1e-7, np.array([[1.0]], np.float32), np.array(1.0, np.float32)):
        model = graphs.model(nodes, [("x", np.float32, [1, 1])], [("y", np.float32, [1, 1])],  # scalar vs (1,) too
                             [("c1", np.array([1.0], np.float32)), ("c2", c2)])
        assert not CSE()(gs.import_onnx(model)).modified


def test_random_ops_and_graph_outputs_are_kept():
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["r1"], seed=1.0),
        helper.make_node("RandomNormalLike", ["x"], ["r2"], seed=1.0),
        helper.make_node("Add", ["r1", "r2"], ["y"]),
        helper.make_node("Neg", ["x"], ["n1"]),
        helper.make_node("Neg", ["x"], ["n2"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, [4])],
                         [("y", np.float32, [4]), ("n1", np.float32, [4]), ("n2", np.float32, [4])])
    graph = gs.import_onnx(model)
    assert not CSE()(graph).modified
    assert [o.name for o in graph.outputs] == ["y", "n1", "n2"]


def test_duplicate_feeding_a_graph_output_is_redirected():
    nodes = [helper.make_node("Neg", ["x"], ["n1"]), helper.make_node("Neg", ["x"], ["n2"]),
             helper.make_node("Relu", ["n2"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [4])], [("n1", np.float32, [4]), ("y", np.float32, [4])])
    graph = gs.import_onnx(model)
    assert CSE()(graph).stats == {"nodes": 1}
    assert [n.op for n in graph.nodes] == ["Neg", "Relu"]
    numerics.assert_same_outputs(model, graph, rtol=0, atol=0)
