"""merge_parallel, alone and chained with hoist_split_elementwise and remove_split_concat."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.pass_base import PassManager
from onnxopt.passes.hoist_split_elementwise import HoistSplitElementwisePass
from onnxopt.passes.merge_parallel import MergeParallelPass
from onnxopt.passes.remove_split_concat import RemoveSplitConcatPass
from tests import graphs, numerics

CIN, HW = 3, 6


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def out_names(g: gs.Graph) -> list[str]:
    return [t.name for t in g.outputs]


def conv_model(widths=(4, 6, 2), biases=(True, False, True), attrs=None, *, opset=17, kernel=3, concat=True):
    """Parallel Convs on x concatenated in order into y (or, without concat, each output a graph
    output); attrs[i] overrides branch i's attributes."""
    nodes, inits, outs = [], [], []
    for i, (w, b) in enumerate(zip(widths, biases, strict=False)):
        a = {"pads": [1, 1, 1, 1], "strides": [1, 1], **((attrs or {}).get(i, {}))}
        inits.append((f"w{i}", graphs.rand(w, CIN // a.get("group", 1), kernel, kernel, seed=i)))
        ins = ["x", f"w{i}"]
        if b:
            inits.append((f"b{i}", graphs.rand(w, seed=10 + i)))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"y{i}"], name=f"conv{i}", **a))
        outs.append((f"y{i}", np.float32, None))
    if concat:
        nodes.append(helper.make_node("Concat", [o for o, _, _ in outs], ["y"], name="cat", axis=1))
        outs = [("y", np.float32, None)]
    return nodes, [("x", np.float32, [1, CIN, HW, HW])], outs, inits, opset


def build(nodes, inputs, outs, inits, opset):
    # Output shapes are left to ORT: give every output a rank-only placeholder shape.
    outs = [(n, t, s) if s is not None else (n, t, ["d"] * 4) for n, t, s in outs]
    return graphs.model(nodes, inputs, outs, inits, opset=opset)


def run_pass(model, p=None):
    graph = gs.import_onnx(model)
    return graph, (p or MergeParallelPass())(graph)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_merges_convs_with_mixed_bias(opset):
    model = build(*conv_model(opset=opset))
    graph, result = run_pass(model)
    assert result.modified and result.stats == {"merge_conv": 1}
    assert ops(graph) == ["Conv", "Split", "Concat"]
    assert out_names(graph) == ["y"]
    split = graph.nodes[1]
    if opset < 13:
        assert split.attrs["split"] == [4, 6, 2] and len(split.inputs) == 1
    else:
        assert split.inputs[1].values.tolist() == [4, 6, 2] and split.inputs[1].dtype == np.int64
    assert graph.nodes[0].inputs[2].values[4:10].tolist() == [0.0] * 6
    numerics.assert_same_outputs(model, graph)
    assert not MergeParallelPass()(graph).modified


def test_opset18_equal_widths_use_num_outputs():
    model = build(*conv_model(widths=(4, 4), biases=(True, True), opset=18))
    graph, result = run_pass(model)
    split = graph.nodes[1]
    assert split.attrs["num_outputs"] == 2 and len(split.inputs) == 1
    numerics.assert_same_outputs(model, graph)


def test_convs_that_stay_split_are_not_merged():
    """Measured on ORT's CPU provider: a merged Conv that keeps its Split is slower, not faster."""
    graph, result = run_pass(build(*conv_model(concat=False)))
    assert not result.modified and ops(graph) == ["Conv", "Conv", "Conv"]


def test_only_adjacent_concat_inputs_merge():
    """Concat(y0, z, y1, y2): y0 is cut off from the others, so only conv1 and conv2 merge."""
    nodes, inputs, outs, inits, opset = conv_model()
    nodes[-1] = helper.make_node("Concat", ["y0", "z", "y1", "y2"], ["y"], name="cat", axis=1)
    nodes.insert(0, helper.make_node("Relu", ["x"], ["z"], name="other_branch"))
    model = build(nodes, inputs, outs, inits, opset)
    graph, result = run_pass(model)
    assert result.stats == {"merge_conv": 1}
    merged = next(n for n in graph.nodes if n.name.endswith("_merged"))
    assert merged.inputs[1].shape[0] == 6 + 2
    numerics.assert_same_outputs(model, graph)


def test_branches_merge_in_concat_order():
    nodes, *rest = conv_model()
    nodes[-1] = helper.make_node("Concat", ["y2", "y0", "y1"], ["y"], name="cat", axis=1)
    model = build(nodes, *rest)
    graph = chain(gs.import_onnx(model))
    assert ops(graph) == ["Conv"]  # the Split went away because the order matched the Concat
    numerics.assert_same_outputs(model, graph)


def test_different_strides_are_grouped_apart():
    from onnxopt.passes.merge_parallel import _conv

    graph = gs.import_onnx(build(*conv_model(widths=(4, 6), biases=(True, True), attrs={1: {"strides": [2, 2]}},
                                             concat=False)))
    keys = [_conv(n).key for n in graph.nodes]
    assert keys[0] != keys[1]


