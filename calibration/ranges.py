"""Range selection: from a tensor's statistics to the float range the quantizer maps to int8.

- minmax: the observed min and max (every value representable, coarsest steps);
- entropy (default): TensorRT's KL-divergence threshold (``kl.kl_threshold``), on
  histograms without their exact zeros: int8 represents 0 exactly, so zeros lose
  nothing whatever the threshold is, but a ReLU output's spike of them in bin 0
  would dominate the divergence and pull it down (to 2 sigma instead of 4.3 on a
  rectified normal). NVIDIA's pytorch-quantization flattens that spike too.
  Two forms, by ``config.symmetric``:

  - symmetric (the TensorRT target: zero point 0, the range is [-T, T] anyway):
    one threshold T on the histogram of |x|;
  - two-sided (default; onnxruntime's asymmetric activations): a threshold per
    side, T+ on the non-negative values and T- on |negative values|, each side's
    KL search with ``num_quant_bins`` levels on its own histogram up to its last
    value. One T on |x| is set by the bulk, so on a lopsided tensor it cuts the
    long side at the short side's scale: MiniLM's LayerNorm outputs [-7.7, 28.5]
    got [-7.4, 7.4], its GELU outputs [-0.17, 24.6] got [-0.17, 2.1].
    KL alone does not fix that: per side it clips the long side of those tensors
    even harder (T+ 5.9 of 28.5, 4.8 of 24.6), the large values are a handful of
    outlier channels (1e-4 of the values) that a transformer depends on, and
    all-MiniLM-L6-v2's mean-pooled cosine to float dropped from 0.958 to 0.924.
    So each side's KL threshold is checked against the side's largest value and
    the one with the smaller squared error is kept: clipping error (sum of
    (|x| - T)^2 over the values past T) plus rounding error (count * step^2 / 12,
    step = (T- + T+) / 255), over the four combinations. That keeps the outlier
    sides (cosine 0.994, minmax 0.993) and KL's cut where the tail is sparse
    noise (ReLU and Gaussian-like tensors of the CNNs); it also keeps the largest
    value of a tensor with few distinct values (a GlobalAveragePool output),
    where clipping moves whole spikes. Capping the clipped fraction instead
    (fall back to the max when KL clips more than 3e-5 of a side) measured about
    the same on MiniLM but the cap is a magic number: 1e-4 gave 0.945;
- percentile: T = the given percentile of |x|, read off the histogram with values
  spread evenly inside each bin.

With thresholds the range is the observed one clipped to them:
``min = max(-T-, observed min)``, ``max = min(T+, observed max)`` (T- = T+ = T when
symmetric), so a ReLU output keeps min = 0. The range does not always contain 0;
the quantizer widens it. A tensor with no finite value gets the range [0, 0] and a
warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxopt.calibration.kl import kl_threshold
from onnxopt.calibration.observers import TensorStats
from onnxopt.config import CalibrationConfig, CalibrationMethod

logger = logging.getLogger(__name__)

# Steps of an 8-bit range: 2^8 - 1.
LEVELS = 255


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range of one activation tensor (float values)."""

    name: str
    min: float  # observed/selected lower bound (<= 0 <= max is NOT guaranteed; the quantizer widens to include 0)
    max: float
    # entropy/percentile select thresholds T- and T+ (equal unless entropy is two-sided):
    # then min = max(-T-, observed_min), max = min(T+, observed_max)
    # Values left out of the range: NaN, +-inf and |x| >= 1e30 sentinels (finfo.min attention masks).
    # Non-zero usually means a mask that clipping would break: keep that tensor in float.
    nonfinite: int = 0


def select_ranges(stats: Mapping[str, TensorStats], config: CalibrationConfig) -> dict[str, TensorRange]:
    """One range per tensor, by ``config.method``."""
    return {name: select_range(s, config) for name, s in stats.items()}


