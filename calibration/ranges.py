"""Range selection: from a tensor's statistics to the float range the quantizer maps to int8.

- minmax: the observed min and max (every value representable, coarsest steps);
- entropy (default): the TensorRT KL-divergence threshold T on |x| (``kl.kl_threshold``),
  on the histogram without its exact zeros: int8 represents 0 exactly, so zeros
  lose nothing whatever T is, but a ReLU output's spike of them in bin 0 would
  dominate the divergence and pull T down (to 2 sigma instead of 4.3 on a
  rectified normal). NVIDIA's pytorch-quantization flattens that spike too;
- percentile: T = the given percentile of |x|, read off the histogram with values
  spread evenly inside each bin.

With a threshold the range is the observed one clipped to it:
``min = max(-T, observed min)``, ``max = min(T, observed max)``, so a ReLU output
keeps min = 0. The range does not always contain 0; the quantizer widens it.
A tensor with no finite value gets the range [0, 0] and a warning.
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


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range of one activation tensor (float values)."""

    name: str
    min: float  # observed/selected lower bound (<= 0 <= max is NOT guaranteed; the quantizer widens to include 0)
    max: float
    # entropy/percentile select a symmetric threshold T on |x|:
    # then min = max(-T, observed_min), max = min(T, observed_max)
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
