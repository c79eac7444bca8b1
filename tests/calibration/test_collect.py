import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import data
from onnxopt.calibration import CalibrationConfig, collect, select_ranges
from onnxopt.calibration.collect import rebatch
from onnxopt.errors import DataError, UserError
from tests import graphs

MODELS = Path(__file__).resolve().parents[2] / "models"
SCALE, SHIFT = np.float32(1.7), np.float32(0.3)
CONFIG = CalibrationConfig()


def elementwise_model(batch="N", width="W", channels=3):
    """x -> Mul(1.7) -> Relu -> Sub(0.3): float32 ops that numpy reproduces bit for bit."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
        helper.make_node("Relu", ["scaled"], ["act"], name="relu"),
        helper.make_node("Sub", ["act", "shift"], ["y"], name="sub"),
    ]
    shape = [batch, channels, width]
    weights = [("scale", SCALE), ("shift", SHIFT)]
    return graphs.model(nodes, [("x", np.float32, shape)], [("y", np.float32, shape)], weights)


def direct(x):
    scaled = x * SCALE
    act = np.maximum(scaled, np.float32(0))
    return {"x": x, "scaled": scaled, "act": act, "y": act - SHIFT}


def samples(widths, seed=0, first_scale=1.0):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal((1, 3, w)).astype(np.float32) for w in widths]
    out[0] *= np.float32(first_scale)
    return out


def assert_matches_numpy(stats, xs, *, exact_hist):
    for name in ("x", "scaled", "act", "y"):
        values = np.concatenate([direct(x)[name].ravel() for x in xs])
        s = stats[name]
        assert (s.count, s.min, s.max) == (values.size, values.min(), values.max()), name
        hist = np.histogram(np.abs(values).astype(np.float64), bins=2048, range=(0, s.hist_max))[0]
        assert s.hist_max == np.abs(values).max()
        assert s.hist.sum() == pytest.approx(values.size, rel=1e-12)
        if exact_hist:  # up to float32 rounding at bin edges
            assert np.abs(s.hist - hist).sum() <= 1e-3 * values.size, name
        else:  # re-binned: the same shape at 64 bins
            coarse = lambda h: h.reshape(64, 32).sum(axis=1)  # noqa: E731
            assert np.abs(coarse(s.hist) - coarse(hist)).sum() <= 0.01 * values.size, name


def test_statistics_equal_numpy_on_the_concatenated_activations():
    xs = samples([7] * 20 + [11] * 13, first_scale=4.0)  # the first batch holds the largest value
    stats = collect(elementwise_model(), ({"x": x} for x in xs), ["x", "scaled", "act", "y"], CONFIG)
    assert_matches_numpy(stats, xs, exact_hist=True)
    assert stats["act"].zeros == sum(int((direct(x)["act"] == 0).sum()) for x in xs)


def test_growing_range_across_batches():
    xs = [x * np.float32(1 + i / 8) for i, x in enumerate(samples([300] * 64, seed=1))]  # 9 re-binnings
    stats = collect(elementwise_model(), ({"x": x} for x in xs), ["x", "scaled", "act", "y"], CONFIG)
    assert_matches_numpy(stats, xs, exact_hist=False)


def test_rebatching():
    def feeds(*shapes):
        return [{"x": np.zeros(s, np.float32)} for s in shapes]

    def sizes(stream, **kw):
        return [(n, f["x"].shape) for f, n in rebatch(stream, kw.pop("stackable", True), 16, kw.pop("limit", None))]

    assert [n for n, _ in sizes(feeds(*[(1, 3, 5)] * 40))] == [16, 16, 8]
    assert sizes(feeds((40, 3, 5))) == [(16, (16, 3, 5)), (16, (16, 3, 5)), (8, (8, 3, 5))]
    widths = feeds(*[(1, 3, 5)] * 10, (20, 3, 7), *[(1, 3, 5)] * 3)  # a new width starts a new batch
    assert sizes(widths) == [(10, (10, 3, 5)), (16, (16, 3, 7)), (4, (4, 3, 7)), (3, (3, 3, 5))]
    assert sum(n for n, _ in sizes(feeds(*[(4, 3, 5)] * 10), limit=25)) == 25
    assert sizes(feeds(*[(2, 3, 5)] * 5), stackable=False, limit=5) == [(2, (2, 3, 5))] * 3


def test_static_batch_model_takes_feeds_as_they_come():
    xs = samples([6] * 5)
    stats = collect(elementwise_model(batch=1, width=6), ({"x": x} for x in xs), ["act"], CONFIG)
    assert stats["act"].count == 5 * 18


def test_max_samples():
    stats = collect(elementwise_model(), ({"x": x} for x in samples([5] * 30)), ["y"],
                    CalibrationConfig(max_samples=12))
    assert stats["y"].count == 12 * 15


def peak_bytes(model, n_samples):
    def stream():
        rng = np.random.default_rng(0)
        for _ in range(n_samples // 16):
            yield {"x": rng.standard_normal((16, 3, 1024), dtype=np.float32)}

    tracemalloc.start()
    try:
        collect(model, stream(), ["x", "scaled", "act", "y"], CONFIG)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_samples():
    model = elementwise_model()
    few, many = peak_bytes(model, 64), peak_bytes(model, 1024)  # 1024 samples: 50 MB if kept
    assert many < 1.3 * few + (1 << 20), (few, many)


def attention_mask_model():
    """The Hugging Face extended mask: (1 - mask) * finfo(float32).min added to scores."""
    big = np.float32(np.finfo(np.float32).min)
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "big"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    return graphs.model(nodes, [("scores", np.float32, ["N", "S"]), ("mask", np.int64, ["N", "S"])],
                        [("probs", np.float32, ["N", "S"])], [("one", np.float32(1)), ("big", big)])


def test_mask_sentinels_are_counted_not_ranged():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((8, 10)).astype(np.float32)
    mask = (rng.random((8, 10)) < 0.7).astype(np.int64)
    masked = int((mask == 0).sum())
    stats = collect(attention_mask_model(), [{"scores": scores, "mask": mask}], ["bias", "masked", "probs"], CONFIG)
    assert stats["bias"].nonfinite == stats["masked"].nonfinite == masked
    assert (stats["bias"].min, stats["bias"].max) == (0.0, 0.0)
    kept = scores[mask == 1]
    assert (stats["masked"].min, stats["masked"].max) == (kept.min(), kept.max())
    assert stats["probs"].nonfinite == 0
    ranges = select_ranges(stats, CONFIG)
    assert ranges["masked"].nonfinite == masked and -5 < ranges["masked"].min < ranges["masked"].max < 5


def test_folder_of_npz_with_different_widths(tmp_path):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "a.npz", x=rng.standard_normal((6, 3, 5)).astype(np.float32))
    np.savez(tmp_path / "b.npz", x=rng.standard_normal((10, 3, 9)).astype(np.float32))
    model = elementwise_model()
    stats = collect(model, data.iter_feeds(tmp_path, model), ["y"], CONFIG)
    assert stats["y"].count == 6 * 15 + 10 * 27
    stats = collect(model, data.iter_feeds(tmp_path, model), ["y"], CalibrationConfig(max_samples=8))
    assert stats["y"].count == 6 * 15 + 2 * 27


def test_real_exported_model_with_progress_bar(capsys):
    model = onnx.load(MODELS / "digits_cnn.onnx")
    tensors = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Relu", "Gemm")]
    stats = collect(model, data.iter_feeds(MODELS / "digits_cnn.calib.npz", model), tensors, CONFIG, progress=True)
    assert "calibrating" in capsys.readouterr().err
    assert all(s.count > 0 and s.nonfinite == 0 for s in stats.values())
    ranges = select_ranges(stats, CONFIG)
    relu = next(t for t in tensors if "Relu" in t)
    assert ranges[relu].min == 0.0 and 0 < ranges[relu].max <= stats[relu].max


@pytest.mark.parametrize(
    "tensors, feeds, error, message",
    [
        (["nope"], None, UserError, "not produced in the model's main graph"),
        (["scale"], None, UserError, "is a weight"),
        (["y"], {"image": np.zeros((1, 3, 4), np.float32)}, DataError, "does not run"),
        (["y"], {"x": np.zeros((1, 3, 4), np.float64)}, DataError, "does not run"),
    ],
)
def test_refusals(tensors, feeds, error, message):
    with pytest.raises(error, match=message):
        collect(elementwise_model(), [feeds] if feeds else [], tensors, CONFIG)


def test_integer_tensor_and_empty_data():
    feeds = {"scores": np.zeros((1, 2), np.float32), "mask": np.ones((1, 2), np.int64)}
    with pytest.raises(UserError, match="only float tensors"):
        collect(attention_mask_model(), [feeds], ["mask"], CONFIG)
    with pytest.raises(DataError, match="no calibration samples"):
        collect(elementwise_model(), [], ["y"], CONFIG)


def test_iter_feeds_reads_one_file_at_a_time(tmp_path, monkeypatch):
    model = elementwise_model()
    for name in ("a", "b", "c"):
        np.savez(tmp_path / f"{name}.npz", x=np.zeros((4, 3, 5), np.float32))
    (tmp_path / "c.npz").write_text("broken")  # only an error once the stream gets there
    read = []
    real = data._read_npz
    monkeypatch.setattr(data, "_read_npz", lambda p: read.append(p.name) or real(p))
    stream = data.iter_feeds(tmp_path, model, 6)
    assert read == []  # nothing read before the first batch is asked for
    assert sum(f["x"].shape[0] for f in stream) == 6 and read == ["a.npz", "b.npz"]
    with pytest.raises(DataError, match="c.npz: not a readable"):
        list(data.iter_feeds(tmp_path, model))
    with pytest.raises(DataError, match="no such file"):
        data.iter_feeds(tmp_path / "missing", model)  # fails at once, not on the first next()