def select_range(stats: TensorStats, config: CalibrationConfig) -> TensorRange:
    if stats.count == 0:
        logger.warning("tensor %r: no finite value seen in calibration; range [0, 0]", stats.name)
        return TensorRange(stats.name, 0.0, 0.0, stats.nonfinite)
    if stats.nonfinite:
        logger.info("tensor %r: %d non-finite or sentinel values left out of its range", stats.name, stats.nonfinite)
    if config.method is CalibrationMethod.MINMAX:
        return TensorRange(stats.name, stats.min, stats.max, stats.nonfinite)
    if config.method is CalibrationMethod.ENTROPY and not config.symmetric:
        lo, hi = two_sided_thresholds(stats, config.num_quant_bins)
        return TensorRange(stats.name, max(stats.min, -lo), min(stats.max, hi), stats.nonfinite)
    if config.method is CalibrationMethod.ENTROPY:
        hist = stats.hist.copy()
        hist[0] = max(hist[0] - stats.zeros, 0.0)
        t = kl_threshold(hist, stats.edges, config.num_quant_bins)
    elif config.method is CalibrationMethod.PERCENTILE:
        t = percentile_threshold(stats.hist, stats.edges, config.percentile)
    else:
        raise ValueError(f"unknown calibration method {config.method!r}")
    return TensorRange(stats.name, max(-t, stats.min), min(t, stats.max), stats.nonfinite)


def percentile_threshold(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The ``percentile`` (0-100) of the values histogrammed in ``counts`` over ``edges``,
    interpolated linearly inside the bin where the cumulative count reaches it."""
    c = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.shape != (len(c) + 1,):
        raise ValueError(f"{len(c)} bins need {len(c) + 1} edges, got {edges.shape}")
    cum = np.concatenate([[0.0], np.cumsum(c)])
    if cum[-1] <= 0:
        return float(edges[-1])
    target = cum[-1] * min(max(percentile, 0.0), 100.0) / 100.0
    k = int(np.searchsorted(cum, target, side="left"))  # first edge where the count reaches target
    if k == 0:
        return float(edges[0])
    k = min(k, len(c))
    frac = (target - cum[k - 1]) / c[k - 1] if c[k - 1] > 0 else 1.0
    return float(edges[k - 1] + min(frac, 1.0) * (edges[k] - edges[k - 1]))


def two_sided_thresholds(stats: TensorStats, num_quant_bins: int = 128) -> tuple[float, float]:
    """(T-, T+) for the range [-T-, T+]: per side, the KL threshold of that side's
    histogram, or the side's largest value where that has the smaller squared error."""
    pos = stats.pos
    pos[0] = max(pos[0] - stats.zeros, 0.0)
    sides = (stats.neg, pos)
    edges = stats.edges
    tops = [_top(c) for c in sides]
    kl = [kl_threshold(c[:n], edges[: n + 1], num_quant_bins) if n else 0.0 for c, n in zip(sides, tops)]
    maxes = [float(edges[n]) for n in tops]
    centres = (edges[:-1] + edges[1:]) / 2
    # Rounding error per squared range width: count * step^2 / 12 (zeros are exact).
    rounding = sum(c.sum() for c in sides) / 12 / LEVELS**2
    best = None
    for lo in dict.fromkeys((kl[0], maxes[0])):  # KL's choice first: it wins ties
        for hi in dict.fromkeys((kl[1], maxes[1])):
            err = rounding * (lo + hi) ** 2
            err += sum(float(c @ np.maximum(centres - t, 0.0) ** 2) for c, t in zip(sides, (lo, hi)))
            if best is None or err < best[0]:
                best = (err, lo, hi)
    return best[1], best[2]


def _top(counts: np.ndarray) -> int:
    """Number of bins up to the last non-empty one (0 for an empty side)."""
    nonempty = np.flatnonzero(counts > 0)
    return int(nonempty[-1]) + 1 if len(nonempty) else 0
