#!/usr/bin/env python
"""Transformer fusions: is the optimized encoder, run with onnxruntime's graph optimizations
off, as fast as the original with onnxruntime's own fusions on?

    python benchmarks/bench_transformer_fusions.py [MODEL.onnx ...] [--repeat 200] [--seq 16 128]

Each model (default: models/tiny_bert.onnx, opset 14, and models/tiny_bert_opset17.onnx) is
optimized, per target, by these variants (each checked against the original first):

    O1+fusions   -O1 with fuse_layer_norm and fuse_gelu before fuse_conv_activation
    +skip_ln     the same plus fuse_skip_layer_norm (onnxruntime target only)
    opset17      a model below opset 17 converted with onnx.version_converter, then O1+fusions

The passes are added to the registry here when it does not list them yet. Timing: one thread,
3 warm-up runs, then --repeat rounds in which every session runs once, in an order rotated
every round so that load drift hits all of them; the median is reported. Sessions: the
original at ENABLE_EXTENDED and ENABLE_ALL, each variant at DISABLE_ALL (a plain edge
runtime) and ENABLE_ALL. Inputs come from the signature: batch 1 and every other dynamic dim
= --seq (token ids below the embedding table size, masks all ones).

Ratios: ``none/ext`` = variant at DISABLE_ALL / original at ENABLE_EXTENDED (goal <= 1);
``all/all`` = variant / original, both at ENABLE_ALL (must not exceed 1 beyond noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter

from onnxopt import optimizer, presets, runtime
from onnxopt.config import OptimizeConfig, Target

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [REPO / "models" / "tiny_bert.onnx", REPO / "models" / "tiny_bert_opset17.onnx"]
FUSIONS = ("fuse_layer_norm", "fuse_gelu")
ALL_FUSIONS = (*FUSIONS, "fuse_skip_layer_norm")
LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
WARMUP = 3


def register_fusions() -> None:
    from onnxopt.passes import PASSES
    from onnxopt.passes.fuse_gelu import FuseGeluPass
    from onnxopt.passes.fuse_layer_norm import FuseLayerNormPass
    from onnxopt.passes.fuse_skip_layer_norm import FuseSkipLayerNormPass

    for cls in (FuseLayerNormPass, FuseGeluPass, FuseSkipLayerNormPass):
        PASSES.setdefault(cls.name, cls)


def pass_list(fusions=FUSIONS) -> list[str]:
    """O1 with ``fusions`` just before fuse_conv_activation (the order recommended for the preset)."""
    names = [n for n in presets.PRESETS["O1"] if n not in ALL_FUSIONS]
    at = names.index("fuse_conv_activation") if "fuse_conv_activation" in names else len(names)
    return names[:at] + list(fusions) + names[at:]


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def variants(model: onnx.ModelProto, target: Target) -> dict[str, onnx.ModelProto]:
    config = OptimizeConfig(target=target)
    out = {}
    for label, source, names in (
        ("O1+fusions", model, pass_list()),
        ("+skip_ln", model, pass_list(ALL_FUSIONS) if target is Target.ONNXRUNTIME else None),
        ("opset17", version_converter.convert_version(model, 17) if opset_of(model) < 17 else None, pass_list()),
    ):
        if source is None or names is None:
            continue
        result = optimizer.optimize_model(source, names, config, strict=True)
        fused = Counter()
        for r in result.records:
            if r.name in ALL_FUSIONS:
                fused.update({f"{r.name}.{k}": v for k, v in r.stats.items()})
        print(f"   {label:10s} nodes {len(model.graph.node)} -> {len(result.model.graph.node)}  {dict(fused)}")
        print(f"   {'':10s} {ops(result.model)}")
        out[label] = result.model
    return out


def feeds_for(model: onnx.ModelProto, seq: int) -> dict[str, np.ndarray]:
    shapes = {}
    for vi in runtime.real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else seq)
                                for i, d in enumerate(dims))
    return runtime.random_feeds(model, shapes=shapes, seed=0)


def time_sessions(sessions: dict[str, ort.InferenceSession], feeds, repeat: int) -> dict[str, float]:
    """Median ms per session, interleaved, order rotated every round."""
    names = list(sessions)
    for name in names:
        for _ in range(WARMUP):
            sessions[name].run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def ops(model: onnx.ModelProto) -> str:
    counts = Counter((f"{n.domain}:" if n.domain else "") + n.op_type for n in model.graph.node)
    return " ".join(f"{op}x{c}" for op, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def bench(path: Path, target: Target, seqs: list[int], repeat: int) -> None:
    model = onnx.load(path)
    print(f"\n== {path.name} (opset {opset_of(model)})  target={target.value}")
    outs = variants(model, target)
    for seq in seqs:
        feeds = feeds_for(model, seq)
        ref = runtime.run(runtime.session(model, optimization=LEVELS["none"]), feeds)
        sessions = {"orig ext": runtime.session(model, optimization=LEVELS["ext"], threads=1),
                    "orig all": runtime.session(model, optimization=LEVELS["all"], threads=1)}
        errors = {}
        for label, out in outs.items():
            got = runtime.run(runtime.session(out, optimization=LEVELS["none"]), feeds)
            errors[label] = max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref)
            for level in ("none", "all"):
                sessions[f"{label} {level}"] = runtime.session(out, optimization=LEVELS[level], threads=1)
        ms = time_sessions(sessions, feeds, repeat)
        print(f"   seq {seq}: original ext {ms['orig ext']:.3f} ms, all {ms['orig all']:.3f} ms")
        for label in outs:
            none, full = ms[f"{label} none"], ms[f"{label} all"]
            print(f"     {label:10s} none {none:.3f} ms ({none / ms['orig ext']:.2f}x ext)  all {full:.3f} ms"
                  f" ({full / ms['orig all']:.2f}x all)  max abs err {errors[label]:.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("models", nargs="*", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--targets", default="onnxruntime,standard")
    args = ap.parse_args(argv)
    register_fusions()
    print(f"onnxruntime {ort.__version__}; O1+fusions: {','.join(pass_list())}")
    for path in args.models:
        for target in args.targets.split(","):
            bench(path, Target(target), args.seq, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
