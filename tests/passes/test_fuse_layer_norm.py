"""fuse_layer_norm: every exporter variant checked in onnxruntime, the refusals, and the shapes helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, version_converter

from onnxopt.config import Target
from onnxopt.pass_base import PassManager
from onnxopt.passes.fuse_gelu import FuseGeluPass
from onnxopt.passes.fuse_layer_norm import FuseLayerNormPass, broadcast, covers, symbolic_dims
from tests import graphs, numerics

F32 = np.float32
H = 8
EPS = 1e-2  # with inputs of variance ~0.01, a fusion that drops or misplaces eps fails
MODELS = Path(__file__).resolve().parents[2] / "models"


def ln_nodes(x="x", out="y", *, square="pow", div="div", axes=(-1,), axes_input=False, gamma="g", beta="b",
             swap=False, prefix=""):
    """The exporter's decomposed LayerNorm of ``x``; initializer names: two, eps, ax, g, b."""
    p = prefix
    rm = {"inputs": [x, f"{p}ax"]} if axes_input else {"inputs": [x], "axes": list(axes)}
    nodes = [helper.make_node("ReduceMean", rm["inputs"], [f"{p}m"], **({} if axes_input else {"axes": rm["axes"]})),
             helper.make_node("Sub", [x, f"{p}m"], [f"{p}d"])]
    sq_in = [f"{p}d", f"{p}d"] if square == "mul" else [f"{p}d", "two"]
    nodes.append(helper.make_node("Mul" if square == "mul" else "Pow", sq_in, [f"{p}sq"]))
    rm2_in = [f"{p}sq", f"{p}ax"] if axes_input else [f"{p}sq"]
    nodes.append(helper.make_node("ReduceMean", rm2_in, [f"{p}v"], **({} if axes_input else {"axes": list(axes)})))
    add_in = ["eps", f"{p}v"] if swap else [f"{p}v", "eps"]
    nodes += [helper.make_node("Add", add_in, [f"{p}ve"]), helper.make_node("Sqrt", [f"{p}ve"], [f"{p}s"])]
    last = f"{p}n"
    if div == "div":
        nodes.append(helper.make_node("Div", [f"{p}d", f"{p}s"], [last]))
    else:
        nodes.append(helper.make_node("Reciprocal", [f"{p}s"], [f"{p}r"]))
        nodes.append(helper.make_node("Mul", [f"{p}r", f"{p}d"] if swap else [f"{p}d", f"{p}r"], [last]))
    for op, c in (("Mul", gamma), ("Add", beta)):
        if c:
            nodes.append(helper.make_node(op, [c, last] if swap else [last, c], [f"{p}{op}_out"]))
            last = f"{p}{op}_out"
    nodes[-1].output[0] = out
    return nodes


def ln_model(*, opset=17, shape=("B", "S", H), gamma_shape=(H,), beta_shape=(H,), extra_outputs=(), dtype=F32,
             out_shape=None, **kw):
    axes_input = opset >= 18
    kw.setdefault("gamma", "g" if gamma_shape is not None else None)
    kw.setdefault("beta", "b" if beta_shape is not None else None)
    nodes = ln_nodes(axes_input=axes_input, **kw)
    axes = kw.get("axes", (-1,))
    inits = [("two", np.array(2.0, dtype)), ("eps", np.array(EPS, dtype))]
    inits += [("ax", np.array(axes, np.int64))] if axes_input else []
    inits += [("g", graphs.rand(*gamma_shape, seed=1).astype(dtype))] if gamma_shape is not None else []
    inits += [("b", graphs.rand(*beta_shape, seed=2).astype(dtype))] if beta_shape is not None else []
    reduced = [*shape[:len(shape) - len(axes)], *[1] * len(axes)]
    outs = [("y", dtype, list(out_shape or shape)), *((o, dtype, reduced if o in ("v", "m", "s") else list(shape))
                                         for o in extra_outputs)]
    return graphs.model(nodes, [("x", dtype, list(shape))], outs, inits, opset=opset)


def feeds(model, shape=(2, 5, H)):
    x = numerics.random_feeds(model, shapes={"x": shape})["x"]
    return {"x": (x * 0.1 + 0.3).astype(x.dtype)}  # variance ~0.01 ~ eps; a mean away from 0


def fuse(model):
    g = gs.import_onnx(model)
    return g, FuseLayerNormPass()(g)


