#!/usr/bin/env python
"""int8 benchmark: onnxopt --int8 against onnxruntime.quantization.quantize_static, in one run.

    python benchmarks/bench_int8.py [MODEL.onnx ...] [--calib C.npz] [--test T.npz] [--labels L.npy]
                                    [--samples 64] [--pool-mask attention_mask] [--json out.json]

For each model (default: every models/*.onnx that has a .calib.npz beside it), both tools quantize
it with each calibration method (entropy, minmax, percentile) on the same calibration samples:
- onnxopt: ``onnxopt IN -o OUT --int8 --calibrate CALIB --calibration-samples N
  --calibration-method M --no-validate -q``;
- ORT: ``quant_pre_process(IN -> pre.onnx)`` once, then ``quantize_static(pre.onnx -> OUT)`` per
  method (QDQ, per_channel=True, activations QUInt8, weights QInt8), fed the same batches onnxopt
  calibrates on. Models below opset 13 are also run through ORT after converting them to opset 13
  with onnx.version_converter (rows "ORT(op13)"); the plain rows get no help.
Every run is its own subprocess, measured for wall time and peak RSS the way bench_lossless.py
does (a wrapper reaps it with os.wait4), with a timeout and an RSS cap. Every result is then
loaded in onnxruntime (1 thread, ORT_ENABLE_ALL) beside the float model: file size, latency
(median of interleaved runs), and accuracy of the first output against float on held-out samples
(cosine, top-1 agreement for 2-D logits, argmax-sequence agreement for 3-D outputs, accuracy
against labels). A failure of either tool is a result: its error text goes in the table.

Inside the same runs, each tool's calibration step alone is timed too (the "cal-only s" column):
onnxopt's from its --report JSON (seconds.calibrate: the calibrate() call, from the calibration
session to the ranges); ORT's by wrapping, in the child script, the create_calibrator that
quantize_static calls, so that the calibrator's creation (augmented model, session), collect_data
and compute_data are timed. Both include reading the calibration batches, which both tools do
lazily during inference.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# shared with the lossless benchmark (same folder, so importable when this file is run as a script)
from bench_lossless import MB, Run, _console_script, _grid, _last_line, _progress, count_ops, model_bytes
from bench_lossless import time_sessions as _time_sessions
from onnx import version_converter

from onnxopt.data import iter_feeds
from onnxopt.errors import OnnxoptError
from onnxopt.runtime import real_inputs

REPO = Path(__file__).resolve().parents[1]
METHODS = ("entropy", "minmax", "percentile")
ORT_METHOD = {"entropy": "Entropy", "minmax": "MinMax", "percentile": "Percentile"}
FLOAT, OURS, ORT, ORT13 = "float", "onnxopt", "ORT", "ORT(op13)"
NO_PRE = {ORT: "ORT(no pre)", ORT13: "ORT(op13,no pre)"}  # quantize_static straight on the model
ORT_LABELS = (ORT, NO_PRE[ORT], ORT13, NO_PRE[ORT13])
PER_CHANNEL_OPSET = 13  # per-channel DequantizeLinear (axis attribute) needs opset 13
LATENCY_SLACK = 1.05  # "no slower": within 5 %, the noise of single-thread timings on a shared machine
COSINE_SLACK = 1e-4  # "equal or better" accuracy: cosines equal to 4 decimals count as equal
# ops that run integer kernels in onnxruntime's optimized graph, and float compute ops left in it
INT8_OPS = {"QGemm", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul"}
FLOAT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv",
             "Attention", "MultiHeadAttention"}

# Runs argv as its own child and writes that child's wait4 rusage to a JSON file (as in
# bench_lossless.py), plus a watchdog that kills the child's process group when its RSS passes a
# cap, so that a runaway calibration (ORT's entropy method keeps every activation of every
# sample) fails as a result instead of taking the machine down. The watchdog polls
# /proc/PID/status every 50 ms (Linux only); ru_maxrss still reports the true high-water mark.
_WRAPPER = r"""
import json, os, signal, subprocess, sys, threading, time
report, timeout, cap, argv = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
killed, done = [], threading.Event()
def kill(why):
    killed.append(why)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
def watch():
    while not done.is_set():
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
        except OSError:
            return
        if cap and rss > cap:
            return kill("memory")
        done.wait(0.05)
