"""factorize_conv: full rank is exact in onnxruntime, reduced rank degrades monotonically,
MACs are counted exactly, and what the pass refuses stays untouched."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.lowrank import RankPolicy
from onnxopt.passes import _conv_factors as cf
from onnxopt.passes.factorize_conv import FactorizeConvPass
from tests import graphs, numerics

F32 = np.float32
ANY_SAVING = RankPolicy(energy=1.0, min_saving=-100.0)  # factorize whatever it costs


def conv_model(*, n=6, c=4, k=(3, 3), hw=(7, 9), weight=None, bias=True, opset=17, group=1, const_node=False,
               weight_input=False, extra=(), extra_inits=(), **attrs) -> onnx.ModelProto:
    """One Conv "conv" reading x (batch, c, *hw) and writing the graph output y.
    ``hw=None`` leaves the spatial dims dynamic."""
    w = weight if weight is not None else graphs.rand(n, c // group, *k, seed=1)
    nodes, inits, inputs = [], [], [("x", F32, ["batch", c, *(hw or ["h", "w"])])]
    if const_node:
        nodes.append(helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)))
    elif weight_input:
        inputs.append(("w", F32, list(w.shape)))
    else:
        inits.append(("w", w))
    if bias:
        inits.append(("b", graphs.rand(w.shape[0], seed=2)))
    inits.extend(extra_inits)
    nodes.append(helper.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["y"], name="conv",
                                  group=group, **attrs))
    nodes.extend(extra)
    dyn = [f"d{i}" for i in range(len(inputs[0][2]))]
    outputs = [("y", F32, dyn), *[(e.output[0], F32, dyn) for e in extra]]
    return graphs.model(nodes, inputs, outputs, inits, opset=opset)


def feeds(c=4, hw=(7, 9), seed=3, batch=2):
    return {"x": graphs.rand(batch, c, *hw, seed=seed)}


def ops(g: gs.Graph) -> list[str]:
    return [n.op for n in g.nodes]


def run_pass(model, **kw):
    graph = gs.import_onnx(model)
    p = FactorizeConvPass(**kw)
    return graph, p(graph), p


def rel_error(before, after, x) -> float:
    a, b = numerics.run(before, x)["y"], numerics.run(after, x)["y"]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


SPATIAL_CASES = {
    "3x3": dict(k=(3, 3), hw=(7, 9), pads=[1, 1, 1, 1], opset=17),
    "stride2-asym-pads-nobias": dict(k=(3, 3), hw=(8, 11), strides=[2, 2], pads=[1, 0, 2, 1], bias=False, opset=11),
    "3x5-dilated": dict(k=(3, 5), hw=(9, 10), strides=[2, 1], pads=[0, 2, 1, 2], dilations=[2, 1], opset=13),
    "5x3-hstride": dict(k=(5, 3), hw=(10, 12), strides=[1, 3], pads=[2, 1, 2, 1], dilations=[1, 2], opset=13),
    "3x1": dict(k=(3, 1), hw=(7, 8), strides=[2, 2], pads=[1, 0, 1, 0], opset=11),
    "1x3": dict(k=(1, 3), hw=(6, 9), strides=[1, 2], pads=[0, 1, 0, 1], opset=17),
    "no-attrs": dict(k=(2, 3), hw=(5, 6), opset=13),
}


@pytest.mark.parametrize("case", SPATIAL_CASES, ids=str)
def test_spatial_full_rank_is_exact(case):
    kw = dict(SPATIAL_CASES[case])
    model = conv_model(**kw)
    (kh, kwid), hw = kw["k"], kw["hw"]
    full = min(4 * kh, 6 * kwid)
    graph, result, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": full})
    assert result.modified and result.stats == {"factorize_conv": 1}
    assert ops(graph) == ["Conv", "Conv"]
    first, second = graph.nodes
    assert first.name == "conv_lowrank_a" and second.name == "conv_lowrank_b"
    assert first.inputs[1].values.shape == (full, 4, kh, 1) and second.inputs[1].values.shape == (6, full, 1, kwid)
    assert len(first.inputs) == 2 and len(second.inputs) == (3 if kw.get("bias", True) else 2)
    (layer,) = p.layers
    assert (layer.form, layer.shape, layer.rank, layer.full_rank) == ("spatial", (6, 4, kh, kwid), full, full)
    assert layer.error < 1e-6 and not layer.weighted
    numerics.assert_same_outputs(model, graph, feeds(hw=hw))


def test_spatial_factor_attributes():
    model = conv_model(k=(3, 5), strides=[2, 3], pads=[1, 2, 0, 4], dilations=[2, 1])
    graph, _, _ = run_pass(model, policy=ANY_SAVING, ranks={"conv": 5})
    first, second = graph.nodes
    assert first.attrs == {"kernel_shape": [3, 1], "strides": [2, 1], "dilations": [2, 1], "pads": [1, 0, 0, 0]}
    assert second.attrs == {"kernel_shape": [1, 5], "strides": [1, 3], "dilations": [1, 1], "pads": [0, 2, 0, 4]}


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_pointwise_full_rank_is_exact_with_stride_and_padding(opset):
    # Padding a 1x1 conv makes border pixels equal to the bias: it must stay on the second factor.
    model = conv_model(n=5, c=7, k=(1, 1), hw=(6, 7), strides=[2, 1], pads=[1, 2, 0, 1], opset=opset)
    graph, result, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": 5})
    assert ops(graph) == ["Conv", "Conv"]
    first, second = graph.nodes
    assert first.attrs == {"kernel_shape": [1, 1], "strides": [2, 1], "dilations": [1, 1], "pads": [1, 2, 0, 1]}
    assert second.attrs == {"kernel_shape": [1, 1]} and second.inputs[2].name == "b"
    assert [p.layers[0].form, p.layers[0].full_rank] == ["svd", 5]
    numerics.assert_same_outputs(model, graph, feeds(c=7, hw=(6, 7)))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("k", [(3, 3), (1, 1), (2, 4)], ids=str)
def test_auto_pad_needs_no_input_shape(auto_pad, k):
    model = conv_model(k=k, hw=None, strides=[2, 3], auto_pad=auto_pad)
    full = min(4 * k[0], 6 * k[1]) if k != (1, 1) else 4
    graph, result, _ = run_pass(model, policy=ANY_SAVING, ranks={"conv": full})
    assert result.modified and all(n.attrs["auto_pad"] == auto_pad for n in graph.nodes[: 2 if k != (1, 1) else 1])
    for hw in [(9, 10), (8, 13)]:  # odd and even sizes: SAME pads differ
        numerics.assert_same_outputs(model, graph, feeds(hw=hw))


def test_constant_node_weight_and_intermediate_input():
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    model = conv_model(const_node=True, pads=[1, 1, 1, 1], extra=[relu])
    graph, result, _ = run_pass(model, policy=ANY_SAVING, ranks={"conv": 12})
    assert ops(graph) == ["Conv", "Conv", "Relu"]
    numerics.assert_same_outputs(model, graph, feeds())


def test_error_decreases_with_rank():
    model = conv_model(n=8, c=8, hw=(10, 10), pads=[1, 1, 1, 1])
    x = feeds(c=8, hw=(10, 10))
    errors, recorded = [], []
    for rank in (3, 8, 16, 24):
        graph, result, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": rank})
        assert result.modified
        errors.append(rel_error(model, graph, x))
        recorded.append(p.layers[0].error)
    assert errors[0] > errors[1] > errors[2] > 1e-3 and errors[3] < 1e-5, errors
    assert recorded == sorted(recorded, reverse=True) and recorded[-1] < 1e-6


def test_pointwise_weighted_by_input_moments_beats_plain_svd():
    # Inputs spread over few channel directions: the weighted SVD spends its rank on them.
    rng = np.random.default_rng(0)
    c = 12
    mix = rng.standard_normal((c, c)) * np.geomspace(3, 0.01, c)[:, None]
    def sample(seed):
        z = np.random.default_rng(seed).standard_normal((4, 6, 6, c)) @ mix
        return {"x": np.ascontiguousarray(z.transpose(0, 3, 1, 2)).astype(F32)}
    calib = sample(1)["x"]
    flat = calib.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    moments = {"x": flat.T @ flat / len(flat)}
    model = conv_model(n=10, c=c, k=(1, 1), hw=(6, 6))
    plain, _, _ = run_pass(model, policy=ANY_SAVING, ranks={"conv": 3})
    weighted, _, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": 3}, moments=moments)
    assert p.layers[0].weighted
    held_out = sample(2)
    assert rel_error(model, weighted, held_out) < 0.5 * rel_error(model, plain, held_out)


def test_moments_do_not_apply_to_spatial_form():
    model = conv_model(pads=[1, 1, 1, 1])
    _, _, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": 4}, moments={"x": np.eye(4)})
    assert not p.layers[0].weighted


def test_mac_counts_with_known_and_unknown_input_shape():
    # x 7x9, stride (1, 2), pad 1: output 7x5, so the first factor runs at 9/5 of the output width.
    kw = dict(strides=[1, 2], pads=[1, 1, 1, 1])
    _, _, known = run_pass(conv_model(hw=(7, 9), **kw), policy=ANY_SAVING, ranks={"conv": 2})
    _, _, unknown = run_pass(conv_model(hw=None, **kw), policy=ANY_SAVING, ranks={"conv": 2})
    (layer,), (approx,) = known.layers, unknown.layers
    assert (layer.macs_before, layer.params_before, layer.params_after) == (6 * 4 * 9, 216, 2 * (4 * 3 + 6 * 3))
    assert layer.macs_after == math.ceil(2 * 4 * 3 * 9 / 5) + 2 * 6 * 3 == 80
    # Per image: the first factor writes 7x9 pixels, the second 7x5; per output pixel that is above.
    per_image = 2 * 4 * 3 * 7 * 9 + 6 * 2 * 3 * 7 * 5
    assert math.ceil(per_image / 35) == layer.macs_after
    assert approx.macs_after == 2 * 4 * 3 * 2 + 2 * 6 * 3  # the stride stands for 9/5
    # The input of a Conv after another node: its shape comes from shape inference.
    relu = helper.make_node("Relu", ["y"], ["r"], name="relu")
    inner = helper.make_node("Conv", ["r", "w2"], ["z"], name="inner", strides=[1, 2], pads=[1, 1, 1, 1])
    model = conv_model(hw=(7, 9), pads=[1, 1, 1, 1], extra=[relu, inner], extra_inits=[("w2", graphs.rand(4, 6, 3, 3))])
    _, _, p = run_pass(model, policy=ANY_SAVING, ranks={"inner": 2})
    assert p.layers[0].macs_after == math.ceil(2 * 6 * 3 * 9 / 5) + 2 * 4 * 3
    _, _, pw = run_pass(conv_model(n=5, c=7, k=(1, 1)), policy=ANY_SAVING, ranks={"conv": 3})
    assert (pw.layers[0].macs_before, pw.layers[0].macs_after) == (35, 3 * (7 + 5))


def test_layer_that_would_not_save_macs_is_left_alone():
    model = conv_model(n=3, c=2, pads=[1, 1, 1, 1])  # rank r costs 15 r MACs of 54: r > 2 saves too little
    graph, result, p = run_pass(model, policy=RankPolicy(energy=0.99))
    numerics.assert_untouched(model, graph, result, reason="of the MACs; factorizing needs at most 80%")
    (layer,) = p.layers
    assert not layer.applied and layer.macs_after == layer.macs_before == 54


def test_ratio_policy_keeps_macs_within_budget_and_is_idempotent():
    model = conv_model(n=16, c=16, hw=(8, 8), pads=[1, 1, 1, 1])
    graph, result, p = run_pass(model, policy=RankPolicy(ratio=0.5))
    assert result.modified and p.layers[0].macs_after <= 0.5 * p.layers[0].macs_before
    assert p.layers[0].rank == max(r for r in range(1, 49) if r * (16 * 3 + 16 * 3) <= 0.5 * 16 * 16 * 9)
    again = FactorizeConvPass(policy=RankPolicy(ratio=0.5))
    second = again(graph)
    assert not second.modified and not second.skipped and again.layers == []


def test_ranks_select_layers():
    second = helper.make_node("Conv", ["y", "w2"], ["z"], name="other", pads=[1, 1, 1, 1])
    model = conv_model(pads=[1, 1, 1, 1], extra=[second], extra_inits=[("w2", graphs.rand(6, 6, 3, 3, seed=5))])
    graph, result, p = run_pass(model, policy=ANY_SAVING, ranks={"other": 18})
    assert [layer.node for layer in p.layers] == ["other"]
    assert [n.name for n in graph.nodes] == ["conv", "other_lowrank_a", "other_lowrank_b"]
    numerics.assert_same_outputs(model, graph, feeds())


@pytest.mark.parametrize("kw", [
    dict(c=4, n=4, group=2),  # grouped
    dict(c=4, n=4, group=4),  # depthwise
    dict(weight_input=True),  # weight not constant
    dict(weight=graphs.rand(6, 4, 3, seed=1), hw=(7,), pads=[1, 1]),  # 1-D
    dict(weight=graphs.rand(6, 4, 3, 3, 3, seed=1), hw=(5, 5, 5)),  # 3-D
], ids=["grouped", "depthwise", "weight-input", "conv1d", "conv3d"])
def test_silent_non_matches(kw):
    model = conv_model(**kw)
    graph, result, p = run_pass(model, policy=ANY_SAVING, flattened=True)
    numerics.assert_untouched(model, graph, result)
    assert p.layers == []


def test_shared_weight_is_refused_with_reason():
    other = helper.make_node("Conv", ["x", "w"], ["z"], name="twin")
    model = conv_model(extra=[other])
    graph, result, _ = run_pass(model, policy=ANY_SAVING)
    assert not result.modified and {s.node for s in result.skipped} == {"conv", "twin"}
    assert all("shared" in s.reason for s in result.skipped)
    assert gs.export_onnx(graph).graph == gs.export_onnx(gs.import_onnx(model)).graph


def cp_kernel(n, c, kh, kw, rank, seed=0):
    rng = np.random.default_rng(seed)
    return cf.cp_reconstruct(tuple(rng.standard_normal((d, rank)) for d in (n, c, kh, kw))).astype(F32)


def effective_kernel(graph: gs.Graph) -> np.ndarray:
    """The (N, C, KH, KW) kernel the four flattened factors compute together."""
    p, v, h, d = (node.inputs[1].values.astype(np.float64) for node in graph.nodes)
    return np.einsum("nk,kc,kp,kq->ncpq", d[:, :, 0, 0], p[:, :, 0, 0], v[:, 0, :, 0], h[:, 0, 0, :])


def jin_kernel(n, c, kh, kw, seed=4) -> np.ndarray:
    """Jin et al.'s flattened filters: each output filter an outer product of a channel, a
    vertical and a horizontal vector. Its spatial matrix has rank min(N, C KH, N KW)."""
    rng = np.random.default_rng(seed)
    a, b, h = rng.standard_normal((n, c)), rng.standard_normal((n, kh)), rng.standard_normal((n, kw))
    return np.einsum("nc,np,nq->ncpq", a, b, h).astype(F32)


@pytest.mark.parametrize("opset", [11, 17])
def test_flattened_is_exact_on_a_cp_kernel(opset):
    # Spatial rank 2 costs ceil(2*5*3*10/8) + 2*6*3 = 74 MACs per output pixel (input 9x10,
    # output 5x8); flattened rank r costs ceil(r*(5*90/40 + 3*10/8)) + r*(3 + 6) = 24 r: rank 3,
    # the kernel's CP rank, fits the same budget and is exact where spatial rank 2 is not.
    model = conv_model(n=6, c=5, weight=cp_kernel(6, 5, 3, 3, 3), strides=[2, 1], pads=[1, 0, 1, 2],
                       dilations=[1, 2], hw=(9, 10), opset=opset)
    graph, result, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": 2}, flattened=True)
    assert ops(graph) == ["Conv"] * 4
    assert [n.name for n in graph.nodes] == [f"conv_lowrank_{s}" for s in "avhb"]
    assert [n.attrs.get("group", 1) for n in graph.nodes] == [1, 3, 3, 1]
    assert graph.nodes[1].attrs["strides"] == [2, 1] and graph.nodes[2].attrs["pads"] == [0, 0, 0, 2]
    (layer,) = p.layers
    assert (layer.form, layer.rank, layer.macs_after, layer.params_after) == ("flattened", 3, 72, 3 * (5 + 3 + 3 + 6))
    assert layer.error < 1e-5
    numerics.assert_same_outputs(model, graph, feeds(c=5, hw=(9, 10)), rtol=1e-3, atol=1e-4)


def test_flattened_recovers_jin_filters():
    # Unknown shape, stride 2: spatial rank 5 costs 5*4*3*2 + 5*6*3 = 210 MACs, flattened rank
    # 6 (one term per output filter) 6*(4*4 + 3*2 + 3 + 6) = 186.
    model = conv_model(weight=jin_kernel(6, 4, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2], hw=None)
    graph, _, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": 5}, flattened=True)
    assert (p.layers[0].form, p.layers[0].rank) == ("flattened", 6) and p.layers[0].error < 1e-5
    numerics.assert_same_outputs(model, graph, feeds(hw=(7, 8)), rtol=1e-3, atol=1e-4)


def test_flattened_error_is_the_measured_kernel_error_and_falls_with_rank():
    model = conv_model(n=8, c=6, pads=[1, 1, 1, 1])
    w = graphs.rand(8, 6, 3, 3, seed=1).astype(np.float64)
    errors = []
    for rank in (1, 3, 6):  # spatial ranks: their MACs buy flattened ranks 2, 6 and 12
        graph, _, p = run_pass(model, policy=ANY_SAVING, ranks={"conv": rank}, flattened=True)
        assert p.layers[0].form == "flattened" and p.layers[0].rank == 2 * rank
        measured = np.linalg.norm(effective_kernel(graph) - w) / np.linalg.norm(w)
        assert measured == pytest.approx(p.layers[0].error, rel=1e-4)
        errors.append(measured)
    assert errors[0] > errors[1] > errors[2] > 0.01


def separable_kernel(n, c, rank, seed=6) -> np.ndarray:
    """A kernel whose spatial matrix has rank ``rank`` (its CP rank is much higher)."""
    first, second = cf.spatial_weights(graphs.rand(c * 3, rank, seed=seed), graphs.rand(rank, n * 3, seed=seed + 1),
                                       (n, c, 3, 3))
    return np.einsum("kcp,nkq->ncpq", first[..., 0], second[:, :, 0]).astype(F32)


def test_flattened_is_chosen_only_where_it_is_better():
    # At 30% of the MACs the flattened form reaches rank 12, the spatial form rank 5.
    policy = RankPolicy(ratio=0.3)
    _, _, jin = run_pass(conv_model(n=12, c=12, weight=jin_kernel(12, 12, 3, 3), pads=[1, 1, 1, 1]),
                         policy=policy, flattened=True)
    _, _, sep = run_pass(conv_model(n=12, c=12, weight=separable_kernel(12, 12, 2), pads=[1, 1, 1, 1]),
                         policy=policy, flattened=True)
    assert (jin.layers[0].form, jin.layers[0].rank) == ("flattened", 12) and jin.layers[0].error < 1e-4
    assert (sep.layers[0].form, sep.layers[0].rank) == ("spatial", 5) and sep.layers[0].error < 1e-4


def test_flattened_error_target_finds_the_smallest_rank():
    model = conv_model(n=12, c=12, weight=cp_kernel(12, 12, 3, 3, 4, seed=2), pads=[1, 1, 1, 1])
    graph, result, p = run_pass(model, policy=RankPolicy(max_error=1e-3), flattened=True)
    (layer,) = p.layers
    assert result.modified and (layer.form, layer.rank) == ("flattened", 4) and layer.error <= 1e-3
    numerics.assert_same_outputs(model, graph, feeds(c=12), rtol=1e-3, atol=1e-4)


def test_flattened_that_misses_the_error_target_is_not_used():
    model = conv_model(n=8, c=8, weight=graphs.rand(8, 8, 3, 3, seed=9), pads=[1, 1, 1, 1])
    graph, result, p = run_pass(model, policy=RankPolicy(max_error=0.01), flattened=True)
    numerics.assert_untouched(model, graph, result, reason="spatial rank")
    assert p.layers[0].form == "spatial" and not p.layers[0].applied


def test_flattened_used_where_the_spatial_form_saves_nothing():
    # A CP rank-12 kernel on 8 -> 8 channels: within 5% error the spatial form needs rank 10,
    # 10*48/576 = 83% of the MACs; the flattened form needs rank <= 12, at most 12*22/576 = 46%.
    # (ALS does not reach the exact rank-12 fit in its iterations: CP ranks above the channel
    # counts are hard for it.)
    model = conv_model(n=8, c=8, weight=cp_kernel(8, 8, 3, 3, 12, seed=3), pads=[1, 1, 1, 1])
    graph, result, p = run_pass(model, policy=RankPolicy(max_error=0.05), flattened=True)
    (layer,) = p.layers
    assert result.modified and layer.form == "flattened" and layer.error <= 0.05 and layer.rank <= 12
    assert rel_error(model, graph, feeds(c=8)) < 0.1
