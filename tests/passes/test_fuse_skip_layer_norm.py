"""fuse_skip_layer_norm: SkipLayerNormalization checked in onnxruntime (graph optimizations off),
the operand order its kernel needs, and the shapes it cannot be trusted with."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.config import OptimizeConfig, Target
from onnxopt.pass_base import PassManager
from onnxopt.passes.fuse_layer_norm import FuseLayerNormPass
from onnxopt.passes.fuse_skip_layer_norm import FuseSkipLayerNormPass
from tests import graphs, numerics

F32 = np.float32
H = 8
MS = "com.microsoft"
ORT = FuseSkipLayerNormPass(Target.ONNXRUNTIME)
BSH = ("B", "S", H)


def skip_ln_model(a_shape=BSH, b_shape=BSH, *, bias=None, swap=False, sum_reader=False, sum_output=False,
                  ln_attrs=None, beta=True, out_shape=None, pre=(), extra_inputs=(), dtype=F32, opset=17):
    """LN(a + b) (or LN((a + bias) + b) with ``bias`` the bias Add's operand order: "left"/"right")."""
    nodes, lhs = list(pre), "a"
    if bias:
        nodes.append(helper.make_node("Add", ["a", "c"] if bias == "right" else ["c", "a"], ["ab"]))
        lhs = "ab"
    nodes.append(helper.make_node("Add", ["b", lhs] if swap else [lhs, "b"], ["s"]))
    nodes.append(helper.make_node("LayerNormalization", ["s", "g", "beta"] if beta else ["s", "g"], ["y"],
                                  **{"epsilon": 1e-2, **(ln_attrs or {})}))
    out_shape = list(out_shape or a_shape)
    outs = [("y", dtype, out_shape)]
    if sum_reader:
        nodes.append(helper.make_node("Neg", ["s"], ["z"]))
        outs.append(("z", dtype, out_shape))
    if sum_output:
        outs.append(("s", dtype, out_shape))
    inits = [("g", graphs.rand(H, seed=1).astype(dtype)), ("c", graphs.rand(H, seed=3).astype(dtype))]
    inits += [("beta", graphs.rand(H, seed=2).astype(dtype))] if beta else []
    inits = [(k, v) for k, v in inits if any(k in n.input for n in nodes)]
    inputs = [("a", dtype, list(a_shape)), ("b", dtype, list(b_shape)), *extra_inputs]
    return graphs.model(nodes, inputs, outs, inits, opset=opset)


def feeds(model, **shapes):
    x = numerics.random_feeds(model, shapes=shapes or None, seed=1)
    return {k: (v * 0.1 + 0.2).astype(v.dtype) for k, v in x.items()}


def fuse(model, p=ORT):
    g = gs.import_onnx(model)
    return g, p(g)


def assert_fused(model, inputs, stats, outputs=("y",), sizes=({},)) -> gs.Graph:
    g, res = fuse(model)
    assert res.modified and dict(res.stats) == stats and not res.skipped, res
    node = next(n for n in g.nodes if n.op == "SkipLayerNormalization")
    assert node.domain == MS and node.attrs["epsilon"] == pytest.approx(1e-2)
    assert [t.name for t in node.inputs] == list(inputs)
    assert [t.name for t in node.outputs] == list(outputs)
    assert sum(d.domain == MS for d in g.import_domains) == 1
    for shapes in sizes:
        numerics.assert_same_outputs(model, g, feeds(model, **shapes))
    assert not ORT(g).modified
    return g


def assert_untouched(model, reason=None, p=ORT) -> None:
    g, res = fuse(model, p)
    numerics.assert_untouched(model, g, res, reason)

@pytest.mark.parametrize("swap", [False, True])
def test_same_shape_operands(swap):
    order = ["b", "a"] if swap else ["a", "b"]
    m = skip_ln_model(a_shape=(3, 5, H), b_shape=(3, 5, H), swap=swap)
    assert_fused(m, [*order, "g", "beta"], {"skip_layer_norm": 1})


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("skip_shape", [(1, 4, H), (4, H)], ids=["1xSxH", "SxH"])
def test_broadcast_skip_is_the_skip_input_whatever_the_operand_order(skip_shape, swap):
    m = skip_ln_model(a_shape=("B", 4, H), b_shape=skip_shape, swap=swap)
    assert_fused(m, ["a", "b", "g", "beta"], {"skip_layer_norm": 1}, sizes=({"a": (3, 4, H)}, {"a": (1, 4, H)}))


def test_two_dimensional_input():
    m = skip_ln_model(a_shape=(6, H), b_shape=(6, H), beta=False)
    assert_fused(m, ["a", "b", "g"], {"skip_layer_norm": 1})


@pytest.mark.parametrize("bias", ["left", "right"])
@pytest.mark.parametrize("swap", [False, True])
def test_bias_add_becomes_the_bias_input(bias, swap):
    m = skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), bias=bias, swap=swap)
    assert_fused(m, ["a", "b", "g", "beta", "c"], {"skip_layer_norm": 1, "bias": 1})


def test_bias_without_beta_leaves_an_empty_beta_slot():
    m = skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), bias="right", beta=False)
    assert_fused(m, ["a", "b", "g", "", "c"], {"skip_layer_norm": 1, "bias": 1})


