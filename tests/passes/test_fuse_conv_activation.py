"""fuse_conv_activation: com.microsoft FusedConv checked in onnxruntime, plus the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.config import OptimizeConfig, Target
from onnxopt.pass_base import PassManager
from onnxopt.passes.fold_affine_into_conv import FoldAffineIntoConvPass
from onnxopt.passes.fold_bn_into_conv import FoldBnIntoConvPass
from onnxopt.passes.fuse_conv_activation import FuseConvActivationPass
from tests import graphs, numerics

F32 = np.float32
ORT = FuseConvActivationPass(target=Target.ONNXRUNTIME)


def conv_act_model(op="Relu", attrs=None, clip_inputs=(), *, opset=17, dims=2, group=1, cin=4, cout=6,
                   bias=True, dtype=F32, extra_outputs=(), inits=(), x_inputs=(), pre_nodes=()):
    """x -> Conv -> ``op`` -> z. ``clip_inputs``: extra input names of the activation (Clip 11+)."""
    w = graphs.rand(cout, cin // group, *(3,) * dims, seed=1).astype(dtype)
    conv_in = ["x", "w", "b"] if bias else ["x", "w"]
    conv = helper.make_node("Conv", conv_in, ["y"], name="conv", group=group, pads=[1] * 2 * dims)
    nodes = [*pre_nodes, conv, helper.make_node(op, ["y", *clip_inputs], ["z"], name="act", **(attrs or {}))]
    params = [("w", w), *([("b", graphs.rand(cout, seed=2).astype(dtype))] if bias else []), *inits]
    shape = [2, cin, *(6,) * dims]
    dyn = [f"d{i}" for i in range(dims + 2)]
    outs = [(o, dtype, dyn) for o in ("z", *extra_outputs)]
    return graphs.model(nodes, [("x", dtype, shape), *x_inputs], outs, params, opset=opset)


def fuse(model, p=ORT):
    g = gs.import_onnx(model)
    return g, p(g)


def feeds(model):
    # Scaled up so that Clip / HardSigmoid / LeakyRelu see both sides of their kinks.
    return {k: v * 3 for k, v in numerics.random_feeds(model).items()}


def assert_fused(model, activation, params=None) -> gs.Graph:
    g, res = fuse(model)
    assert res.modified and dict(res.stats) == {f"fuse_conv_{activation.lower()}": 1} and not res.skipped
    assert [(n.op, n.domain) for n in g.nodes] == [("FusedConv", "com.microsoft")]
    node = g.nodes[0]
    assert node.attrs["activation"] == activation and node.outputs[0].name == "z"
    if params is None:
        assert "activation_params" not in node.attrs
    else:
        np.testing.assert_allclose(node.attrs["activation_params"], params, rtol=1e-6)
    assert sum(d.domain == "com.microsoft" for d in g.import_domains) == 1
    numerics.assert_same_outputs(model, g, feeds(model))
    assert not ORT(g).modified
    return g


def assert_untouched(model, reason=None, p=ORT) -> None:
    g, res = fuse(model, p)
    numerics.assert_untouched(model, g, res, reason)
    assert not any(d.domain == "com.microsoft" for d in gs.export_onnx(g).opset_import)

LOWEST, HIGHEST = float(np.finfo(F32).min), float(np.finfo(F32).max)
CASES = {
    "relu": ("Relu", {}, None),
    "tanh": ("Tanh", {}, None),
    "sigmoid": ("Sigmoid", {}, None),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.2}, [0.2]),
    "leaky_relu_default": ("LeakyRelu", {}, [0.01]),
    "hard_sigmoid": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, [0.3, 0.4]),
    "hard_sigmoid_default": ("HardSigmoid", {}, [0.2, 0.5]),
}


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", sorted(CASES))
def test_activation(case, opset):
    op, attrs, params = CASES[case]
    assert_fused(conv_act_model(op, attrs, opset=opset), op, params)


def test_clip_attributes_before_opset_11():
    assert_fused(conv_act_model("Clip", {"min": -1.5, "max": 2.0}, opset=10), "Clip", [-1.5, 2.0])
    assert_fused(conv_act_model("Clip", {"min": 0.0}, opset=10), "Clip", [0.0, HIGHEST])


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("bounds", [(-1.5, 2.0), (0.0, None), (None, 6.0), (None, None)])
def test_clip_constant_inputs(opset, bounds):
    names, inits = [], []
    for name, v in zip(("lo", "hi"), bounds, strict=True):
        names.append("" if v is None else name)
        if v is not None:
            inits.append((name, np.array(v, F32)))
    while names and not names[-1]:
        names.pop()
    expected = [LOWEST if bounds[0] is None else bounds[0], HIGHEST if bounds[1] is None else bounds[1]]
    assert_fused(conv_act_model("Clip", clip_inputs=names, inits=inits, opset=opset), "Clip", expected)


def test_clip_bound_from_constant_node():
    lo = helper.make_node("Constant", [], ["lo"], value=onnx.numpy_helper.from_array(np.array(0.0, F32)))
    m = conv_act_model("Clip", clip_inputs=["lo", "hi"], inits=[("hi", np.array(6.0, F32))], pre_nodes=[lo])
    assert_fused(m, "Clip", [0.0, 6.0])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group,cin,cout,bias", [(1, 4, 6, False), (2, 4, 6, True), (4, 4, 8, True)],
                         ids=["dense", "grouped", "depthwise"])
def test_conv_ranks_groups_and_bias(dims, group, cin, cout, bias):
    m = conv_act_model("LeakyRelu", {"alpha": 0.1}, dims=dims, group=group, cin=cin, cout=cout, bias=bias)
    assert_fused(m, "LeakyRelu", [0.1])


def test_existing_com_microsoft_import_is_kept():
    m = conv_act_model()
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert_fused(m, "Relu")


def test_result_loads_with_all_onnxruntime_optimizations_on():
    m = conv_act_model("HardSigmoid")
    g, _ = fuse(m)
    sess = runtime.session(numerics.to_model(g))
    x = feeds(m)
    np.testing.assert_allclose(runtime.run(sess, x)["z"], numerics.run(m, x)["z"], rtol=1e-4, atol=1e-5)


def test_standard_target_changes_nothing():
    assert_untouched(conv_act_model(), p=FuseConvActivationPass())
    assert_untouched(conv_act_model(), p=FuseConvActivationPass.from_config(OptimizeConfig()))
    p = FuseConvActivationPass.from_config(OptimizeConfig(target=Target.ONNXRUNTIME))
    assert p.target is Target.ONNXRUNTIME


def test_refuses_float16_conv():
    assert_untouched(conv_act_model(dtype=np.float16), "float32 only; this Conv is float16")


def test_refuses_clip_with_runtime_bounds():
    m = conv_act_model("Clip", clip_inputs=["lo"], x_inputs=[("lo", F32, [])])
    assert_untouched(m, "not a constant scalar")


def test_refuses_clip_with_min_above_max():
    bounds = [("lo", np.array(2.0, F32)), ("hi", np.array(1.0, F32))]
    m = conv_act_model("Clip", clip_inputs=["lo", "hi"], inits=bounds)
    assert_untouched(m, "min 2.0 > max 1.0")


def test_refuses_conv_output_with_other_reader_or_graph_output():
    assert_untouched(conv_act_model(extra_outputs=("y",)), "graph output")
    m = conv_act_model()
    m.graph.node.append(helper.make_node("Mul", ["y", "y"], ["s"], name="side"))
    m.graph.output.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, ["a", "b", "c", "d"]))
    assert_untouched(m, "read elsewhere")


def test_leaves_other_activations_and_producers_alone_silently():
    assert_untouched(conv_act_model("Elu"))
    assert_untouched(conv_act_model("HardSwish"))  # runs in onnxruntime 1.32 only: see the pass docstring
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    m = graphs.model(nodes, [("x", F32, (2, 4))], [("z", F32, (2, 6))], [("w", graphs.rand(4, 6))])
    assert_untouched(m)


def test_with_the_folds_a_conv_bn_mul_relu_chain_becomes_one_fused_conv():
    c = 6
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1]),
             helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["n"], epsilon=1e-2),
             helper.make_node("Mul", ["n", "k"], ["p"]),
             helper.make_node("Relu", ["p"], ["z"])]
    inits = [("w", graphs.rand(c, 4, 3, seed=1)), ("s", graphs.rand(c, seed=2)),
             ("b", graphs.rand(c, seed=3)), ("m", graphs.rand(c, seed=4)),
             ("v", graphs.positive(c, seed=5) * 0.02), ("k", graphs.rand(c, 1, seed=6))]
    m = graphs.model(nodes, [("x", F32, (2, 4, 9))], [("z", F32, (2, c, 9))], inits)
    g = gs.import_onnx(m)
    pm = PassManager([FoldBnIntoConvPass(), FoldAffineIntoConvPass(), ORT], max_steps=5, strict=True)
    g = pm.run(g)
    assert [n.op for n in g.nodes] == ["FusedConv"]
    assert [r.modified for r in pm.records] == [True, True, True, False, False, False]
    numerics.assert_same_outputs(m, g, feeds(m))
