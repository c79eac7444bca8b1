#!/usr/bin/env python
"""Lossless benchmark: onnxopt against onnxsim, onnxoptimizer and onnxslim, in one run.

    python benchmarks/bench_lossless.py [MODEL.onnx ...] [--data X.npz] [--shape name:1x3x224x224]
                                        [--repeat 20] [--tool-repeat 3] [--timeout 600] [--json out.json]

For each model (default: every models/*.onnx), every tool optimizes it --tool-repeat times as a
subprocess with its default settings; wall time and peak memory are the medians over those runs.
Each tool's output is then loaded in onnxruntime beside the original and measured: node count and
op counts, file size, max abs and relative L2 error of every output on the same inputs, and
single-thread CPU latency with ORT's own graph optimizations on (ENABLE_ALL) and off (DISABLE_ALL,
the situation of a plain edge runtime); the original also at ENABLE_EXTENDED.

Peak memory is the ``ru_maxrss`` that ``os.wait4`` returns for the tool's process, collected by a
small wrapper process, never by this script directly: on Linux, exec() folds the high-water RSS of
the address space it replaces into the new process's ``ru_maxrss``, so any child forked from this
script (hundreds of MB of onnxruntime, numpy and models) would report at least this script's RSS.
A fresh wrapper's own ``ru_maxrss`` is inflated the same way; the wrapper's child is not, except
up to the wrapper's own footprint (about 13 MB), which is the floor of the measure.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import runtime
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.io import load_model

REPO = Path(__file__).resolve().parents[1]
ORIGINAL = "original"
OURS = "onnxopt"
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
ORIGINAL_LEVELS = ("all", "ext", "none")
TOOL_LEVELS = ("all", "none")
WARMUP_RUNS = 3
COLUMNS = ("tool", "time s", "peak MB", "nodes", "size MB", "max abs", "rel L2")  # then one per ORT level
MB = 1 << 20

# Runs argv as its own child and writes that child's wait4 rusage to a JSON file. Tool output goes
# to the inherited stdout/stderr (the caller's log file). A timer kills the tool's process group.
_WRAPPER = r"""
import json, os, signal, subprocess, sys, threading, time
report, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
timed_out = []
def kill():
    timed_out.append(True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
start = time.perf_counter()
proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
timer = threading.Timer(timeout, kill)
timer.start()
try:
    _, status, usage = os.wait4(proc.pid, 0)
except BaseException:
    kill()
    raise
seconds = time.perf_counter() - start
timer.cancel()
proc.returncode = os.waitstatus_to_exitcode(status)
scale = 1 if sys.platform == "darwin" else 1024
with open(report, "w") as f:
    json.dump({"seconds": seconds, "peak_bytes": usage.ru_maxrss * scale,
               "exit_code": proc.returncode, "timed_out": bool(timed_out)}, f)
"""


class ToolMissing(Exception):
    """The tool's command cannot be built (console script not installed)."""


def _console_script(name: str) -> list[str]:
    """argv that runs console script `name` with this interpreter, so no shell shim (pyenv) is timed."""
    eps = metadata.entry_points(group="console_scripts", name=name)
    if not eps:
        raise ToolMissing(f"console script {name!r} is not installed")
    ep = next(iter(eps))
    launcher = f"import sys; sys.argv[0] = {name!r}; import {ep.module} as m; sys.exit(m.{ep.attr}())"
    return [sys.executable, "-c", launcher]


@dataclass(frozen=True)
class Tool:
    name: str
    command: Callable[[Path, Path], list[str]]  # (input model, output model) -> argv


TOOLS = (
    Tool(OURS, lambda src, dst: [*_console_script("onnxopt"), str(src), "-o", str(dst), "--no-validate"]),
    Tool("onnxsim", lambda src, dst: [sys.executable, "-m", "onnxsim", str(src), str(dst)]),
    Tool("onnxoptimizer", lambda src, dst: [sys.executable, "-m", "onnxoptimizer", str(src), str(dst)]),
    Tool("onnxslim", lambda src, dst: [*_console_script("onnxslim"), str(src), str(dst)]),
)


@dataclass
class Run:
    seconds: float | None = None
    peak_mb: float | None = None
    error: str | None = None


@dataclass
class Result:
    """Everything measured for one tool's output (or the original) on one model."""

    tool: str
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None  # median wall time of the optimization
    peak_mb: float | None = None  # median peak RSS of the optimization
    runs: int = 0
    nodes: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    file_mb: float | None = None
    max_abs: float | None = None  # worst over outputs
    rel_l2: float | None = None  # worst over outputs
    output_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # ORT level -> median ms


@dataclass
class ModelReport:
    model: str
    inputs: dict[str, list[int]]
    samples: int
    results: list[Result]
    ratios: dict[str, dict[str, float | None]]


# ---------------------------------------------------------------- running the tools


def run_measured(argv: Sequence[str], run_dir: Path, timeout: float) -> Run:
    """Run argv through the wrapper; the model it writes is checked by the caller."""
    report, log = run_dir / "rusage.json", run_dir / "log.txt"
    with open(log, "wb") as out:
        try:
            subprocess.run([sys.executable, "-c", _WRAPPER, str(report), str(timeout), *argv],
                           stdout=out, stderr=subprocess.STDOUT, timeout=timeout + 60, check=False)
        except subprocess.TimeoutExpired:
            return Run(error=f"measurement wrapper hung past {timeout + 60:g} s")
    if not report.exists():
        return Run(error=f"measurement wrapper failed: {_last_line(log)}")
    usage = json.loads(report.read_text())
    if usage["timed_out"]:
        return Run(error=f"timed out after {timeout:g} s")
    if usage["exit_code"] != 0:
        return Run(error=f"exit {usage['exit_code']}: {_last_line(log)}")
    return Run(seconds=usage["seconds"], peak_mb=usage["peak_bytes"] / MB)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


@dataclass
class Outcome:
    output: Path | None = None
    runs: list[Run] = field(default_factory=list)
    error: str | None = None


def optimize_all(tools: Sequence[Tool], model: Path, work: Path, repeat: int, timeout: float
                 ) -> dict[str, Outcome]:
    """Each tool `repeat` times, round robin so that a change in machine load hits every tool alike.

    A tool that fails once is not run again. Only the newest output of each tool is kept on disk.
    """
    outcomes = {t.name: Outcome() for t in tools}
    for i in range(repeat):
        for tool in tools:
            outcome = outcomes[tool.name]
            if outcome.error:
                continue
            run_dir = work / tool.name / f"run{i}"
            dst = run_dir / "model" / "model.onnx"
            dst.parent.mkdir(parents=True)
            try:
                run = run_measured(tool.command(model, dst), run_dir, timeout)
            except ToolMissing as e:
                run = Run(error=str(e))
            if run.error is None and not dst.exists():
                run = Run(error="exited 0 but wrote no model")
            _progress(f"{model.stem}: {tool.name} run {i + 1}/{repeat}: "
                      + (run.error or f"{run.seconds:.2f} s, {run.peak_mb:.0f} MB"))
            if run.error:
                outcome.error = run.error
                continue
            if outcome.output is not None:
                shutil.rmtree(outcome.output.parent.parent)
            outcome.output, outcome.runs = dst, [*outcome.runs, run]
    return outcomes


# ---------------------------------------------------------------- measuring the results


def load_samples(model: onnx.ModelProto, data: Path | None, shapes: Mapping[str, tuple[int, ...]],
                 limit: int) -> list[dict[str, np.ndarray]]:
    """Feeds per sample: the first `limit` of the npz (first axis = samples), else one generated."""
    if data is None:
        return [runtime.random_feeds(model, shapes=shapes, seed=0)]
    try:
        with np.load(data) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{data}: not a readable npz file ({_first_line(e)})") from e
    inputs = runtime.real_inputs(model)
    missing = [vi.name for vi in inputs if vi.name not in arrays]
    if missing:
        raise DataError(f"{data} has no array for input(s) {missing} (it has {sorted(arrays)})")
    counts = {arrays[vi.name].shape[0] for vi in inputs}
    if len(counts) != 1:
        raise DataError(f"{data}: inputs have different sample counts {sorted(counts)}")
    samples = []
    for i in range(min(counts.pop(), limit)):
        feeds = {}
        for vi in inputs:
            arr, rank = arrays[vi.name], len(vi.type.tensor_type.shape.dim)
            # rank + 1 dims: a samples axis before the model's own; same rank: the batch axis is it
            feeds[vi.name] = arr[i] if arr.ndim == rank + 1 else arr[i : i + 1]
        samples.append(feeds)
    return samples


def count_ops(graph: onnx.GraphProto, counts: Counter | None = None) -> Counter:
    """Op counts, nodes of control-flow subgraphs included; non-standard domains are prefixed."""
    counts = Counter() if counts is None else counts
    for node in graph.node:
        counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                count_ops(sub, counts)
    return counts


def model_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The .onnx file plus the external data files its initializers point to."""
    files = {path}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files |= {path.parent / e.value for e in t.external_data if e.key == "location"}
    return sum(f.stat().st_size for f in files if f.exists())


def output_errors(ref: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]]
                  ) -> dict[str, dict[str, float]]:
    """Max abs and relative L2 error per output over all samples; outputs matched by name, else position."""
    ref_names, got_names = list(ref[0]), list(got[0])
    if set(ref_names) != set(got_names) and len(ref_names) != len(got_names):
        raise ValueError(f"outputs changed: {ref_names} -> {got_names}")
    match = dict(zip(ref_names, ref_names if set(ref_names) == set(got_names) else got_names, strict=True))
    errors = {}
    for name, other in match.items():
        a = np.concatenate([np.asarray(r[name], np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(g[other], np.float64).ravel() for g in got])
        if a.shape != b.shape or any(r[name].shape != g[other].shape for r, g in zip(ref, got, strict=True)):
            raise ValueError(f"output {name!r} changed shape: {ref[0][name].shape} -> {got[0][other].shape}")
        diff = np.abs(a - b)
        diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0  # inf == inf and NaN where the original has NaN
        rel_l2 = np.linalg.norm(diff) / (np.linalg.norm(a) or 1.0)
        errors[name] = {"max_abs": float(diff.max(initial=0.0)), "rel_l2": float(rel_l2)}
    return errors


def load_result(tool: str, path: Path, levels: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]
                ) -> tuple[Result, dict[str, ort.InferenceSession], list[dict[str, np.ndarray]]]:
    """Structure of the model, its ORT sessions, and its outputs with ORT's own rewrites off."""
    result = Result(tool)
    model = onnx.load(str(path), load_external_data=False)
    counts = count_ops(model.graph)
    result.nodes, result.ops = sum(counts.values()), dict(counts.most_common())
    result.file_mb = model_bytes(path, model) / MB
    sessions = {lvl: runtime.session(path, optimization=LEVELS[lvl], threads=1) for lvl in levels}
    outputs = [runtime.run(sessions["none"], s) for s in samples]
    return result, sessions, outputs


def time_sessions(sessions: Mapping[tuple[str, str], ort.InferenceSession], feeds: Mapping[str, np.ndarray],
                  repeat: int) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], str]]:
    """Median ms per session after warmup; runs interleaved so load drift is shared. Also failures."""
    live, failed = {}, {}
    for key, sess in sessions.items():
        try:
            for _ in range(WARMUP_RUNS):
                sess.run(None, dict(feeds))
            live[key] = sess
        except Exception as e:  # an ORT rewrite can break a model that loads fine
            failed[key] = _first_line(e)
    keys, times, feeds = list(live), {k: [] for k in live}, dict(feeds)
    for r in range(repeat if keys else 0):
        shift = r % len(keys)  # rotate the order so that no session always runs right after another
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            live[key].run(None, feeds)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, failed


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def compute_ratios(results: Sequence[Result]) -> dict[str, dict[str, float | None]]:
    """onnxopt / other for each metric where lower is better, so < 1 means onnxopt is better."""
    by = {r.tool: r for r in results}
    ours = by.get(OURS)
    if ours is None or ours.error:
        return {}
    metrics = {
        "time": lambda r: r.seconds, "peak": lambda r: r.peak_mb, "nodes": lambda r: r.nodes,
        "all ms": lambda r: r.latency_ms.get("all"), "none ms": lambda r: r.latency_ms.get("none"),
    }
    ratios = {r.tool: {m: _ratio(get(ours), get(r)) for m, get in metrics.items()}
              for r in results if r.tool not in (OURS, ORIGINAL) and not r.error}
    orig = by[ORIGINAL].latency_ms
    ratios[ORIGINAL] = {
        "onnxopt none / original ext": _ratio(ours.latency_ms.get("none"), orig.get("ext")),
        "onnxopt all / original all": _ratio(ours.latency_ms.get("all"), orig.get("all")),
    }
    return ratios


