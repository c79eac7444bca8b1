"""Command line: ``onnxopt pack IN.onnx -o OUT.onnxz`` and ``onnxopt unpack IN.onnxz -o OUT.onnx``.

``pack`` runs the lossless preset first (BatchNormalization folded into the convolutions,
so a codebook sees the weights that multiply the activations; parallel MatMuls are not
merged, see ``lossless``), chooses a setting per weight
(``choose_settings``: ``--bits``/``--sparsity`` for all, the budget search with ``--calibrate``,
which may also share a weight divided by its input-channel scales measured on the samples,
``packing.scales``; else Deep Compression's default policy), packs, unpacks again and compares what
``unpack`` gives with the original model in onnxruntime on ``--data`` (held out), else the
calibration samples, else generated inputs. OUT is written, atomically, only if that
comparison meets the budget. The report has the bytes of every tensor after each stage,
and what gzip, xz and zstd make of the original file.

``unpack`` writes nothing for a corrupt, truncated or foreign file: one line, exit 2.
Errors propagate as ``onnxopt.errors`` types; ``cli.main`` maps them to exit codes.
Printing happens here and in ``cli`` only.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import logging
import lzma
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import onnx

from onnxopt import __version__, cli_common, data, io, presets, report, runtime, validate
from onnxopt.errors import UnsupportedModelError, UserError, ValidationFailed
from onnxopt.optimizer import Optimized, optimize_model
from onnxopt.packing import container, native
from onnxopt.packing import pack as packing
from onnxopt.packing.policy import Policy, TensorSetting, default_settings, packable, per_channel_pays
from onnxopt.packing.search import Search, SearchConfig, search
from onnxopt.validate import Budget

logger = logging.getLogger("onnxopt")

DEFAULT_MIN_COSINE = 0.99  # the budget searched with --calibrate when none is given
NATIVE_FORMS = ("gather", "sparse")
SKIPPED_PASSES = ("merge_parallel",)  # see ``lossless``


def pack_parser() -> argparse.ArgumentParser:
    p = cli_common.Parser(prog="onnxopt pack", description="Prune, share (k-means) and Huffman-code the weights of an "
                    "ONNX model into an .onnxz file; onnxopt unpack gives back a standard ONNX model.")
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnxz")
    p.add_argument("--bits", type=int, metavar="B", help="every weight shared to 2^B centroids (default: 8 for conv, "
                   "5 for fully connected, 4 for embedding tables, as Deep Compression)")
    p.add_argument("--sparsity", type=float, metavar="S", help="prune this fraction of every weight by magnitude "
                   "(default 0)")
    p.add_argument("--calibrate", metavar="S.npz", help="choose bits and sparsity per weight by measured "
                   "sensitivity on these samples to meet --min-cosine (default 0.99) or --min-top1")
    p.add_argument("--calibration-samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--margin", type=float, default=SearchConfig.margin, metavar="F", help="with --calibrate, the "
                   "budget checked on the samples is stricter: cosine >= 1 - F (1 - C) (default %(default)s)")
    p.add_argument("--force", action="store_true", help="allow writing over the input file")
    cli_common.common_options(p)
    return p


def unpack_parser() -> argparse.ArgumentParser:
    p = cli_common.Parser(prog="onnxopt unpack", description="Turn an .onnxz file back into a standard ONNX model.")
    p.add_argument("input", metavar="IN.onnxz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--force", action="store_true", help="allow writing over the input file")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return p


def choose_settings(model: onnx.ModelProto, *, bits: int | None = None, sparsity: float | None = None,
                    samples: list[dict] | None = None, budget: Budget | None = None,
                    config: SearchConfig | None = None, progress: bool = False
                    ) -> tuple[dict[str, TensorSetting] | None, Search | None, str]:
    """(settings, search or None, how they were chosen). ``bits``/``sparsity`` set every packable
    weight; else ``samples`` and a lossy ``budget`` run the search (settings None: not met);
    else the default policy. Raises ``UserError`` for a mix of the two."""
    if samples is not None and (bits is not None or sparsity is not None):
        raise UserError("--bits and --sparsity set every weight; --calibrate chooses them per weight: give one")
    if samples is not None:
        if budget is None or not (budget.min_cosine is not None or budget.min_top1 is not None):
            raise UserError("--calibrate needs a budget: --min-cosine or --min-top1")
        found = search(model, samples, budget, config or SearchConfig(scaled=True), progress=progress)
        return found.settings, found, f"budget search by sensitivity ({found.budget.describe()} on the samples)"
    policy = Policy()
    if bits is None and sparsity is None:
        return default_settings(model, policy), None, "default policy (8 bits conv, 5 fully connected, 4 embedding)"
    settings = {}
    for name, (w, dims) in packable(model, policy.min_elements).items():
        b = policy.bits(w.kind) if bits is None else bits
        settings[name] = TensorSetting(b, sparsity or 0.0, per_channel_pays(dims, w.axis, b,
                                                                            policy.max_codebook_overhead))
    return settings, None, f"--bits {bits if bits is not None else 'default'} --sparsity {sparsity or 0:g}"


def native_model(model: onnx.ModelProto, form: str, settings: dict[str, TensorSetting]) -> onnx.ModelProto:
    """``model`` with ``settings`` in an ONNX-native form that needs no decoder: "gather" (uint8 codebook
    indices + Gather) or "sparse" (pruned weights as sparse initializers)."""
    if form not in NATIVE_FORMS:
        raise UserError(f"unknown native form {form!r}; choose from {', '.join(NATIVE_FORMS)}")
    return native.codebook_gather(model, settings) if form == "gather" else native.sparse_initializers(model, settings)


def pack(argv: list[str]) -> int:
    """``onnxopt pack``; see the module docstring. Returns the exit code; errors propagate."""
    args = pack_parser().parse_args(argv)
    cli_common.setup_logging(args)
    timings, t0 = {}, time.perf_counter()
    budget, config = _budget(args), _check_options(args)
    io.check_output_path(args.output, protect=args.input, force=args.force)
    if args.report:
        io.check_output_path(args.report, protect=args.input)
    model = io.load_model(args.input)
    samples = _samples(args, model)
    compressed = _Background(compressor_sizes, _file_bytes(args.input))
    optimized = lossless(model)
    t = time.perf_counter()
    progress = not args.quiet and sys.stderr.isatty()
    settings, found, rule = choose_settings(optimized.model, bits=args.bits, sparsity=args.sparsity, samples=samples,
                                            budget=budget if samples else None, config=config, progress=progress)
    timings["choose"] = time.perf_counter() - t
    facts = {"onnxopt": __version__, "input": args.input, "output": None, "input_size_bytes": io.file_size(args.input),
             "lossless_passes": optimized.passes, "settings_rule": rule, "search": found.facts() if found else None}
    check = None
    if settings is not None:
        check = _pack_and_check(args, model, optimized.model, settings, budget, facts, timings, samples,
                                found.scales if found else None)
    facts["compressors"] = compressed.result()
    _emit(args, facts, timings, t0)
    if settings is None:
        raise ValidationFailed(f"{found.message()}; {args.output} not written")
    if not check:
        raise ValidationFailed(f"{check.summary()}; {args.output} not written")
    return cli_common.EXIT_OK


class _Background:
    """``fn(*args)`` in a daemon thread, so that an error exit never waits for it (xz takes ~0.6 s per MB;
    zlib, lzma and zstandard release the GIL)."""

    def __init__(self, fn, *args):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self.value = fn(*args)
        except BaseException as e:  # handed to the caller of result()
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _file_bytes(path: str) -> bytes:
    """The model file as stored, with an external data file beside it (as ``io.file_size`` counts)."""
    path = Path(path)
    extra = path.parent / (path.name + ".data")
    return path.read_bytes() + (extra.read_bytes() if extra.exists() else b"")


def lossless(model: onnx.ModelProto) -> Optimized:
    """The lossless preset before packing, but for ``merge_parallel``: Q, K and V kept apart get bits of
    their own (merged, on all-MiniLM-L6-v2 at --min-cosine 0.985: 7.8x instead of 8.1x)."""
    return optimize_model(model, presets.pass_names("O1", skip=SKIPPED_PASSES))


def _pack_and_check(args, model, optimized, settings, budget, facts, timings, samples, scales
                    ) -> validate.ValidationReport:
    """Pack, unpack, compare with the original; write OUT if the budget holds."""
    t = time.perf_counter()
    blob, packed = packing.pack(optimized, settings, scales)
    timings["pack"] = time.perf_counter() - t
    t = time.perf_counter()
    unpacked = packing.unpack(blob)
    timings["unpack"] = time.perf_counter() - t
    feeds, source = _feeds(args, model, samples)
    t = time.perf_counter()
    check = validate.compare(model, unpacked, feeds, source=source, budget=budget, latency_repeat=args.latency_repeat)
    timings["validate"] = time.perf_counter() - t
    facts.update({"packing": packed, "validation": check.to_json(), "output_size_bytes": len(blob),
                  "ratio": facts["input_size_bytes"] / len(blob)})
    if check:
        container.write_file(args.output, blob, protect=args.input, force=args.force)
        facts["output"] = args.output
    return check


def _budget(args) -> Budget:
    """The user's budget; packing is lossy, so without one the numbers are reported and nothing fails."""
    budget = replace(cli_common.budget(args), lossy=True)
    if args.calibrate and budget.min_cosine is None and budget.min_top1 is None:
        budget = replace(budget, min_cosine=DEFAULT_MIN_COSINE)
    return budget


