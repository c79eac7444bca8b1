"""fuse_gelu: the exporters' erf and tanh GELUs checked in onnxruntime, per opset and target, plus refusals."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.config import OptimizeConfig, Target
from onnxopt.passes.fuse_gelu import FuseGeluPass
from tests import graphs, numerics

F32 = np.float32
H = 16
MS = "com.microsoft"
STD, ORT = FuseGeluPass(Target.STANDARD), FuseGeluPass(Target.ONNXRUNTIME)


def erf_nodes(x="x", out="y", *, scale="div", half="last", swap=False):
    """x * 0.5 * (1 + erf(x / sqrt 2)) as exporters write it; ``half``: first | last | on_p."""
    n = [helper.make_node("Div", [x, "sqrt2"], ["u"]) if scale == "div"
         else helper.make_node("Mul", ["rsqrt2", x] if swap else [x, "rsqrt2"], ["u"]),
         helper.make_node("Erf", ["u"], ["e"]),
         helper.make_node("Add", ["one", "e"] if swap else ["e", "one"], ["p"])]
    if half == "first":
        n += [helper.make_node("Mul", ["half", x] if swap else [x, "half"], ["hx"]),
              helper.make_node("Mul", ["p", "hx"] if swap else ["hx", "p"], [out])]
    elif half == "last":
        n += [helper.make_node("Mul", ["p", x] if swap else [x, "p"], ["xp"]),
              helper.make_node("Mul", ["half", "xp"] if swap else ["xp", "half"], [out])]
    else:
        n += [helper.make_node("Mul", ["p", "half"], ["hp"]), helper.make_node("Mul", [x, "hp"], [out])]
    return n


def tanh_nodes(x="x", out="y", *, cube="pow", factored=False):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), or with (1 + 0.044715 x^2) factored out."""
    if factored:
        n = [helper.make_node("Mul", [x, x], ["x2"]), helper.make_node("Mul", ["c", "x2"], ["cx2"]),
             helper.make_node("Add", ["one", "cx2"], ["q"]), helper.make_node("Mul", [x, "k"], ["kx"]),
             helper.make_node("Mul", ["kx", "q"], ["u"])]
    else:
        n = ([helper.make_node("Pow", [x, "three"], ["x3"])] if cube == "pow" else
             [helper.make_node("Mul", [x, x], ["x2"]), helper.make_node("Mul", ["x2", x], ["x3"])])
        n += [helper.make_node("Mul", ["x3", "c"], ["cx3"]), helper.make_node("Add", [x, "cx3"], ["inner"]),
              helper.make_node("Mul", ["k", "inner"], ["u"])]
    return n + [helper.make_node("Tanh", ["u"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"]),
                helper.make_node("Mul", ["half", x], ["hx"]), helper.make_node("Mul", ["hx", "p"], [out])]


def constants(dtype=F32, **override):
    values = {"sqrt2": math.sqrt(2), "rsqrt2": 1 / math.sqrt(2), "one": 1.0, "half": 0.5,
              "k": math.sqrt(2 / math.pi), "c": 0.044715, "three": 3.0, **override}
    return [(k, np.array(v, dtype)) for k, v in values.items()]


def gelu_model(nodes, *, opset=17, bias=False, dtype=F32, x_shape=("B", "S", H), extra_outputs=(), extra_inputs=(),
               **override):
    """``nodes`` read "x" (after ``x = a + c`` when ``bias``) and write "y"."""
    pre = [helper.make_node("Add", ["a", "bias"], ["x"])] if bias else []
    inits = constants(dtype, **override) + ([("bias", graphs.rand(H, seed=3).astype(dtype))] if bias else [])
    used = {i for n in pre + nodes for i in n.input}
    inits = [(k, v) for k, v in inits if k in used]
    inputs = [("a" if bias else "x", dtype, list(x_shape)), *((i, dtype, list(x_shape)) for i in extra_inputs)]
    outs = [("y", dtype, list(x_shape)), *((o, dtype, list(x_shape)) for o in extra_outputs)]
    return graphs.model(pre + nodes, inputs, outs, inits, opset=opset)


def fuse(model, p=ORT):
    g = gs.import_onnx(model)
    return g, p(g)


def feeds(model):
    names = {i.name for i in model.graph.input}
    shapes = {k: (2, 3, H)[-len(i.type.tensor_type.shape.dim):] for i in model.graph.input for k in (i.name,)
              if k in ("x", "a") and k in names}
    return {k: v * 2 for k, v in numerics.random_feeds(model, shapes=shapes).items()}


def assert_fused(model, expected, stats, p=ORT, attrs=None) -> gs.Graph:
    g, res = fuse(model, p)
    assert res.modified and dict(res.stats) == stats and not res.skipped, res
    assert [(n.op, n.domain or "") for n in g.nodes] == expected
    assert g.nodes[-1].outputs[0].name == "y"
    if attrs is not None:
        assert g.nodes[-1].attrs == attrs
    numerics.assert_same_outputs(model, g, feeds(model))
    assert not p(g).modified
    return g


def assert_untouched(model, reason=None, p=ORT) -> None:
    g, res = fuse(model, p)
    numerics.assert_untouched(model, g, res, reason)

@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("half", ["first", "last", "on_p"])
@pytest.mark.parametrize("swap", [False, True])
def test_erf_variants_com_microsoft(scale, half, swap):
    m = gelu_model(erf_nodes(scale=scale, half=half, swap=swap))
    assert_fused(m, [("Gelu", MS)], {"gelu_erf": 1})


@pytest.mark.parametrize("form", ["pow", "mul", "factored"])
def test_tanh_variants_com_microsoft(form):
    m = gelu_model(tanh_nodes(cube=form, factored=form == "factored"))
    assert_fused(m, [("FastGelu", MS)], {"gelu_tanh": 1})


@pytest.mark.parametrize("p", [STD, ORT], ids=["standard", "onnxruntime"])
def test_opset_20_standard_gelu_for_both_targets(p):
    assert_fused(gelu_model(erf_nodes(), opset=20), [("Gelu", "")], {"gelu_erf": 1}, p, {"approximate": "none"})
    assert_fused(gelu_model(tanh_nodes(), opset=20), [("Gelu", "")], {"gelu_tanh": 1}, p, {"approximate": "tanh"})


@pytest.mark.parametrize("opset", [14, 17, 19])
def test_below_opset_20_standard_target_reports_and_leaves_it(opset):
    assert_untouched(gelu_model(erf_nodes(), opset=opset), f"opset {opset} < 20", STD)
    assert_untouched(gelu_model(tanh_nodes(), opset=opset), f"opset {opset} < 20", STD)
    assert_untouched(gelu_model(erf_nodes(), opset=opset), f"opset {opset} < 20",
                     FuseGeluPass.from_config(OptimizeConfig()))


def test_bias_absorbed_into_bias_gelu_and_fast_gelu():
    m = gelu_model(erf_nodes(), bias=True)
    assert_fused(m, [("BiasGelu", MS)], {"gelu_erf": 1, "bias_gelu": 1})
    m = gelu_model(tanh_nodes(), bias=True)
    g = assert_fused(m, [("FastGelu", MS)], {"gelu_tanh": 1, "bias_gelu": 1})
    assert [t.name for t in g.nodes[0].inputs] == ["a", "bias"]


def test_bias_absorbed_into_an_existing_standard_gelu_only_for_onnxruntime():
    nodes = [helper.make_node("Add", ["bias", "a"], ["x"]), helper.make_node("Gelu", ["x"], ["y"])]
    m = graphs.model(nodes, [("a", F32, ["B", H])], [("y", F32, ["B", H])], [("bias", graphs.rand(H))], opset=20)
    assert_fused(m, [("BiasGelu", MS)], {"bias_gelu": 1})
    assert_untouched(m, p=STD)


def test_bias_not_absorbed_when_it_would_broadcast_or_is_shared():
    m = gelu_model(erf_nodes(), bias=True, x_shape=("B", "S", "H"))  # last dim unknown: bias could broadcast it
    assert_fused(m, [("Add", ""), ("Gelu", MS)], {"gelu_erf": 1})
    m = gelu_model(erf_nodes(), bias=True, extra_outputs=("x",))
    assert_fused(m, [("Add", ""), ("Gelu", MS)], {"gelu_erf": 1})


def test_constants_checked_to_1e_4():
    assert_fused(gelu_model(erf_nodes(), sqrt2=1.41421), [("Gelu", MS)], {"gelu_erf": 1})  # 2.5e-6 off
    assert_untouched(gelu_model(erf_nodes(), sqrt2=1.4))
    assert_untouched(gelu_model(erf_nodes(), half=0.6))
    assert_untouched(gelu_model(erf_nodes(), one=2.0))
    assert_untouched(gelu_model(tanh_nodes(), c=0.05))
    assert_untouched(gelu_model(tanh_nodes(), three=2.0))


def test_other_readers_and_graph_outputs_of_intermediates_are_refused():
    assert_untouched(gelu_model(erf_nodes(), extra_outputs=("e",)))
    assert_untouched(gelu_model(erf_nodes(), extra_outputs=("u",)))
    assert_untouched(gelu_model(tanh_nodes(), extra_outputs=("x3",)))
    m = gelu_model(erf_nodes(half="first"))
    m.graph.node.append(helper.make_node("Neg", ["hx"], ["side"]))
    m.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["B", "S", H]))
    assert_untouched(m)


