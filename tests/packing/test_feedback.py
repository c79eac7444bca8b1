"""Levels chosen with error feedback (packing.feedback): the layer's outputs, checked in onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from onnxopt.packing import feedback, scales, sharing
from onnxopt.packing import pack as P
from onnxopt.packing import search as SR
from onnxopt.packing.policy import TensorSetting as S
from onnxopt.validate import Budget
from tests import graphs

K, N = 48, 40


def correlated(n: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated, as hidden states are: a few shared factors."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((6, K)).astype(np.float32)
    return (rng.standard_normal((n, 6)).astype(np.float32) @ mix
            + 0.3 * rng.standard_normal((n, K)).astype(np.float32))


def layer(kind: str = "matmul"):
    w = graphs.rand(K, N, seed=5)
    if kind == "conv":  # a 1x1 convolution: (N, K, 1, 1), inputs along axis 1; each pixel a row of x
        nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["x4"]),
                 helper.make_node("Transpose", ["x4"], ["image"], perm=[0, 2, 1, 3]),
                 helper.make_node("Conv", ["image", "w"], ["y"])]
        inits = [("axes", np.array([0, 3], np.int64)), ("w", np.ascontiguousarray(w.T)[:, :, None, None])]
        return graphs.model(nodes, [("x", np.float32, ["n", K])], [("y", np.float32, [1, N, "n", 1])], inits)
    if kind == "gemm":
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        w = np.ascontiguousarray(w.T)
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return graphs.model([node], [("x", np.float32, ["n", K])], [("y", np.float32, ["n", N])], [("w", w)])


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.float64)


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
@pytest.mark.parametrize("setting", [S(4, scaled=True), S(4, per_channel=False, scaled=True),
                                     S(5, sparsity=0.5, scaled=True)], ids=["channel", "tensor", "pruned"])
def test_feedback_keeps_held_out_outputs_closer(kind, setting):
    model = layer(kind)
    fit, held_out = [{"x": correlated(512, 1)}], correlated(512, 2)
    plain = scales.scales(model, fit)
    fed = scales.scales(model, fit, feedback=True)
    assert plain["w"].moment is None and fed["w"].moment.shape == (K, K)
    assert set(scales.feedback_sites(model)) == {"w"}
    np.testing.assert_array_equal(plain["w"].multipliers, fed["w"].multipliers)
    reference = run(model, held_out)
    errors = {}
    for name, found in (("nearest", plain), ("feedback", fed)):
        quantized, _ = P.quantize_model(model, {"w": setting}, found)
        errors[name] = np.linalg.norm(run(quantized, held_out) - reference) / np.linalg.norm(reference)
        unpacked = P.unpack(P.pack(model, {"w": setting}, found)[0])  # the decoder needs no moment
        np.testing.assert_array_equal(run(unpacked, held_out), run(quantized, held_out))
    assert errors["feedback"] < 0.8 * errors["nearest"], errors


def test_pruned_weights_stay_zero_and_levels_stay_on_the_grid():
    model = layer()
    found = scales.scales(model, [{"x": correlated(256, 1)}], feedback=True)
    q = P.quantize_tensor(graphs.rand(K, N, seed=5), S(3, sparsity=0.5, scaled=True), 1, "w", found["w"])
    assert np.count_nonzero(q.mask) == K * N // 2 and np.all(q.values[~q.mask] == 0)
    assert q.sizes.max() <= 8  # clipped to the grid's 2**3 levels however far the feedback pushed


def test_uncorrelated_inputs_give_nearest_levels():
    """With H diagonal nothing is fed forward: the levels are round(v / step), exactly."""
    v = graphs.rand(K, N, seed=3).astype(np.float64)
    step, first, last = np.full((K, N), 0.1), np.full((K, N), -40), np.full((K, N), 40)
    got = feedback.levels(v, step, first, last, np.diag(np.linspace(0.5, 4.0, K)))
    np.testing.assert_array_equal(got, np.rint(v / step))


def test_blocks_give_the_row_by_row_result(monkeypatch):
    x = correlated(400, 1).astype(np.float64)
    v, step = graphs.rand(K, N, seed=3).astype(np.float64), np.full((K, N), 0.05)
    args = (v, step, np.full((K, N), -100), np.full((K, N), 100), x.T @ x / len(x))
    monkeypatch.setattr(feedback, "BLOCK", 1)
    one = feedback.levels(*args)
    monkeypatch.setattr(feedback, "BLOCK", 7)
    np.testing.assert_array_equal(feedback.levels(*args), one)
    assert np.count_nonzero(one != np.rint(v / step)) > K * N // 10  # the feedback did move levels


def test_zero_grid_rounder_sees_the_weights_layout():
    w = graphs.rand(6, 5, seed=1)
    seen = {}

    def nearest(step, first, last):
        seen.update(step=step, first=first, last=last)
        return np.rint(w / step)

    for axis in (None, 0, 1):
        expected = sharing.zero_grid(w, 4, axis=axis)
        got = sharing.zero_grid(w, 4, axis=axis, rounder=nearest)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        assert seen["step"].shape == w.shape and np.all(seen["first"] <= seen["last"])


def test_search_checks_on_samples_the_moments_did_not_see():
    model = layer()
    feeds = [{"x": correlated(32, i)} for i in range(4)]
    config = SR.SearchConfig(bits=(8, 6, 4), sparsities=(0.0,), scaled=True, max_checks=4)
    found = SR.search(model, feeds, Budget(lossy=True, min_cosine=0.99), config)
    assert found.met and found.samples == 64  # half of the 128
    assert found.scales["w"].moment is not None