@pytest.mark.parametrize("attrs", [
    {1: {"dilations": [2, 2], "pads": [2, 2, 2, 2]}},
    {1: {"pads": [0, 0, 2, 2]}},
    {1: {"auto_pad": "SAME_UPPER", "pads": None}},
], ids=["dilations", "pads", "auto_pad"])
def test_different_conv_attributes_are_not_merged(attrs):
    attrs = {i: {k: v for k, v in a.items() if v is not None} for i, a in attrs.items()}
    nodes, *rest = conv_model(widths=(4, 6), biases=(True, True), attrs=attrs)
    if "auto_pad" in attrs[1]:
        nodes[1] = helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", auto_pad="SAME_UPPER")
    graph, result = run_pass(build(nodes, *rest))
    assert not result.modified and ops(graph) == ["Conv", "Conv", "Concat"]


def test_grouped_conv_is_refused_and_reported():
    graph, result = run_pass(build(*conv_model(widths=(4, 6), attrs={1: {"group": 3}})))
    assert not result.modified and ops(graph) == ["Conv", "Conv", "Concat"]
    assert [(s.node, s.reason) for s in result.skipped] == [("conv1", "grouped convolution (group != 1)")]


def test_non_constant_weight_is_left_out():
    nodes, inputs, outs, inits, opset = conv_model()
    inits = [(n, a) for n, a in inits if n != "w2"]
    inputs = [*inputs, ("w2", np.float32, [2, CIN, 3, 3])]
    model = build(nodes, inputs, outs, inits, opset)
    graph, result = run_pass(model)
    assert result.stats == {"merge_conv": 1}
    assert sorted(ops(graph)) == ["Concat", "Conv", "Conv", "Split"]
    assert [(s.node, s.reason) for s in result.skipped] == [("conv2", "weight is not a constant")]
    numerics.assert_same_outputs(model, graph)


def test_weight_shared_with_another_node_is_left_out():
    nodes, inputs, outs, inits, opset = conv_model()
    nodes.append(helper.make_node("Conv", ["z", "w0"], ["yz"], name="other", pads=[1, 1, 1, 1]))
    inputs = [*inputs, ("z", np.float32, [1, CIN, HW, HW])]
    model = build(nodes, inputs, [*outs, ("yz", np.float32, None)], inits, opset)
    graph, result = run_pass(model)
    merged = next(n for n in graph.nodes if n.name == "conv1_merged")
    assert [t.name for t in merged.inputs[:1]] == ["x"] and merged.inputs[1].shape == (8, CIN, 3, 3)
    assert [s.node for s in result.skipped] == ["conv0"]
    numerics.assert_same_outputs(model, graph)


def gemm_model(trans_b, biases, betas, alphas=(0.7, 0.7, 0.7, 0.7), widths=(3, 5, 2, 4), k=6, m=5):
    nodes, inits, outs = [], [], []
    for i, (n, c, beta, alpha) in enumerate(zip(widths, biases, betas, alphas, strict=False)):
        w = graphs.rand(*((n, k) if trans_b else (k, n)), seed=i)
        inits.append((f"w{i}", w))
        ins = ["x", f"w{i}"]
        if c is not None:
            inits.append((f"c{i}", graphs.rand(*c(n), seed=20 + i)))
            ins.append(f"c{i}")
        nodes.append(helper.make_node("Gemm", ins, [f"y{i}"], name=f"gemm{i}", transB=trans_b,
                                      alpha=alpha, beta=beta))
        outs.append((f"y{i}", np.float32, [m, n]))
    return graphs.model(nodes, [("x", np.float32, [m, k])], outs, inits)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_merges_gemms_with_every_bias_form(trans_b):
    biases = (lambda n: (n,), lambda n: (1, n), None, lambda n: ())
    model = gemm_model(trans_b, biases, betas=(1.0, 0.5, 2.0, -1.5))
    graph, result = run_pass(model)
    assert result.stats == {"merge_gemm": 1} and ops(graph) == ["Gemm", "Split"]
    gemm = graph.nodes[0]
    assert "beta" not in gemm.attrs and gemm.attrs["transB"] == trans_b
    assert gemm.inputs[1].shape == ((14, 6) if trans_b else (6, 14)) and gemm.inputs[2].shape == (14,)
    numerics.assert_same_outputs(model, graph)


def test_gemms_with_different_alpha_are_not_merged():
    model = gemm_model(0, (None,) * 4, betas=(1.0,) * 4, alphas=(1.0, 0.5, 2.0, 3.0))
    assert not run_pass(model)[1].modified


def test_gemm_row_bias_is_refused():
    row, col = (lambda n: (5, n)), (lambda n: (n,))
    model = gemm_model(0, (row, col, col, col), betas=(1.0,) * 4)
    graph, result = run_pass(model)
    assert result.stats == {"merge_gemm": 1}
    assert [s.node for s in result.skipped] == ["gemm0"] and "varies along rows" in result.skipped[0].reason
    numerics.assert_same_outputs(model, graph)