def _check_options(args) -> SearchConfig:
    """Refuse bad option values and combinations before anything is loaded."""
    if args.calibrate and (args.bits is not None or args.sparsity is not None):
        raise UserError("--bits and --sparsity set every weight; --calibrate chooses them per weight: give one")
    if args.calibration_samples is not None and (args.calibration_samples < 1 or not args.calibrate):
        raise UserError("--calibration-samples must be at least 1 and goes with --calibrate")
    if args.samples is not None and args.samples < 1:
        raise UserError("--samples must be at least 1")
    TensorSetting(8 if args.bits is None else args.bits, args.sparsity or 0.0)
    return SearchConfig(margin=args.margin, scaled=True)


def _samples(args, model: onnx.ModelProto) -> list[dict] | None:
    return data.load_feeds(args.calibrate, model, limit=args.calibration_samples) if args.calibrate else None


def _feeds(args, model: onnx.ModelProto, samples: list[dict] | None) -> tuple[list[dict], str]:
    """Validation inputs: --data (held out), else the calibration samples, else generated ones."""
    if args.data:
        return data.load_feeds(args.data, model, limit=args.samples), f"data: {args.data}"
    if samples:
        return samples, f"calibration data {args.calibrate}, not held out: give --data for that"
    return [runtime.random_feeds(model, shapes=cli_common.parse_shapes(args.shape), seed=0)], "generated inputs"


