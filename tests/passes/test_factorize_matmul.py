"""factorize_matmul: exact at full rank, the ranks a policy picks, the refusals, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.lowrank import RankPolicy
from onnxopt.passes.factorize_matmul import FactorizeMatMulPass
from tests import graphs, numerics

F32 = np.float32


def low_rank(k: int, n: int, r: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
    return (w + noise * rng.standard_normal((k, n))).astype(F32)


def matmul_model(w: np.ndarray, x_shape=("b", 7, None), opset: int = 17, bias: bool = False):
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not bias else "t"], name="proj")]
    inits = [("w", w)]
    if bias:
        nodes.append(helper.make_node("Add", ["t", "b"], ["y"]))
        inits.append(("b", graphs.rand(n, seed=5)))
    shape = [*x_shape[:-1], k]
    return graphs.model(nodes, [("x", F32, shape)], [("y", F32, [*x_shape[:-1], n])], inits, opset=opset)


def gemm_model(w: np.ndarray, trans_b: int, alpha: float = 1.0, beta: float = 1.0, opset: int = 13):
    k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return graphs.model([node], [("x", F32, ["b", k])], [("y", F32, ["b", n])],
                        [("w", w), ("c", graphs.rand(n, seed=3))], opset=opset)


def feeds_for(model, seed=0, shape=None):
    return numerics.random_feeds(model, seed=seed, shapes=shape)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_exact_rank_weight_is_reproduced_with_fewer_macs(opset):
    w = low_rank(64, 48, 6)
    model = matmul_model(w, opset=opset)
    graph = gs.import_onnx(model)
    p = FactorizeMatMulPass(RankPolicy(energy=0.999999))
    result = p(graph)
    assert result.modified and result.stats == {"factorize_matmul": 1}
    assert [n.op for n in graph.nodes] == ["MatMul", "MatMul"]
    (layer,) = p.layers
    assert (layer.rank, layer.full_rank, layer.macs_before, layer.macs_after) == (6, 48, 64 * 48, 6 * (64 + 48))
    assert layer.error < 1e-6
    numerics.assert_same_outputs(model, graph, feeds_for(model, shape={"x": (2, 7, 64)}), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_keeps_bias_alpha_beta_on_full_rank(trans_b, alpha, beta):
    w = low_rank(40, 30, 4, seed=1)
    w = w.T.copy() if trans_b else w
    model = gemm_model(w, trans_b, alpha, beta)
    graph = gs.import_onnx(model)
    result = FactorizeMatMulPass(RankPolicy(max_error=1e-6))(graph)
    assert result.modified and [n.op for n in graph.nodes] == ["MatMul", "Gemm"]
    numerics.assert_same_outputs(model, graph, feeds_for(model, shape={"x": (5, 40)}), rtol=1e-4, atol=1e-4)


def test_reduced_rank_error_falls_with_rank_and_matches_the_spectrum():
    w = low_rank(64, 64, 64, seed=2)
    model = matmul_model(w)
    feeds = feeds_for(model, shape={"x": (4, 7, 64)})
    ref = numerics.run(model, feeds)["y"]
    errors = []
    for r in (4, 12, 24):
        graph = gs.import_onnx(model)
        p = FactorizeMatMulPass(RankPolicy(min_saving=0.0), ranks={"proj": r})
        p(graph)
        y = numerics.run(graph, feeds)["y"]
        errors.append(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        assert p.layers[0].rank == r
    assert errors[0] > errors[1] > errors[2] > 0.05


def test_data_weighted_factors_beat_plain_svd_on_that_data():
    """Inputs living mostly in a few directions: weighting by their second moment keeps the output."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 32)).astype(F32)
    basis = rng.standard_normal((4, 32))
    x = (rng.standard_normal((200, 4)) @ basis + 0.01 * rng.standard_normal((200, 32))).astype(F32)
    model = matmul_model(w, x_shape=("b", None))
    ref = x @ w
    errs = {}
    for name, moments in (("plain", None), ("data", {"x": x.T.astype(np.float64) @ x / len(x)})):
        graph = gs.import_onnx(model)
        FactorizeMatMulPass(RankPolicy(min_saving=0.0), ranks={"proj": 4}, moments=moments)(graph)
        y = numerics.run(graph, {"x": x})["y"]
        errs[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert errs["data"] < 0.05 < errs["plain"]


def test_layer_that_would_not_save_macs_is_left_alone_with_the_reason():
    model = matmul_model(graphs.rand(16, 4, seed=1))
    graph = gs.import_onnx(model)
    p = FactorizeMatMulPass(RankPolicy(energy=0.99))
    result = p(graph)
    numerics.assert_untouched(model, graph, result, reason="of the MACs")
    assert not p.layers[0].applied


@pytest.mark.parametrize("case", ["shared", "transA", "dynamic_weight"])
def test_refusals(case):
    w = low_rank(32, 32, 2)
    if case == "shared":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y1"], name="a"),
                 helper.make_node("MatMul", ["x", "w"], ["y2"], name="b")]
        outs = [("y1", F32, ["b", 32]), ("y2", F32, ["b", 32])]
        model = graphs.model(nodes, [("x", F32, ["b", 32])], outs, [("w", w)])
        reason = None
    elif case == "transA":
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)
        model = graphs.model([node], [("x", F32, [32, "b"])], [("y", F32, ["b", 32])], [("w", w)], opset=13)
        reason = "transA"
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
        model = graphs.model([node], [("x", F32, ["b", 32]), ("w", F32, [32, 32])], [("y", F32, ["b", 32])])
        reason = None
    graph = gs.import_onnx(model)
    result = FactorizeMatMulPass(RankPolicy(energy=0.9))(graph)
    if case == "shared":
        assert not result.modified and len(result.skipped) == 2
        assert all("shared with 1 other" in s.reason for s in result.skipped)
    else:
        numerics.assert_untouched(model, graph, result, reason=reason)


def test_idempotent_factors_are_not_factorized_again():
    model = matmul_model(low_rank(64, 64, 64, seed=3))
    graph = gs.import_onnx(model)
    p = FactorizeMatMulPass(RankPolicy(ratio=0.3, min_saving=0.0))
    assert p(graph).modified
    again = FactorizeMatMulPass(RankPolicy(ratio=0.3, min_saving=0.0))(graph)
    assert not again.modified and len(graph.nodes) == 2
