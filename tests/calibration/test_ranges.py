import logging

import numpy as np
import pytest

from onnxopt.calibration import CalibrationConfig, CalibrationMethod, TensorRange, TensorStats, select_ranges
from onnxopt.calibration.kl import kl_threshold
from onnxopt.calibration.ranges import percentile_threshold, two_sided_thresholds
from onnxopt.errors import UserError

ENTROPY = CalibrationConfig()
SYMMETRIC = CalibrationConfig(symmetric=True)
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


def test_symmetric_entropy_clips_to_the_kl_threshold_of_the_nonzero_values():
    rng = np.random.default_rng(2)
    relu = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    relu[:3] = [30.0, 25.0, 20.0]  # a long tail the threshold cuts off
    s = stats_of(relu)
    assert s.zeros == np.count_nonzero(relu == 0) > 40_000
    nonzero = s.hist.copy()
    nonzero[0] -= s.zeros
    t = kl_threshold(nonzero, s.edges)
    r = select_ranges({"t": s}, SYMMETRIC)["t"]
    assert (r.min, r.max) == (0.0, t)  # min is the observed 0, not -T
    assert 3.5 < t < 20  # the tail is cut, the bulk of the half-normal kept
    assert kl_threshold(s.hist, s.edges) < 2.5  # with the spike of zeros, T would drop to 2 sigma


def test_symmetric_entropy_is_one_threshold_on_abs():
    x = lopsided(np.random.default_rng(4), outliers=20)
    s = stats_of(x)
    t = kl_threshold(s.hist, s.edges)  # no zeros here
    r = select_ranges({"t": s}, SYMMETRIC)["t"]
    assert (r.min, r.max) == (max(-t, s.min), min(t, s.max))
    assert r.max < 5 < 10 < s.max  # the outliers' side is cut at the bulk's scale


def lopsided(rng, outliers, n=200_000):
    """A normal bulk and ``outliers`` values in [10, 30] (an outlier channel)."""
    x = rng.standard_normal(n)
    x[:outliers] = rng.uniform(10, 30, outliers)
    x[0] = 30.0
    return x.astype(np.float32)


@pytest.mark.parametrize("outliers", [20, 100, 400])  # 1e-4 to 2e-3 of the values
def test_two_sided_entropy_keeps_a_long_side_that_carries_mass(outliers):
    x = lopsided(np.random.default_rng(5), outliers)
    s = stats_of(x)
    r = select_ranges({"t": s}, ENTROPY)["t"]
    assert r.max >= 0.97 * s.max == 0.97 * 30.0
    assert -s.min * 0.8 < -r.min <= -s.min  # the short side stays near the bulk's own scale


def test_two_sided_entropy_cuts_each_side_by_its_own_kl_threshold():
    rng = np.random.default_rng(6)
    x = rng.standard_normal(200_000)
    x = np.where(x > 0, 2 * x, x).astype(np.float32)  # twice as wide on the positive side
    s = stats_of(x)
    r = select_ranges({"t": s}, ENTROPY)["t"]
    pos, e = s.pos, s.edges
    top = np.flatnonzero(pos)[-1] + 1
    assert r.max == kl_threshold(pos[:top], e[: top + 1]) < s.max  # KL's cut of the sparse Gaussian tail
    assert 1.6 < r.max / -r.min < 2.4
    sym = select_ranges({"t": s}, SYMMETRIC)["t"]
    assert -r.min < -sym.min == -s.min  # one threshold on |x|, set by the wide side, never cuts the short one


def test_two_sided_entropy_keeps_the_max_of_few_distinct_values():
    # Like a GlobalAveragePool output: one value per sample and channel. KL moves
    # whole spikes when it clips (cut at 3.18 of 3.46 here).
    x = np.abs(np.random.default_rng(3).standard_normal(2000)).astype(np.float32)
    s = stats_of(x)
    assert kl_threshold(s.hist, s.edges) < 0.95 * s.max
    r = select_ranges({"t": s}, ENTROPY)["t"]
    assert (r.min, r.max) == (s.min, s.max)


def test_two_sided_entropy_of_a_relu_keeps_min_zero():
    relu = np.maximum(np.random.default_rng(7).standard_normal(100_000), 0).astype(np.float32)
    s = stats_of(relu)
    assert two_sided_thresholds(s)[0] == 0.0
    r = select_ranges({"t": s}, ENTROPY)["t"]
    assert r.min == 0.0 and str(r.min) == "0.0" and 3.5 < r.max <= s.max


@pytest.mark.parametrize("config", [ENTROPY, SYMMETRIC])
def test_entropy_keeps_the_observed_range_when_it_is_tighter(config):
    s = stats_of([-1.0, -0.5, 0.25])  # 3 values: every candidate keeps them
    r = select_ranges({"t": s}, config)["t"]
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
