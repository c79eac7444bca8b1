"""fold_bn_into_conv: every layer kind checked in onnxruntime, plus the refusals.

The builders here (``layer``) are shared with test_fold_affine_into_conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.config import OptimizeConfig
from onnxopt.passes.fold_bn_into_conv import FoldBnIntoConvPass
from tests import graphs, numerics

F32 = np.float32
BN_PARAMS = ["scale", "bias", "mean", "var"]
NCHW = ["n", "c", "h", "w"]


def layer(kind: str, *, cin=4, cout=6, group=1, bias=True, dims=2, trans_b=0, alpha=1.0, beta=1.0,
          c_shape="n", rank=2, seed=0, const_node=False):
    """Nodes and initializers of one layer reading "x" and writing "y".

    Returns (nodes, initializers, x shape, y rank). ``kind``: conv, convt, gemm, matmul.
    """
    nodes, inits = [], []
    if kind in ("conv", "convt"):
        k = (3,) * dims
        w_shape = (cout, cin // group, *k) if kind == "conv" else (cin, cout // group, *k)
        x_shape, y_rank = (2, cin, *(5,) * dims), dims + 2
        attrs = {"group": group, **({"pads": [1] * 2 * dims} if kind == "conv" else {"strides": [2] * dims})}
        op = "Conv" if kind == "conv" else "ConvTranspose"
    else:
        w_shape = (cout, cin) if (kind == "gemm" and trans_b) else (cin, cout)
        x_shape, y_rank = ((3, cin) if rank == 2 else (2, 3, cin)[-rank:]), max(rank, 1)
        attrs = {"transB": trans_b, "alpha": alpha, "beta": beta} if kind == "gemm" else {}
        op = "Gemm" if kind == "gemm" else "MatMul"
    inputs = ["x", "w"]
    w = graphs.rand(*w_shape, seed=seed)
    if const_node:
        nodes.append(helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)))
    else:
        inits.append(("w", w))
    b = {"n": graphs.rand(cout, seed=seed + 1), "1n": graphs.rand(1, cout, seed=seed + 1),
         "scalar": np.array(0.7, F32), "mn": graphs.rand(3, cout, seed=seed + 1)}
    if bias and kind != "matmul":
        inits.append(("b", b[c_shape] if kind == "gemm" else b["n"]))
        inputs.append("b")
    nodes.append(helper.make_node(op, inputs, ["y"], name="layer", **attrs))
    return nodes, inits, x_shape, y_rank


def bn_params(c: int, seed: int = 10):
    # Small variances so that epsilon matters: a fold that drops eps=1e-2 fails.
    return [("scale", graphs.rand(c, seed=seed)), ("bias", graphs.rand(c, seed=seed + 1)),
            ("mean", graphs.rand(c, seed=seed + 2)), ("var", graphs.positive(c, seed=seed + 3) * 0.02)]


def bn_model(kind="conv", *, opset=17, eps=1e-2, bn_attrs=None, relu_after=False, bn_outputs=("z",),
             extra_outputs=(), **kw) -> onnx.ModelProto:
    nodes, inits, x_shape, y_rank = layer(kind, **kw)
    c = kw.get("cout", 6)
    nodes.append(helper.make_node("BatchNormalization", ["y", *BN_PARAMS], list(bn_outputs),
                                  name="bn", epsilon=eps, **(bn_attrs or {})))
    outs = ["z"]
    if relu_after:
        nodes.append(helper.make_node("Relu", ["z"], ["r"], name="relu"))
        outs.append("r")
    dyn = [f"d{i}" for i in range(y_rank)]
    return graphs.model(nodes, [("x", F32, x_shape)], [(o, F32, dyn) for o in [*outs, *extra_outputs]],
                        [*inits, *bn_params(c)], opset=opset)


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def fold(model: onnx.ModelProto, p=None):
    g = gs.import_onnx(model)
    return g, (p or FoldBnIntoConvPass())(g)


def assert_folded(model: onnx.ModelProto, expected_ops: list[str], p=None) -> gs.Graph:
    g, res = fold(model, p)
    assert res.modified and dict(res.stats) == {"fold_bn_into_conv": 1} and not res.skipped
    assert ops(g) == expected_ops
    assert [o.name for o in g.outputs] == [o.name for o in model.graph.output]
    numerics.assert_same_outputs(model, g, numerics.random_feeds(model))
    again = (p or FoldBnIntoConvPass())(g)
    assert not again.modified and not again.stats
    return g


def assert_untouched(model, reason=None, p=None) -> None:
    g, res = fold(model, p)
    numerics.assert_untouched(model, g, res, reason)

@pytest.mark.parametrize("opset", [11, 14, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["dense", "grouped", "depthwise", "depthwise_x2"])
def test_conv(opset, bias, group, cin, cout):
    assert_folded(bn_model("conv", opset=opset, bias=bias, group=group, cin=cin, cout=cout), ["Conv"])


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_1d_3d(dims):
    assert_folded(bn_model("conv", dims=dims), ["Conv"])


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 8)], ids=["dense", "grouped", "g4"])
def test_conv_transpose(opset, bias, group, cin, cout):
    m = bn_model("convt", opset=opset, bias=bias, group=group, cin=cin, cout=cout)
    assert_folded(m, ["ConvTranspose"])


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", ["none", "scalar", "n", "1n"])
def test_gemm(opset, trans_b, c_shape):
    m = bn_model("gemm", opset=opset, trans_b=trans_b, alpha=0.5, beta=1.5, bias=c_shape != "none",
                 c_shape=c_shape)
    g = assert_folded(m, ["Gemm"])
    assert g.nodes[0].attrs["beta"] == 1.0 or c_shape == "none"


@pytest.mark.parametrize("opset", [11, 17])
def test_matmul_becomes_gemm(opset):
    g = assert_folded(bn_model("matmul", opset=opset), ["Gemm"])
    assert g.nodes[0].name == "layer" and g.nodes[0].inputs[2].shape == (6,)


def test_training_mode_zero():
    assert_folded(bn_model(opset=14, bn_attrs={"training_mode": 0}), ["Conv"])


def test_default_epsilon():
    nodes, inits, x_shape, _ = layer("conv")
    nodes.append(helper.make_node("BatchNormalization", ["y", *BN_PARAMS], ["z"]))
    params = [(n, a) for n, a in bn_params(6) if n != "var"] + [("var", graphs.positive(6, seed=3) * 1e-4)]
    m = graphs.model(nodes, [("x", F32, x_shape)], [("z", F32, NCHW)], [*inits, *params])
    assert_folded(m, ["Conv"])


def test_bn_output_is_graph_output_and_read_by_relu():
    g = assert_folded(bn_model(relu_after=True), ["Conv", "Relu"])
    assert g.nodes[0].outputs[0].name == "z"


def test_chain_of_two_bns_folds_in_one_run():
    nodes, inits, x_shape, _ = layer("conv")
    for name, src, dst in (("bn1", "y", "z1"), ("bn2", "z1", "z")):
        nodes.append(helper.make_node("BatchNormalization", [src, *BN_PARAMS], [dst],
                                      name=name, epsilon=1e-2))
    m = graphs.model(nodes, [("x", F32, x_shape)], [("z", F32, NCHW)], [*inits, *bn_params(6)])
    g, res = fold(m)
    assert res.stats == {"fold_bn_into_conv": 2} and ops(g) == ["Conv"]
    numerics.assert_same_outputs(m, g, numerics.random_feeds(m))


def test_weight_from_constant_node():
    assert_folded(bn_model(const_node=True), ["Conv"])


def test_small_shared_weight_gets_a_new_copy():
    m = bn_model()
    m.graph.node.append(helper.make_node("Conv", ["x", "w"], ["other"], name="other", pads=[1, 1, 1, 1]))
    m.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, NCHW))
    g = assert_folded(m, ["Conv", "Conv"])
    other = next(n for n in g.nodes if n.name == "other")
    assert other.inputs[1].name == "w" and np.array_equal(other.inputs[1].values, onnx.numpy_helper.to_array(
        m.graph.initializer[0]))


def test_large_shared_weight_is_refused():
    m = bn_model()
    m.graph.node.append(helper.make_node("Conv", ["x", "w"], ["other"], name="other", pads=[1, 1, 1, 1]))
    m.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, NCHW))
    assert_untouched(m, "shared with 1 other node", FoldBnIntoConvPass(fold_size_limit=16))
    assert FoldBnIntoConvPass.from_config(OptimizeConfig(fold_size_limit=16)).fold_size_limit == 16


def test_refuses_training_mode():
    m = bn_model(opset=14, bn_attrs={"training_mode": 1}, bn_outputs=("z", "rm", "rv"))
    assert_untouched(m, "training_mode=1")


def test_refuses_running_stat_outputs_before_opset_14_even_unread():
    # onnxruntime runs such a node with batch statistics: folding would change the outputs.
    m = bn_model(opset=11, bn_outputs=("z", "m", "v", "sm", "sv"))
    assert_untouched(m, "running mean/variance outputs")
    assert not np.allclose(numerics.run(m, numerics.random_feeds(m))["z"],
                           numerics.run(bn_model(opset=11), numerics.random_feeds(m))["z"], atol=1e-3)


def test_refuses_layer_output_with_other_reader():
    m = bn_model()
    m.graph.node.append(helper.make_node("Relu", ["y"], ["yr"], name="side"))
    m.graph.output.append(helper.make_tensor_value_info("yr", onnx.TensorProto.FLOAT, NCHW))
    assert_untouched(m, "read elsewhere")


def test_refuses_layer_output_that_is_graph_output():
    assert_untouched(bn_model(extra_outputs=("y",)), "graph output")


def test_refuses_non_constant_statistics():
    m = bn_model()
    mean = next(i for i in m.graph.initializer if i.name == "mean")
    m.graph.initializer.remove(mean)
    m.graph.input.append(helper.make_tensor_value_info("mean", onnx.TensorProto.FLOAT, [6]))
    assert_untouched(m, "not a constant")


def test_refuses_matmul_on_3d_input():
    nodes, inits, x_shape, _ = layer("matmul", rank=3)
    # BN over the (2, 3, 6) MatMul output normalizes axis 1 (3 channels), not the 6 outputs.
    nodes.append(helper.make_node("BatchNormalization", ["y", *BN_PARAMS], ["z"], epsilon=1e-2))
    m = graphs.model(nodes, [("x", F32, x_shape)], [("z", F32, ["a", "b", "c"])], [*inits, *bn_params(3)])
    assert_untouched(m, "channel axis 1")


def test_refuses_matmul_with_unknown_input_rank():
    g = gs.import_onnx(bn_model("matmul"))
    g.inputs[0].shape = None
    res = FoldBnIntoConvPass()(g)
    assert not res.modified and ops(g) == ["MatMul", "BatchNormalization"]
    assert "not known to be 2-D" in res.skipped[0].reason


def test_refuses_gemm_with_full_c():
    assert_untouched(bn_model("gemm", c_shape="mn"), "not per output channel")


def test_leaves_bn_after_non_layer_alone_silently():
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("BatchNormalization", ["y", *BN_PARAMS], ["z"])]
    m = graphs.model(nodes, [("x", F32, (2, 6, 4, 4))], [("z", F32, (2, 6, 4, 4))], bn_params(6))
    assert_untouched(m)


def test_opset_9_and_13():
    for opset in (9, 13):
        assert_folded(bn_model(opset=opset, bias=False, group=2), ["Conv"])


def test_refuses_negative_variance():
    m = bn_model(eps=1e-5)
    var = next(i for i in m.graph.initializer if i.name == "var")
    var.CopyFrom(onnx.numpy_helper.from_array(-np.ones(6, F32), "var"))
    assert_untouched(m, "not be finite")
