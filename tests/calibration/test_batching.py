"""How collect() runs the model: run sizes, the fallback to one sample at a time, the session."""

import sys
import weakref

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.calibration import CalibrationConfig, collect
from onnxopt.calibration.observers import TensorStats
from onnxopt.errors import DataError, UnsupportedModelError
from tests import graphs
from tests.calibration.test_collect import assert_matches_numpy, elementwise_model, samples

COLLECT = sys.modules["onnxopt.calibration.collect"]  # the package re-exports the function under that name
TENSORS = ["x", "scaled", "act", "y"]


def run_sizes(monkeypatch):
    """Record the sample count of every onnxruntime run."""
    sizes, real = [], COLLECT._run
    monkeypatch.setattr(COLLECT, "_run", lambda sess, names, feeds: sizes.append(len(feeds["x"])) or
                        real(sess, names, feeds))
    return sizes


@pytest.mark.parametrize("batch_size, expected", [(16, [1] + [3] * 6 + [1]), (2, [1] + [2] * 9 + [1])])
def test_first_run_takes_one_sample_then_as_many_as_the_budget_allows(monkeypatch, batch_size, expected):
    sizes = run_sizes(monkeypatch)
    per_sample = 3 * 3 * 100 * 4  # three exposed float32 outputs of 3x100 (x is an input, not an output)
    monkeypatch.setattr(COLLECT, "RUN_BYTES", 3 * per_sample + 1)
    xs = samples([100] * 20, seed=5, first_scale=4.0)  # the first run sets the range: no re-binning
    stats = collect(elementwise_model(), ({"x": x} for x in xs), TENSORS, CalibrationConfig(batch_size=batch_size))
    assert sizes == expected
    assert_matches_numpy(stats, xs, exact_hist=True)


def flattening_model():
    """Reshape to [1, -1] then Softmax: a dynamic batch axis that the graph folds away, so
    stacking samples would normalize them together."""
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["y"], axis=-1)]
    return graphs.model(nodes, [("x", np.float32, ["N", 3, 8])], [("y", np.float32, [1, None])],
                        [("flat_shape", np.array([1, -1], np.int64))])


def test_batch_folded_away_runs_one_sample_at_a_time(monkeypatch):
    sizes = run_sizes(monkeypatch)
    xs = [x * np.float32(3) for x in samples([8] * 12, seed=6)]
    stats = collect(flattening_model(), [{"x": np.concatenate(xs)}], ["flat", "y"], CalibrationConfig())
    assert sizes == [1, 11] + [1] * 11  # the batched run is dropped and re-run sample by sample
    soft = [np.exp(x.ravel() - x.max()) / np.exp(x.ravel() - x.max()).sum() for x in xs]
    assert stats["y"].count == stats["flat"].count == 12 * 24
    assert stats["y"].max == pytest.approx(max(s.max() for s in soft), rel=1e-5)
    assert stats["y"].min == pytest.approx(min(s.min() for s in soft), rel=1e-4)
    assert stats["y"].hist.sum() == 12 * 24


def test_at_most_two_runs_of_activations_are_alive(monkeypatch):
    monkeypatch.setattr(COLLECT, "RUN_BYTES", 1)  # one sample per run: many runs
    alive, most, real = [], [0], TensorStats.update

    def update(self, x):
        if self.name == "y":
            alive.append(weakref.ref(x))
            most[0] = max(most[0], sum(r() is not None for r in alive))
        real(self, x)

    monkeypatch.setattr(TensorStats, "update", update)
    xs = samples([64] * 40, seed=7)
    collect(elementwise_model(), ({"x": x} for x in xs), TENSORS, CalibrationConfig())
    assert len(alive) == 40 and 1 <= most[0] <= 2


def test_the_model_is_left_as_it_was():
    model = elementwise_model()
    before = model.SerializeToString()
    collect(model, [{"x": samples([5])[0]}], ["scaled", "act"], CalibrationConfig())
    with pytest.raises(DataError):
        collect(model, [{"x": np.zeros((1, 4, 5), np.float32)}], ["scaled"], CalibrationConfig())
    assert model.SerializeToString() == before


def conv_relu_model():
    """Conv -> Relu -> Conv: onnxruntime's full optimizations would fuse Conv+Relu were the
    first Conv's output not asked for."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"])]
    weights = [("w1", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)),
               ("b1", rng.standard_normal(16).astype(np.float32)),
               ("w2", rng.standard_normal((8, 16, 1, 1)).astype(np.float32))]
    return graphs.model(nodes, [("x", np.float32, ["N", 3, 12, 12])], [("y", np.float32, ["N", 8, 12, 12])],
                        weights)


def test_asked_tensors_keep_their_values_under_full_optimization():
    model = conv_relu_model()
    x = np.random.default_rng(9).standard_normal((5, 3, 12, 12)).astype(np.float32)
    stats = collect(model, [{"x": x}], ["c1", "r1"], CalibrationConfig())
    plain = COLLECT.session(model, ["c1", "r1"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with COLLECT.exposed(model, ["c1", "r1"]):
        ref = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    c1, r1 = ref.run(["c1", "r1"], {"x": x})
    assert plain.run(["c1"], {"x": x})[0].shape == c1.shape
    assert c1.min() < 0 and stats["c1"].min == pytest.approx(c1.min(), rel=1e-5)  # not the fused Relu's output
    assert (stats["c1"].max, stats["r1"].max) == (pytest.approx(c1.max(), rel=1e-5), pytest.approx(r1.max(), rel=1e-5))
    assert stats["r1"].min == 0 and stats["r1"].zeros == np.count_nonzero(r1 == 0)


def test_falls_back_to_basic_optimizations(monkeypatch):
    levels, real = [], runtime.session

    def session(model, *, optimization, **kw):
        levels.append(optimization)
        if optimization == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise UnsupportedModelError("onnxruntime cannot load the model: an optimizer failed")
        return real(model, optimization=optimization, **kw)

    monkeypatch.setattr(COLLECT.runtime, "session", session)
    xs = samples([9] * 4, first_scale=4.0)
    stats = collect(elementwise_model(), ({"x": x} for x in xs), TENSORS, CalibrationConfig())
    assert levels == [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
    assert_matches_numpy(stats, xs, exact_hist=True)