def assert_fused(model, ops=("LayerNormalization",), axis=-1, shape=(2, 5, H)) -> gs.Graph:
    g, res = fuse(model)
    assert res.modified and dict(res.stats) == {"layer_norm": 1} and not res.skipped, res
    assert [n.op for n in g.nodes] == list(ops)
    ln = g.nodes[0]
    assert ln.attrs["axis"] == axis and ln.attrs["epsilon"] == pytest.approx(EPS)
    assert g.outputs[0].name == "y"
    numerics.assert_same_outputs(model, g, feeds(model, shape))
    assert not FuseLayerNormPass()(g).modified
    return g


def assert_untouched(model, reason=None) -> None:
    g, res = fuse(model)
    numerics.assert_untouched(model, g, res, reason)

@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("div", ["div", "reciprocal"])
@pytest.mark.parametrize("swap", [False, True])
def test_variants(opset, square, div, swap):
    assert_fused(ln_model(opset=opset, square=square, div=div, swap=swap))


def test_gamma_and_beta_are_optional():
    g = assert_fused(ln_model(gamma_shape=None, beta_shape=None))
    np.testing.assert_array_equal(g.nodes[0].inputs[1].values, np.ones(H, F32))
    assert len(g.nodes[0].inputs) == 2
    assert_fused(ln_model(gamma_shape=None))
    assert_fused(ln_model(beta_shape=None))


@pytest.mark.parametrize("gamma_shape", [(1, 1, H), (1, H), ()], ids=["1x1xH", "1xH", "scalar"])
def test_gamma_broadcast_to_the_normalized_shape(gamma_shape):
    g = assert_fused(ln_model(gamma_shape=gamma_shape))
    assert g.nodes[0].inputs[1].shape == (H,)


def test_gamma_that_is_not_per_feature_stays_outside():
    g = assert_fused(ln_model(gamma_shape=(5, 1)), ops=("LayerNormalization", "Mul", "Add"))
    assert len(g.nodes[0].inputs) == 2  # neither gamma nor the Add after it became part of the node


def test_gamma_of_higher_rank_than_x_stays_outside():
    m = ln_model(gamma_shape=(1, 1, 1, H), out_shape=(1, "B", "S", H))
    assert_fused(m, ops=("LayerNormalization", "Mul", "Add"))


@pytest.mark.parametrize("opset", [17, 18])
def test_two_trailing_axes(opset):
    m = ln_model(opset=opset, axes=(-2, -1), gamma_shape=(5, H), beta_shape=(H,), shape=("B", 5, H))
    g = assert_fused(m, axis=-2)
    assert g.nodes[0].inputs[1].shape == (5, H) and g.nodes[0].inputs[2].shape == (5, H)


def test_positive_axes_with_known_rank():
    assert_fused(ln_model(axes=(2,)))
    assert_fused(ln_model(axes=(1, 2), gamma_shape=None, beta_shape=None, shape=("B", 5, H)), axis=-2)


def test_graph_output_name_kept_and_intermediate_graph_output_refused():
    assert_fused(ln_model(gamma_shape=None, beta_shape=None))  # "y" is the Div output
    assert_untouched(ln_model(extra_outputs=("v",)))
    assert_untouched(ln_model(extra_outputs=("d",)))
    # The normalized tensor is a graph output: LayerNormalization computes it, gamma/beta stay after it.
    assert_fused(ln_model(extra_outputs=("n",)), ops=("LayerNormalization", "Mul", "Add"))


def test_intermediate_with_another_reader_is_refused():
    m = ln_model()
    m.graph.node.append(helper.make_node("Neg", ["s"], ["side"]))
    m.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["B", "S", 1]))
    assert_untouched(m)


@pytest.mark.parametrize("opset", [11, 13, 14, 16])
def test_below_opset_17_left_decomposed_with_reason(opset):
    assert_untouched(ln_model(opset=opset), f"opset {opset} < 17")


def test_not_layer_norm_patterns_are_left_alone():
    m = ln_model()
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array(3.0, F32), "two"))
    assert_untouched(m)  # Pow(d, 3)
    m = ln_model()
    for node in m.graph.node:
        if node.op_type == "ReduceMean":
            node.attribute.append(helper.make_attribute("keepdims", 0))
    assert_untouched(m)
    m = ln_model()
    m.graph.node[3].attribute[0].CopyFrom(helper.make_attribute("axes", [-2]))  # second mean on other axes
    assert_untouched(m)