def bench_model(path: Path, tools: Sequence[Tool], args: argparse.Namespace, work: Path) -> ModelReport:
    model = load_model(path, check=False)  # a one-line UnsupportedModelError for a file that is not a model
    samples = load_samples(model, args.data, args.shapes, args.max_samples)
    # the original first: a model that onnxruntime cannot run is skipped before any tool runs
    original, orig_sessions, ref = load_result(ORIGINAL, path, ORIGINAL_LEVELS, samples)
    outcomes = optimize_all(tools, path, work, args.tool_repeat, args.timeout)
    results, sessions = [original], {(ORIGINAL, lvl): s for lvl, s in orig_sessions.items()}
    for tool in tools:
        outcome = outcomes[tool.name]
        result = Result(tool.name, error=outcome.error)
        if outcome.output is not None and not outcome.error:
            try:
                result, tool_sessions, got = load_result(tool.name, outcome.output, TOOL_LEVELS, samples)
                result.output_errors = output_errors(ref, got)
                result.max_abs = max((e["max_abs"] for e in result.output_errors.values()), default=0.0)
                result.rel_l2 = max((e["rel_l2"] for e in result.output_errors.values()), default=0.0)
                sessions |= {(tool.name, lvl): s for lvl, s in tool_sessions.items()}
            except Exception as e:  # a tool's output is untrusted: any failure to read or run it is its cell
                result = Result(tool.name, error=f"output unusable: {type(e).__name__}: {_first_line(e)}")
        result.runs = len(outcome.runs)
        if outcome.runs:
            result.seconds = statistics.median(r.seconds for r in outcome.runs)
            result.peak_mb = statistics.median(r.peak_mb for r in outcome.runs)
        results.append(result)
    _progress(f"{path.stem}: timing {len(sessions)} sessions x {args.repeat} runs")
    latency, failed = time_sessions(sessions, samples[0], args.repeat)
    by = {r.tool: r for r in results}
    for (tool, lvl), ms in latency.items():
        by[tool].latency_ms[lvl] = ms
    for (tool, lvl), msg in failed.items():
        by[tool].notes.append(f"ORT {lvl} failed: {msg}")
    inputs = {k: list(v.shape) for k, v in samples[0].items()}
    return ModelReport(path.name, inputs, len(samples), results, compute_ratios(results))


