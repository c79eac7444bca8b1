"""kl_threshold against a direct implementation written here, one candidate at a time."""

import numpy as np
import pytest
from scipy.stats import entropy

from onnxopt.calibration.kl import TIE, kl_divergences, kl_threshold


def reference_divergences(counts, num_quant_bins=128):
    """The TensorRT recipe, literally: for each i, build P and Q and take KL(P || Q)."""
    c = np.asarray(counts, dtype=np.float64)
    n, q = len(c), num_quant_bins
    out = []
    for i in range(q, n + 1):
        if c[i:].sum() > 0 and c[: i - 1].sum() == 0:
            out.append(np.inf)  # clipping everything into one spike: not a candidate
            continue
        p = c[:i].copy()
        p[i - 1] += c[i:].sum()  # outliers folded into the last bin
        level = np.floor(np.arange(i) * q / i).astype(int)
        mass = np.bincount(level, weights=c[:i], minlength=q)
        nonzero = np.bincount(level, weights=c[:i] > 0, minlength=q)
        expanded = np.where(c[:i] > 0, mass[level] / np.maximum(nonzero[level], 1), 0.0)
        out.append(kl_divergence(p, expanded))
    return np.array(out)


def kl_divergence(p, q):
    """KL(p || q) of unnormalized histograms; inf where p > 0 = q."""
    if q.sum() == 0 or np.any((p > 0) & (q == 0)):
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def reference_threshold(counts, edges, num_quant_bins=128, kl=None):
    if len(counts) < num_quant_bins or np.sum(counts) == 0:
        return float(edges[-1])
    kl = reference_divergences(counts, num_quant_bins) if kl is None else kl
    return float(edges[num_quant_bins + np.flatnonzero(kl <= kl.min() + TIE)[0]])


def histogram(values, bins=2048):
    counts, edges = np.histogram(np.abs(values), bins=bins, range=(0, np.abs(values).max()))
    return counts, edges


rng = np.random.default_rng(0)
HISTOGRAMS = {
    "gaussian": histogram(rng.standard_normal(200_000)),
    "laplacian": histogram(rng.laplace(size=200_000)),
    "heavy_tailed": histogram(rng.standard_t(2, size=200_000)),
    "relu": histogram(np.maximum(rng.standard_normal(100_000), 0) * 3),
    "random_counts": (rng.integers(0, 50, 2048) * (rng.random(2048) < 0.7), np.linspace(0, 5, 2049)),
    "fractional": (rng.random(1024) ** 3 * 1e3, np.linspace(0, 1, 1025)),
    "sparse_40_bins": (np.bincount(rng.choice(2048, 40, replace=False), minlength=2048) * 7, np.linspace(0, 2, 2049)),
    "one_nonzero_bin": (np.eye(1, 2048, 700)[0] * 5, np.linspace(0, 1, 2049)),
    "two_spikes": (np.eye(1, 2048, 3)[0] * 1e6 + np.eye(1, 2048, 2047)[0], np.linspace(0, 1, 2049)),
}


@pytest.mark.parametrize("name", HISTOGRAMS)
def test_matches_the_direct_implementation(name):
    counts, edges = HISTOGRAMS[name]
    ours, ref = kl_divergences(np.asarray(counts, float), 128), reference_divergences(counts)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=1e-11)
    assert kl_threshold(counts, edges) == reference_threshold(counts, edges, kl=ref)


def test_reference_agrees_with_scipy():
    p, q = rng.random(50), rng.random(50)
    assert kl_divergence(p, q) == pytest.approx(entropy(p, q), rel=1e-12)


@pytest.mark.parametrize("q", [1, 8, 100])
def test_other_level_counts(q):
    counts, edges = histogram(rng.laplace(size=20_000), bins=300)
    assert kl_threshold(counts, edges, q) == reference_threshold(counts, edges, q)


def test_threshold_clips_a_long_tail_but_keeps_the_bulk():
    values = np.concatenate([rng.standard_normal(500_000), [40.0, -55.0]])
    t = kl_threshold(*histogram(values))
    assert 2.5 < t < 10  # the two outliers do not set the range, the bulk is kept


def test_threshold_is_a_bin_edge():
    counts, edges = HISTOGRAMS["laplacian"]
    assert kl_threshold(counts, edges) in set(edges[128:].tolist())


@pytest.mark.parametrize(
    "counts, expected",
    [
        (np.zeros(2048), 1.0),  # no data: the whole range
        (np.array([5.0]), 1.0),  # one bin, fewer than 128: nothing to choose
        (np.ones(100), 1.0),  # fewer bins than levels
        (np.eye(1, 2048, 700)[0], (701) / 2048),  # one value: the edge just above it
        (np.eye(1, 2048, 5)[0], 128 / 2048),  # a value below bin 128: the smallest candidate
        (np.eye(1, 2048, 512)[0] + np.eye(1, 2048, 1024)[0] + np.eye(1, 2048, 2047)[0], 1.0),  # no collapse at 513
        (np.r_[np.zeros(1843), np.ones(205)], 1.0),  # values in [0.9, 1]: not clipped at 0.9
    ],
)
def test_degenerate_histograms(counts, expected):
    edges = np.linspace(0, 1, len(counts) + 1)
    assert kl_threshold(counts, edges) == pytest.approx(expected)
    assert kl_threshold(counts, edges) == reference_threshold(counts, edges)


def test_bad_input():
    with pytest.raises(ValueError, match="edges"):
        kl_threshold(np.ones(10), np.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="not negative"):
        kl_threshold(-np.ones(10), np.linspace(0, 1, 11), 4)
    with pytest.raises(ValueError, match="finite"):
        kl_threshold(np.full(10, np.nan), np.linspace(0, 1, 11), 4)