start = time.perf_counter()
proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
timer = threading.Timer(timeout, kill, ("timeout",))
timer.start()
threading.Thread(target=watch, daemon=True).start()
try:
    _, status, usage = os.wait4(proc.pid, 0)
except BaseException:
    kill("interrupted")
    raise
seconds = time.perf_counter() - start
done.set()
timer.cancel()
scale = 1 if sys.platform == "darwin" else 1024
with open(report, "w") as f:
    json.dump({"seconds": seconds, "peak_bytes": usage.ru_maxrss * scale,
               "exit_code": os.waitstatus_to_exitcode(status), "killed": killed[0] if killed else None}, f)
"""

_ORT_PRE_PROCESS = r"""
import sys
from onnxruntime.quantization.shape_inference import quant_pre_process
quant_pre_process(sys.argv[1], sys.argv[2])
"""

# The calibration reader yields the batches stored in an npz as "b0000__input_name" keys, read
# lazily, one batch at a time: the same batches onnxopt's data loader feeds its calibration.
# quantize_static calls the create_calibrator of its own module (onnxruntime 1.32:
# onnxruntime.quantization.quantize), then the calibrator's collect_data and compute_data, and
# nothing else between the model it wrote for calibration and the tensor ranges. The script wraps
# that name there, times the three calls and writes their seconds to a JSON file after
# quantize_static returns. If a later onnxruntime moves the name, the file stays empty and the
# bench shows "-" with a note.
_ORT_QUANTIZE = r"""
import json, sys, time
import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
src, dst, data, method, timing = sys.argv[1:6]
qmod = sys.modules["onnxruntime.quantization.quantize"]  # the package's "quantize" is a function
spent = {}
def timed(key, fn):
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
    return call
create = getattr(qmod, "create_calibrator", None)
def create_calibrator(*args, **kwargs):
    calibrator = timed("create_calibrator", create)(*args, **kwargs)
    calibrator.collect_data = timed("collect_data", calibrator.collect_data)
    calibrator.compute_data = timed("compute_data", calibrator.compute_data)
    return calibrator
if create is not None:
    qmod.create_calibrator = create_calibrator
class Batches(CalibrationDataReader):
    def __init__(self, path):
        self.npz = np.load(path)
        self.batches = sorted({k.split("__", 1)[0] for k in self.npz.files})
        self.i = 0
    def get_next(self):
        if self.i >= len(self.batches):
            return None
        prefix = self.batches[self.i] + "__"
        self.i += 1
        return {k[len(prefix):]: self.npz[k] for k in self.npz.files if k.startswith(prefix)}
    def rewind(self):
        self.i = 0
quantize_static(src, dst, Batches(data), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[method])
with open(timing, "w") as f:
    json.dump(spent, f)
"""
ORT_STEPS = ("create_calibrator", "collect_data", "compute_data")


@dataclass
class Result:
    """One row: the float model, or one tool's int8 output for one method."""

    name: str  # "onnxopt entropy", "ORT(op13) minmax", "float", "ORT quant_pre_process"
    tool: str
    method: str | None = None
    seconds: float | None = None  # wall time of the run (ORT rows: quantize_static alone)
    peak_mb: float | None = None  # peak RSS of the run (ORT rows: quantize_static alone)
    cal_seconds: float | None = None  # the calibration step alone, timed inside that run
    pre_seconds: float | None = None  # ORT rows: the quant_pre_process run they start from
    pre_peak_mb: float | None = None
    error: str | None = None
    loads: bool | None = None
    size_mb: float | None = None
    latency_ms: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None
    top1: float | None = None  # agreement with float's argmax, 2-D outputs
    seq: float | None = None  # fraction of samples whose per-position argmax matches float's, 3-D outputs
    acc: float | None = None  # accuracy against --labels
    int8_ops: int | None = None  # integer-kernel nodes in onnxruntime's optimized graph
    float_ops: int | None = None  # Conv/MatMul/Gemm-like nodes still in float there
    qdq_left: int | None = None  # QuantizeLinear/DequantizeLinear nodes left there
    ops: dict[str, int] = field(default_factory=dict)  # op counts of onnxruntime's optimized graph
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelReport:
    model: str
    opset: int
    inputs: dict[str, list[int]]
    calib: str
    calib_samples: int
    test: str
    test_samples: int
    pooled: bool
    results: list[Result]
    ratios: dict[str, dict[str, dict[str, float | None]]]  # method -> ORT variant -> metric -> ratio
    verdicts: list[str]