def matmul_nodes(src, widths, k):
    nodes = [helper.make_node("MatMul", [src, f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(widths))]
    return nodes, [(f"w{i}", graphs.rand(k, n, seed=i)) for i, n in enumerate(widths)]


def test_merges_matmuls_on_3d_activations():
    nodes, inits = matmul_nodes("x", (8, 12, 4), 16)
    outs = [(f"y{i}", np.float32, [2, "seq", n]) for i, n in enumerate((8, 12, 4))]
    model = graphs.model(nodes, [("x", np.float32, [2, "seq", 16])], outs, inits)
    graph, result = run_pass(model)
    assert result.stats == {"merge_matmul": 1} and ops(graph) == ["MatMul", "Split"]
    assert graph.nodes[1].attrs["axis"] == 2
    numerics.assert_same_outputs(model, graph, numerics.random_feeds(model, shapes={"x": (2, 5, 16)}))


def test_matmul_of_unknown_rank_splits_last_axis():
    nodes, inits = matmul_nodes("r", (8, 4), 16)  # r has no value_info: its rank is unknown
    nodes.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    outs = [(f"y{i}", np.float32, [3, n]) for i, n in enumerate((8, 4))]
    model = graphs.model(nodes, [("x", np.float32, [3, 16])], outs, inits)
    graph, result = run_pass(model)
    assert result.modified and graph.nodes[-1].op == "Split" and graph.nodes[-1].attrs["axis"] == -1
    numerics.assert_same_outputs(model, graph)


def test_dtype_mismatch_is_not_merged():
    x = gs.Variable("x", np.float32, [2, 4])
    nodes = [gs.Node("MatMul", f"mm{i}", inputs=[x, gs.Constant(f"w{i}", np.ones((4, 3), dt))],
                     outputs=[gs.Variable(f"y{i}", np.float32, [2, 3])])
             for i, dt in enumerate((np.float32, np.float64))]
    graph = gs.Graph(nodes, [x], [n.outputs[0] for n in nodes], opset=17)
    assert not MergeParallelPass()(graph).modified


def test_output_is_deterministic():
    model = build(*conv_model())
    a, _ = run_pass(model)
    b, _ = run_pass(model)
    assert gs.export_onnx(a).SerializeToString() == gs.export_onnx(b).SerializeToString()


# Chained with hoist_split_elementwise and remove_split_concat.

def chain(graph):
    passes = [MergeParallelPass(), HoistSplitElementwisePass(), RemoveSplitConcatPass()]
    return PassManager(passes, max_steps=5, strict=True).run(graph)


def inception_model(opset, *, deep_branch=False):
    widths = (4, 6, 2)
    nodes, inits = [], []
    for i, w in enumerate(widths):
        inits += [(f"w{i}", graphs.rand(w, 8, 1, 1, seed=i)), (f"b{i}", graphs.rand(w, seed=10 + i))]
        nodes += [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
    cat = ["r0", "r1", "r2"]
    if deep_branch:
        inits.append(("w3", graphs.rand(5, 6, 3, 3, seed=3)))
        nodes += [helper.make_node("Conv", ["r1", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c3"], ["r3"], name="relu3")]
        cat[1] = "r3"
    nodes.append(helper.make_node("Concat", cat, ["y"], name="cat", axis=1))
    width = 11 if deep_branch else 12
    return graphs.model(nodes, [("x", np.float32, [1, 8, HW, HW])], [("y", np.float32, [1, width, HW, HW])],
                        inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_chain_turns_inception_block_into_one_conv(opset):
    model = inception_model(opset)
    graph = chain(gs.import_onnx(model))
    assert ops(graph) == ["Conv", "Relu"] and out_names(graph) == ["y"]
    assert graph.nodes[0].inputs[1].shape == (12, 8, 1, 1)
    numerics.assert_same_outputs(model, graph)


def test_chain_leaves_branches_that_go_deeper_apart():
    """The middle branch continues into a 3x3 conv, so the outer two are not adjacent in the Concat."""
    model = inception_model(17, deep_branch=True)
    graph = chain(gs.import_onnx(model))
    assert "Split" not in ops(graph) and ops(graph).count("Conv") == 4
    numerics.assert_same_outputs(model, graph)


def test_chain_merges_qkv_projections():
    nodes, inits = [], []
    for i, name in enumerate("qkv"):
        inits += [(f"w{name}", graphs.rand(64, 64, seed=i, scale=0.1)),
                  (f"b{name}", graphs.rand(64, seed=9 + i))]
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_mm"], name=f"{name}_proj"),
                  helper.make_node("Add", [f"{name}_mm", f"b{name}"], [name], name=f"{name}_bias")]
    outs = [(n, np.float32, [1, "seq", 64]) for n in "qkv"]
    model = graphs.model(nodes, [("x", np.float32, [1, "seq", 64])], outs, inits)
    graph = chain(gs.import_onnx(model))
    x = graph.inputs[0]
    assert [n.op for n in x.outputs] == ["MatMul"]
    assert ops(graph) == ["MatMul", "Add", "Split"] and out_names(graph) == ["q", "k", "v"]
    numerics.assert_same_outputs(model, graph, numerics.random_feeds(model, shapes={"x": (1, 7, 64)}))
