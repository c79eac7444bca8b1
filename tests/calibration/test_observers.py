import pickle

import numpy as np
import pytest

from onnxopt.calibration.observers import TensorStats, rebin

rng = np.random.default_rng(0)


def numpy_hist(values, top, bins=2048):
    return np.histogram(np.abs(values), bins=bins, range=(0, top))[0]


def test_one_batch_is_numpy_histogram_of_abs():
    x = rng.standard_normal((8, 3, 50, 50))  # float64: binning rounds like np.histogram
    s = TensorStats("t")
    s.update(x)
    assert (s.count, s.min, s.max, s.hist_max) == (x.size, x.min(), x.max(), np.abs(x).max())
    assert s.hist.sum() == x.size
    assert np.abs(s.hist - numpy_hist(x, s.hist_max)).sum() <= 2  # at most a value on an edge moves


def test_float32_binning_differs_from_numpy_only_at_edges():
    x = rng.standard_normal(1_000_000).astype(np.float32) * 3
    s = TensorStats("t")
    s.update(x)
    assert s.hist.sum() == x.size
    assert np.abs(s.hist - numpy_hist(x.astype(np.float64), s.hist_max)).sum() < 1e-4 * x.size
    np.testing.assert_array_equal(s.edges, np.linspace(0, s.hist_max, 2049))


@pytest.mark.parametrize(
    "hist, old_max, new_max, expected",
    [
        ([1, 2, 3, 4], 1.0, 2.0, [3, 7, 0, 0]),  # twice the range: pairs of bins merge
        ([4, 4, 4, 4], 4.0, 5.0, [5, 5, 5, 1]),  # values spread evenly inside each old bin
        ([7, 0, 0, 0], 0.0, 3.0, [7, 0, 0, 0]),  # all zeros so far: they stay at 0
        ([1, 2, 3, 4], 2.0, 2.0, [1, 2, 3, 4]),
    ],
)
def test_rebin(hist, old_max, new_max, expected):
    np.testing.assert_allclose(rebin(np.array(hist, float), old_max, new_max), expected)


def test_growing_range_rebins_and_keeps_count_min_max_and_shape():
    batches = [rng.standard_normal(20_000) * scale for scale in (0.5, 1.0, 1.0, 2.0, 3.5)]  # range grows 4 times
    s = TensorStats("t")
    for b in batches:
        s.update(b)
    everything = np.concatenate(batches)
    assert s.hist_max == np.abs(everything).max()
    assert (s.count, s.min, s.max) == (everything.size, everything.min(), everything.max())
    assert s.hist.sum() == pytest.approx(everything.size, rel=1e-12)
    direct = numpy_hist(everything, s.hist_max)
    assert np.abs(s.hist - direct).sum() < 0.04 * everything.size  # about the same shape ...
    coarse = lambda h: h.reshape(64, 32).sum(axis=1)  # noqa: E731
    np.testing.assert_allclose(coarse(s.hist), coarse(direct), atol=0.001 * everything.size)  # ... at 64 bins
    centres = (s.edges[:-1] + s.edges[1:]) / 2
    assert centres @ s.hist / s.count == pytest.approx(np.abs(everything).mean(), rel=1e-3)


def test_merge_equals_one_pass():
    a, b = np.maximum(rng.standard_normal(30_000), 0), np.r_[rng.standard_normal(10_000) * 4, np.nan]
    left, right, both = TensorStats("t"), TensorStats("t"), TensorStats("t")
    left.update(a)
    right.update(b)
    both.update(np.concatenate([a, b]))
    merged = left.merge(right)
    assert (merged.count, merged.min, merged.max, merged.hist_max) == (both.count, both.min, both.max, both.hist_max)
    assert (merged.nonfinite, merged.zeros) == (both.nonfinite, both.zeros)
    assert merged.hist.sum() == pytest.approx(both.hist.sum())
    assert np.abs(merged.hist - both.hist).sum() < 0.05 * both.count
    assert left.count == a.size  # inputs untouched


