#!/usr/bin/env python
"""Time onnxopt.packing.huffman on streams the size of a 100 MB float model (25 M weights).

    python benchmarks/bench_huffman.py [--symbols 25000000] [--streams 1 200] [--seed 0]

Symbols are what weight sharing produces: Laplace-distributed weights (the usual shape of
trained weights) snapped to 2^b centroids spaced linearly between their min and max, as
k-means with linear initialisation starts, and relative indices of a 90%-pruned layer
(geometric gaps, capped at 2^4 - 1 as a 4-bit index with filler entries would be). Each
case is encoded as one stream and as N equal streams (one per tensor), and reports
bits/symbol against the entropy, table+header bytes, and encode and decode wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxopt.packing import huffman


def centroid_indices(rng: np.random.Generator, size: int, bits: int) -> tuple[np.ndarray, int]:
    weights = rng.laplace(0.0, 1.0, size).astype(np.float32)
    levels = 1 << bits
    scaled = (weights - weights.min()) / (weights.max() - weights.min()) * (levels - 1)
    return np.rint(scaled).astype(np.uint16), levels


def relative_indices(rng: np.random.Generator, size: int, width: int = 4) -> tuple[np.ndarray, int]:
    gaps = rng.geometric(0.1, size)
    return np.minimum(gaps, (1 << width) - 1).astype(np.uint16), 1 << width


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    p = np.bincount(symbols, minlength=alphabet) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size)


def run(name: str, symbols: np.ndarray, alphabet: int, streams: int) -> None:
    parts = np.array_split(symbols, streams)
    t0 = time.perf_counter()
    blobs = [huffman.encode(p, alphabet) for p in parts]
    t1 = time.perf_counter()
    decoded = [huffman.decode(b) for b in blobs]
    t2 = time.perf_counter()
    assert all(np.array_equal(d, p) for d, p in zip(decoded, parts)), "round trip failed"
    size = sum(map(len, blobs))
    ideal = sum(entropy_bits(p, alphabet) for p in parts) / 8
    rate, entropy, excess = 8 * size / symbols.size, 8 * ideal / symbols.size, 100 * (size / ideal - 1)
    print(
        f"{name:<20} streams={streams:<4} {symbols.size / 1e6:5.1f} M sym  "
        f"{rate:5.3f} bit/sym (entropy {entropy:5.3f}, +{excess:.2f}%)  "
        f"encode {t1 - t0:5.2f} s  decode {t2 - t1:5.2f} s ({1e9 * (t2 - t1) / symbols.size:4.1f} ns/sym)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=25_000_000)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    cases = [
        ("centroids 8-bit", *centroid_indices(rng, args.symbols, 8)),
        ("centroids 5-bit", *centroid_indices(rng, args.symbols, 5)),
        ("relative idx 4-bit", *relative_indices(rng, args.symbols)),
    ]
    for name, symbols, alphabet in cases:
        for streams in args.streams:
            run(name, symbols, alphabet, streams)


if __name__ == "__main__":
    main()