@dataclass
class Data:
    calib: Path  # npz holding exactly the calibration samples, given to onnxopt
    ort_batches: Path  # the same samples as the batches onnxopt's loader makes, for ORT's reader
    calib_samples: int
    calib_source: str
    test: list[dict[str, np.ndarray]]  # held-out samples, one inference each
    test_source: str
    labels: np.ndarray | None


# ---------------------------------------------------------------- running the tools


def run_measured(argv: Sequence[str], run_dir: Path, timeout: float, cap_mb: float) -> Run:
    """Run argv through the wrapper. Time and peak are kept even for a failed run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    report, log = run_dir / "rusage.json", run_dir / "log.txt"
    wrapper = [sys.executable, "-c", _WRAPPER, str(report), str(timeout), str(int(cap_mb * MB))]
    with open(log, "wb") as out:
        try:
            # cwd: quant_pre_process leaves sym_shape_infer_temp.onnx and *.data files in it when it fails
            subprocess.run([*wrapper, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=run_dir,
                           timeout=timeout + 60, check=False)
        except subprocess.TimeoutExpired:
            return Run(error=f"measurement wrapper hung past {timeout + 60:g} s")
    if not report.exists():
        return Run(error=f"measurement wrapper failed: {_last_line(log)}")
    usage = json.loads(report.read_text())
    run = Run(seconds=usage["seconds"], peak_mb=usage["peak_bytes"] / MB)
    if usage["killed"] == "memory":
        run.error = f"killed at the {cap_mb / 1024:g} GB RSS cap after {run.seconds:.0f} s ({_last_line(log)})"
    elif usage["killed"]:
        run.error = f"{usage['killed']} after {timeout:g} s"
    elif usage["exit_code"] != 0:
        run.error = f"exit {usage['exit_code']}: {error_line(log)}"
    return run


def error_text(e: BaseException) -> str:
    """An exception's first line, long enough to keep onnxruntime's whole message."""
    text = str(e).strip()
    return text.splitlines()[0][:1000] if text else type(e).__name__


def error_line(log: Path) -> str:
    """The last line of the log, with the exception line of the last Python traceback in it when the
    log does not end with that line (onnxopt prints a one-line summary after its traceback)."""
    lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "no output"
    last = lines[-1].strip()[:400]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:
        # frames are indented; the exception line is the first unindented line after the header
        exc = next((ln for ln in lines[starts[-1] + 1 :] if not ln[0].isspace()), None)
        if exc and exc.strip()[:400] != last:
            return f"{last} [{exc.strip()[:400]}]"
    return last


def onnxopt_argv(src: Path, dst: Path, calib: Path, n: int, method: str) -> list[str]:
    return [*_console_script("onnxopt"), str(src), "-o", str(dst), "--int8", "--calibrate", str(calib),
            "--calibration-samples", str(n), "--calibration-method", method, "--no-validate", "-q",
            "--report", str(dst.parent / STEP_FILE[OURS])]


STEP_FILE = {OURS: "report.json", ORT: "calibration_seconds.json"}  # beside the run's model


def calibration_seconds(tool: str, run_dir: Path) -> tuple[float | None, str | None]:
    """The calibration step's seconds that a tool run wrote in run_dir, or None and why not."""
    path = run_dir / STEP_FILE[OURS if tool == OURS else ORT]
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"calibration step not timed: {path.name}: {error_text(e)}"
    if tool == OURS:
        value = doc.get("seconds", {}).get("calibrate")
        return (value, None) if value is not None else (None, "calibration step not timed: no seconds.calibrate")
    missing = [k for k in ORT_STEPS if k not in doc]
    if missing:
        return None, f"calibration step not timed: quantize_static never called {', '.join(missing)}"
    return sum(doc[k] for k in ORT_STEPS), None