# ---------------------------------------------------------------- output


def format_report(report: ModelReport, top_ops: int) -> str:
    """The whole per-model printout: results table, op-count table, ratios, notes."""

    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    inputs = " ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in report.inputs.items())
    lines = [f"== {report.model}  ({inputs}, {report.samples} sample(s))"]
    rows = [[*COLUMNS, *(f"{x} ms" for x in LEVELS)]]
    for r in report.results:
        if r.error:
            rows.append([r.tool, f"error: {r.error[:100]}"])
            continue
        ms = r.latency_ms
        rows.append([r.tool, num(r.seconds, ".2f"), num(r.peak_mb, ".0f"), str(r.nodes),
                     num(r.file_mb, ".2f"), num(r.max_abs, ".1e"), num(r.rel_l2, ".1e"),
                     *(num(ms.get(lvl), ".3f") for lvl in LEVELS)])
    lines += _grid(rows)
    ok = [r for r in report.results if not r.error]
    ops = [op for op, _ in sum((Counter(r.ops) for r in ok), Counter()).most_common(top_ops)]
    op_rows = [["op", *(r.tool for r in ok)]] + [[op, *(str(r.ops.get(op, 0)) for r in ok)] for op in ops]
    lines += ["", *_grid(op_rows), ""]
    if not report.ratios:
        lines.append("onnxopt has no result: no ratios")
    for tool, ratios in report.ratios.items():
        prefix = "" if tool == ORIGINAL else f"onnxopt vs {tool}: "
        lines.append(prefix + "  ".join(f"{m} {num(v, '.2f')}x" for m, v in ratios.items()))
    lines += [f"note: {r.tool}: {n}" for r in report.results for n in r.notes]
    return "\n".join(lines)