def compressor_sizes(blob: bytes) -> dict[str, dict | str]:
    """What gzip (level 6), xz (preset 6) and zstd (level 3, if the zstandard module is installed)
    make of ``blob``: {"gzip": {"bytes", "ratio", "seconds"}, ..., "zstd": "not installed"}."""
    out: dict[str, dict | str] = {}
    coders = {"gzip": lambda b: gzip.compress(b, 6, mtime=0), "xz": lambda b: lzma.compress(b, preset=6)}
    try:
        zstandard = importlib.import_module("zstandard")
        coders["zstd"] = zstandard.ZstdCompressor(level=3).compress
    except ImportError:
        out["zstd"] = "not installed"
    for name, coder in coders.items():
        t = time.perf_counter()
        size = len(coder(blob))
        out[name] = {"bytes": size, "ratio": len(blob) / max(size, 1), "seconds": round(time.perf_counter() - t, 3)}
    return dict(sorted(out.items()))


def _emit(args, facts: dict, timings: dict, t0: float) -> None:
    facts["seconds"] = {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - t0}.items()}
    if args.report:
        report.write_json(facts, args.report)
    if not args.quiet:
        print(render(facts))


def render(facts: dict) -> str:
    """The terminal summary of ``pack``: per-tensor stages, totals, compressors, search, validation."""
    lines = [f"onnxopt pack {facts['onnxopt']}: {facts['input']} -> {facts['output'] or '(not written)'}",
             f"  settings: {facts['settings_rule']}"]
    packed = facts.get("packing")
    if packed:
        lines += ["", *_render_tensors(packed)]
        sizes = f"{report._bytes(facts['input_size_bytes'])} -> {report._bytes(facts['output_size_bytes'])}"
        lines.append(f"  file: {sizes} ({facts['ratio']:.2f}x smaller)")
    comp = facts.get("compressors") or {}
    parts = [f"{k} {v['ratio']:.2f}x" if isinstance(v, dict) else f"{k} {v}" for k, v in comp.items()]
    if parts:
        lines.append("  the original file with " + ", ".join(parts))
    if facts.get("search"):
        lines += ["", *render_search(facts["search"])]
    if facts.get("validation"):
        lines += ["", *report._render_validation(facts["validation"])]
    return "\n".join(lines)


