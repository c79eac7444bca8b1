"""Canonical, length-limited Huffman coding of small non-negative integer symbols.

Code lengths come from package-merge (Larmore and Hirschberg): the optimal prefix code
with no code longer than ``max_len``. Vectorised by level, each list is the sorted coins
merged with the pairs ("packages") of the deeper list; coins stay in weight order, so a
level's chosen prefix holds the ``k`` lightest symbols' coins, and a symbol's length is
the number of levels whose ``k`` exceeds its rank. Codes are canonical, ordered by
(length, symbol), so the lengths alone define them. One distinct symbol gets the 1-bit
code ``0``: every symbol costs at least one bit, so ``count <= 8 * bytes`` always.

Blob layout (varint = unsigned LEB128, all bit fields MSB-first)::

    blob      = version:u8 (=1)  alphabet:varint  count:varint  [body, only if count > 0]
    body      = lengths  block:varint  ints(nblocks - 1) of block byte sizes  last:varint  blocks
    lengths   = flags:u8 (bit 0: used-symbol mask, bit 2: used-symbol list, bit 1: delta coded)
                [mask: ceil(alphabet / 8) bytes, 1 = symbol has a code]
                [list: m:varint  ints(m) of gaps between used symbols, the first from -1]
                raw:   ints(m) of the code lengths of the used symbols (all symbols, 0 = unused,
                       if neither mask nor list)
                delta: first:varint  ints(m - 1) of successive differences
    ints(m)   = min:zigzag-varint  width:u8  m values (v - min) of width bits, padded to a byte
    blocks    = ceil(count / block) byte-aligned blocks, block k holding symbols
                [k * block, (k + 1) * block) as concatenated codes and zero padding

The writer keeps the smallest of the (all, mask, list) x (raw, delta) length tables:
~100 bytes for 256 k-means indices, at most 163 (5-bit raw lengths), a few bytes per
used symbol for a large alphabet sparsely used.

Decoding runs all blocks in lockstep, one Python iteration per symbol position in a
block: peek ``L`` bits (the longest code) at each block's offset from big-endian 32-bit
words starting at every byte, and read symbol and length from two ``2**L`` tables. The
block size trades decode time (the loop is ``block`` long) against size (~1 byte per
block for its size field and padding). Decode checks, each failing with a one-line
``UnsupportedModelError``: every field lies inside the blob and nothing follows it, the
code is complete (Kraft sum 1, or one 1-bit code), every block ends in its last byte
with zero padding, and ``count <= 8 * bytes`` before anything of size ``count`` exists.
"""

from __future__ import annotations

import logging
import operator

import numpy as np

from onnxopt.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

VERSION = 1
DEFAULT_MAX_LEN = 20
MAX_CODE_LEN = 24  # a peek of L bits at bit offset 0..7 must fit one 32-bit word
MAX_ALPHABET = 1 << 24
MAX_BLOCK = 1 << 16
_CHUNK_SYMBOLS = 1 << 20  # encoder working set: a few arrays of this many symbols
_MAX_WIDTH = 48
_INVALID_LEN = 255  # table entry for bits no code starts with: jumps past any block end
_MASK, _DELTA, _GAPS = 1, 2, 4  # code length table flags


def code_lengths(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN) -> np.ndarray:
    """Optimal code length per symbol (uint8, 0 for count 0) with no code longer than max_len."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise ValueError("counts must be a 1-D array of non-negative integers")
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len must be in [1, {MAX_CODE_LEN}], got {max_len}")
    lengths = np.zeros(counts.size, np.uint8)
    used = np.flatnonzero(counts)
    if used.size > 1 << max_len:
        raise ValueError(f"{used.size} symbols do not fit in codes of at most {max_len} bits")
    if used.size == 1:
        lengths[used] = 1
    elif used.size > 1:
        order = used[np.argsort(counts[used], kind="stable")]
        lengths[order] = _package_merge(counts[order].astype(np.int64), max_len)
    return lengths


def _package_merge(weights: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths for ascending weights (2 <= n <= 2**max_len), by package-merge."""
    n = weights.size
    levels = min(max_len, n - 1)  # an optimal code is never deeper than n - 1
    coin_flags = []  # deepest level first; the deepest list is the coins alone
    items = weights
    for _ in range(levels - 1):
        half = items.size // 2
        packages = items[0 : 2 * half : 2] + items[1 : 2 * half : 2]
        both = np.concatenate([weights, packages])
        order = np.argsort(both, kind="stable")  # merges the two sorted runs; ties put coins first
        items = both[order]
        coin_flags.append(order < n)
    taken, chosen = [], 2 * n - 2  # the shallowest list pays for n - 1 units of Kraft sum
    for is_coin in reversed(coin_flags):
        coins = int(np.count_nonzero(is_coin[:chosen]))
        taken.append(coins)
        chosen = 2 * (chosen - coins)
    taken.append(chosen)
    per_count = np.bincount(taken, minlength=n + 1)
    return np.cumsum(per_count[::-1])[::-1][1:].astype(np.uint8)  # levels whose prefix holds symbol j


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(symbols by (length, symbol), their lengths, 2**(L - length) for each, L = longest length)."""
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]
    sorted_lengths = lengths[order].astype(np.int64)
    top = int(sorted_lengths[-1]) if order.size else 0
    return order, sorted_lengths, np.left_shift(1, top - sorted_lengths), top


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code per symbol (uint32, right-aligned in its length; 0 where the length is 0)."""
    lengths = np.asarray(lengths)
    if lengths.size and lengths.max() > MAX_CODE_LEN:
        raise ValueError(f"code lengths must be at most {MAX_CODE_LEN}")
    order, sorted_lengths, span, top = _canonical(lengths)
    if int(span.sum()) > 1 << top:
        raise ValueError("code lengths break Kraft's inequality")
    codes = np.zeros(lengths.size, np.uint32)
    codes[order] = (np.cumsum(span) - span) >> (top - sorted_lengths)  # left-aligned codes add up the spans
    return codes


