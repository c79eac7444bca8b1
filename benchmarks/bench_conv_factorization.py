#!/usr/bin/env python
"""Speed/accuracy trade-off of factorizing a CNN's KxK convolutions (factorize_conv).

    python benchmarks/bench_conv_factorization.py [MODEL.onnx ...] [--ratios 1,0.75,0.5,0.25]
        [--kernel 3] [--flattened] [--repeat 30] [--samples 64]

For each model (default: models/digits_cnn.onnx, models/inception_block.onnx and, when
present, /tmp/onnxopt-real/resnet18_op13.onnx), every group-1 KxK convolution (3x3 unless
--kernel says otherwise) is factorized at each ratio of its MACs: ratio 1 means full rank,
min(C K, N K), which is exact and costs more MACs than the original; below 1 the rank is
the largest whose factors keep that fraction of the layer's MACs (a layer where even rank
1 does not is left alone). Other convolutions are not touched. --flattened adds "+flat" rows:
each layer takes the flattened form instead where that has the lower weight error at the same
MACs (tried only for small layers: FLATTENED_MAX_WORK in passes/factorize_conv.py).

Columns, against the original:
    convs     convolutions factorized            MACs M, params M, MB: whole model (MACs at batch 1)
    ms        median onnxruntime latency, CPU, 1 thread, ORT_ENABLE_ALL, batch 1, --repeat runs,
              every variant of a model timed interleaved
    rel L2 / cos   first output on --samples random inputs (seed 0)
    top-1 / acc    on MODEL.test.npz when it exists (first --test-samples): argmax agreement
              with the original, and accuracy against MODEL.test_labels.npy when that exists
Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.analysis import model_stats
from onnxopt.lowrank import RankPolicy, max_rank_within
from onnxopt.passes.factorize_conv import FactorizeConvPass, find_sites

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [REPO / "models/digits_cnn.onnx", REPO / "models/inception_block.onnx",
                  Path("/tmp/onnxopt-real/resnet18_op13.onnx")]
WARMUP = 3


def factorize(model: onnx.ModelProto, ratio: float, kernel: int, flattened: bool, spectra: dict):
    """The model with its KxK convs factorized at ``ratio`` of their MACs, and the pass's records.
    With ``flattened``, the pass takes the flattened form where it has the lower error at the MACs
    of the spatial rank (and its CP fit is cheap enough: FLATTENED_MAX_WORK)."""
    graph = gs.import_onnx(model)
    sites = [s for s in find_sites(graph)[0] if s.shape[2:] == (kernel, kernel)]
    probe = FactorizeConvPass(spectra=spectra)
    ranks = {}
    for s in sites:
        full = probe.spectrum(s).full_rank
        ranks[s.label] = full if ratio >= 1 else max_rank_within(s.macs, ratio * s.full_macs, full)
    # ratio 1: full rank whatever it costs; below: refuse layers whose rank 1 already exceeds the ratio.
    policy = RankPolicy(ratio=min(ratio, 1.0), min_saving=-100.0 if ratio >= 1 else 1 - ratio - 1e-9)
    p = FactorizeConvPass(policy=policy, ranks=ranks, spectra=spectra, flattened=flattened)
    p(graph)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out, p.layers


def batch_feeds(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    shapes = {vi.name: (batch, *runtime.input_shape(vi, {})[1:]) for vi in runtime.real_inputs(model)}
    return runtime.random_feeds(model, shapes=shapes, seed=seed)


def test_data(path: Path, model: onnx.ModelProto, samples: int):
    test = path.with_suffix(".test.npz")
    if not test.exists():
        return None, None
    with np.load(test) as z:
        feeds = {vi.name: z[vi.name][:samples] for vi in runtime.real_inputs(model)}
    labels = path.with_name(path.stem + ".test_labels.npy")
    return feeds, (np.load(labels)[:samples] if labels.exists() else None)


def first_output(sess, feeds) -> np.ndarray:
    return runtime.run(sess, feeds)[sess.get_outputs()[0].name].astype(np.float64)


def latencies(sessions: list, feeds, repeat: int) -> list[float]:
    times = [[] for _ in sessions]
    for s in sessions:
        for _ in range(WARMUP):
            s.run(None, feeds)
    for i in range(repeat):
        for j in [(i + k) % len(sessions) for k in range(len(sessions))]:
            t0 = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def bench(path: Path, args) -> None:
    model = onnx.load(path)
    print(f"{path.name}: factorizing {args.kernel}x{args.kernel} convs", file=sys.stderr)
    spectra: dict = {}
    variants = [("original", model, [])]
    for ratio in args.ratios:
        variants.append((f"ratio {ratio:g}", *factorize(model, ratio, args.kernel, False, spectra)))
        if args.flattened and ratio < 1:
            variants.append((f"ratio {ratio:g} +flat", *factorize(model, ratio, args.kernel, True, spectra)))
    one = batch_feeds(model, 1, seed=0)
    rand = batch_feeds(model, args.samples, seed=0)
    test, labels = test_data(path, model, args.test_samples)
    sessions = [runtime.session(m, threads=1) for _, m, _ in variants]
    print(f"  timing {len(variants)} variants x {args.repeat} runs", file=sys.stderr)
    ms = latencies(sessions, one, args.repeat)
    ref_rand = first_output(sessions[0], rand)
    ref_test = first_output(sessions[0], test) if test else None
    header = ["variant", "convs", "MACs M", "x MACs", "params M", "MB", "ms", "x ms", "rel L2", "cos",
              "top-1", "acc"]
    rows = []
    base = None
    for (name, m, layers), sess, t in zip(variants, sessions, ms):
        stats = model_stats(m, one, m.ByteSize())
        base = base or (stats.macs, t)
        out = first_output(sess, rand)
        rel = np.linalg.norm(out - ref_rand) / np.linalg.norm(ref_rand)
        cos = float(np.mean(_cosines(out, ref_rand)))
        top1 = acc = "-"
        if test:
            pred = first_output(sess, test)
            top1 = f"{np.mean(pred.argmax(-1) == ref_test.argmax(-1)):.3f}"
            acc = f"{np.mean(pred.argmax(-1) == labels):.3f}" if labels is not None else "-"
        rows.append([name, str(sum(la.applied for la in layers)), f"{stats.macs / 1e6:.2f}",
                     f"{stats.macs / base[0]:.2f}", f"{stats.params / 1e6:.3f}", f"{m.ByteSize() / 2**20:.2f}",
                     f"{t:.3f}", f"{t / base[1]:.2f}", f"{rel:.2e}", f"{cos:.5f}", top1, acc])
    held_out = f"{len(next(iter(test.values())))} of {path.stem}.test.npz" if test else "none"
    print(f"\n== {path.name}  ({args.samples} random inputs; held-out data: {held_out})")
    _print_table(header, rows)
    _print_layers(variants[1:])
    sys.stdout.flush()


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _print_layers(variants) -> None:
    """Per layer and variant: rank/full rank, form (s spatial, f flattened) and weight error, or '-'."""
    labels = list(dict.fromkeys(la.node for _, _, layers in variants for la in layers))
    if not labels:
        return
    cells = {(name, la.node): (f"{la.rank}/{la.full_rank}{la.form[0]} {la.error:.2f}" if la.applied else "-")
             for name, _, layers in variants for la in layers}
    shapes = {la.node: "x".join(map(str, la.shape)) for _, _, layers in variants for la in layers}
    print("\nper layer: rank/full rank, form (s spatial, f flattened), relative weight error")
    _print_table(["layer", "kernel", *(name for name, _, _ in variants)],
                 [[lab, shapes[lab], *(cells.get((name, lab), "-") for name, _, _ in variants)] for lab in labels])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--kernel", type=int, default=3, help="factorize KxK convolutions with this K")
    ap.add_argument("--flattened", action="store_true", help="also try the flattened form")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--samples", type=int, default=64, help="random inputs for rel L2 and cos")
    ap.add_argument("--test-samples", type=int, default=512, help="samples of MODEL.test.npz used")
    args = ap.parse_args(argv)
    models = args.models or [p for p in DEFAULT_MODELS if p.exists()]
    for path in models:
        if not path.exists():
            print(f"{path}: no such file", file=sys.stderr)
            return 2
        bench(path, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