def _grid(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-align the first column, right-align the others; short rows (errors) run on unaligned."""
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows if len(r) == n) for i in range(n)]
    out = []
    for r in rows:
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)] if len(r) == n else r[1:]
        out.append("  ".join([r[0].ljust(widths[0]), *rest]))
    return out


def environment(tools: Sequence[Tool]) -> dict[str, object]:
    versions = {}
    for dist in ["onnxopt", "onnx", "onnxruntime", *(t.name for t in tools if t.name != OURS)]:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as d:
        floor = run_measured([sys.executable, "-c", "pass"], Path(d), 60).peak_mb
    return {"versions": versions, "python": platform.python_version(), "machine": platform.machine(),
            "memory_floor_mb": floor}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- command line


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"bad --shape {text!r}; expected name:1x3x224x224")
    return name, shape


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="ONNX models (default: models/*.onnx)")
    p.add_argument("--data", type=Path, help="npz keyed by input name, first axis = samples")
    p.add_argument("--max-samples", type=int, default=64, help="samples of --data used for the errors")
    p.add_argument("--shape", action="append", type=parse_shape, default=[],
                   help="input shape for generated inputs, name:1x3x224x224 (repeatable)")
    p.add_argument("--repeat", type=int, default=20, help="timed ORT runs per session (median)")
    p.add_argument("--tool-repeat", type=int, default=3, help="runs of each tool (median)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per tool run")
    p.add_argument("--tools", default=",".join(t.name for t in TOOLS), help="comma-separated subset of tools")
    p.add_argument("--top-ops", type=int, default=8, help="ops shown in the op-count table")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    names = args.tools.split(",")
    unknown = sorted(set(names) - {t.name for t in TOOLS})
    if unknown:
        p.error(f"unknown tools {unknown}; choose from {[t.name for t in TOOLS]}")
    if min(args.repeat, args.tool_repeat, args.max_samples) < 1 or args.timeout <= 0:
        p.error("--repeat, --tool-repeat and --max-samples must be >= 1, --timeout > 0")
    args.tools = [t for t in TOOLS if t.name in names]
    args.shapes = dict(args.shape)
    args.models = args.models or sorted((REPO / "models").glob("*.onnx"))
    if not args.models:
        p.error("no models given and none in models/")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args.tools)
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench_lossless_") as tmp:
        for i, path in enumerate(args.models):
            try:
                report = bench_model(path, args.tools, args, Path(tmp) / f"{i}_{path.stem}")
            except (OnnxoptError, OSError, onnx.checker.ValidationError) as e:
                print(f"== {path.name}: skipped: {e}\n", flush=True)
                continue
            reports.append(report)
            print(format_report(report, args.top_ops) + "\n", flush=True)
    versions = "  ".join(f"{k} {v or 'missing'}" for k, v in env["versions"].items())
    print(f"{versions}\nmemory floor (bare interpreter through the wrapper): {env['memory_floor_mb']:.0f} MB")
    if args.json:
        skip = ("tools", "models", "shape", "shapes")
        settings = {k: str(v) for k, v in vars(args).items() if k not in skip}
        settings |= {"tools": [t.name for t in args.tools], "models": [str(m) for m in args.models],
                     "shapes": {k: list(v) for k, v in args.shapes.items()}}
        payload = {"environment": env, "args": settings,
                   "models": [asdict(r) for r in reports]}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
