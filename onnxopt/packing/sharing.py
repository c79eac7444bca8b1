"""Magnitude pruning and k-means weight sharing (Deep Compression, Han et al. 2016, sections 2-3), pure numpy.

Pruning keeps the largest-magnitude weights of a tensor. ``prune(w, s)`` prunes exactly
``n = floor(s * w.size + 0.5)`` weights (``s * size`` rounded half up), or every exact zero
if there are more of them: a zero costs nothing to prune and reconstructs exactly. Among
equal magnitudes the lower flat (C-order) index is pruned first.

Weight sharing replaces each kept weight by the nearest of at most ``2**bits`` float32
centroids: 1-D k-means (Lloyd) from a linear start, centroids evenly spaced from the smallest
to the largest value (the paper's choice: it keeps the rare large weights). In one dimension
every cluster is an interval of the sorted values, so the values are sorted once and one
Lloyd step is, per centroid, a binary search for the midpoint to its neighbour plus a mean
from prefix sums: O(k log n), not O(n k).
A value on a midpoint goes to the lower centroid. The loop stops when no boundary moves
(an exact fixed point) or after ``iters`` steps. An empty cluster keeps its centroid during
the iterations (it stays between its neighbours, so the order holds) and is dropped at the
end; dropping it moves no value. Centroids are rounded to float32 (still strictly
increasing: each mean lies within its cluster, clusters are disjoint intervals) and
every value labelled with its nearest float32 centroid (the codebook really stored), ties
to the lower one. A row with at most ``k`` distinct values gets exactly those values as
its centroids: sharing is then lossless. Values are taken as float32 and -0.0 as +0.0.

``share(w, bits, axis=..., mask=...)`` clusters per tensor (``axis=None``) or per slice along
``axis`` (one codebook per output channel when channels differ in scale). No code is
reserved for zero: ``Shared.mask`` carries the pruned positions, which the sparse stage
(``packing.sparse``) stores as gaps, so the index alphabet stays ``2**bits`` (uint8 at
8 bits, as the ONNX Gather form needs) and the only zero symbol is the sparse stage's filler.
``reconstruct`` gives float32 weights: a kept weight is exactly its centroid, a pruned one
exactly +0.0. A codebook row with fewer than ``2**bits`` centroids is padded by repeating
its last centroid (0.0 for a row with no kept weight); indices never point into the padding.

Cost: a sort, a float64 prefix sum and a labelling pass, plus O(k log n) per Lloyd step.
Labels come from a lookup table over value bins: a value whose bin holds no midpoint takes
the bin's label, only the rest are binary-searched (exact, ~10x faster than searching all).
Lloyd creeps in 1-D: 256 centroids on 25 M Gaussian values need ~35 000 steps (~0.1 ms each)
to stop, the error falling from 0.0120 (30 steps) to 0.0107 (1000) to 0.0065; 4-6 bits, or
per-channel rows of a few thousand values, stop within a few hundred steps.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import InternalError, UnsupportedModelError, UserError

logger = logging.getLogger(__name__)

MAX_BITS = 16
DEFAULT_ITERS = 1000  # see the module docstring: enough for most tensors, not all
_LUT_BINS = 1 << 16  # bins of the label lookup table; any size is exact, this one is fast
_LUT_MIN_SIZE = 1 << 14  # below this a plain binary search per value is quicker
_FEW_ROWS = 8  # up to this many rows, one np.searchsorted per row beats the batched search


Rounder = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (step, first, last) -> levels


class Init(enum.Enum):
    LINEAR = "linear"  # evenly spaced between min and max (the paper's choice)
    DENSITY = "density"  # evenly spaced quantiles of the values


@dataclass(frozen=True)
class Shared:
    """Weights as centroid indices: ``codebook`` is (2**bits,) or (channels, 2**bits) float32,
    ``indices`` (uint8 up to 8 bits, else uint16; 0 where pruned) and ``mask`` (True = kept)
    have the weights' shape, C-contiguous."""

    codebook: np.ndarray
    indices: np.ndarray
    mask: np.ndarray
    axis: int | None
    bits: int


