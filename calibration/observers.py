"""Streaming statistics of one activation tensor: running min/max, a histogram of |x|
and one of the negative values' |x| (the positive side is the difference), so that a
range can be chosen per side for asymmetric quantization.

Memory is O(num_bins) per tensor whatever the number of samples: each batch is
folded into the statistics and dropped.

The histograms have ``num_bins`` equal bins over ``[0, hist_max]``, where ``hist_max``
is the largest finite |x| seen so far, so it always has full resolution over the
observed range. When a batch goes beyond it, the counts are re-binned into the
wider range, never restarted: the cumulative count is taken as linear inside each
old bin (values spread evenly within a bin) and read off at the new edges. The
total is kept exactly, and mass moves by less than one new bin width. The range
only grows when a batch sets a new maximum (about ln(batches) times for i.i.d.
data), so the smearing stays small. Two statistics of the same tensor merge the
same way (``merge``), e.g. when calibration is split over processes.

Non-finite values are kept out: NaN, +-inf and sentinels with |x| >= ``SENTINEL``
(``finfo(float32).min`` attention masks, -3.4e38, which an exporter writes where
the model means -inf) would otherwise stretch the range until every real value
falls in bin 0. They are counted in ``nonfinite`` and excluded from min, max and
the histogram. A tensor that carries them is usually a mask that must stay in
float; ``nonfinite`` lets the quantizer tell.

Binning computes ``k = ceil(|x| * num_bins / hist_max)`` in the tensor's own dtype,
in cache-sized chunks, gives k the sign of x and counts with one ``np.bincount``
for both sides: k = 0 is then exactly the zeros (counted for free; values too small
to tell from 0 at this scale count as zeros), |k| >= 1 is bin |k|-1, taken as the
interval ((|k|-1) w, |k| w]. This is about two and a half times faster than ``np.histogram``
of |x| alone. In float32 a value within
rounding of a bin edge may land in the neighbouring bin.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

# |x| from here up is a sentinel, not an activation (float16 tensors: half their max).
SENTINEL = 1e30
# Elements binned per step: the temporaries of one step stay in cache.
CHUNK = 1 << 16


@dataclass(eq=False)
class TensorStats:
    """Running statistics of one tensor. ``count`` finite values went into ``min``,
    ``max`` and ``hist`` (of |x|), ``zeros`` of them 0 (they are in ``hist[0]`` too);
    ``neg`` is the part of ``hist`` from negative values, on the same edges;
    ``nonfinite`` values (NaN, +-inf, |x| >= SENTINEL) were counted and left out."""

    name: str
    num_bins: int = 2048
    count: int = 0
    nonfinite: int = 0
    zeros: int = 0
    min: float = math.inf
    max: float = -math.inf
    hist_max: float = 0.0  # upper edge of the histogram of |x|
    hist: np.ndarray = field(default=None, repr=False)  # float64 counts (fractional after re-binning)
    neg: np.ndarray = field(default=None, repr=False)  # the negative values' share of hist

    def __post_init__(self):
        for attr in ("hist", "neg"):
            if getattr(self, attr) is None:
                setattr(self, attr, np.zeros(self.num_bins, np.float64))
            if getattr(self, attr).shape != (self.num_bins,):
                raise ValueError(f"{self.name}: {attr} has shape {getattr(self, attr).shape}, "
                                 f"expected ({self.num_bins},)")

    @property
    def pos(self) -> np.ndarray:
        """Histogram of the non-negative values (the zeros in bin 0)."""
        return np.maximum(self.hist - self.neg, 0.0)  # re-binning rounds each a little differently

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.hist_max, self.num_bins + 1)

    @property
    def amax(self) -> float:
        """Largest finite |x| seen (0 if none)."""
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch of values into the statistics."""
        x = np.asarray(x)
        limit = _sentinel(x.dtype)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)  # float16: one copy, then the fast path
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())  # NaN propagates through min/max
        if not (-limit < lo and hi < limit):
            x = self._drop_nonfinite(x, limit)
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        amax = max(-lo, hi, 0.0)
        if amax > self.hist_max:
            self.hist = rebin(self.hist, self.hist_max, amax)
            self.neg = rebin(self.neg, self.hist_max, amax)
            self.hist_max = amax
        self.zeros += self._add(x)
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of both batches together (a new object; neither input changes)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"{self.name}: cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        top = max(self.hist_max, other.hist_max)
        hist = rebin(self.hist, self.hist_max, top) + rebin(other.hist, other.hist_max, top)
        neg = rebin(self.neg, self.hist_max, top) + rebin(other.neg, other.hist_max, top)
        return TensorStats(self.name, self.num_bins, self.count + other.count, self.nonfinite + other.nonfinite,
                           self.zeros + other.zeros, min(self.min, other.min), max(self.max, other.max), top,
                           hist, neg)

    def _drop_nonfinite(self, x: np.ndarray, limit: float) -> np.ndarray:
        keep = np.isfinite(x)
        keep &= np.abs(x) < limit
        kept = x[keep]
        self.nonfinite += x.size - kept.size
        return kept

    def _add(self, x: np.ndarray) -> int:
        """Bin |x| into ``hist`` (and ``neg``); return how many values are 0."""
        if self.hist_max == 0.0:  # every value so far is 0
            self.hist[0] += x.size
            return x.size
        n = self.num_bins
        if n / self.hist_max > float(np.finfo(x.dtype).max):  # tiny values: scale in float64
            x = x.astype(np.float64)
        scale = x.dtype.type(n / self.hist_max)
        counts = np.zeros(2 * n + 3, np.int64)
        size = min(x.size, CHUNK)
        buf, idx, sign = np.empty(size, x.dtype), np.empty(size, np.int32), np.empty(size, f"u{x.itemsize}")
        bits, sign_bit = buf.view(sign.dtype), sign.dtype.type(1 << (8 * x.itemsize - 1))
        for start in range(0, x.size, CHUNK):
            part, m = x[start : start + CHUNK], min(CHUNK, x.size - start)
            k, ik, sk = buf[:m], idx[:m], sign[:m]
            np.abs(part, out=k)
            k *= scale
            np.ceil(k, out=k)
            np.bitwise_and(part.view(sk.dtype), sign_bit, out=sk)  # -k for a negative value: copysign,
            np.bitwise_or(bits[:m], sk, out=bits[:m])  # on the bits (np.copysign is four times slower)
            np.add(k, n + 1, out=ik, casting="unsafe")
            counts += np.bincount(ik, minlength=2 * n + 3)
        # Index n+1+k holds the values with ceil(|x| / w) = k, n+1-k the negative ones:
        # k = 0 the zeros (and values too small to tell from 0 at this scale), k >= 1
        # bin k-1, taken as the interval ((k-1) w, k w]. k = n+1 is |x| = hist_max
        # scaled a rounding above n.
        zeros = int(counts[n + 1])
        pos, neg = counts[n + 2 :], counts[n::-1]
        pos[n - 1] += pos[n]
        neg[n - 1] += neg[n]
        self.neg += neg[:n]
        self.hist += pos[:n] + neg[:n]
        self.hist[0] += zeros
        return zeros


def rebin(hist: np.ndarray, old_max: float, new_max: float) -> np.ndarray:
    """Counts of ``hist`` (equal bins over [0, old_max]) re-spread over equal bins on
    [0, new_max], new_max >= old_max, assuming values are uniform inside each old bin."""
    if new_max == old_max:
        return hist.copy()
    if new_max < old_max:
        raise ValueError(f"cannot shrink a histogram from {old_max} to {new_max}")
    out = np.zeros_like(hist, dtype=np.float64)
    if old_max == 0.0:  # all mass is at exactly 0
        out[0] = hist.sum()
        return out
    n = len(hist)
    cum = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    new_cum = np.interp(np.linspace(0.0, new_max, n + 1), np.linspace(0.0, old_max, n + 1), cum)
    np.maximum.accumulate(new_cum, out=new_cum)  # interp rounding must not make a count negative
    return np.diff(new_cum)


def _sentinel(dtype: np.dtype) -> float:
    return min(SENTINEL, float(np.finfo(dtype).max) / 2) if np.issubdtype(dtype, np.floating) else SENTINEL