def test_refuses_non_trailing_axes_and_dynamic_normalized_dims():
    assert_untouched(ln_model(axes=(1,), gamma_shape=None, beta_shape=None), "not the trailing axes")
    assert_untouched(ln_model(shape=("B", "S", "H"), gamma_shape=None, beta_shape=None), "not static")


def test_float64_layer_norm():
    m = ln_model(dtype=np.float64)
    g, res = fuse(m)
    assert res.stats == {"layer_norm": 1} and g.nodes[0].inputs[1].values.dtype == np.float64
    numerics.assert_same_outputs(m, g, feeds(m), rtol=1e-9)


def test_after_a_com_microsoft_gelu_the_shapes_are_still_known():
    """An FFN block: onnx shape inference stops at com.microsoft Gelu; symbolic_dims goes on."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "c1"], ["hb"]),
             helper.make_node("Div", ["hb", "sqrt2"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["hb", "p"], ["q"]),
             helper.make_node("Mul", ["q", "half"], ["f"]), helper.make_node("MatMul", ["f", "w2"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["r"]), *ln_nodes("r", "y")]
    inits = [("w1", graphs.rand(H, 16, seed=3)), ("c1", graphs.rand(16, seed=4)), ("w2", graphs.rand(16, H, seed=5)),
             ("sqrt2", np.array(1.4142135, F32)), ("one", np.array(1.0, F32)), ("half", np.array(0.5, F32)),
             ("two", np.array(2.0, F32)), ("eps", np.array(EPS, F32)), ("g", graphs.rand(H, seed=1)),
             ("b", graphs.rand(H, seed=2))]
    m = graphs.model(nodes, [("x", F32, ["B", "S", H])], [("y", F32, ["B", "S", H])], inits)
    g = gs.import_onnx(m)
    pm = PassManager([FuseGeluPass(Target.ONNXRUNTIME), FuseLayerNormPass()], max_steps=3, strict=True)
    g = pm.run(g)
    assert [n.op for n in g.nodes] == ["MatMul", "BiasGelu", "MatMul", "Add", "LayerNormalization"]
    numerics.assert_same_outputs(m, g, feeds(m))


def test_tiny_bert_converted_to_opset_17():
    m = version_converter.convert_version(onnx.load(MODELS / "tiny_bert.onnx"), 17)
    g, res = fuse(m)
    assert res.stats == {"layer_norm": 5} and not res.skipped
    assert not any(n.op in ("ReduceMean", "Pow", "Sqrt") for n in g.nodes)
    data = dict(np.load(MODELS / "tiny_bert.calib.npz"))
    numerics.assert_same_outputs(m, g, {k: v[:4] for k, v in data.items()})


def test_broadcast_and_covers():
    b, s, m = frozenset({"b"}), frozenset({"s"}), frozenset({"m"})
    assert broadcast((b, s, 8), (1, s, 8)) == (b, s, 8)
    assert broadcast((b, 1, 1, s), (m, 4, s, s)) == (b | m, 4, s, s)
    assert broadcast((b, 8), (3, 8)) == (3, 8) and broadcast((4, 8), (3, 8)) is None
    assert covers(b | m, b) and not covers(b, b | m) and covers(b, 1) and covers(3, b)
    assert not covers(1, b) and not covers(b, 3) and covers(b, b)


def test_symbolic_dims_relates_a_residual_to_the_hidden_state():
    nodes = [helper.make_node("Mul", ["h", "mask"], ["a"]), helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Transpose", ["t"], ["a2"], perm=[1, 0, 2]), helper.make_node("Add", ["a2", "h"], ["y"])]
    m = graphs.model(nodes, [("h", F32, ["B", "S", H]), ("mask", F32, ["B", 1, 1])], [("y", F32, ["B", "S", H])])
    dims = symbolic_dims(gs.import_onnx(m))
    # The two "B"s are not assumed equal: onnxruntime accepts mask batch 1 with h batch 3.
    assert dims["a2"] == (frozenset({"h[0]", "mask[0]"}), frozenset({"h[1]"}), H)
    assert covers(dims["a2"][0], dims["h"][0]) and not covers(dims["h"][0], dims["a2"][0])
