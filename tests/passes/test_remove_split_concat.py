"""remove_split_concat: Split parts concatenated back in order become the Split's input."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.passes.remove_split_concat import RemoveSplitConcatPass
from tests import graphs, numerics

SHAPE = [1, 10, 3, 3]


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def split_node(opset, src, outs, sizes, axis, inits, name="split"):
    if opset < 13:
        return helper.make_node("Split", [src], outs, name=name, axis=axis, split=list(sizes))
    if opset >= 18 and len(set(sizes)) == 1:
        return helper.make_node("Split", [src], outs, name=name, axis=axis, num_outputs=len(outs))
    inits.append((f"{name}_sizes", np.array(sizes, np.int64)))
    return helper.make_node("Split", [src, f"{name}_sizes"], outs, name=name, axis=axis)


def model(cat, *, sizes=(3, 2, 5), split_axis=1, cat_axis=1, opset=17, extra_nodes=(), extra_outs=(),
          relu=True, after=False):
    """x -> [Relu] -> Split into s0.. -> Concat(cat) -> y; a0 and a1 are other Relu outputs of x."""
    inits = []
    src = "r" if relu else "x"
    parts = [f"s{i}" for i in range(len(sizes))]
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu else []
    nodes += [split_node(opset, src, parts, sizes, split_axis, inits),
              helper.make_node("Sigmoid", ["x"], ["a0"]), helper.make_node("Tanh", ["x"], ["a1"]),
              helper.make_node("Concat", cat, ["cat" if after else "y"], name="concat", axis=cat_axis),
              *extra_nodes]
    if after:
        nodes.append(helper.make_node("Neg", ["cat"], ["y"]))
    outs = [("y", np.float32, ["n", "c", "h", "w"]), *extra_outs]
    return graphs.model(nodes, [("x", np.float32, SHAPE)], outs, inits, opset=opset)


def run_pass(m):
    graph = gs.import_onnx(m)
    return graph, RemoveSplitConcatPass()(graph)


@pytest.mark.parametrize("opset,sizes", [(11, (3, 2, 5)), (13, (3, 2, 5)), (17, (3, 2, 5)), (18, (5, 5)),
                                         (18, (3, 7))])
def test_removes_split_and_concat(opset, sizes):
    m = model([f"s{i}" for i in range(len(sizes))], sizes=sizes, opset=opset)
    graph, result = run_pass(m)
    assert result.stats == {"remove_split_concat": 1, "bypass_single_concat": 1}
    assert ops(graph) == ["Relu"] and graph.nodes[0].outputs[0].name == "y"
    assert [t.name for t in graph.outputs] == ["y"]
    numerics.assert_same_outputs(m, graph)
    assert not RemoveSplitConcatPass()(graph).modified


def test_keeps_the_other_concat_inputs():
    m = model(["a0", "s0", "s1", "s2", "a1"])
    graph, result = run_pass(m)
    assert result.stats == {"remove_split_concat": 1}
    concat = next(n for n in graph.nodes if n.op == "Concat")
    assert [t.name for t in concat.inputs] == ["a0", "r", "a1"]
    numerics.assert_same_outputs(m, graph)


def test_two_splits_in_one_concat():
    inits = []
    nodes = [split_node(17, "x", ["s0", "s1"], (4, 6), 1, inits, "sa"),
             split_node(17, "x", ["t0", "t1"], (5, 5), 1, inits, "sb"),
             helper.make_node("Concat", ["s0", "s1", "t0", "t1"], ["y"], axis=1)]
    m = graphs.model(nodes, [("x", np.float32, SHAPE)], [("y", np.float32, [1, 20, 3, 3])], inits)
    graph, result = run_pass(m)
    assert result.stats == {"remove_split_concat": 2} and ops(graph) == ["Concat"]
    assert [t.name for t in graph.nodes[0].inputs] == ["x", "x"]
    numerics.assert_same_outputs(m, graph)


def test_single_input_concat_is_kept_between_graph_input_and_output():
    m = model(["s0", "s1", "s2"], relu=False)
    graph, result = run_pass(m)
    assert result.stats == {"remove_split_concat": 1} and ops(graph) == ["Concat"]
    numerics.assert_same_outputs(m, graph)


def test_negative_concat_axis_with_known_rank():
    m = model(["s0", "s1", "s2"], cat_axis=-3)
    graph, result = run_pass(m)
    assert result.modified and ops(graph) == ["Relu"]
    numerics.assert_same_outputs(m, graph)


def test_negative_axis_with_unknown_rank_stays():
    # Neither the Split's tensors nor the Concat's output carry a shape here.
    m = model(["s0", "s1", "s2"], cat_axis=-3, after=True)
    assert not run_pass(m)[1].modified


@pytest.mark.parametrize("cat,kw", [
    (["s1", "s0", "s2"], {}),
    (["s0", "a0", "s1", "s2"], {}),
    (["s0", "s1"], {"extra_outs": [("s2", np.float32, [1, 5, 3, 3])]}),
    (["s0", "s1", "s2"], {"split_axis": 2, "sizes": (1, 1, 1)}),
    (["s0", "s1", "s2"], {"extra_nodes": [helper.make_node("Neg", ["s1"], ["z"])],
                          "extra_outs": [("z", np.float32, [1, 2, 3, 3])]}),
    (["s0", "s1", "s2", "s2"], {}),
], ids=["out_of_order", "interleaved", "partial_graph_output", "other_axis", "extra_reader", "read_twice"])
def test_refused(cat, kw):
    graph, result = run_pass(model(cat, **kw))
    assert not result.modified and "Split" in ops(graph) and "Concat" in ops(graph)
