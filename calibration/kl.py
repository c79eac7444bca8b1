"""The TensorRT entropy threshold: the clipping point on |x| that loses least information.

Given counts c[0..n) of |x| on equal bins, every candidate i = q..n (q = 128
levels for int8) is scored:

- reference P: c[0..i) with the outliers O(i) = sum c[i..n) folded into bin i-1;
- candidate Q: c[0..i) quantized to q levels, bin j going to level floor(j*q/i),
  each level's mass M_g spread evenly over its Z_g non-zero bins (zero bins stay
  zero: values that never occur are not invented);
- score KL(P/|P| || Q/|Q|); the smallest wins (ties within float noise go to the
  smaller threshold, i.e. finer resolution) and the threshold is edges[i].

Written per candidate that is O(n) work for n candidates. It is O(q) here: with
prefix sums S (of c), N (of c > 0) and L (of c log c), level g of candidate i
covers bins [ceil(g*i/q), ceil((g+1)*i/q)), so M_g and Z_g are differences of S
and N, and with T = |P| (all counts) and C = |Q| = S[i]:

    KL = (sum_j P_j log P_j - sum_j P_j log Q_j) / T - log T + log C
    sum_j P_j log P_j = L[i] - c[i-1] log c[i-1] + (c[i-1] + O) log(c[i-1] + O)
    sum_j P_j log Q_j = sum_g M_g log(M_g / Z_g) + O log(M_{q-1} / Z_{q-1})

(bin i-1 is always in the last level). A candidate is out (KL = inf) when Q is
empty (C = 0), when outliers land in an empty bin i-1 (P > 0 where Q = 0), and
when they land in a bin i-1 with nothing below it: P and Q are then the same
single spike and score 0 although clipping moved most of the data (values in
[0.9, 1] would be clipped at 0.9). The candidate i = n has no outliers and is
always in, so the search always has an answer.
All candidates are scored at once from an (n - q + 1) x (q + 1) array of level
edges, in blocks of rows that stay in cache (about 2 ms for 2048 bins).
"""

from __future__ import annotations

import functools

import numpy as np

# Scores this close to the minimum are equal up to float noise.
TIE = 1e-12
# Candidates scored per block: a block's (ROWS, q + 1) temporaries fit in cache.
ROWS = 256


def kl_threshold(counts: np.ndarray, edges: np.ndarray, num_quant_bins: int = 128) -> float:
    """Threshold on |x| (an entry of ``edges``) minimizing KL(P || Q), see the module doc.

    A histogram with fewer than ``num_quant_bins`` bins or no counts keeps its whole
    range (``edges[-1]``).
    """
    c = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    n, q = len(c), int(num_quant_bins)
    if edges.shape != (n + 1,):
        raise ValueError(f"{n} bins need {n + 1} edges, got {edges.shape}")
    if q < 1:
        raise ValueError(f"num_quant_bins must be positive, got {q}")
    if not np.all(np.isfinite(c) & (c >= 0)):
        raise ValueError("histogram counts must be finite and not negative")
    total = c.sum()
    if n < q or total <= 0:
        return float(edges[-1])
    kl = kl_divergences(c, q)
    best = int(np.flatnonzero(kl <= kl.min() + TIE)[0])
    return float(edges[q + best])


def kl_divergences(c: np.ndarray, q: int) -> np.ndarray:
    """KL(P || Q) for every candidate i = q..len(c) (inf where undefined)."""
    cand, bounds = _levels(len(c), q)
    s = np.concatenate([[0.0], np.cumsum(c)])
    total = s[-1]
    suffix = np.concatenate([np.cumsum(c[::-1])[::-1], [0.0]])  # exact 0 past the end: no phantom outliers
    nz = np.concatenate([[0.0], np.cumsum(c > 0)])
    clogc = np.concatenate([[0.0], np.cumsum(_xlogx(c))])
    plogq = np.empty(len(cand))
    for rows in range(0, len(cand), ROWS):  # blocks of candidates that stay in cache
        plogq[rows : rows + ROWS] = _level_terms(s, nz, bounds[rows : rows + ROWS])
    q_last = _last_level(c, *_last_bins(len(c), q))
    inside, outliers, end = s[cand], suffix[cand], c[cand - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = clogc[cand] - _xlogx(end) + _xlogx(end + outliers)
        plogq += np.where(outliers > 0, outliers * np.log(q_last), 0.0)
        kl = (plogp - plogq) / total - np.log(total) + np.log(inside)
    undefined = (inside <= 0) | ((outliers > 0) & ((end <= 0) | (s[cand - 1] <= 0)))
    return np.where(undefined, np.inf, np.maximum(kl, 0.0))


def _level_terms(s: np.ndarray, nz: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per candidate row: sum_g M_g log(M_g / Z_g)."""
    at = s[bounds]
    mass = at[:, 1:] - at[:, :-1]  # M_g
    np.take(nz, bounds, out=at)
    ratio = at[:, 1:] - at[:, :-1]  # Z_g
    np.maximum(ratio, 1.0, out=ratio)  # Z_g = 0 only where M_g = 0
    np.divide(mass, ratio, out=ratio)
    ratio += mass <= 0  # empty level: log(1) = 0, not 0 * log(0)
    np.log(ratio, out=ratio)
    ratio *= mass
    return ratio.sum(axis=1)


def _last_level(c: np.ndarray, idx: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """M/Z of each candidate's last level, summed bin by bin: it multiplies the outlier
    count, so the rounding of a prefix-sum difference (large when the level's mass is
    tiny next to the counts before it, as with re-binned fractional counts) would show."""
    vals = np.where(inside, c[idx], 0.0)
    return vals.sum(axis=1) / np.maximum((vals > 0).sum(axis=1), 1)


@functools.lru_cache(maxsize=4)
def _levels(n: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates i = q..n and, per candidate, the q + 1 bin edges of its levels:
    ceil(g * i / q), g = 0..q. The same for every tensor: cached, read-only."""
    cand = np.arange(q, n + 1)
    bounds = -(-np.outer(cand, np.arange(q + 1)) // q)
    cand.flags.writeable = bounds.flags.writeable = False
    return cand, bounds


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x), 0.0)


@functools.lru_cache(maxsize=4)
def _last_bins(n: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, the bins of its last level (padded; ``inside`` marks the real ones)."""
    cand, bounds = _levels(n, q)
    start = bounds[:, -2]
    idx = start[:, None] + np.arange(int((cand - start).max()))
    inside = idx < cand[:, None]
    idx = np.minimum(idx, n - 1)
    idx.flags.writeable = inside.flags.writeable = False
    return idx, inside