def pre_process_all(path: Path, model: onnx.ModelProto, args: argparse.Namespace, work: Path
                    ) -> tuple[list[Result], dict[str, Path | str]]:
    """ORT's variants and the model quantize_static reads in each (or why it has none).

    "ORT" is the model as given and "ORT(op13)", for models below opset 13, the model converted to
    opset 13 first. Each goes through quant_pre_process, as onnxruntime's documentation asks. Where
    that fails, the variant's rows show the failure, and a "no pre" variant quantizes the same model
    without pre-processing (the step is optional), so that quantize_static itself is still measured.
    """
    variants: dict[str, Path | str] = {ORT: path}
    if opset_of(model) < PER_CHANNEL_OPSET:
        variants[ORT13] = convert_opset13(path, work / "op13.onnx")
    rows, sources = [], {}
    for label, src in variants.items():
        if isinstance(src, str):  # the conversion itself failed
            rows.append(Result(f"{label} opset conversion", label, error=src))
            sources[label] = src
            continue
        dst = work / label / "pre.onnx"
        run = run_measured([sys.executable, "-c", _ORT_PRE_PROCESS, str(src), str(dst)], work / label / "pre",
                           args.timeout, args.mem_cap_gb * 1024)
        if run.error is None and not dst.exists():
            run.error = "exited 0 but wrote no model"
        _progress(f"{path.stem}: {label} quant_pre_process: " + (run.error or cost(run)))
        rows.append(Result(f"{label} quant_pre_process", label, seconds=run.seconds, peak_mb=run.peak_mb,
                           error=run.error))
        sources[label] = f"quant_pre_process failed: {run.error}" if run.error else dst
        if run.error:
            sources[NO_PRE[label]] = src
    return rows, sources


def quantize_all(path: Path, model: onnx.ModelProto, data: Data, args: argparse.Namespace, work: Path
                 ) -> tuple[list[Result], dict[str, Path]]:
    """Every (tool, method) run once; methods interleaved so that load drift hits both tools alike."""
    results, sources = pre_process_all(path, model, args, work)
    pre = {r.tool: r for r in results}
    outputs = {}
    for method in args.methods:
        for label in (OURS, *sources):
            name = f"{label} {method}"
            dst = work / name.replace(" ", "_").replace(",", "_") / "model.onnx"
            src = sources.get(label)
            if label == OURS:
                argv = onnxopt_argv(path, dst, data.calib, data.calib_samples, method)
            elif isinstance(src, str):
                argv = None
            else:
                argv = [sys.executable, "-c", _ORT_QUANTIZE, str(src), str(dst), str(data.ort_batches),
                        ORT_METHOD[method], str(dst.parent / STEP_FILE[ORT])]
            run = run_measured(argv, dst.parent, args.timeout, args.mem_cap_gb * 1024) if argv else Run(error=src)
            if run.error is None and not dst.exists():
                run.error = "exited 0 but wrote no model"
            _progress(f"{path.stem}: {name}: " + (run.error or cost(run)))
            result = Result(name, label, method, seconds=run.seconds, peak_mb=run.peak_mb, error=run.error)
            if argv and run.error is None:
                result.cal_seconds, why = calibration_seconds(label, dst.parent)
                result.notes += [why] if why else []
            if label in pre:
                result.pre_seconds, result.pre_peak_mb = pre[label].seconds, pre[label].peak_mb
            results.append(result)
            if run.error is None:
                outputs[name] = dst
    return results, outputs


def cost(run: Run) -> str:
    return f"{run.seconds:.1f} s, {run.peak_mb:.0f} MB"


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset13(path: Path, dst: Path) -> Path | str:
    """The model at opset 13 (onnx's version converter, untimed: it is help ORT does not give itself),
    or the converter's error text."""
    try:
        converted = version_converter.convert_version(onnx.load(str(path)), PER_CHANNEL_OPSET)
        dst.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(converted, str(dst))
        return dst
    except Exception as e:  # the converter raises RuntimeError, ValidationError and others
        return f"onnx.version_converter to opset 13 failed: {type(e).__name__}: {error_text(e)}"


# ---------------------------------------------------------------- data


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.stem + suffix)