def prune(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask (True = kept) pruning the ``sparsity`` fraction of smallest |w|; see the module docstring."""
    if not 0.0 <= sparsity <= 1.0:
        raise UserError(f"sparsity must be between 0 and 1, got {sparsity}")
    w = np.asarray(weights)
    _check_finite(w)
    mag = np.abs(w).ravel()
    count = max(math.floor(sparsity * mag.size + 0.5), int(np.count_nonzero(mag == 0)))
    keep = np.ones(mag.size, dtype=bool)
    if count:
        threshold = np.partition(mag, count - 1)[count - 1]
        below = mag < threshold
        keep[below] = False
        keep[np.flatnonzero(mag == threshold)[: count - int(np.count_nonzero(below))]] = False
    return keep.reshape(w.shape)


def kmeans_1d(
    values: np.ndarray, k: int, *, init: Init = Init.LINEAR, iters: int = DEFAULT_ITERS
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct float32 centroids, at most k; labels of ``values``' shape, uint8 if k <= 256 else uint16)."""
    if not 1 <= k <= 1 << MAX_BITS:
        raise UserError(f"k must be between 1 and {1 << MAX_BITS}, got {k}")
    _check_iters(iters)
    v = _as_float32(values)
    _check_finite(v)
    codebook, labels, sizes = _kmeans_rows(v.reshape(1, -1), None, k, init, iters)
    return codebook[0, : sizes[0]], labels.reshape(v.shape)


def share(
    weights: np.ndarray, bits: int, *, axis: int | None = None, mask: np.ndarray | None = None,
    init: Init = Init.LINEAR, iters: int = DEFAULT_ITERS,
) -> Shared:
    """k-means sharing of the kept weights (``mask``, default all) to 2**bits centroids per tensor or per ``axis``."""
    if not 1 <= bits <= MAX_BITS:
        raise UserError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    _check_iters(iters)
    w = _as_float32(weights)
    keep = np.ones(w.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != w.shape:
        raise InternalError(f"mask shape {keep.shape} differs from weights shape {w.shape}")
    if axis is not None:
        axis = _normalize_axis(axis, w.ndim)
    _check_finite(w if mask is None else w[keep])
    codebook, labels, _ = _kmeans_rows(
        _to_rows(w, axis), None if mask is None else _to_rows(keep, axis), 1 << bits, init, iters
    )
    indices = _from_rows(labels, w.shape, axis)
    return Shared(codebook[0] if axis is None else codebook, indices, keep, axis, bits)


def zero_grid(
    weights: np.ndarray, bits: int, *, axis: int | None = None, mask: np.ndarray | None = None,
    rounder: Rounder | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept weights on a uniform grid through zero, per tensor or per slice along ``axis``.

    A row's step is ``(hi - lo) / max(2**bits - 2, 1)`` over its kept values, so the levels
    ``round(v / step)`` from ``round(lo / step)`` to ``round(hi / step)`` are at most ``2**bits``
    and zero is one of them (a row of one value ``c`` takes step ``|c|``, or 1 for zeros:
    exact). Returns (codebook: each row's used levels ``float32(step * level)`` ascending, the
    rows one after another; centroids per row; row-local indices, uint8 up to 8 bits else
    uint16, 0 where pruned).

    ``rounder(step, first, last)``, given each weight's step and its grid's first and last
    level (arrays of the weights' shape), chooses the levels instead of ``round(v / step)``
    (``packing.feedback``); levels past the grid's ends are clipped to them.
    """
    if not 1 <= bits <= MAX_BITS:
        raise UserError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    w = _as_float32(weights)
    keep = np.ones(w.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if axis is not None:
        axis = _normalize_axis(axis, w.ndim)
    _check_finite(w[keep])
    rows, kept = _to_rows(w, axis).astype(np.float64), _to_rows(keep, axis)
    lo = np.min(rows, axis=1, where=kept, initial=np.inf)
    hi = np.max(rows, axis=1, where=kept, initial=-np.inf)
    lo, hi = np.where(kept.any(axis=1), lo, 0.0), np.where(kept.any(axis=1), hi, 0.0)
    span = hi - lo
    step = np.where(span > 0, span / max((1 << bits) - 2, 1), np.where(hi != 0, np.abs(hi), 1.0))
    first = np.rint(lo / step).astype(np.int64)
    if rounder is None:
        level = np.rint(rows / step[:, None]).astype(np.int64)
    else:
        def full(a: np.ndarray) -> np.ndarray:
            return _from_rows(np.broadcast_to(a[:, None], rows.shape), w.shape, axis)

        last = np.rint(hi / step).astype(np.int64)
        level = np.clip(_to_rows(np.asarray(rounder(full(step), full(first), full(last)), np.int64), axis),
                        first[:, None], last[:, None])
    local = np.where(kept, level - first[:, None], 0)
    width = 1 << bits
    used = np.zeros((len(rows), width), dtype=bool)
    r_idx = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)
    used[r_idx[kept], local[kept]] = True
    used[~kept.any(axis=1), 0] = True  # a row with nothing kept keeps one level, 0.0 (as ``share`` pads)
    rank = np.cumsum(used, axis=1) - 1
    sizes = np.count_nonzero(used, axis=1).astype(np.int64)
    r, j = np.nonzero(used)
    codebook = (step[r] * (first[r] + j)).astype(np.float32)
    labels = np.where(kept, np.take_along_axis(rank, local, axis=1), 0)
    indices = _from_rows(labels.astype(np.uint8 if bits <= 8 else np.uint16), w.shape, axis)
    return codebook, sizes, indices


def reconstruct(shared: Shared) -> np.ndarray:
    """float32 weights: each kept weight is its centroid, bit for bit; each pruned one is +0.0."""
    _check_shared(shared)
    cb, idx, axis, width = shared.codebook, shared.indices, shared.axis, 1 << shared.bits
    if axis is None:
        out = cb[idx]
    else:
        flat = _to_rows(idx, axis).astype(np.intp) + (np.arange(len(cb), dtype=np.intp) * width)[:, None]
        out = _from_rows(cb.ravel()[flat], idx.shape, axis)
    return np.where(shared.mask, out, np.float32(0.0))


def relative_error(weights: np.ndarray, shared: Shared) -> float:
    """||reconstruct(shared) - weights|| / ||weights|| (L2; 0 for an all-zero tensor reconstructed exactly)."""
    w = np.asarray(weights, dtype=np.float64)
    err = float(np.linalg.norm((reconstruct(shared) - w).ravel()))
    norm = float(np.linalg.norm(w.ravel()))
    return err / norm if norm else (0.0 if err == 0 else math.inf)


def _check_shared(s: Shared) -> None:
    """Shared as a decoder may have rebuilt it: every array must fit the others before we index with it."""
    cb, idx, axis, width = s.codebook, s.indices, s.axis, 1 << s.bits
    rows = 1 if axis is None else (idx.shape[axis] if 0 <= axis < idx.ndim else -1)
    if cb.dtype != np.float32 or cb.shape != ((width,) if axis is None else (rows, width)):
        raise UnsupportedModelError(f"codebook {cb.shape} ({cb.dtype}) does not fit {s.bits} bits, axis {axis}")
    if idx.dtype.kind not in "ui" or s.mask.dtype != bool or s.mask.shape != idx.shape:
        raise UnsupportedModelError(f"indices {idx.shape} ({idx.dtype}) and mask {s.mask.shape} disagree")
    if idx.size and not 0 <= int(idx.min()) <= int(idx.max()) < width:
        raise UnsupportedModelError(f"centroid index outside a codebook of {width}")


def _as_float32(a: np.ndarray) -> np.ndarray:
    return np.add(np.asarray(a), np.float32(0.0), dtype=np.float32)  # also turns -0.0 into +0.0


def _check_finite(a: np.ndarray) -> None:
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise UnsupportedModelError("weights contain NaN or infinity")


def _check_iters(iters: int) -> None:
    if iters < 0:
        raise UserError(f"k-means iterations must be at least 0, got {iters}")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise UserError(f"axis {axis} out of range for a tensor of rank {ndim}")
    return axis % ndim


def _to_rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return a.reshape(1, -1)
    moved = np.moveaxis(a, axis, 0)
    return moved.reshape(len(moved), math.prod(moved.shape[1:]))


def _from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), 0, axis))


def _kmeans_rows(
    rows: np.ndarray, keep: np.ndarray | None, k: int, init: Init, iters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of each row's kept values -> (codebook (R, k) padded, labels (R, L), centroids per row)."""
    x, starts = _sorted_rows(rows, keep)
    centroids = np.zeros((len(rows), k), dtype=np.float32)
    valid = np.zeros((len(rows), k), dtype=bool)
    exact = _few_distinct(x, starts, k)
    _fill_exact(x, starts, exact, centroids, valid)
    lloyd = np.flatnonzero(~exact)
    if lloyd.size:
        c, counts = _lloyd(x, starts[lloyd], starts[lloyd + 1], k, init, iters)
        centroids[lloyd] = c
        valid[lloyd] = counts > 0
    codebook, sizes = _pack_codebooks(centroids, valid)
    labels = np.zeros(rows.shape, dtype=np.uint8 if k <= 256 else np.uint16)
    for r in np.flatnonzero(sizes > 1):  # pruned values may be anything (NaN too): only kept ones are labelled
        if keep is None:
            labels[r] = _nearest(rows[r], codebook[r, : sizes[r]])
        else:
            labels[r, keep[r]] = _nearest(rows[r, keep[r]], codebook[r, : sizes[r]])
    return codebook, labels, sizes


def _sorted_rows(rows: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's kept values sorted, concatenated, and the row boundaries (R + 1,) into them."""
    n_rows, length = rows.shape
    if keep is None:
        return np.sort(rows, axis=1).ravel(), np.arange(n_rows + 1, dtype=np.int64) * length
    if n_rows == 1:  # sort only the kept values: a tenth of the work at sparsity 0.9
        x = np.sort(rows[keep])
        return x, np.array([0, len(x)], dtype=np.int64)
    ordered = np.where(keep, rows, np.float32(np.inf))  # kept values are finite, so pruned ones sort last
    ordered.sort(axis=1)
    counts = np.count_nonzero(keep, axis=1)
    starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return ordered[np.arange(length) < counts[:, None]], starts


def _few_distinct(x: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """Which sorted rows hold at most k distinct values."""
    n = np.diff(starts)
    few = n <= k
    big = np.flatnonzero(~few)
    if big.size:  # k + 1 evenly spaced samples that differ prove a row holds more than k values, in one gather
        s = x[starts[big, None] + np.arange(k + 1) * (n[big, None] - 1) // k]
        for r in big[np.count_nonzero(s[:, 1:] != s[:, :-1], axis=1) < k]:  # many repeats: count them all
            row = x[starts[r] : starts[r + 1]]
            few[r] = np.count_nonzero(row[1:] != row[:-1]) < k
    return few


def _fill_exact(x: np.ndarray, starts: np.ndarray, exact: np.ndarray, centroids: np.ndarray, valid: np.ndarray) -> None:
    """Rows with at most k distinct values: those values are the centroids (lossless)."""
    rows = np.flatnonzero(exact & (starts[1:] > starts[:-1]))
    if not rows.size:
        return
    n = np.diff(starts)[rows]
    bounds = np.concatenate(([0], np.cumsum(n)))
    seg = x[np.repeat(starts[rows] - bounds[:-1], n) + np.arange(bounds[-1])]
    first = np.ones(len(seg), dtype=bool)
    np.not_equal(seg[1:], seg[:-1], out=first[1:])
    first[bounds[:-1]] = True
    first = np.flatnonzero(first)
    row = np.searchsorted(bounds, first, side="right") - 1
    slot = np.arange(len(first)) - np.searchsorted(first, bounds[:-1])[row]
    centroids[rows[row], slot] = seg[first]
    valid[rows[row], slot] = True


def _lloyd(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int, init: Init, iters: int) -> tuple[np.ndarray, ...]:
    """Lloyd's k-means on the sorted rows x[lo[r]:hi[r]] -> (float64 centroids (R, k), cluster sizes (R, k))."""
    prefix = np.empty(len(x) + 1)
    prefix[0] = 0.0
    prefix[1:] = x
    np.cumsum(prefix[1:], out=prefix[1:])
    t = np.linspace(0.0, 1.0, k)
    if init is Init.LINEAR:
        first, last = x[lo].astype(np.float64)[:, None], x[hi - 1].astype(np.float64)[:, None]
        c = first + (last - first) * t
    else:
        c = x[lo[:, None] + np.rint(t * (hi - lo - 1)[:, None]).astype(np.int64)].astype(np.float64)
    edges = np.full((len(lo), k + 1), -1, dtype=np.int64)
    active = np.arange(len(lo))
    for step in range(iters + 1):  # assign, then update while anything moved: the sizes returned fit c
        mids = (c[active, :-1] + c[active, 1:]) / 2
        inner = _segment_search(x, lo[active], hi[active], mids)
        e = np.concatenate((lo[active, None], inner, hi[active, None]), axis=1)
        moved = (e != edges[active]).any(axis=1)
        edges[active] = e
        active, e = active[moved], e[moved]
        if not active.size or step == iters:
            break
        size = np.diff(e, axis=1)
        mean = np.diff(prefix[e], axis=1) / np.maximum(size, 1)
        # rounding must not push a mean outside its cluster, or the centroid order could break
        mean = np.clip(mean, x[np.minimum(e[:, :-1], len(x) - 1)], x[np.maximum(e[:, 1:] - 1, 0)])
        c[active] = np.where(size > 0, mean, c[active])
    return c, np.diff(edges, axis=1)


def _segment_search(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """For each query q[r, j], the first index in [lo[r], hi[r]) of the sorted x[lo[r]:hi[r]] with x > q (else hi)."""
    q = _floor_float32(q)  # float32 queries: comparing float32 x with float64 would convert all of x
    if len(q) <= _FEW_ROWS:  # one numpy call per row beats the batched search's per-step overhead
        return np.stack([a + np.searchsorted(x[a:b], row, side="right") for a, b, row in zip(lo, hi, q)])
    lo = np.broadcast_to(lo[:, None], q.shape).copy()
    hi = np.broadcast_to(hi[:, None], q.shape).copy()
    last = len(x) - 1
    for _ in range(int(np.max(hi - lo, initial=0)).bit_length()):
        mid = (lo + hi) >> 1
        active = lo < hi
        right = active & (x[np.minimum(mid, last)] <= q)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


def _floor_float32(a: np.ndarray) -> np.ndarray:
    """The largest float32 <= a: for a float32 v, v <= a exactly when v <= _floor_float32(a)."""
    f = a.astype(np.float32)
    over = f > a
    f[over] = np.nextafter(f[over], np.float32(-np.inf))
    return f


def _pack_codebooks(c: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's valid centroids to the front (order kept) and pad with the last one."""
    n_rows, width = c.shape
    sizes = np.count_nonzero(valid, axis=1)
    packed = np.zeros_like(c)
    r, j = np.nonzero(valid)
    packed[r, (np.cumsum(valid, axis=1) - 1)[r, j]] = c[r, j]
    # each mean lies in its cluster's [min, max] and clusters are disjoint, so rounding to float32
    # (monotone) cannot make two centroids of one row equal or swap them
    if np.any((np.diff(packed, axis=1) <= 0) & (np.arange(width - 1) < sizes[:, None] - 1)):
        raise InternalError("k-means centroids are not strictly increasing")
    cols = np.minimum(np.arange(width), np.maximum(sizes - 1, 0)[:, None])
    return np.take_along_axis(packed, cols, axis=1), sizes


def _nearest(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted distinct float32 centroids c for each float32 value, ties to the lower."""
    mids = _floor_float32((c[:-1].astype(np.float64) + c[1:]) / 2)  # exact for float32 within 2**29 of each other
    if v.size < _LUT_MIN_SIZE:
        return np.searchsorted(mids, v, side="left")
    lo = np.float32(v.min())
    scale = np.float32(_LUT_BINS / (float(v.max()) - float(lo)))
    if not np.isfinite(scale) or scale == 0:
        return np.searchsorted(mids, v, side="left")

    def bins(a: np.ndarray) -> np.ndarray:  # monotone in a, as each correctly rounded step is
        t = np.subtract(a, lo, dtype=np.float32)
        t *= scale
        return np.clip(t, 0, _LUT_BINS - 1, out=t).astype(np.int32)

    # every midpoint in a lower bin than v's is below v, one in a higher bin is above it:
    # the table counts the former, and only values in a bin holding a midpoint need a search
    mid_bins = bins(mids)
    table = np.searchsorted(mid_bins, np.arange(_LUT_BINS), side="left").astype(np.min_scalar_type(len(c)))
    holds_mid = np.zeros(_LUT_BINS, dtype=bool)
    holds_mid[mid_bins] = True
    vb = bins(v)
    labels = table[vb]
    fix = np.flatnonzero(holds_mid[vb])
    labels[fix] = np.searchsorted(mids, v[fix], side="left")
    return labels
