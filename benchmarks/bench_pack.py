#!/usr/bin/env python
"""Weight packing: compression ratio against held-out fidelity for a few settings, beside gzip/xz/zstd.

    python benchmarks/bench_pack.py [MODEL.onnx ...] [--min-cosine 0.99 ...] [--min-top1 0.95]

Each MODEL needs MODEL.calib.npz and MODEL.test.npz beside it (default: every model in
models/ that has both; /tmp/onnxopt-real has MiniLM and EfficientNet-Lite0, see
benchmarks/build_real_models.py). As ``onnxopt pack`` does, the lossless preset runs
first (``cli_pack.lossless``: BatchNormalization folded); then, per setting, the model is
packed, unpacked and run on the held-out test samples against the original float model:

    8 bits/tensor   every weight shared to 256 centroids, one codebook per tensor (k-means)
    6 bits/tensor   the same at 64
    default         Deep Compression's policy (8 conv, 5 fully connected, 4 embedding)
    cos>=C          the budget search on the calibration samples (``--calibrate --min-cosine C``)
    top1>=A         the same with ``--min-top1 A``, for models with 2-D logits

Columns: ratio = original file / .onnxz file; bits/w over the packed weights; cosine = the
CLI's metric (mean over samples of each sample's whole output, worst output); pooled = the
cosine of attention-mask-weighted mean-pooled embeddings (sentence encoders: what
all-MiniLM-L6-v2 users compare); top-1 = agreement of 2-D logits; unpack = the whole
``onnxopt unpack`` (read, decode, check, write); search = seconds spent choosing settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxopt import cli_pack, data, io, runtime, validate
from onnxopt.packing import pack as packing
from onnxopt.packing.policy import TensorSetting, packable
from onnxopt.sensitivity import count_samples

ROOT = Path(__file__).resolve().parent.parent


def models_with_data(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.onnx")) if _beside(p, "calib").exists() and _beside(p, "test").exists()]


def _beside(model: Path, split: str) -> Path:
    return model.with_name(f"{model.stem}.{split}.npz")


def pooled_cosine(ref: list[dict], got: list[dict], feeds: list[dict]) -> float | None:
    """Mean cosine of attention-mask-weighted mean-pooled last_hidden_state; None if not an encoder."""
    if "attention_mask" not in feeds[0] or "last_hidden_state" not in ref[0]:
        return None
    cosines = []
    for a, b, f in zip(ref, got, feeds):
        mask = f["attention_mask"][..., None].astype(np.float64)
        ea, eb = ((x["last_hidden_state"] * mask).sum(1) / mask.sum(1) for x in (a, b))
        cosines.append(np.sum(ea * eb, 1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1))
    return float(np.mean(np.concatenate(cosines)))


def is_classifier(outputs: dict[str, np.ndarray]) -> bool:
    return len(outputs) == 1 and next(iter(outputs.values())).ndim == 2


def settings_to_run(model, calib, ref0, args) -> list[tuple[str, callable]]:
    """(label, a function giving (settings, input scales or None))."""
    names = packable(model, 1024)
    runs = [("8 bits/tensor", lambda: ({n: TensorSetting(8, 0.0, False) for n in names}, None)),
            ("6 bits/tensor", lambda: ({n: TensorSetting(6, 0.0, False) for n in names}, None)),
            ("default", lambda: (cli_pack.choose_settings(model)[0], None))]
    for c in args.min_cosine:
        runs.append((f"cos>={c:g}", lambda c=c: _searched(model, calib, validate.Budget(lossy=True, min_cosine=c))))
    if is_classifier(ref0):
        for a in args.min_top1:
            runs.append((f"top1>={a:g}", lambda a=a: _searched(model, calib, validate.Budget(lossy=True, min_top1=a))))
    return runs


def _searched(model, calib, budget):
    settings, found, _ = cli_pack.choose_settings(model, samples=calib, budget=budget)
    if settings is None:
        raise RuntimeError(found.message())
    return settings, found.scales


def unpack_seconds(blob: bytes) -> float:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "m.onnxz"
        src.write_bytes(blob)
        t = time.perf_counter()
        cli_pack.unpack([str(src), "-o", str(Path(d) / "m.onnx"), "-q"])
        return time.perf_counter() - t


def bench(path: Path, args) -> None:
    original = io.load_model(path)
    model = cli_pack.lossless(original).model
    calib = data.load_feeds(_beside(path, "calib"), original)
    test = data.load_feeds(_beside(path, "test"), original)
    sess = runtime.session(original)
    ref = [runtime.run(sess, f) for f in test]
    size = io.file_size(path)
    comp = cli_pack.compressor_sizes(path.read_bytes())
    params = sum(int(np.prod(t.dims)) for t in original.graph.initializer)
    print(f"\n{path.name}: {size / 1e6:.2f} MB, {params:,} parameters; {count_samples(calib)} calibration "
          f"samples, {count_samples(test)} held-out test samples")
    print("  the original file with " + ", ".join(f"{k} {v['ratio']:.3f}x ({v['seconds']:.1f} s)"
                                                   if isinstance(v, dict) else f"{k} {v}" for k, v in comp.items()))
    print(f"  {'setting':<14} {'ratio':>7} {'bits/w':>7} {'cosine':>9} {'pooled':>9} {'top-1':>7} {'unpack':>8} "
          f"{'search':>8}")
    for label, choose in settings_to_run(model, calib, ref[0], args):
        t = time.perf_counter()
        try:
            settings, scales = choose()
        except RuntimeError as e:
            print(f"  {label:<14} {e}")
            continue
        chosen = time.perf_counter() - t
        blob, report = packing.pack(model, settings, scales)
        unpacked = runtime.session(packing.unpack(blob))
        got = [runtime.run(unpacked, f) for f in test]
        check = validate.compare_runs(ref, unpacked, test, budget=validate.Budget(lossy=True))
        cosine = min(o.cosine for o in check.outputs)
        top1 = min((o.top1 for o in check.outputs if o.top1 is not None), default=None) if is_classifier(
            ref[0]) else None
        pooled = pooled_cosine(ref, got, test)
        print(f"  {label:<14} {size / len(blob):>6.2f}x {report['total']['bits_per_weight']:>7.2f} {cosine:>9.5f} "
              f"{'-' if pooled is None else f'{pooled:.5f}':>9} {'-' if top1 is None else f'{100 * top1:.1f}%':>7} "
              f"{unpack_seconds(blob):>7.2f}s {chosen if 'cos' in label or 'top1' in label else 0:>7.1f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="default: models/ with calib and test data")
    p.add_argument("--min-cosine", type=float, nargs="*", default=[0.99])
    p.add_argument("--min-top1", type=float, nargs="*", default=[0.95])
    args = p.parse_args()
    for path in args.models or models_with_data(ROOT / "models"):
        bench(path, args)


if __name__ == "__main__":
    main()