def prepare_data(path: Path, model: onnx.ModelProto, args: argparse.Namespace, work: Path) -> Data:
    """Calibration and held-out samples: --calib/--test/--labels, else MODEL.calib.npz, MODEL.test.npz
    and MODEL.test_labels.npy beside the model; without test data, the second half of calib is held
    out and only the first half calibrates."""
    calib_path = args.calib or sibling(path, ".calib.npz")
    test_path = args.test or (sibling(path, ".test.npz") if sibling(path, ".test.npz").exists() else None)
    arrays = read_npz(calib_path)
    count = len(next(iter(arrays.values())))
    labels = None
    if test_path is not None:
        test_arrays, test_source = read_npz(test_path), test_path.name
        label_path = args.labels or sibling(path, ".test_labels.npy")
        labels = np.load(label_path) if (args.labels or label_path.exists()) else None
    else:
        if count < 2:
            raise OnnxoptError(f"{calib_path}: {count} sample(s), too few to hold half out")
        half = count // 2
        test_arrays = {k: v[half:] for k, v in arrays.items()}
        arrays = {k: v[:half] for k, v in arrays.items()}
        count, test_source = half, f"second half of {calib_path.name}"
    n = min(args.samples, count)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.npz"
    np.savez(calib, **{k: v[:n] for k, v in arrays.items()})
    batches = list(iter_feeds(calib, model, n))  # the batches onnxopt's calibration will see
    ort_batches = work / "ort_batches.npz"
    np.savez(ort_batches, **{f"b{i:04d}__{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    test_file = work / "test.npz"
    np.savez(test_file, **test_arrays)
    test = [s for batch in iter_feeds(test_file, model) for s in split_batch(batch, model)]
    if labels is not None and len(labels) != len(test):
        raise OnnxoptError(f"{len(labels)} labels for {len(test)} held-out samples")
    source = f"{n} of {calib_path.name}" + (" (first half)" if test_path is None else "")
    return Data(calib, ort_batches, n, source, test, test_source, labels)


def split_batch(batch: Mapping[str, np.ndarray], model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Batch-1 samples where the batch axis is dynamic or 1; a static batch stays whole."""
    dims = [vi.type.tensor_type.shape.dim for vi in real_inputs(model)]
    if any(d and d[0].HasField("dim_value") and d[0].dim_value > 1 for d in dims):
        return [dict(batch)]
    n = len(next(iter(batch.values())))
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]


# ---------------------------------------------------------------- measuring the results


def session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def first_output(sess: ort.InferenceSession, name: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in sess.get_outputs()]
    return sess.run([name if name in names else names[0]], dict(feeds))[0]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mean of [B, T, H] hidden states over the positions the mask keeps."""
    m = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def accuracy(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], pooled: bool, labels: np.ndarray | None
             ) -> dict[str, float | None]:
    """Per-sample cosine (mean, min) of the first output against float, and the argmax agreements."""
    cos = [cosine(r, g) for r, g in zip(ref, got, strict=True)]
    out = {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)), "top1": None, "seq": None, "acc": None}
    if ref[0].ndim == 2 and not pooled:  # logits [batch, classes]
        agree = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got, strict=True)])
        out["top1"] = float(agree.mean())
        if labels is not None:
            out["acc"] = float((np.concatenate([g.argmax(-1) for g in got]) == labels.ravel()).mean())
    elif ref[0].ndim == 3 and not pooled:  # per-position class scores (CTC): the whole sequence must match
        out["seq"] = float(np.mean([np.array_equal(r.argmax(-1), g.argmax(-1)) for r, g in zip(ref, got, strict=True)]))
    return out


def outputs(sess: ort.InferenceSession, name: str, data: Data, mask: str | None) -> list[np.ndarray]:
    got = [first_output(sess, name, s) for s in data.test]
    if mask:
        got = [mean_pool(g, s[mask]) for g, s in zip(got, data.test, strict=True)]
    return got


