"""fold_affine_into_conv: per-channel Mul/Add/Sub/Div folds checked in onnxruntime, plus the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.passes.fold_affine_into_conv import FoldAffineIntoConvPass
from tests import graphs, numerics
from tests.passes.test_fold_bn_into_conv import layer

F32 = np.float32
NCHW = ["n", "c", "h", "w"]


def affine_model(kind, steps, *, opset=17, extra_outputs=(), z_rank=None, **kw):
    """``layer`` followed by ``steps``: (op, constant shape, operand index of the constant).

    The constants are away from zero and one, so a dropped or misplaced fold shows.
    """
    nodes, inits, x_shape, y_rank = layer(kind, **kw)
    src = "y"
    for i, (op, shape, pos) in enumerate(steps):
        c = graphs.positive(*shape, seed=20 + i) * np.where(graphs.rand(*shape, seed=30 + i) > 0, 1, -1)
        inits.append((f"c{i}", c.astype(F32)))
        dst = "z" if i == len(steps) - 1 else f"t{i}"
        operands = [src, f"c{i}"] if pos == 1 else [f"c{i}", src]
        nodes.append(helper.make_node(op, operands, [dst], name=f"{op.lower()}{i}"))
        src = dst
    dyn = [f"d{i}" for i in range(y_rank)]
    outs = [("z", F32, [f"d{i}" for i in range(z_rank or y_rank)])] + [(o, F32, dyn) for o in extra_outputs]
    return graphs.model(nodes, [("x", F32, x_shape)], outs, inits, opset=opset)


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def fold(model, p=None):
    g = gs.import_onnx(model)
    return g, (p or FoldAffineIntoConvPass())(g)


def assert_folded(model, expected_ops, stats, p=None) -> gs.Graph:
    g, res = fold(model, p)
    assert res.modified and dict(res.stats) == stats and not res.skipped, res
    assert ops(g) == expected_ops
    assert [o.name for o in g.outputs] == [o.name for o in model.graph.output]
    numerics.assert_same_outputs(model, g, numerics.random_feeds(model))
    again = (p or FoldAffineIntoConvPass())(g)
    assert not again.modified and not again.stats
    return g


def assert_untouched(model, reason=None, p=None) -> None:
    g, res = fold(model, p)
    numerics.assert_untouched(model, g, res, reason)

CONV_CASES = {
    "mul_c11": [("Mul", (6, 1, 1), 1)],
    "mul_1c11_first": [("Mul", (1, 6, 1, 1), 0)],
    "mul_scalar": [("Mul", (), 1)],
    "add_c11": [("Add", (6, 1, 1), 1)],
    "add_first": [("Add", (1, 6, 1, 1), 0)],
    "sub": [("Sub", (6, 1, 1), 1)],
    "sub_from_const": [("Sub", (6, 1, 1), 0)],
    "div": [("Div", (6, 1, 1), 1)],
    "div_scalar": [("Div", (1,), 1)],
}


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv(case, bias, opset):
    steps = CONV_CASES[case]
    op = steps[0][0]
    assert_folded(affine_model("conv", steps, bias=bias, opset=opset), ["Conv"], {f"fold_{op.lower()}": 1})


@pytest.mark.parametrize("group,cin,cout", [(2, 4, 6), (6, 6, 6)], ids=["grouped", "depthwise"])
def test_grouped_conv_mul_then_add_in_one_run(group, cin, cout):
    steps = [("Mul", (cout, 1, 1), 1), ("Add", (cout, 1, 1), 0)]
    m = affine_model("conv", steps, group=group, cin=cin, cout=cout, bias=False)
    assert_folded(m, ["Conv"], {"fold_mul": 1, "fold_add": 1})


@pytest.mark.parametrize("dims,shape", [(1, (6, 1)), (3, (1, 6, 1, 1, 1))])
def test_conv_1d_3d(dims, shape):
    assert_folded(affine_model("conv", [("Mul", shape, 1)], dims=dims), ["Conv"], {"fold_mul": 1})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group, bias):
    steps = [("Div", (6, 1, 1), 1), ("Sub", (6, 1, 1), 1)]
    m = affine_model("convt", steps, group=group, bias=bias)
    assert_folded(m, ["ConvTranspose"], {"fold_div": 1, "fold_sub": 1})


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", ["none", "scalar", "1n"])
def test_gemm(trans_b, c_shape, opset):
    steps = [("Mul", (6,), 0), ("Add", (1, 6), 1)]
    m = affine_model("gemm", steps, trans_b=trans_b, alpha=0.5, beta=1.5, bias=c_shape != "none",
                     c_shape=c_shape, opset=opset)
    assert_folded(m, ["Gemm"], {"fold_mul": 1, "fold_add": 1})


def test_matmul_2d_add_becomes_gemm():
    g = assert_folded(affine_model("matmul", [("Mul", (1, 6), 1), ("Add", (6,), 0)]), ["Gemm"],
                      {"fold_mul": 1, "fold_add": 1})
    assert g.nodes[0].name == "layer"


def test_matmul_3d_mul_folds_into_weight():
    assert_folded(affine_model("matmul", [("Mul", (6,), 1)], rank=3), ["MatMul"], {"fold_mul": 1})


def test_matmul_3d_add_is_left_as_matmul_plus_bias():
    assert_untouched(affine_model("matmul", [("Add", (6,), 1)], rank=3))


def test_matmul_unknown_rank_accepts_only_rank_1_constants():
    for shape, folded in (((6,), True), ((1, 6), False)):
        g = gs.import_onnx(affine_model("matmul", [("Mul", shape, 1)]))
        g.inputs[0].shape = None
        res = FoldAffineIntoConvPass()(g)
        assert res.modified == folded
        assert ops(g) == (["MatMul"] if folded else ["MatMul", "Mul"])
        assert folded or "unknown rank" in res.skipped[0].reason


def test_output_that_is_graph_output_keeps_its_name():
    g = assert_folded(affine_model("conv", [("Add", (6, 1, 1), 1)]), ["Conv"], {"fold_add": 1})
    assert g.nodes[0].outputs[0].name == "z" and g.outputs[0] is g.nodes[0].outputs[0]


def test_large_shared_weight_refused_for_mul_but_add_still_folds():
    def shared(steps):
        m = affine_model("conv", steps)
        m.graph.node.append(helper.make_node("Conv", ["x", "w"], ["other"], name="other", pads=[1, 1, 1, 1]))
        m.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, NCHW))
        return m

    p = FoldAffineIntoConvPass(fold_size_limit=16)
    assert_untouched(shared([("Mul", (6, 1, 1), 1)]), "shared with 1 other node", p)
    g = assert_folded(shared([("Add", (6, 1, 1), 1)]), ["Conv", "Conv"], {"fold_add": 1}, p)
    assert all(n.inputs[1].name == "w" for n in g.nodes)


@pytest.mark.parametrize("shape,kind,cout", [
    ((5,), "conv", 5),              # per column of the (2, 5, 5, 5) output, not per channel
    ((1, 1, 5, 1, 1), "conv", 5),   # per channel, but adds an axis to the output
    ((1, 6, 5, 5), "conv", 6),      # per position
    ((3, 6), "gemm", 6),            # per row and column
    ((3, 1), "gemm", 6),            # per row
])
def test_refuses_constant_that_is_not_per_channel(shape, kind, cout):
    m = affine_model(kind, [("Mul", shape, 1)], cout=cout, z_rank=max(len(shape), 2 if kind == "gemm" else 4))
    assert_untouched(m, "not per output channel")


def test_refuses_division_by_zero():
    m = affine_model("conv", [("Div", (6, 1, 1), 1)])
    c = next(i for i in m.graph.initializer if i.name == "c0")
    c.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 2, 0, 3, 4, 5], F32).reshape(6, 1, 1), "c0"))
    assert_untouched(m, "zero")


def test_leaves_non_affine_forms_alone_silently():
    assert_untouched(affine_model("conv", [("Div", (6, 1, 1), 0)]))  # c / y
    nodes, inits, x_shape, _ = layer("conv")
    nodes.append(helper.make_node("Add", ["y", "y"], ["z"]))
    m = graphs.model(nodes, [("x", F32, x_shape)], [("z", F32, NCHW)], inits)
    assert_untouched(m)


def test_leaves_attention_scores_alone_silently():
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Div", ["s", "d"], ["z"])]
    m = graphs.model(nodes, [("q", F32, (2, 4, 8)), ("k", F32, (2, 8, 4))], [("z", F32, (2, 4, 4))],
                     [("d", np.array(2.8, F32))])
    assert_untouched(m)


def test_refuses_layer_output_with_other_reader():
    m = affine_model("conv", [("Mul", (6, 1, 1), 1)])
    m.graph.node.append(helper.make_node("Relu", ["y"], ["side"], name="side"))
    m.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, NCHW))
    assert_untouched(m, "read elsewhere")


def test_refuses_layer_output_that_is_graph_output():
    assert_untouched(affine_model("conv", [("Add", (6, 1, 1), 1)], extra_outputs=("y",)), "graph output")