def test_size_does_not_grow_with_samples():
    few, many = TensorStats("t"), TensorStats("t")
    few.update(rng.standard_normal(1000))
    for _ in range(300):
        many.update(rng.standard_normal(1000) * rng.uniform(0.5, 2))
    assert many.count == 300 * few.count
    assert abs(len(pickle.dumps(many)) - len(pickle.dumps(few))) < 32
    assert many.hist.nbytes == few.hist.nbytes == 2048 * 8


def test_non_finite_and_sentinels_are_counted_and_kept_out():
    finfo_min = np.finfo(np.float32).min  # what exporters write for attention masks
    x = np.array([1.5, -2.0, np.nan, np.inf, -np.inf, finfo_min, finfo_min + 1e32, 0.25], np.float32)
    s = TensorStats("t")
    s.update(x)
    assert (s.count, s.nonfinite, s.min, s.max, s.hist_max) == (3, 5, -2.0, 1.5, 2.0)
    assert s.hist.sum() == 3
    s.update(np.full(4, -np.inf, np.float32))  # a batch with nothing finite
    assert (s.count, s.nonfinite, s.min, s.max) == (3, 9, -2.0, 1.5)


def test_float16_sentinel_is_half_its_range():
    s = TensorStats("t")
    s.update(np.array([np.finfo(np.float16).min, 3.0, -1.0], np.float16))
    assert (s.count, s.nonfinite, s.min, s.max) == (2, 1, -1.0, 3.0)


def test_zeros_then_values():
    s = TensorStats("t", num_bins=16)
    s.update(np.zeros(10, np.float32))
    assert (s.hist_max, s.hist[0], s.amax, s.zeros) == (0.0, 10, 0.0, 10)
    s.update(np.array([4.0, -8.0, -0.0], np.float32))
    assert s.hist[0] == 11 and s.hist[7] == 1 and s.hist[15] == 1 and s.hist.sum() == 13 and s.zeros == 11


def test_tiny_values_bin_in_float64():
    s = TensorStats("t")
    s.update(np.array([1e-39, -3e-39, 2e-39], np.float32))  # 2048 / 3e-39 overflows float32
    assert np.flatnonzero(s.hist).tolist() == [682, 1365, 2047]


def test_empty_and_fresh():
    s = TensorStats("t")
    s.update(np.zeros((0, 3), np.float32))
    assert (s.count, s.nonfinite, s.amax, s.hist.sum()) == (0, 0, 0.0, 0)


def test_negative_side_has_its_own_histogram():
    x = np.r_[rng.standard_normal(30_000), rng.standard_normal(30_000) * 3, np.zeros(100), -np.zeros(50)]
    s = TensorStats("t")
    s.update(x)
    neg, pos = numpy_hist(x[x < 0], s.hist_max), numpy_hist(x[x > 0], s.hist_max)
    assert s.neg.sum() == np.count_nonzero(x < 0) and np.abs(s.neg - neg).sum() <= 2
    pos[0] += s.zeros
    assert s.pos.sum() == np.count_nonzero(x >= 0) == x.size - s.neg.sum() and np.abs(s.pos - pos).sum() <= 2
    assert s.zeros == 150


def test_negative_side_rebins_and_merges():
    a, b = np.maximum(rng.standard_normal(30_000), 0), -np.abs(rng.standard_normal(10_000)) * 4
    left, right, both = TensorStats("t"), TensorStats("t"), TensorStats("t")
    left.update(a)
    right.update(b)
    both.update(a)
    both.update(b)  # grows the range: re-bins hist and neg
    merged = left.merge(right)
    for s in (merged, both):
        assert s.neg.sum() == pytest.approx(b.size) and s.pos.sum() == pytest.approx(a.size)
        assert np.abs(s.neg - numpy_hist(b, s.hist_max)).sum() < 0.01 * b.size
        assert np.all(s.pos[np.flatnonzero(s.edges[:-1] > a.max() + s.hist_max / 2048)] == 0)