@pytest.mark.parametrize("kind", ["reader", "graph_output"])
def test_residual_sum_read_elsewhere_comes_from_output_3(kind):
    m = skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), bias="right",
                      sum_reader=kind == "reader", sum_output=kind == "graph_output")
    g = assert_fused(m, ["a", "b", "g", "beta", "c"], {"skip_layer_norm": 1, "bias": 1, "sum_output": 1},
                     outputs=("y", "", "", "s"))
    assert "Add" not in [n.op for n in g.nodes]


def test_the_broadcast_maximum_is_proven_to_cover_the_hidden_state():
    """a = h * mask has batch max(h, mask): input a covers skip h for any batches fed, even 1 vs 3."""
    nodes = [helper.make_node("Mul", ["h", "mask"], ["a"]), helper.make_node("Add", ["h", "a"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], epsilon=1e-2)]
    m = graphs.model(nodes, [("h", F32, ["B", "S", H]), ("mask", F32, ["M", 1, 1])], [("y", F32, ["Y", "S", H])],
                     [("g", graphs.rand(H, seed=1)), ("beta", graphs.rand(H, seed=2))])
    sizes = [{"h": (1, 4, H), "mask": (3, 1, 1)}, {"h": (3, 4, H), "mask": (1, 1, 1)},
             {"h": (2, 4, H), "mask": (2, 1, 1)}]
    assert_fused(m, ["a", "h", "g", "beta"], {"skip_layer_norm": 1}, sizes=sizes)


@pytest.mark.parametrize("a_shape,b_shape", [
    (("B1", "S", H), ("B2", "S", H)),  # either may be the batch-1 side
    (("B", "S", H), ("B", "S", H)),  # same dim_param, but onnxruntime does not check it
    (("B", "S", H), ("B", "T", H)),  # sequence dims unrelated
    ((2, 3, H), (2, 1, H)),  # skip broadcast along the sequence: the kernel rejects it
    (("B", 3, "H"), ("B", 3, "H")),  # hidden size unknown
    ((2, 2, 3, H), (2, 2, 3, H)),  # 4-D: the kernel takes 2-D and 3-D only
])
def test_unproven_shapes_are_refused(a_shape, b_shape):
    out = [max(x, y) if isinstance(x, int) and isinstance(y, int) else x for x, y in zip(a_shape, b_shape)]
    m = skip_ln_model(a_shape=a_shape, b_shape=b_shape, out_shape=out)
    assert_untouched(m, "cannot prove")


def test_batch_1_operand_is_the_skip_never_the_input():
    """As input, the batch-1 operand would give an output of batch 1 (the kernel repeats skip, never input)."""
    m = skip_ln_model(a_shape=(1, 3, H), b_shape=(2, 3, H), out_shape=(2, 3, H))
    assert_fused(m, ["b", "a", "g", "beta"], {"skip_layer_norm": 1})


def test_layer_norms_it_cannot_express_are_refused():
    assert_untouched(skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), ln_attrs={"axis": 1}), "last axis")
    assert_untouched(skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), ln_attrs={"stash_type": 0}), "stash_type")
    m = skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H), dtype=np.float64)
    assert_untouched(m, "float32")


def test_layer_norm_reading_something_else_and_standard_target_are_left_alone():
    nodes = [helper.make_node("Relu", ["a"], ["s"]), helper.make_node("LayerNormalization", ["s", "g"], ["y"])]
    m = graphs.model(nodes, [("a", F32, [2, 3, H])], [("y", F32, [2, 3, H])], [("g", graphs.rand(H))])
    assert_untouched(m)
    m = skip_ln_model(a_shape=(2, 3, H), b_shape=(2, 3, H))
    assert_untouched(m, p=FuseSkipLayerNormPass())
    assert_untouched(m, p=FuseSkipLayerNormPass.from_config(OptimizeConfig()))
    assert not any(d.domain == MS for d in m.opset_import)


def test_after_fuse_layer_norm_and_with_onnxruntime_optimizations_on():
    """A decomposed LayerNorm (opset 17) after a residual with bias: both passes, then ORT_ENABLE_ALL loads it."""
    from tests.passes.test_fuse_layer_norm import EPS, ln_nodes

    nodes = [helper.make_node("MatMul", ["a", "w"], ["mm"]), helper.make_node("Add", ["c", "mm"], ["ab"]),
             helper.make_node("Add", ["ab", "a"], ["r"]), *ln_nodes("r", "y", beta="lnb")]
    inits = [("w", graphs.rand(H, H, seed=4)), ("c", graphs.rand(H, seed=3)), ("two", np.array(2.0, F32)),
             ("eps", np.array(EPS, F32)), ("g", graphs.rand(H, seed=1)), ("lnb", graphs.rand(H, seed=2))]
    m = graphs.model(nodes, [("a", F32, list(BSH))], [("y", F32, list(BSH))], inits)
    g = PassManager([FuseLayerNormPass(), ORT], max_steps=3, strict=True).run(gs.import_onnx(m))
    assert [(n.op, n.domain or "") for n in g.nodes] == [("MatMul", ""), ("SkipLayerNormalization", MS)]
    x = feeds(m, a=(2, 3, H))
    numerics.assert_same_outputs(m, g, x)
    sess = runtime.session(numerics.to_model(g))
    np.testing.assert_allclose(runtime.run(sess, x)["y"], numerics.run(m, x)["y"], rtol=1e-4, atol=1e-5)
