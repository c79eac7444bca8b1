import json
import logging

import numpy as np
import onnx
import pytest

from onnxopt.calibration import (
    CalibrationConfig,
    CalibrationMethod,
    TensorRange,
    calibrate,
    fingerprint,
    load_ranges,
    save_ranges,
)
from onnxopt.calibration import cache as cache_module
from onnxopt.errors import UserError
from tests.calibration.test_collect import elementwise_model

RANGES = {
    "a": TensorRange("a", -1.2345678901234567, 2.5e-7),
    "b/c:0": TensorRange("b/c:0", 0.0, 6.0, nonfinite=12),
}
MINMAX = CalibrationConfig(method=CalibrationMethod.MINMAX)


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "ranges.json"
    save_ranges(path, RANGES, "abc")
    assert load_ranges(path, "abc") == RANGES
    doc = json.loads(path.read_text())
    assert (doc["version"], doc["method"], doc["fingerprint"]) == (2, "entropy", "abc")


def test_missing_cache_is_none(tmp_path):
    assert load_ranges(tmp_path / "none.json", "abc") is None


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.update(fingerprint="other"),
        lambda doc: doc.update(version=1),  # one threshold on |x|: recalibrate
        lambda doc: doc.update(method="minmax"),
        lambda doc: doc["settings"].update(num_bins=1024),
        lambda doc: doc["settings"].update(symmetric=True),
    ],
)
def test_stale_cache_is_ignored_with_a_warning(tmp_path, caplog, change):
    path = tmp_path / "ranges.json"
    save_ranges(path, RANGES, "abc")
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert load_ranges(path, "abc") is None
    assert "stale" in caplog.text


def test_settings_of_other_methods_do_not_matter(tmp_path):
    path = tmp_path / "ranges.json"
    save_ranges(path, RANGES, "abc", config=MINMAX)
    assert load_ranges(path, "abc", config=CalibrationConfig(method=CalibrationMethod.MINMAX, num_bins=512)) == RANGES


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"ranges": {}}'])
def test_foreign_file_is_a_user_error(tmp_path, text):
    path = tmp_path / "ranges.json"
    path.write_text(text)
    with pytest.raises(UserError, match="not an onnxopt calibration cache"):
        load_ranges(path, "abc")


def test_malformed_range_is_a_user_error(tmp_path):
    path = tmp_path / "ranges.json"
    save_ranges(path, RANGES, "abc")
    doc = json.loads(path.read_text())
    del doc["ranges"]["a"]["max"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="malformed"):
        load_ranges(path, "abc")


def test_save_into_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        save_ranges(tmp_path / "no" / "ranges.json", RANGES, "abc")


def test_fingerprint_follows_structure_weights_and_tensors():
    model = elementwise_model()
    key = fingerprint(model, ["y", "act"])
    assert fingerprint(elementwise_model(), ["act", "y", "act"]) == key  # same model, same set of names
    assert fingerprint(model, ["y"]) != key
    retrained = onnx.ModelProto()
    retrained.CopyFrom(model)
    retrained.graph.initializer[0].raw_data = np.float32(1.8).tobytes()
    assert fingerprint(retrained, ["y", "act"]) != key
    other_op = elementwise_model()
    other_op.graph.node[1].op_type = "Sigmoid"
    assert fingerprint(other_op, ["y", "act"]) != key


def test_second_run_with_the_cache_does_no_inference(tmp_path, monkeypatch):
    calls, pulled = [], []
    real_collect = cache_module.collect
    monkeypatch.setattr(cache_module, "collect", lambda *a, **k: calls.append(1) or real_collect(*a, **k))

    def stream():
        for seed in range(4):
            pulled.append(seed)
            yield {"x": np.random.default_rng(seed).standard_normal((4, 3, 6)).astype(np.float32)}

    model, path = elementwise_model(), tmp_path / "ranges.json"
    first = calibrate(model, stream(), ["act", "y"], MINMAX, cache=path)
    assert (len(calls), len(pulled)) == (1, 4) and path.exists()
    second = calibrate(model, stream(), ["act", "y"], MINMAX, cache=path)
    assert second == first
    assert (len(calls), len(pulled)) == (1, 4)  # no collect, not one batch read


def test_stale_cache_is_recalibrated_and_rewritten(tmp_path):
    model, path = elementwise_model(), tmp_path / "ranges.json"
    save_ranges(path, {"y": TensorRange("y", -1.0, 1.0)}, "stale", config=MINMAX)
    feeds = [{"x": np.full((2, 3, 4), 2.0, np.float32)}]
    ranges = calibrate(model, feeds, ["y"], MINMAX, cache=path)
    assert ranges["y"] == TensorRange("y", float(np.float32(2.0) * np.float32(1.7) - np.float32(0.3)),
                                      float(np.float32(2.0) * np.float32(1.7) - np.float32(0.3)))
    assert load_ranges(path, fingerprint(model, ["y"]), config=MINMAX) == ranges