def graph_counts(path: Path, result: Result) -> None:
    """Op counts of onnxruntime's optimized graph: int8 kernels, float compute ops and Q/DQ left."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # saving the optimized graph is best effort in onnxruntime
        result.notes.append(f"optimized graph unreadable: {error_text(e)}")
        return
    ops = count_ops(graph)
    bare = Counter()
    for op, n in ops.items():
        bare[op.rpartition(":")[2]] += n
    result.ops = dict(ops.most_common())
    result.int8_ops = sum(n for op, n in bare.items() if op.startswith("QLinear") or "Integer" in op or op in INT8_OPS)
    result.float_ops = sum(n for op, n in bare.items() if op in FLOAT_OPS)
    result.qdq_left = bare["QuantizeLinear"] + bare["DequantizeLinear"]


def measure(result: Result, path: Path, data: Data, ref: list[np.ndarray] | None, out_name: str,
            mask: str | None, work: Path) -> tuple[ort.InferenceSession | None, list[np.ndarray] | None]:
    """Load, run on the held-out samples and compare with float; errors go into the result."""
    model = onnx.load(str(path), load_external_data=False)
    result.size_mb = model_bytes(path, model) / MB
    optimized = work / f"{result.name.replace(' ', '_')}.ort.onnx"
    try:
        sess = session(path, optimized)
    except Exception as e:  # onnxruntime has its own exception types for every load failure
        result.loads, result.error = False, f"output does not load: {error_text(e)}"
        return None, None
    try:
        got = outputs(sess, out_name, data, mask)
    except Exception as e:
        result.loads, result.error = False, f"output loads but does not run: {error_text(e)}"
        return None, None
    result.loads = True
    graph_counts(optimized, result)
    if ref is not None:
        try:
            for key, value in accuracy(ref, got, mask is not None, data.labels).items():
                setattr(result, key, value)
        except ValueError as e:  # a changed output shape
            result.notes.append(f"not comparable with float: {error_text(e)}")
    elif data.labels is not None and got[0].ndim == 2:
        result.acc = accuracy(got, got, False, data.labels)["acc"]
    return sess, got


def time_sessions(sessions: Mapping[str, ort.InferenceSession], feeds: Mapping[str, np.ndarray], repeat: int,
                  results: Mapping[str, Result]) -> None:
    latency, failed = _time_sessions(sessions, feeds, repeat)
    for name, ms in latency.items():
        results[name].latency_ms = ms
    for name, msg in failed.items():
        results[name].notes.append(f"latency run failed: {msg}")


# ---------------------------------------------------------------- ratios and verdict


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def usable(r: Result | None) -> bool:
    return r is not None and not r.error and bool(r.loads)


def compute_ratios(by: Mapping[str, Result], methods: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """onnxopt / ORT per method and ORT variant (< 1: onnxopt better): calibration time and peak memory
    against quantize_static alone and with its quant_pre_process run, the calibration step alone, and
    int8 latency."""
    out = {}
    for m in methods:
        ours = by.get(f"{OURS} {m}")
        out[m] = {}
        for variant in ORT_LABELS:
            theirs = by.get(f"{variant} {m}")
            if not usable(ours) or not usable(theirs):
                continue
            r = {"time": _ratio(ours.seconds, theirs.seconds),
                 "cal-only time": _ratio(ours.cal_seconds, theirs.cal_seconds),
                 "peak": _ratio(ours.peak_mb, theirs.peak_mb)}
            if theirs.pre_seconds is not None:  # the cost of ORT's whole documented flow
                r["time incl. pre"] = _ratio(ours.seconds, theirs.seconds + theirs.pre_seconds)
                r["peak incl. pre"] = _ratio(ours.peak_mb, max(theirs.peak_mb, theirs.pre_peak_mb))
            out[m][variant] = r | {"latency": _ratio(ours.latency_ms, theirs.latency_ms)}
    return out


def verdict(by: Mapping[str, Result], variant: str) -> str | None:
    """The issue's four claims for onnxopt entropy against one ORT variant's entropy."""
    ours, theirs = by.get(f"{OURS} entropy"), by.get(f"{variant} entropy")
    if ours is None or theirs is None:
        return None
    head = f"verdict, onnxopt entropy vs {variant} entropy:"
    if not usable(ours):
        return f"{head} FAIL: onnxopt failed ({ours.error})"
    if not usable(theirs):
        return f"{head} PASS by default: {variant} failed and onnxopt's output loads and runs"
    checks = []
    acc_ok, acc_txt = True, []
    for key in ("cos_mean", "top1", "seq", "acc"):
        a, b = getattr(ours, key), getattr(theirs, key)
        if a is not None and b is not None:
            slack = COSINE_SLACK if key == "cos_mean" else 0.0
            acc_ok &= a >= b - slack
            acc_txt.append(f"{key} {a:.4f} vs {b:.4f}")
    checks.append(f"accuracy >= ORT {pass_fail(acc_ok)} ({', '.join(acc_txt)})")
    speed = _ratio(theirs.seconds, ours.seconds)
    checks.append(f"calibration >= 5x faster {pass_fail(speed is not None and speed >= 5)} ({fmt(speed, '.1f')}x)")
    step = _ratio(theirs.cal_seconds, ours.cal_seconds)
    checks.append(f"calibration step >= 5x faster {pass_fail(step is not None and step >= 5)} ({fmt(step, '.1f')}x)")
    mem = _ratio(ours.peak_mb, theirs.peak_mb)
    checks.append(f"peak memory <= half {pass_fail(mem is not None and mem <= 0.5)} ({fmt(mem, '.2f')}x)")
    lat = _ratio(ours.latency_ms, theirs.latency_ms)
    checks.append(f"latency no slower {pass_fail(lat is not None and lat <= LATENCY_SLACK)} ({fmt(lat, '.2f')}x)")
    return f"{head} " + "; ".join(checks)


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------- one model


def bench_model(path: Path, args: argparse.Namespace, work: Path) -> ModelReport:
    model = onnx.load(str(path), load_external_data=False)
    data = prepare_data(path, model, args, work)
    mask = args.pool_mask if args.pool_mask in {vi.name for vi in real_inputs(model)} else None
    base = Result(FLOAT, FLOAT)
    base_sess, ref = measure(base, path, data, None, model.graph.output[0].name, None, work)
    if base_sess is None:
        raise OnnxoptError(f"the float model fails in onnxruntime: {base.error}")
    if mask and ref[0].ndim != 3:
        mask = None  # nothing to pool: compare the output as it is
    if mask:
        ref = [mean_pool(r, s[mask]) for r, s in zip(ref, data.test, strict=True)]
    results, produced = quantize_all(path, model, data, args, work)
    sessions = {FLOAT: base_sess}
    for r in results:
        if r.name in produced:
            sess, _ = measure(r, produced[r.name], data, ref, model.graph.output[0].name, mask, work)
            if sess is not None:
                sessions[r.name] = sess
    results = [base, *results]
    by = {r.name: r for r in results}
    _progress(f"{path.stem}: timing {len(sessions)} sessions x {args.repeat} runs")
    time_sessions(sessions, data.test[0], args.repeat, by)
    verdicts = [v for v in (verdict(by, label) for label in ORT_LABELS) if v]
    inputs = {k: list(v.shape) for k, v in data.test[0].items()}
    return ModelReport(path.name, opset_of(model), inputs, data.calib_source, data.calib_samples, data.test_source,
                       len(data.test), bool(mask), results, compute_ratios(by, args.methods), verdicts)


# ---------------------------------------------------------------- output

COLUMNS = ("result", "calib s", "cal-only s", "peak MB", "loads", "size MB", "ms", "x float", "cos mean", "cos min",
           "top-1", "seq", "acc", "int8 ops", "fp ops", "Q/DQ")


def format_report(report: ModelReport) -> str:
    inputs = " ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in report.inputs.items())
    pooled = ", cosine of mask-mean-pooled embeddings" if report.pooled else ""
    lines = [f"== {report.model}  (opset {report.opset}, {inputs}; calibration: {report.calib}; "
             f"held out: {report.test_samples} of {report.test}{pooled})"]
    base_ms = next(r.latency_ms for r in report.results if r.tool == FLOAT)
    rows, errors = [list(COLUMNS)], []
    for r in report.results:
        cost = [fmt(r.seconds, ".2f"), fmt(r.cal_seconds, ".2f"), fmt(r.peak_mb, ".0f")]
        if r.error:
            rows.append([r.name, *cost, "error: " + r.error[:110]])
            errors.append(f"error: {r.name}: {r.error}")
            continue
        if r.method is None and r.tool != FLOAT:  # the pre-processing row: cost only
            rows.append([r.name, *cost, *["" for _ in COLUMNS[len(cost) + 1 :]]])
            continue
        rows.append([r.name, *cost, {True: "yes", False: "no", None: "-"}[r.loads], fmt(r.size_mb, ".2f"),
                     fmt(r.latency_ms, ".2f"), fmt(_ratio(r.latency_ms, base_ms), ".2f"), fmt(r.cos_mean, ".4f"),
                     fmt(r.cos_min, ".4f"), fmt(r.top1, ".3f"), fmt(r.seq, ".3f"), fmt(r.acc, ".3f"),
                     fmt(r.int8_ops, "d"), fmt(r.float_ops, "d"), fmt(r.qdq_left, "d")])
    lines += _grid(rows)
    lines.append("")
    for method, variants in report.ratios.items():
        for variant, ratios in variants.items():
            parts = [f"{k} {fmt(v, '.2f')}x" for k, v in ratios.items()]
            lines.append(f"onnxopt/{variant} {method}: " + "  ".join(parts))
        if not variants:
            lines.append(f"onnxopt/ORT {method}: no ratios (a side failed)")
    lines += report.verdicts + errors
    lines += [f"note: {r.name}: {n}" for r in report.results for n in r.notes]
    return "\n".join(lines)


# imported once, unmeasured, before any timed run, so that neither tool's first run alone pays for
# reading its libraries from a cold disk cache (quant_pre_process imports torch when it is installed)
_WARM_UP = "import onnxopt.cli, onnxruntime.quantization, onnxruntime.quantization.shape_inference"


def environment() -> dict[str, object]:
    subprocess.run([sys.executable, "-c", _WARM_UP], capture_output=True, check=False)
    versions = {}
    for dist in ("onnxopt", "onnx", "onnxruntime", "numpy", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as d:
        floor = run_measured([sys.executable, "-c", "pass"], Path(d), 60, 0).peak_mb
    return {"versions": versions, "python": platform.python_version(), "machine": platform.machine(),
            "memory_floor_mb": floor}


# ---------------------------------------------------------------- command line


def default_models() -> list[Path]:
    return [p for p in sorted((REPO / "models").glob("*.onnx")) if sibling(p, ".calib.npz").exists()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="ONNX models (default: models/*.onnx with a .calib.npz)")
    p.add_argument("--calib", type=Path, help="calibration npz for every model (default: MODEL.calib.npz)")
    p.add_argument("--test", type=Path, help="held-out npz (default: MODEL.test.npz, else half of calib)")
    p.add_argument("--labels", type=Path, help="labels .npy for the held-out samples (default: MODEL.test_labels.npy)")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (both tools, the same ones)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--pool-mask", metavar="INPUT", default="attention_mask",
                   help="for models with this input and a 3-D first output, compare mask-mean-pooled embeddings "
                        "(default: attention_mask; '' to compare the raw output)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per session (median)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per tool run")
    p.add_argument("--mem-cap-gb", type=float, default=12.0, help="kill a tool run whose RSS passes this")
    p.add_argument("--keep", type=Path, help="keep every model written in this folder (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_intermixed_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods: choose from {','.join(METHODS)}")
    if min(args.samples, args.repeat) < 1 or args.timeout <= 0 or args.mem_cap_gb <= 0:
        p.error("--samples and --repeat must be >= 1, --timeout and --mem-cap-gb > 0")
    # absolute paths: every tool runs in its own folder
    args.models = [m.resolve() for m in args.models] or default_models()
    args.calib, args.test, args.labels = (p and p.resolve() for p in (args.calib, args.test, args.labels))
    if not args.models:
        p.error("no models given and none in models/ with a .calib.npz")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        root = args.keep or Path(tmp)
        for i, path in enumerate(args.models):
            try:
                report = bench_model(path, args, root / f"{i}_{path.stem}")
            except (OnnxoptError, OSError, ValueError, onnx.checker.ValidationError) as e:
                print(f"== {path.name}: skipped: {e}\n", flush=True)
                continue
            reports.append(report)
            print(format_report(report) + "\n", flush=True)
    versions = "  ".join(f"{k} {v or 'missing'}" for k, v in env["versions"].items())
    print(f"{versions}\nmemory floor (bare interpreter through the wrapper): {env['memory_floor_mb']:.0f} MB\n"
          "percentile method: each tool's default (onnxopt 99.99, onnxruntime 99.999)")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "models"}
        settings["models"] = [str(m) for m in args.models]
        args.json.write_text(json.dumps({"environment": env, "args": settings,
                                         "models": [asdict(r) for r in reports]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
