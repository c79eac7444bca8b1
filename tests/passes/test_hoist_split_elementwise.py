"""hoist_split_elementwise: element-wise readers of every Split output move above the Split."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.passes.hoist_split_elementwise import HoistSplitElementwisePass
from tests import graphs, numerics

X4 = [1, 10, 3, 3]


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def split_node(opset, src, outs, sizes, axis, inits):
    """Split in the form ``opset`` uses; ``sizes`` None means equal parts, given by no sizes."""
    if sizes is None and opset >= 18:
        return helper.make_node("Split", [src], outs, name="split", axis=axis, num_outputs=len(outs))
    if sizes is None:
        return helper.make_node("Split", [src], outs, name="split", axis=axis)
    if opset < 13:
        return helper.make_node("Split", [src], outs, name="split", axis=axis, split=list(sizes))
    inits.append(("sizes", np.array(sizes, np.int64)))
    return helper.make_node("Split", [src, "sizes"], outs, name="split", axis=axis)


def split_model(branch, *, sizes=(4, 6), axis=1, x_shape=X4, opset=17, n=None, inits=(), extra=(),
                out_rank=None):
    """x -> Split -> branch(i, part) per output; ``branch`` returns nodes ending in output y{i}."""
    n = n or len(sizes)
    inits = list(inits)
    parts = [f"p{i}" for i in range(n)]
    nodes = [split_node(opset, "x", parts, sizes, axis, inits)]
    for i, p in enumerate(parts):
        nodes += branch(i, p, inits)
    outs = [(f"y{i}", np.float32, None) for i in range(n)] + list(extra)
    rank = out_rank or len(x_shape)
    outs = [(name, t, s if s is not None else [f"d{j}" for j in range(rank)]) for name, t, s in outs]
    return graphs.model(nodes, [("x", np.float32, x_shape)], outs, inits, opset=opset)


def unary(op, **attrs):
    return lambda i, p, inits: [helper.make_node(op, [p], [f"y{i}"], name=f"{op.lower()}{i}", **attrs)]


def binary(op, shape_of, *, left=False, same=False):
    """``op`` with a constant of shape ``shape_of(i)``, on the left when ``left``."""
    def make(i, p, inits):
        inits.append((f"c{i}", graphs.rand(*shape_of(i), seed=0 if same else 30 + i) + 2.0))
        ins = [f"c{i}", p] if left else [p, f"c{i}"]
        return [helper.make_node(op, ins, [f"y{i}"], name=f"{op.lower()}{i}")]
    return make


def run_pass(model):
    graph = gs.import_onnx(model)
    return graph, HoistSplitElementwisePass()(graph)


def check_hoisted(model, op, count=1):
    graph, result = run_pass(model)
    assert result.modified and result.stats == {"hoist_split_elementwise": count}
    assert ops(graph)[-1] == "Split" and op in ops(graph)
    assert [t.name for t in graph.outputs] == [o.name for o in model.graph.output]
    numerics.assert_same_outputs(model, graph)
    assert not HoistSplitElementwisePass()(graph).modified
    return graph


@pytest.mark.parametrize("opset,sizes", [(11, (4, 6)), (13, (4, 6)), (17, None), (18, None), (18, (3, 7))])
def test_hoists_relu(opset, sizes):
    graph = check_hoisted(split_model(unary("Relu"), sizes=sizes, opset=opset, n=2), "Relu")
    assert ops(graph) == ["Relu", "Split"]


def test_leaky_relu_with_different_alpha_stays():
    def branch(i, p, inits):
        return [helper.make_node("LeakyRelu", [p], [f"y{i}"], alpha=0.1 * (i + 1))]
    graph, result = run_pass(split_model(branch))
    assert not result.modified and ops(graph) == ["Split", "LeakyRelu", "LeakyRelu"]


@pytest.mark.parametrize("equal", [True, False])
def test_clip_needs_equal_bounds(equal):
    def branch(i, p, inits):
        hi = 0.5 if equal else 0.5 + i
        inits += [(f"lo{i}", np.array(-0.5, np.float32)), (f"hi{i}", np.array(hi, np.float32))]
        return [helper.make_node("Clip", [p, f"lo{i}", f"hi{i}"], [f"y{i}"])]
    model = split_model(branch, opset=13)
    if equal:
        check_hoisted(model, "Clip")
    else:
        assert not run_pass(model)[1].modified


def test_hoists_bias_add_after_last_axis_split():
    model = split_model(binary("Add", lambda i: ((4, 8)[i],)), sizes=(4, 8), axis=-1, x_shape=[2, 3, 12])
    graph = check_hoisted(model, "Add")
    assert graph.nodes[0].inputs[1].shape == (12,)


def test_hoists_per_channel_sub_with_constant_on_the_left():
    model = split_model(binary("Sub", lambda i: (1, (4, 6)[i], 1, 1), left=True))
    graph = check_hoisted(model, "Sub")
    assert graph.nodes[0].inputs[0].shape == (1, 10, 1, 1)


def test_hoists_div_by_different_scalars():
    graph = check_hoisted(split_model(binary("Div", lambda i: ())), "Div")
    assert graph.nodes[0].inputs[1].shape == (10, 1, 1)


def test_identical_scalar_stays_scalar():
    graph = check_hoisted(split_model(binary("Mul", lambda i: (), same=True)), "Mul")
    assert graph.nodes[0].inputs[1].shape == ()


def test_constant_with_known_off_axis_dim():
    mul = binary("Mul", lambda i: (3, 1, (4, 8)[i]))
    model = split_model(mul, sizes=(4, 8), axis=3, x_shape=[2, 3, 5, 12])
    graph = check_hoisted(model, "Mul")
    assert graph.nodes[0].inputs[1].shape == (3, 1, 12)


def test_prelu_with_per_branch_slopes():
    check_hoisted(split_model(binary("PRelu", lambda i: ((4, 6)[i], 1, 1))), "PRelu")


def test_uneven_num_outputs_split_opset18():
    model = split_model(binary("Add", lambda i: ((4, 4, 2)[i], 1, 1)), sizes=None, opset=18, n=3)
    check_hoisted(model, "Add")


def test_chain_of_elementwise_ops_in_one_run():
    def branch(i, p, inits):
        inits.append((f"s{i}", np.array(1.5 + i, np.float32)))
        return [helper.make_node("Relu", [p], [f"r{i}"]),
                helper.make_node("Mul", [f"r{i}", f"s{i}"], [f"y{i}"])]
    graph = check_hoisted(split_model(branch), "Mul", count=2)
    assert ops(graph) == ["Relu", "Mul", "Split"]


@pytest.mark.parametrize("shape", [(3, 1, 1, 1), (2, 1, 1, 1, 1)], ids=["broadcasts_batch", "adds_rank"])
def test_constant_that_changes_the_part_shape_is_refused(shape):
    model = split_model(binary("Add", lambda i: shape), out_rank=len(shape))
    graph, result = run_pass(model)
    assert not result.modified and ops(graph) == ["Split", "Add", "Add"]
    reasons = [s.reason for s in result.skipped]
    assert reasons == ["Add after split: constant would change the shape of a part"]


def test_mixed_sides_of_sub_are_refused():
    def branch(i, p, inits):
        inits.append((f"c{i}", np.array(1.0, np.float32)))
        return [helper.make_node("Sub", [p, f"c{i}"] if i else [f"c{i}", p], [f"y{i}"])]
    assert not run_pass(split_model(branch))[1].modified


def test_unknown_split_sizes_with_different_constants_are_refused():
    model = split_model(binary("Add", lambda i: ()), sizes=None, n=2, opset=13, x_shape=[1, "c", 3, 3])
    graph, result = run_pass(model)
    assert not result.modified and "split sizes unknown" in result.skipped[0].reason


def test_same_scalar_needs_no_split_sizes():
    add = binary("Add", lambda i: (), same=True)
    model = split_model(add, sizes=None, n=2, opset=13, x_shape=[1, "c", 3, 3])
    graph, result = run_pass(model)
    assert result.modified
    numerics.assert_same_outputs(model, graph, numerics.random_feeds(model, shapes={"x": (1, 8, 3, 3)}))


def test_split_output_with_another_reader_stays():
    def branch(i, p, inits):
        extra = [helper.make_node("Neg", [p], ["z"])] if i else []
        return [helper.make_node("Relu", [p], [f"y{i}"]), *extra]
    model = split_model(branch, extra=[("z", np.float32, None)])
    assert not run_pass(model)[1].modified


def test_split_output_that_is_a_graph_output_stays():
    model = split_model(unary("Relu"), extra=[("p1", np.float32, None)])
    assert not run_pass(model)[1].modified


def test_different_ops_stay():
    def branch(i, p, inits):
        return [helper.make_node("Relu" if i else "Sigmoid", [p], [f"y{i}"])]
    assert not run_pass(split_model(branch))[1].modified