def _render_tensors(packed: dict, top: int = 40) -> list[str]:
    def row(name: str, r: dict) -> list[str]:
        bits = "-" if r.get("bits") is None else str(r["bits"]) + ("/ch" if r.get("axis") is not None else "")
        kept = f"{100 * r['kept'] / max(r['numel'], 1):.0f}%"
        return [name[-44:], bits, kept, f"{r['original_bytes']:,}", f"{r['pruned_bytes']:,}", f"{r['shared_bytes']:,}",
                f"{r['huffman_bytes']:,}", f"{r['bits_per_weight']:.2f}", f"{r['ratio']:.1f}x"]

    rows = sorted(packed["tensors"].items(), key=lambda kv: -kv[1]["original_bytes"])
    table = [row(n, r) for n, r in rows[:top]] + [row("total", {**packed["total"], "bits": None})]
    out = report._table(["tensor", "bits", "kept", "original", "pruned", "shared", "huffman", "bits/w", "ratio"],
                        table)
    if len(rows) > top:
        out.insert(-1, f"  ... {len(rows) - top} smaller tensors in the JSON report")
    return out


def render_search(s: dict) -> list[str]:
    passed = [c for c in s["checks"] if c["passed"]]
    best = min(passed, key=lambda c: c["estimated_bytes"], default=None)
    line = (f"budget search ({s['budget_checked']} on {s['samples']} calibration samples, {s['seconds']:.1f} s): "
            f"{len(s['checks'])} whole-model checks")
    if best:
        line += f", chose cosine {best['cosine']:.6f}" + (f", top-1 {best['top1']:.4f}" if best["top1"] is not None
                                                          else "")
    return [line if s["met"] else line + ", budget not met"]


def unpack(argv: list[str]) -> int:
    """``onnxopt unpack``: one line on success; corrupt input raises ``UnsupportedModelError`` (exit 2)."""
    args = unpack_parser().parse_args(argv)
    cli_common.setup_logging(args)
    t0 = time.perf_counter()
    io.check_output_path(args.output, protect=args.input, force=args.force)
    path = Path(args.input)
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}")
    try:
        model = packing.unpack(path.read_bytes())
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    except OSError as e:
        raise UnsupportedModelError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from e
    blob = io.serialize(model)
    io.check_model(model, path, data=blob)
    io.save_model(model, args.output, protect=args.input, force=args.force, data=blob)
    if not args.quiet:
        print(f"onnxopt unpack: {args.input} ({report._bytes(path.stat().st_size)}) -> {args.output} "
              f"({report._bytes(io.file_size(args.output))}), checked by onnx: PASS, "
              f"{time.perf_counter() - t0:.2f} s")
    return cli_common.EXIT_OK
