import logging

import numpy as np
import pytest

from onnxopt.calibration import CalibrationConfig, CalibrationMethod, TensorRange, TensorStats, select_ranges
from onnxopt.calibration.kl import kl_threshold
from onnxopt.calibration.ranges import percentile_threshold
from onnxopt.errors import UserError

ENTROPY = CalibrationConfig()
MINMAX = CalibrationConfig(method=CalibrationMethod.MINMAX)


def stats_of(*batches, name="t"):
    s = TensorStats(name)
    for b in batches:
        s.update(np.asarray(b, np.float32))
    return s


def test_minmax_is_the_observed_range_exactly():
    a = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    b = np.array([-7.25, 2.0, np.nan], np.float32)
    r = select_ranges({"t": stats_of(a, b)}, MINMAX)["t"]
    assert r == TensorRange("t", -7.25, float(a.max()), nonfinite=1)


def test_percentile_exact_on_evenly_spread_counts():
    counts, edges = np.ones(2048), np.linspace(0, 2048, 2049)  # one value per unit: the percentile is p% of 2048
    assert percentile_threshold(counts, edges, 99.99) == pytest.approx(0.9999 * 2048, abs=1e-9)
    assert percentile_threshold(counts, edges, 50) == pytest.approx(1024)
    assert percentile_threshold(counts, edges, 100) == 2048
    assert percentile_threshold(np.zeros(4), np.linspace(0, 1, 5), 99) == 1.0


def test_percentile_interpolates_inside_the_bin():
    counts, edges = np.array([0, 10, 0, 30.0]), np.array([0, 1, 2, 3, 4.0])
    assert percentile_threshold(counts, edges, 25) == 2.0  # all of bin 1, skipping the empty bin 2
    assert percentile_threshold(counts, edges, 20) == 1.8
    assert percentile_threshold(counts, edges, 62.5) == 3.5


def test_percentile_close_to_numpy_on_data():
    x = np.random.default_rng(1).laplace(size=200_000).astype(np.float32)
    s = stats_of(x)
    cfg = CalibrationConfig(method=CalibrationMethod.PERCENTILE, percentile=99.9)
    r = select_ranges({"t": s}, cfg)["t"]
    t = np.percentile(np.abs(x), 99.9)
    width = s.hist_max / 2048
    assert abs(r.max - t) < width and abs(-r.min - t) < width


def test_entropy_clips_to_the_kl_threshold_of_the_nonzero_values():
    rng = np.random.default_rng(2)
    relu = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    relu[:3] = [30.0, 25.0, 20.0]  # a long tail the threshold cuts off
    s = stats_of(relu)
    assert s.zeros == np.count_nonzero(relu == 0) > 40_000
    nonzero = s.hist.copy()
    nonzero[0] -= s.zeros
    t = kl_threshold(nonzero, s.edges)
    r = select_ranges({"t": s}, ENTROPY)["t"]
    assert (r.min, r.max) == (0.0, t)  # min is the observed 0, not -T
    assert 3.5 < t < 20  # the tail is cut, the bulk of the half-normal kept
    assert kl_threshold(s.hist, s.edges) < 2.5  # with the spike of zeros, T would drop to 2 sigma


def test_entropy_keeps_the_observed_range_when_it_is_tighter():
    s = stats_of([-1.0, -0.5, 0.25])  # 3 values: every candidate keeps them
    r = select_ranges({"t": s}, ENTROPY)["t"]
    assert r.min == -1.0 and r.max == 0.25


def test_tensor_with_no_finite_value_gets_zero_range(caplog):
    with caplog.at_level(logging.WARNING):
        r = select_ranges({"m": stats_of([-np.inf, np.nan], name="m")}, ENTROPY)["m"]
    assert r == TensorRange("m", 0.0, 0.0, nonfinite=2)
    assert "no finite value" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"percentile": 0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"num_bins": 64}, "num_quant_bins"),
        ({"batch_size": 0}, "batch size"),
        ({"max_samples": 0}, "samples"),
        ({"method": "entropy"}, "not one of"),
    ],
)
def test_bad_config_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        CalibrationConfig(**kwargs)