def test_products_that_are_not_gelu_are_left_alone():
    n = erf_nodes()
    n[-1] = helper.make_node("Mul", ["xp", "xp"], ["y"])  # (x * p)^2 with no 0.5
    assert_untouched(gelu_model(n))
    n = erf_nodes()
    n[0] = helper.make_node("Div", ["z", "sqrt2"], ["u"])  # erf of another tensor than the one multiplied
    assert_untouched(gelu_model(n, extra_inputs=("z",)))


def test_float64_is_refused_with_reason():
    assert_untouched(gelu_model(erf_nodes(), dtype=np.float64), "float32 only")


def test_rank_1_constants_need_a_known_rank_of_x():
    m = gelu_model(erf_nodes())
    for t in m.graph.initializer:
        if t.name == "half":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([0.5], F32), "half"))
    assert_fused(m, [("Gelu", MS)], {"gelu_erf": 1})  # x is 3-D: (1,) broadcasts nothing
    nodes = [helper.make_node("Reshape", ["a", "shape"], ["x"]), *erf_nodes()]
    inits = [(k, v.reshape(1) if k == "half" else v) for k, v in constants() if k in ("sqrt2", "one", "half")]
    m = graphs.model(nodes, [("a", F32, [6, H]), ("shape", np.int64, [None])], [("y", F32, ["Y0", "Y1"])], inits)
    assert_untouched(m, "rank is not known")  # a rank-0 x would become rank 1


def test_result_loads_with_all_onnxruntime_optimizations_on():
    m = gelu_model(erf_nodes(), bias=True)
    g, _ = fuse(m)
    sess = runtime.session(numerics.to_model(g))
    x = feeds(m)
    np.testing.assert_allclose(runtime.run(sess, x)["y"], numerics.run(m, x)["y"], rtol=1e-4, atol=1e-5)
