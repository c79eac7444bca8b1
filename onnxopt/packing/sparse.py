"""Relative-index sparse storage with filler entries (Deep Compression, Han et al. 2016, section 2).

The tensor is flattened in C order and stored as one sequence of entries, CSR-like with a
single row (row boundaries would only add fillers; the shape restores them). Each entry
has a position and a value symbol; positions are stored relatively, as

    gap = position - previous position - 1        (previous position of the first entry: -1)

the number of unstored (pruned) weights skipped, so a dense tensor is all gaps 0 and the
whole range 0 .. 2**bits - 1 of a ``bits``-wide index is used. The paper's figure 2 stores
the same thing as ``diff = gap + 1`` (1 .. 8 in 3 bits). When more than ``2**bits - 1``
weights are skipped, filler entries are stored every ``2**bits`` positions, each with the
largest gap ``2**bits - 1`` and the value zero, until the real entry is in reach:

    bits = 2, kept positions [0, 6, 7, 20] of 22:
    gaps      [0, 3, 1, 0, 3, 3, 3, 0]        stored positions 0, 4, 6, 7, 11, 15, 19, 20
    is_filler [F, T, F, F, T, T, T, F]

Weights after the last entry need nothing: the shape gives the length. A filler is never
last and always has the largest gap; ``from_relative`` rejects anything else.

In the value stream a filler is the symbol ``filler_id``, one past the real symbols
(``2**bits`` of the codebook for centroid indices, so the Huffman alphabet is the codebook
plus one): ``merge_fillers`` and ``split_fillers`` convert. ``to_streams`` and
``from_streams`` do the whole step, (indices, keep-mask) <-> (gap stream, value stream);
those two integer streams are what the Huffman coder codes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from onnxopt.errors import InternalError, UnsupportedModelError, UserError

logger = logging.getLogger(__name__)

MAX_INDEX_BITS = 16
_HIST_LIMIT = 1 << 16  # gaps below this are histogrammed once by value; larger ones are few and kept as a list


class RelativeIndex(NamedTuple):
    gaps: np.ndarray  # one per stored entry (fillers included), uint8 for bits <= 8 else uint16
    is_filler: np.ndarray  # bool, one per stored entry
    positions: np.ndarray  # int64 flat positions of the real entries (the mask's True), ascending


def to_relative(mask: np.ndarray, bits: int) -> RelativeIndex:
    """Gaps (with fillers) of the True positions of the flattened ``mask``, ``bits`` wide."""
    _check_bits(bits)
    positions = np.flatnonzero(np.asarray(mask, dtype=bool).ravel())
    skipped = np.diff(positions, prepend=-1) - 1
    fillers = skipped >> bits
    slots = np.arange(len(positions)) + np.cumsum(fillers)  # where each real entry lands among all entries
    total = len(positions) + int(fillers.sum())
    top = (1 << bits) - 1
    gaps = np.full(total, top, dtype=_gap_dtype(bits))
    gaps[slots] = skipped & top
    is_filler = np.ones(total, dtype=bool)
    is_filler[slots] = False
    return RelativeIndex(gaps, is_filler, positions)


def from_relative(
    gaps: np.ndarray, bits: int | None, total_length: int, is_filler: np.ndarray | None = None
) -> np.ndarray:
    """Flat positions (int64, ascending) of the stored entries, or of the real ones only if ``is_filler`` is given.

    ``bits`` (None: unchecked) bounds the gaps. Raises UnsupportedModelError on entries that
    do not fit ``total_length`` or on a filler that ``to_relative`` would not have written.
    """
    gaps = np.asarray(gaps)
    if gaps.ndim != 1 or (gaps.size and gaps.dtype.kind not in "ui") or total_length < 0:
        raise UnsupportedModelError(f"sparse index: expected a 1-D integer gap stream, got {gaps.dtype} {gaps.shape}")
    if gaps.size and int(gaps.min()) < 0:
        raise UnsupportedModelError("sparse index: negative gap")
    if bits is not None:
        if not 1 <= bits <= MAX_INDEX_BITS:
            raise UnsupportedModelError(f"sparse index: width of {bits} bits")
        if gaps.size and int(gaps.max()) >= 1 << bits:
            raise UnsupportedModelError(f"sparse index: gap {int(gaps.max())} does not fit {bits} bits")
    positions = np.cumsum(gaps, dtype=np.int64) + np.arange(1, len(gaps) + 1)
    positions -= 1
    if positions.size and positions[-1] >= total_length:
        raise UnsupportedModelError(f"sparse index: entries run to position {positions[-1]} of {total_length}")
    if is_filler is None:
        return positions
    is_filler = np.asarray(is_filler)
    if is_filler.dtype != bool or is_filler.shape != gaps.shape:
        raise UnsupportedModelError(f"sparse index: {len(gaps)} gaps but filler flags of shape {is_filler.shape}")
    if is_filler.size and is_filler[-1]:
        raise UnsupportedModelError("sparse index: the last entry is a filler")
    if bits is not None and np.any(gaps[is_filler] != (1 << bits) - 1):
        raise UnsupportedModelError("sparse index: a filler entry with less than the largest gap")
    return positions[~is_filler]


def merge_fillers(symbols: np.ndarray, is_filler: np.ndarray, filler_id: int) -> np.ndarray:
    """The stored value stream: ``symbols`` (all < filler_id) at the real entries, ``filler_id`` at the fillers."""
    symbols, is_filler = np.asarray(symbols).ravel(), np.asarray(is_filler, dtype=bool)
    if symbols.size != np.count_nonzero(~is_filler):
        raise InternalError(f"{symbols.size} symbols for {np.count_nonzero(~is_filler)} real entries")
    if symbols.size and not 0 <= int(symbols.min()) <= int(symbols.max()) < filler_id:
        raise InternalError(f"symbols must be in [0, {filler_id}) to leave the filler symbol {filler_id} free")
    stream = np.full(len(is_filler), filler_id, dtype=np.min_scalar_type(filler_id))
    stream[~is_filler] = symbols
    return stream


def split_fillers(stream: np.ndarray, filler_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``merge_fillers`` -> (symbols of the real entries, is_filler)."""
    stream = np.asarray(stream)
    if stream.ndim != 1 or (stream.size and stream.dtype.kind not in "ui"):
        raise UnsupportedModelError(f"sparse values: expected a 1-D integer stream, got {stream.dtype} {stream.shape}")
    if stream.size and not 0 <= int(stream.min()) <= int(stream.max()) <= filler_id:
        raise UnsupportedModelError(f"sparse values: symbol outside [0, {filler_id}]")
    is_filler = stream == filler_id
    return stream[~is_filler].astype(np.min_scalar_type(max(filler_id - 1, 0))), is_filler