def estimate_size(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN, block_size: int | None = None) -> int:
    """Bytes of encode() for a stream with these symbol counts: exact but for ~1 byte per block."""
    counts = np.asarray(counts)
    lengths = code_lengths(counts, max_len)
    count = int(counts.sum())
    head = 1 + len(_varint(counts.size)) + len(_varint(count))
    if count == 0:
        return head
    block = _block_size(count, block_size)
    nblocks = -(-count // block)
    bits = int(np.dot(counts.astype(np.int64), lengths.astype(np.int64)))
    return head + len(_write_lengths(lengths)) + len(_varint(block)) + 4 + -(-bits // 8) + nblocks


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pack_ints(values: np.ndarray) -> bytes:
    low = int(values.min()) if values.size else 0
    width = int(values.max() - low).bit_length() if values.size else 0
    zigzag = 2 * low if low >= 0 else -2 * low - 1
    offsets, bits = values.astype(np.int64) - low, np.empty((values.size, width), np.uint8)
    for plane in range(width):  # one bit plane at a time: no (values x width) int64 temporary
        bits[:, plane] = offsets >> (width - 1 - plane) & 1
    return _varint(zigzag) + bytes([width]) + np.packbits(bits).tobytes()


class _Reader:
    """Cursor over a blob; every read checks the bytes are there."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int, what: str) -> bytes:
        if size > self.left():
            raise UnsupportedModelError(f"huffman stream truncated in its {what}")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def varint(self, what: str) -> int:
        value = 0
        for shift in range(0, 63, 7):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
        raise UnsupportedModelError(f"huffman stream: {what} is not a valid varint")

    def ints(self, count: int, what: str) -> np.ndarray:
        zigzag = self.varint(what)
        low = zigzag >> 1 if zigzag % 2 == 0 else -(zigzag >> 1) - 1
        width = self.take(1, what)[0]
        if width > _MAX_WIDTH:
            raise UnsupportedModelError(f"huffman stream: {what} has a {width}-bit field")
        raw = np.frombuffer(self.take(-(-count * width // 8), what), np.uint8)
        values = np.zeros(count, np.int64)
        for plane in np.unpackbits(raw)[: count * width].reshape(count, width).T:
            values = values << 1 | plane
        return low + values


def _write_lengths(lengths: np.ndarray) -> bytes:
    used = lengths > 0
    symbols = np.flatnonzero(used)
    used_sets = [(0, b"")]  # every symbol carries a length, 0 = unused
    if symbols.size < lengths.size:
        used_sets.append((_MASK, np.packbits(used).tobytes()))
        used_sets.append((_GAPS, _varint(symbols.size) + _pack_ints(np.diff(symbols, prepend=-1))))
    options = []
    for flag, head in used_sets:
        values = (lengths[used] if flag else lengths).astype(np.int64)
        options.append(bytes([flag]) + head + _pack_ints(values))
        options.append(bytes([flag | _DELTA]) + head + _varint(int(values[0])) + _pack_ints(np.diff(values)))
    return min(options, key=len)  # min keeps the first of equal sizes: deterministic


def _read_used(reader: _Reader, flags: int, alphabet: int) -> np.ndarray:
    if flags & _MASK:
        raw = np.frombuffer(reader.take(-(-alphabet // 8), "used-symbol mask"), np.uint8)
        return np.unpackbits(raw)[:alphabet].astype(bool)
    if not flags & _GAPS:
        return np.ones(alphabet, bool)
    count = reader.varint("used-symbol list")
    if count > alphabet:
        raise UnsupportedModelError(f"huffman stream: {count} used symbols in an alphabet of {alphabet}")
    gaps = reader.ints(count, "used-symbol list")
    symbols = np.cumsum(gaps) - 1
    if count and (gaps.min() < 1 or gaps.max() > alphabet or symbols[-1] >= alphabet):  # max: no overflow
        raise UnsupportedModelError("huffman stream: used-symbol list outside the alphabet")
    used = np.zeros(alphabet, bool)
    used[symbols] = True
    return used


def _read_lengths(reader: _Reader, alphabet: int) -> np.ndarray:
    flags = reader.take(1, "code length table")[0]
    if flags & ~(_MASK | _DELTA | _GAPS) or flags & _MASK and flags & _GAPS:
        raise UnsupportedModelError(f"huffman stream: unknown code table flags {flags:#x}")
    used = _read_used(reader, flags, alphabet)
    count = int(np.count_nonzero(used))
    if flags & _DELTA and count:
        first = reader.varint("code length table")
        values = first + np.concatenate([[0], np.cumsum(reader.ints(count - 1, "code length table"))])
    else:
        values = reader.ints(count, "code length table")
    lowest = 1 if flags & (_MASK | _GAPS) else 0
    if values.size and (values.min() < lowest or values.max() > MAX_CODE_LEN):
        raise UnsupportedModelError(f"huffman stream: code lengths outside [{lowest}, {MAX_CODE_LEN}]")
    lengths = np.zeros(alphabet, np.uint8)
    lengths[used] = values
    return lengths


def _check_complete(lengths: np.ndarray) -> None:
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 1 and used[0] == 1:
        return
    if used.size < 2 or int(np.sum(np.left_shift(1, MAX_CODE_LEN - used))) != 1 << MAX_CODE_LEN:
        raise UnsupportedModelError("huffman stream: the code lengths do not form a complete prefix code")


def _block_size(count: int, block_size: int | None) -> int:
    if block_size is None:  # at most 16 blocks up to 8192 symbols, then 512 or 1024 long: ~1 byte per block
        return 1024 if count >= 1 << 18 else min(512, max(64, 1 << (-(-count // 16) - 1).bit_length()))
    if not 1 <= block_size <= MAX_BLOCK:
        raise ValueError(f"block_size must be in [1, {MAX_BLOCK}], got {block_size}")
    return block_size


def _out_dtype(alphabet: int) -> type:
    return np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint32


def encode(
    symbols: np.ndarray, alphabet_size: int, *, max_len: int = DEFAULT_MAX_LEN, block_size: int | None = None
) -> bytes:
    """One self-contained blob (code table, header, bitstream) for the flattened symbols."""
    symbols, alphabet_size = np.asarray(symbols).reshape(-1), operator.index(alphabet_size)
    if symbols.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got {symbols.dtype}")
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet_size must be in [1, {MAX_ALPHABET}], got {alphabet_size}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet_size):
        raise ValueError(f"symbols must lie in [0, {alphabet_size})")
    head = bytes([VERSION]) + _varint(alphabet_size) + _varint(symbols.size)
    if symbols.size == 0:
        return head
    block = _block_size(symbols.size, block_size)
    lengths = code_lengths(np.bincount(symbols.astype(np.int64, copy=False), minlength=alphabet_size), max_len)
    codes = canonical_codes(lengths)
    step = max(1, _CHUNK_SYMBOLS // block) * block  # whole blocks, so chunks join at byte boundaries
    chunks = (symbols[start : start + step] for start in range(0, symbols.size, step))
    parts = [_encode_chunk(codes[c], lengths[c].astype(np.int64), block) for c in chunks]
    sizes = np.concatenate([p[0] for p in parts])  # the short last block apart: it would widen every field
    body = _write_lengths(lengths) + _varint(block) + _pack_ints(sizes[:-1]) + _varint(int(sizes[-1]))
    logger.debug("huffman: %d symbols, %d header bytes, %d data bytes", symbols.size, len(body), sizes.sum())
    return head + body + b"".join(p[1] for p in parts)


def _encode_chunk(codes: np.ndarray, lengths: np.ndarray, block: int) -> tuple[np.ndarray, bytes]:
    """Byte size of each block and their bytes, codes MSB-first, each block zero-padded to a byte."""
    firsts = np.arange(0, codes.size, block)
    sizes = (np.add.reduceat(lengths, firsts) + 7) >> 3
    ends = np.cumsum(lengths)
    before = ends - lengths  # bit offset of each code, counted without padding
    block_shift = 8 * (np.cumsum(sizes) - sizes) - before[firsts]
    offsets = before + np.repeat(block_shift, block)[: codes.size]
    # each code (<= 24 bits) lands in a 64-bit window over 32-bit words `word` and `word + 1`;
    # disjoint bit fields add like OR, and float64 sums below 2**32 are exact
    window = codes.astype(np.uint64) << (64 - lengths - (offsets & 31)).astype(np.uint64)
    word = offsets >> 5
    nwords = int(sizes.sum()) // 4 + 2
    words = np.bincount(word, (window >> np.uint64(32)).astype(np.float64), minlength=nwords)
    words += np.bincount(word + 1, (window & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=nwords)
    return sizes, words.astype(np.uint32).astype(">u4").tobytes()[: int(sizes.sum())]


def decode(blob: bytes) -> np.ndarray:
    """The symbols of an encode() blob (uint8/uint16/uint32 by alphabet size); UnsupportedModelError if corrupt."""
    reader = _Reader(bytes(blob))
    version = reader.take(1, "version")[0]
    if version != VERSION:
        raise UnsupportedModelError(f"huffman stream: unknown version {version}")
    alphabet = reader.varint("alphabet size")
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise UnsupportedModelError(f"huffman stream: alphabet size {alphabet} outside [1, {MAX_ALPHABET}]")
    count = reader.varint("symbol count")
    if count > 8 * reader.left():  # every symbol costs at least one bit
        raise UnsupportedModelError(f"huffman stream: {count} symbols cannot fit in {reader.left()} bytes")
    dtype = _out_dtype(alphabet)
    if count == 0:
        if reader.left():
            raise UnsupportedModelError(f"huffman stream: {reader.left()} unexpected bytes after an empty stream")
        return np.zeros(0, dtype)
    lengths = _read_lengths(reader, alphabet)
    _check_complete(lengths)
    block = reader.varint("block size")
    if not 1 <= block <= MAX_BLOCK:
        raise UnsupportedModelError(f"huffman stream: block size {block} outside [1, {MAX_BLOCK}]")
    sizes = reader.ints(-(-count // block) - 1, "block sizes")
    sizes = np.append(sizes, reader.varint("block sizes"))
    if sizes.min() < 0 or sizes.max() > reader.left() or int(sizes.sum()) != reader.left():
        raise UnsupportedModelError("huffman stream: block sizes do not match the bytes present (truncated?)")
    data = reader.take(reader.left(), "blocks")
    return _decode_blocks(data, sizes, lengths, count, block).astype(dtype, copy=False)


def _decode_tables(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Symbol and code length for every L-bit peek (L = longest code); canonical codes make them runs."""
    order, sorted_lengths, span, top = _canonical(lengths)
    gap = (1 << top) - int(span.sum())  # only the single 1-bit code leaves codes unused
    dtype = _out_dtype(lengths.size)
    symbol_of = np.concatenate([np.repeat(order.astype(dtype), span), np.zeros(gap, dtype)])
    length_of = np.concatenate([np.repeat(sorted_lengths.astype(np.uint8), span), np.full(gap, _INVALID_LEN, np.uint8)])
    return symbol_of, length_of, top


def _decode_blocks(data: bytes, sizes: np.ndarray, lengths: np.ndarray, count: int, block: int) -> np.ndarray:
    symbol_of, length_of, top = _decode_tables(lengths)
    words = np.ndarray((len(data) + 1,), ">u4", data + bytes(4), strides=(1,)).astype(np.int64)
    ends = np.cumsum(sizes)
    pos = 8 * (ends - sizes)
    last, steps = count - (sizes.size - 1) * block, min(block, count)
    out = np.empty((steps, sizes.size), symbol_of.dtype)
    byte, peek, step = np.empty_like(pos), np.empty_like(pos), np.empty(sizes.size, np.uint8)
    for i in range(steps):  # one iteration per position within a block, all blocks at once
        np.right_shift(pos, 3, out=byte)
        np.take(words, byte, out=peek, mode="clip")
        np.bitwise_and(pos, 7, out=byte)
        np.subtract(32 - top, byte, out=byte)
        np.right_shift(peek, byte, out=peek)
        np.bitwise_and(peek, (1 << top) - 1, out=peek)
        np.take(symbol_of, peek, out=out[i], mode="clip")  # "clip": no bounds pass, no buffered out
        np.take(length_of, peek, out=step, mode="clip")
        np.add(pos, step, out=pos)
        if i + 1 == last:
            last_end = int(pos[-1])  # the last block may be short: the rest of its column is cut below
    pos[-1] = last_end
    padding = (np.take(words, pos >> 3, mode="clip") >> 24) & (0xFF >> (pos & 7))
    if np.any(((pos + 7) >> 3) != ends) or np.any(((pos & 7) != 0) & (padding != 0)):
        raise UnsupportedModelError("huffman stream: corrupt bitstream (a block does not end where its size says)")
    return out.T.reshape(-1)[:count]
