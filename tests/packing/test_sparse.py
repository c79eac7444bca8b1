"""Relative-index sparse storage: hand-checked gap/filler streams, round trips, corrupt input."""

import numpy as np
import pytest

from onnxopt.errors import InternalError, UnsupportedModelError, UserError
from onnxopt.packing.sparse import (
    best_index_bits,
    from_relative,
    from_streams,
    index_cost_bits,
    merge_fillers,
    split_fillers,
    to_relative,
    to_streams,
)


def mask_of(length, positions):
    m = np.zeros(length, dtype=bool)
    m[positions] = True
    return m


# length, kept positions, bits -> gaps, is_filler (1 = filler)
HAND_CASES = {
    "docstring example": (22, [0, 6, 7, 20], 2, [0, 3, 1, 0, 3, 3, 3, 0], [0, 1, 0, 0, 1, 1, 1, 0]),
    "bits=1": (7, [3, 5, 6], 1, [1, 1, 1, 0], [1, 0, 0, 0]),
    "all zeros": (9, [], 3, [], []),
    "dense": (5, [0, 1, 2, 3, 4], 1, [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]),
    "first and last kept": (10, [0, 9], 4, [0, 8], [0, 0]),
    "largest gap, no filler": (17, [15], 4, [15], [0]),
    "one past the largest gap": (17, [16], 4, [15, 0], [1, 0]),
    "two fillers": (40, [2, 35], 4, [2, 15, 15, 0], [0, 1, 1, 0]),
    "trailing zeros need nothing": (100, [1], 2, [1], [0]),
}


@pytest.mark.parametrize("case", HAND_CASES.values(), ids=HAND_CASES.keys())
def test_to_relative_hand_checked(case):
    length, positions, bits, gaps, fillers = case
    rel = to_relative(mask_of(length, positions), bits)
    assert rel.gaps.tolist() == gaps and rel.gaps.dtype == np.uint8
    assert rel.is_filler.tolist() == [bool(f) for f in fillers]
    assert rel.positions.tolist() == positions
    assert from_relative(rel.gaps, bits, length, rel.is_filler).tolist() == positions


def test_from_relative_without_flags_gives_every_stored_position():
    assert from_relative(np.array([0, 3, 1, 0, 3, 3, 3, 0]), 2, 22).tolist() == [0, 4, 6, 7, 11, 15, 19, 20]
    assert from_relative(np.array([], dtype=np.uint8), None, 0).tolist() == []


def test_huge_gap_needs_many_fillers():
    rel = to_relative(mask_of(100_000, [99_999]), 4)
    assert len(rel.gaps) == 99_999 // 16 + 1 and rel.is_filler.sum() == 6249
    assert rel.gaps[-1] == 99_999 % 16 and (rel.gaps[:-1] == 15).all()
    assert from_relative(rel.gaps, 4, 100_000, rel.is_filler).tolist() == [99_999]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_round_trip_random_masks(bits, sparsity):
    rng = np.random.default_rng(bits * 1000 + int(sparsity * 1000))
    mask = rng.random((37, 53)) >= sparsity
    indices = np.where(mask, rng.integers(0, 32, mask.shape), 0).astype(np.uint8)
    rel = to_relative(mask, bits)
    assert rel.gaps.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert int(rel.gaps.max(initial=0)) < 1 << bits
    np.testing.assert_array_equal(rel.positions, np.flatnonzero(mask))
    np.testing.assert_array_equal(from_relative(rel.gaps, bits, mask.size, rel.is_filler), rel.positions)
    gaps, values = to_streams(indices, mask, bits, 32)
    assert len(gaps) == len(values) and np.count_nonzero(values == 32) == rel.is_filler.sum()
    back_indices, back_mask = from_streams(gaps, values, bits, 32, mask.shape)
    np.testing.assert_array_equal(back_mask, mask)
    np.testing.assert_array_equal(back_indices, indices)
    assert back_indices.dtype == np.uint8


def test_to_streams_hand_checked():
    mask = mask_of(22, [0, 6, 7, 20])
    indices = np.where(mask, np.arange(22) % 4, 0)
    gaps, values = to_streams(indices, mask, 2, 4)
    assert gaps.tolist() == [0, 3, 1, 0, 3, 3, 3, 0]
    assert values.tolist() == [0, 4, 2, 3, 4, 4, 4, 0]