def to_streams(indices: np.ndarray, mask: np.ndarray, bits: int, filler_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap stream, value stream) of the kept ``indices`` (True in ``mask``), fillers included."""
    if np.shape(indices) != np.shape(mask):
        raise InternalError(f"indices shape {np.shape(indices)} differs from mask shape {np.shape(mask)}")
    rel = to_relative(mask, bits)
    return rel.gaps, merge_fillers(np.asarray(indices).ravel()[rel.positions], rel.is_filler, filler_id)


def from_streams(
    gaps: np.ndarray, values: np.ndarray, bits: int, filler_id: int, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``to_streams`` -> (indices, mask) of ``shape``; indices are 0 where the mask is False.

    It allocates ``prod(shape)`` elements: the caller checks the shape is sane first.
    """
    total = math.prod(shape)
    if np.shape(gaps) != np.shape(values):
        raise UnsupportedModelError(f"sparse tensor: {np.size(gaps)} gaps but {np.size(values)} values")
    symbols, is_filler = split_fillers(values, filler_id)
    positions = from_relative(gaps, bits, total, is_filler)
    indices = np.zeros(total, dtype=symbols.dtype)
    indices[positions] = symbols
    mask = np.zeros(total, dtype=bool)
    mask[positions] = True
    return indices.reshape(shape), mask.reshape(shape)


def index_cost_bits(mask: np.ndarray, bits: int, value_bits: float) -> float:
    """Estimated bits of the entropy-coded gap stream plus ``value_bits`` per stored entry (fillers included)."""
    return _index_costs(_skipped(mask), [bits], value_bits)[0]


def best_index_bits(mask: np.ndarray, value_bits: float, candidates: Iterable[int] = range(1, 9)) -> int:
    """The index width in ``candidates`` with the lowest ``index_cost_bits`` (the narrowest on a tie)."""
    candidates = sorted(set(candidates))
    if not candidates:
        raise UserError("no candidate index width")
    costs = _index_costs(_skipped(mask), candidates, value_bits)
    return candidates[int(np.argmin(costs))]


def _index_costs(skipped: np.ndarray, candidates: list[int], value_bits: float) -> list[float]:
    """Entropy of each width's gap symbols (the Huffman coder gets within a bit per symbol of it) plus values."""
    small, big = skipped[skipped < _HIST_LIMIT], skipped[skipped >= _HIST_LIMIT]
    hist = np.bincount(small, minlength=_HIST_LIMIT)
    gap = np.arange(_HIST_LIMIT)
    costs = []
    for bits in candidates:
        _check_bits(bits)
        top = (1 << bits) - 1
        fillers = int(np.dot(gap >> bits, hist)) + int((big >> bits).sum())
        counts = np.bincount(gap & top, weights=hist, minlength=top + 1) + np.bincount(big & top, minlength=top + 1)
        counts[top] += fillers
        n = counts.sum()
        used = counts[counts > 0]
        costs.append(float(np.sum(used * np.log2(n / used))) + float(n) * value_bits)
    return costs


def _skipped(mask: np.ndarray) -> np.ndarray:
    return np.diff(np.flatnonzero(np.asarray(mask, dtype=bool).ravel()), prepend=-1) - 1


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_INDEX_BITS:
        raise UserError(f"index width must be between 1 and {MAX_INDEX_BITS} bits, got {bits}")


def _gap_dtype(bits: int) -> type[np.unsignedinteger]:
    return np.uint8 if bits <= 8 else np.uint16
