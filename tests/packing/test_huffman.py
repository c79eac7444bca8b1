import functools
import heapq
import itertools
import math

import numpy as np
import pytest

from onnxopt.errors import UnsupportedModelError
from onnxopt.packing import huffman


def kraft(lengths: np.ndarray) -> float:
    used = lengths[lengths > 0].astype(np.int64)
    return float(np.sum(np.ldexp(1.0, -used)))


def heap_huffman_cost(counts: np.ndarray) -> int:
    """Sum of count * length of an unlimited Huffman code: the sum of all merged weights."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def brute_force_limited_cost(counts: list[int], max_len: int) -> int:
    """Cheapest complete prefix code with lengths <= max_len, by trying every non-decreasing length vector."""
    weights = sorted(counts, reverse=True)
    best = None
    for lengths in itertools.combinations_with_replacement(range(1, max_len + 1), len(weights)):
        if sum(1 << (max_len - x) for x in lengths) == 1 << max_len:
            cost = sum(w * x for w, x in zip(weights, lengths))
            best = cost if best is None else min(best, cost)
    return best


def dp_limited_cost(counts: list[int], max_len: int) -> int:
    """Cheapest complete prefix code with lengths <= max_len, by dynamic programming over depths.

    At depth d with i heaviest symbols placed and a free nodes: make k of them leaves for the
    next k symbols, split the rest. Every symbol not yet placed adds its weight once per depth.
    """
    weights = sorted(counts, reverse=True)
    n = len(weights)
    suffix = [sum(weights[i:]) for i in range(n + 1)]

    @functools.cache
    def best(depth: int, placed: int, free: int) -> float:
        if placed == n:
            return 0 if free == 0 else math.inf
        if depth > max_len or free == 0 or free > 2 * (n - placed):
            return math.inf
        options = (best(depth + 1, placed + k, 2 * (free - k)) for k in range(min(free, n - placed) + 1))
        return suffix[placed] + min(options)

    return best(1, 0, 2)


def fibonacci(n: int) -> np.ndarray:
    out = [1, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return np.array(out[:n], np.int64)


def cost(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.dot(np.asarray(counts, np.int64), lengths.astype(np.int64)))


# ---------------------------------------------------------------- code lengths and codes


def test_code_lengths_hand_cases():
    assert huffman.code_lengths(np.array([1, 1, 2, 4])).tolist() == [3, 3, 2, 1]
    # limited to 3 bits: {1,3,3,3,3} costs 32, {2,2,2,3,3} 34, the unlimited {4,4,3,2,1} 30
    assert huffman.code_lengths(np.array([1, 1, 2, 4, 8]), max_len=3).tolist() == [3, 3, 3, 3, 1]
    assert huffman.code_lengths(np.array([0, 5, 0, 0])).tolist() == [0, 1, 0, 0]
    assert huffman.code_lengths(np.array([0, 0])).tolist() == [0, 0]
    assert huffman.code_lengths(np.array([3, 0, 3])).tolist() == [1, 0, 1]


def test_canonical_codes_hand_case():
    # ordered by (length, symbol): 3 -> 0, 2 -> 10, 0 -> 110, 1 -> 111
    assert huffman.canonical_codes(np.array([3, 3, 2, 1])).tolist() == [0b110, 0b111, 0b10, 0b0]
    assert huffman.canonical_codes(np.array([2, 0, 2, 2, 2])).tolist() == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="Kraft"):
        huffman.canonical_codes(np.array([1, 1, 2]))


SHAPES = {
    "geometric": lambda rng, n: rng.geometric(0.3, n),
    "uniform": lambda rng, n: rng.integers(1, 1000, n),
    "power": lambda rng, n: (1e6 / np.arange(1, n + 1) ** 1.5).astype(np.int64) + 1,
    "sparse": lambda rng, n: rng.integers(0, 50, n) * (rng.random(n) < 0.3),
    "wide": lambda rng, n: (10.0 ** rng.uniform(0, 9, n)).astype(np.int64),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_unlimited_lengths_are_optimal_and_complete(shape):
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 256, 1000):
        counts = SHAPES[shape](rng, n)
        if np.count_nonzero(counts) < 2:
            continue
        lengths = huffman.code_lengths(counts, max_len=huffman.MAX_CODE_LEN)
        if lengths.max() < huffman.MAX_CODE_LEN:  # the limit did not bind: must equal plain Huffman
            assert cost(counts, lengths) == heap_huffman_cost(counts)
        else:
            assert shape == "wide" and n >= 256  # counts over 9 decades: the 24-bit limit binds
        assert kraft(lengths) == 1.0
        assert np.array_equal(lengths > 0, counts > 0)


def test_limited_lengths_match_brute_force():
    rng = np.random.default_rng(1)
    cases = [fibonacci(7), fibonacci(8), np.array([1, 1, 1, 1, 1000]), np.array([5, 5, 5, 5, 5, 5, 5])]
    cases += [rng.integers(1, 100, rng.integers(2, 8)) for _ in range(20)]
    for counts in cases:
        for max_len in range(int(np.ceil(np.log2(counts.size))), 7):
            lengths = huffman.code_lengths(counts, max_len)
            assert lengths.max() <= max_len and kraft(lengths) == 1.0
            assert cost(counts, lengths) == brute_force_limited_cost(counts.tolist(), max_len), (counts, max_len)
            assert cost(counts, lengths) == dp_limited_cost(counts.tolist(), max_len)


def test_limited_lengths_match_dynamic_programming():
    rng = np.random.default_rng(8)
    cases = [(fibonacci(40), 24), (fibonacci(40), 20), (fibonacci(30), 10), (rng.integers(1, 1000, 30), 6)]
    cases += [(SHAPES["wide"](rng, 35), 9), (SHAPES["power"](rng, 40), 7)]
    for counts, max_len in cases:
        lengths = huffman.code_lengths(counts, max_len)
        assert lengths.max() <= max_len and kraft(lengths) == 1.0
        assert cost(counts, lengths) == dp_limited_cost(counts.tolist(), max_len), (counts, max_len)


def test_fibonacci_counts_are_limited():
    counts = fibonacci(40)  # plain Huffman would need 39 bits
    for max_len in (6, 12, 20, 24):
        lengths = huffman.code_lengths(counts, max_len)
        assert lengths.max() == max_len and kraft(lengths) == 1.0
    assert cost(counts, huffman.code_lengths(counts, 24)) < cost(counts, huffman.code_lengths(counts, 20))
    symbols = np.random.default_rng(9).permutation(np.repeat(np.arange(26), fibonacci(26)))
    assert huffman.code_lengths(np.bincount(symbols)).max() == 20  # plain Huffman: 25
    assert np.array_equal(huffman.decode(huffman.encode(symbols, 26)), symbols)


def test_canonical_codes_are_prefix_free_and_ordered():
    rng = np.random.default_rng(2)
    lengths = huffman.code_lengths(SHAPES["wide"](rng, 300), max_len=16)
    codes = huffman.canonical_codes(lengths)
    order = np.lexsort((np.arange(lengths.size), lengths))
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in order if lengths[s]]
    assert all(not b.startswith(a) for a, b in itertools.pairwise(words))
    left = [int(w.ljust(16, "0"), 2) for w in words]
    assert left == sorted(left) and len(set(left)) == len(left)


def test_code_lengths_rejects_bad_arguments():
    with pytest.raises(ValueError, match="do not fit"):
        huffman.code_lengths(np.ones(5, int), max_len=2)
    for counts in (np.array([1.0, 2.0]), np.array([-1, 3]), np.ones((2, 2), int)):
        with pytest.raises(ValueError, match="counts"):
            huffman.code_lengths(counts)
    with pytest.raises(ValueError, match="max_len"):
        huffman.code_lengths(np.ones(4, int), max_len=25)


# ---------------------------------------------------------------- streams


def test_tiny_blob_exact_bytes():
    blob = huffman.encode(np.array([0, 0, 0, 0, 1, 1, 2, 3]), 4)
    # version, alphabet 4, count 8 | raw lengths: min 1, 2-bit (0,1,2,2) | block 64 | 0 size fields, last 2
    # | codes 0 0 0 0 10 10 110 111 + 2 zero bits
    assert blob.hex(" ") == "01 04 08 00 02 02 1a 40 00 00 02 0a dc"
    assert huffman.decode(blob).tolist() == [0, 0, 0, 0, 1, 1, 2, 3]


def skewed(rng, n):
    return np.where(rng.random(n) < 0.99999, 3, rng.integers(0, 256, n))


STREAMS = {
    "empty": (lambda rng: np.zeros(0, np.int64), 7),
    "one": (lambda rng: np.array([4]), 5),
    "alphabet-1": (lambda rng: np.zeros(1000, np.uint8), 1),
    "single-symbol": (lambda rng: np.full(3000, 200, np.int32), 256),
    "two-symbols": (lambda rng: rng.integers(0, 2, 5000), 2),
    "geometric": (lambda rng: np.minimum(rng.geometric(0.2, 20000) - 1, 255), 256),
    "uniform-256": (lambda rng: rng.integers(0, 256, 20000), 256),
    "huge-skew": (lambda rng: skewed(rng, 200000), 256),
    "sparse-in-16-bit": (lambda rng: rng.choice([5, 70, 900, 65535], 4000), 1 << 16),
    "uint32-alphabet": (lambda rng: rng.integers(0, 1 << 17, 3000), (1 << 17) + 5),
    "fibonacci": (lambda rng: rng.permutation(np.repeat(np.arange(26), fibonacci(26))), 26),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("block_size", [None, 1, 7, 64])
def test_round_trip(name, block_size):
    make, alphabet = STREAMS[name]
    symbols = make(np.random.default_rng(3))
    if block_size == 1 and symbols.size > 5000:
        symbols = symbols[:5000]
    blob = huffman.encode(symbols, alphabet, block_size=block_size)
    out = huffman.decode(blob)
    assert out.dtype == (np.uint8 if alphabet <= 256 else np.uint16 if alphabet <= 1 << 16 else np.uint32)
    assert np.array_equal(out, symbols)
    assert blob == huffman.encode(symbols.astype(np.int64), alphabet, block_size=block_size)  # deterministic


def test_round_trip_across_encoder_chunks(monkeypatch):
    monkeypatch.setattr(huffman, "_CHUNK_SYMBOLS", 100)
    symbols = np.random.default_rng(4).integers(0, 300, 2345) ** 2 // 300
    for block_size in (1, 30, 100, 1000):
        blob = huffman.encode(symbols, 300, block_size=block_size)
        assert np.array_equal(huffman.decode(blob), symbols)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 1024, 1025, 8193])
@pytest.mark.parametrize("block_size", [None, 64])
def test_block_boundaries(count, block_size):
    symbols = np.random.default_rng(count).integers(0, 11, count)
    assert np.array_equal(huffman.decode(huffman.encode(symbols, 11, block_size=block_size)), symbols)


def test_single_symbol_costs_one_bit_and_uniform_eight():
    blob = huffman.encode(np.full(8000, 9), 10, block_size=800)
    # head 4 (version, 10, 8000) + lengths 5 (flags, min 0, width 1, 10 bits) + block 2 + 9 equal
    # sizes 3 (min 100, width 0) + last size 1, then 8000 bits
    assert len(blob) == 4 + 5 + 2 + 3 + 1 + 1000
    symbols = np.tile(np.arange(256), 40)
    assert set(huffman.code_lengths(np.bincount(symbols)).tolist()) == {8}
    # head 5 + lengths 3 (flags, min 8, width 0) + block 2 + 19 equal sizes 3 + last size 2, then 8 bits each
    assert len(huffman.encode(symbols, 256)) == 5 + 3 + 2 + 3 + 2 + symbols.size


def entropy_bytes(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def test_compression_near_entropy():
    rng = np.random.default_rng(5)
    weights = rng.laplace(size=100_000)  # what k-means with linear initialisation indexes
    symbols = np.rint((weights - weights.min()) / np.ptp(weights) * 255).astype(np.int64)
    assert len(huffman.encode(symbols, 256)) < 1.015 * entropy_bytes(symbols) + 150
    gaps = np.minimum(rng.geometric(0.2, 100_000) - 1, 15)
    assert len(huffman.encode(gaps, 16)) < 1.02 * entropy_bytes(gaps) + 30


def test_length_table_size_for_256_symbols():
    rng = np.random.default_rng(6)
    for counts in (SHAPES["wide"](rng, 256), rng.integers(0, 2, 256) * SHAPES["wide"](rng, 256)):
        assert len(huffman._write_lengths(huffman.code_lengths(counts))) <= 163  # 3 bytes + 256 5-bit lengths
    weights = rng.laplace(size=200_000)
    counts = np.bincount(np.rint((weights - weights.min()) / np.ptp(weights) * 255).astype(np.int64), minlength=256)
    assert len(huffman._write_lengths(huffman.code_lengths(counts))) <= 120


def test_length_table_round_trip_in_every_form():
    rng = np.random.default_rng(10)
    weights = rng.laplace(size=30_000)
    cases = {
        0: np.bincount(rng.integers(0, 16, 1000)),  # every symbol used, raw lengths
        2: fibonacci(20),  # every symbol used, lengths one apart
        1: rng.integers(0, 2, 256) * SHAPES["wide"](rng, 256),  # half used at random: mask
        3: np.bincount(np.rint((weights - weights.min()) / np.ptp(weights) * 255).astype(np.int64)),  # tails unused
        4: np.bincount([3, 3, 3, 900, 70000], minlength=1 << 17),  # few used in a large alphabet
        6: np.bincount(np.minimum(rng.geometric(0.2, 5000) - 1, 255), minlength=256),
    }
    for flags, counts in cases.items():
        lengths = huffman.code_lengths(counts)
        table = huffman._write_lengths(lengths)
        assert table[0] == flags
        assert np.array_equal(huffman._read_lengths(huffman._Reader(table + b"junk"), counts.size), lengths)
    assert len(huffman._write_lengths(huffman.code_lengths(cases[4]))) == 14  # 3 gaps of 17 bits: 7 bytes


@pytest.mark.parametrize("name", ["empty", "one", "geometric", "uniform-256", "huge-skew", "fibonacci"])
def test_estimate_size(name):
    make, alphabet = STREAMS[name]
    symbols = make(np.random.default_rng(3))
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    actual = len(huffman.encode(symbols, alphabet))
    blocks = min(16, symbols.size) + symbols.size // 512
    assert abs(huffman.estimate_size(counts) - actual) <= blocks + 4


def test_encode_rejects_programming_errors():
    for symbols, alphabet in ((np.array([0, 3]), 3), (np.array([-1, 0]), 3), (np.array([0.0]), 3), (np.array([0]), 0)):
        with pytest.raises(ValueError):
            huffman.encode(symbols, alphabet)
    with pytest.raises(ValueError, match="block_size"):
        huffman.encode(np.array([0, 1]), 2, block_size=0)
    with pytest.raises(ValueError, match="do not fit"):
        huffman.encode(np.arange(5), 5, max_len=2)


# ---------------------------------------------------------------- corrupt input


def small_blob() -> bytes:
    symbols = np.minimum(np.random.default_rng(7).geometric(0.3, 300) - 1, 40)
    return huffman.encode(symbols, 41, block_size=16)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "truncated"),
        (b"\x02\x04\x00", "version"),
        (b"\x01\x00\x00", "alphabet"),
        (b"\x01\x80\x80\x80\x10\x00", "alphabet"),  # 2**32 symbols
        (b"\x01\x04\x00\x00", "unexpected bytes after an empty stream"),
        (b"\x01\x04\xff\xff\xff\xff\x0f\x00", "cannot fit"),
        (b"\x01\x04\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00", "varint|cannot fit"),
        (b"\x01\x04\x08\x07\x02\x02\x1a\x80\x04\x00\x00\x02\x0a\xdc", "flags"),
        (b"\x01\x04\x08\x00\x02\x02\x1b\x80\x04\x00\x00\x02\x0a\xdc", "complete prefix code"),  # lengths 1,2,3,4
        (b"\x01\x04\x08\x00\x32\x02\x1a\x80\x04\x00\x00\x02\x0a\xdc", "outside"),  # lengths 25..27
        (b"\x01\x04\x08\x00\x02\x40\x1a\x80\x04\x00\x00\x02\x0a\xdc", "64-bit field"),
        (b"\x01\x04\x08\x00\x02\x02\x1a\x00\x00\x00\x02\x0a\xdc", "block size"),
        # encode([5, 70, 70, 5, 70], 100): used symbols listed as gaps 6, 65 (min 6, 6-bit fields)
        (bytes.fromhex("01 64 05 04 02 0c 06 03 b0 02 00 80 04 00 00 01 68"), None),
        (bytes.fromhex("01 64 05 05 02 0c 06 03 b0 02 00 80 04 00 00 01 68"), "flags"),
        (bytes.fromhex("01 64 05 04 65 0c 06 03 b0 02 00 80 04 00 00 01 68"), "101 used symbols"),
        (bytes.fromhex("01 64 05 04 02 00 06 03 b0 02 00 80 04 00 00 01 68"), "outside the alphabet"),
        (bytes.fromhex("01 64 05 04 02 50 06 03 b0 02 00 80 04 00 00 01 68"), "outside the alphabet"),
        (b"\x01\x04\x08\x00\x02\x02\x1a\x80\x04\x00\x00\x03\x0a\xdc", "block sizes"),
        (b"\x01\x04\x08\x00\x02\x02\x1a\x80\x04\x00\x00\x02\x0a\xdc\x00", "block sizes"),
        (b"\x01\x04\x08\x00\x02\x02\x1a\x80\x04\x00\x00\x02\x0a\xdd", "corrupt bitstream"),  # padding bit set
        (b"\x01\x04\x08\x00\x02\x02\x1a\x80\x04\x00\x00\x02\xfa\xdc", "corrupt bitstream"),  # 18 bits of codes
    ],
)
def test_corrupt_blob_is_one_line_error(blob, message):
    if message is None:  # the intact blob the next cases corrupt
        assert huffman.decode(blob).tolist() == [5, 70, 70, 5, 70]
        return
    with pytest.raises(UnsupportedModelError, match=message) as info:
        huffman.decode(blob)
    assert "\n" not in str(info.value)


def test_huge_gaps_in_used_symbol_list_cannot_wrap_around():
    huge = 2 * (2**62 - 5)  # zigzag of the smallest gap, width 0: three such gaps add up past 2**63
    varint = bytes([huge >> (7 * i) & 0x7F | (0x80 if huge >> (7 * i + 7) else 0) for i in range(9)])
    blob = bytes([1, 100, 5, 4, 3]) + varint + bytes.fromhex("00 02 00 80 04 00 00 01 68")
    with pytest.raises(UnsupportedModelError, match="outside the alphabet"):
        huffman.decode(blob)


def test_flipped_bit_in_single_symbol_stream_is_detected():
    blob = bytearray(huffman.encode(np.full(64, 1), 2, block_size=16))
    blob[-3] |= 0x10  # a 1 bit where only the code 0 exists
    with pytest.raises(UnsupportedModelError, match="corrupt bitstream"):
        huffman.decode(bytes(blob))


def test_truncation_at_every_offset_is_detected():
    for blob in (small_blob(), huffman.encode(np.full(100, 3), 4), huffman.encode(np.zeros(0, int), 3)):
        for end in range(len(blob)):
            with pytest.raises(UnsupportedModelError):
                huffman.decode(blob[:end])


def test_any_flipped_byte_gives_an_error_or_symbols_never_a_crash():
    blob = small_blob()
    caught = 0
    for index, flip in itertools.product(range(len(blob)), (0x01, 0x80, 0xFF)):
        corrupt = bytearray(blob)
        corrupt[index] ^= flip
        try:
            out = huffman.decode(bytes(corrupt))
        except UnsupportedModelError as e:
            assert "\n" not in str(e)
            caught += 1
        else:
            assert out.dtype.kind == "u" and out.size <= 8 * len(blob)
    assert caught > len(blob)  # most flips are caught; bitstream flips may decode to other symbols