def test_merge_and_split_fillers_hand_checked():
    is_filler = np.array([False, True, False, True, False])
    stream = merge_fillers(np.array([5, 1, 7]), is_filler, 8)
    assert stream.tolist() == [5, 8, 1, 8, 7] and stream.dtype == np.uint8
    symbols, flags = split_fillers(stream, 8)
    assert symbols.tolist() == [5, 1, 7] and flags.tolist() == is_filler.tolist()
    wide = merge_fillers(np.array([255, 0, 3], dtype=np.uint8), is_filler, 256)
    assert wide.tolist() == [255, 256, 0, 256, 3] and wide.dtype == np.uint16
    symbols, _ = split_fillers(wide, 256)
    assert symbols.dtype == np.uint8 and symbols.tolist() == [255, 0, 3]
    assert merge_fillers(np.array([], dtype=np.uint8), np.array([], dtype=bool), 4).tolist() == []


def test_merge_fillers_rejects_inconsistent_symbols():
    with pytest.raises(InternalError):
        merge_fillers(np.array([1, 2]), np.array([False, True]), 4)
    with pytest.raises(InternalError):
        merge_fillers(np.array([4]), np.array([False]), 4)
    with pytest.raises(InternalError):
        to_streams(np.zeros(3), np.zeros(4, dtype=bool), 2, 4)
    with pytest.raises(UserError):
        to_relative(np.ones(3, dtype=bool), 0)


CORRUPT = {
    "gap too wide": (np.array([0, 4]), 2, 10, None),
    "runs past the end": (np.array([3, 3, 3]), 2, 11, None),
    "negative gap": (np.array([1, -1]), None, 10, None),
    "float gaps": (np.array([0.0, 1.0]), None, 10, None),
    "two-dimensional": (np.zeros((2, 2), dtype=np.uint8), None, 10, None),
    "width 0": (np.array([0]), 0, 10, None),
    "width 17": (np.array([0]), 17, 10, None),
    "negative length": (np.array([], dtype=np.uint8), None, -1, None),
    "last entry a filler": (np.array([0, 3]), 2, 10, np.array([False, True])),
    "filler with a short gap": (np.array([2, 0]), 2, 10, np.array([True, False])),
    "flags of another length": (np.array([0, 0]), 2, 10, np.array([False])),
    "flags not bool": (np.array([0, 0]), 2, 10, np.array([0, 0])),
}


@pytest.mark.parametrize("case", CORRUPT.values(), ids=CORRUPT.keys())
def test_from_relative_rejects_corrupt_input(case):
    gaps, bits, length, flags = case
    with pytest.raises(UnsupportedModelError):
        from_relative(gaps, bits, length, flags)


def test_from_streams_and_split_reject_corrupt_input():
    with pytest.raises(UnsupportedModelError):
        split_fillers(np.array([0, 5]), 4)  # a symbol past the filler
    with pytest.raises(UnsupportedModelError):
        split_fillers(np.array([[0]]), 4)
    with pytest.raises(UnsupportedModelError):
        from_streams(np.array([0, 0]), np.array([1]), 2, 4, (5,))  # streams of different lengths
    with pytest.raises(UnsupportedModelError):
        from_streams(np.array([0, 0]), np.array([1, 2]), 2, 4, (1,))  # more entries than the shape holds


def brute_force_cost(mask, bits, value_bits):
    gaps = to_relative(mask, bits).gaps
    counts = np.bincount(gaps).astype(np.float64)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.log2(len(gaps) / counts))) + len(gaps) * value_bits


def test_index_cost_hand_checked():
    mask = np.zeros(1000, dtype=bool)
    mask[9::10] = True  # 100 entries, every gap 9
    assert index_cost_bits(mask, 4, 5.0) == 500.0  # no filler, one gap symbol: 0 bits each
    assert index_cost_bits(mask, 3, 5.0) == 200 * 1.0 + 200 * 5.0  # a filler each; gaps 7 and 1 half and half
    assert best_index_bits(mask, 5.0) == 4
    assert best_index_bits(np.ones(50, dtype=bool), 5.0) == 1  # dense: every width costs the same
    assert index_cost_bits(np.zeros(10, dtype=bool), 3, 5.0) == 0.0


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.999])
def test_index_cost_matches_the_streams(sparsity):
    rng = np.random.default_rng(int(sparsity * 1000))
    mask = rng.random(300_000) >= sparsity
    mask[:150_000] = False  # a first gap of 150 000 or more: past the histogram, on the list of large gaps
    for bits in (1, 3, 6, 8):
        assert index_cost_bits(mask, bits, 3.5) == pytest.approx(brute_force_cost(mask, bits, 3.5), rel=1e-12)
    best = best_index_bits(mask, 3.5, range(1, 13))
    assert brute_force_cost(mask, best, 3.5) == min(brute_force_cost(mask, b, 3.5) for b in range(1, 13))
    with pytest.raises(UserError):
        best_index_bits(mask, 3.5, [])
