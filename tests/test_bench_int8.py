"""benchmarks/bench_int8.py's "cal-only s": each tool's calibration step, timed inside its own run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import cli, runtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
bench = pytest.importorskip("bench_int8")

DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_cnn.calib.npz"


def test_ort_script_times_create_collect_compute(tmp_path):
    """The wrapped create_calibrator is the one quantize_static calls: all three steps are timed and
    the model it writes is still a working int8 model."""
    images = np.load(CALIB)["image"][:32]
    batches = tmp_path / "batches.npz"
    np.savez(batches, b0000__image=images[:16], b0001__image=images[16:])
    out = tmp_path / "q.onnx"
    done = subprocess.run([sys.executable, "-c", bench._ORT_QUANTIZE, str(DIGITS), str(out), str(batches),
                           "Entropy", str(tmp_path / bench.STEP_FILE[bench.ORT])],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    spent = json.loads((tmp_path / bench.STEP_FILE[bench.ORT]).read_text())
    assert set(spent) == set(bench.ORT_STEPS) and all(v > 0 for v in spent.values())
    seconds, why = bench.calibration_seconds(bench.ORT13, tmp_path)
    assert why is None and seconds == pytest.approx(sum(spent.values()))
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}
    ref = runtime.run(runtime.session(str(DIGITS)), {"image": images})["logits"]
    got = runtime.run(runtime.session(str(out)), {"image": images})["logits"]
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.95


def test_onnxopt_report_has_calibrate_inside_quantize(tmp_path):
    out = tmp_path / "model.onnx"
    argv = bench.onnxopt_argv(DIGITS, out, CALIB, 32, "entropy")
    assert cli.main(argv[argv.index(str(DIGITS)):]) == 0
    seconds = json.loads((tmp_path / bench.STEP_FILE[bench.OURS]).read_text())["seconds"]
    assert 0 < seconds["calibrate"] <= seconds["quantize"]
    assert bench.calibration_seconds(bench.OURS, tmp_path) == (seconds["calibrate"], None)


def test_missing_step_timings_give_none_and_a_reason(tmp_path):
    seconds, why = bench.calibration_seconds(bench.OURS, tmp_path)
    assert seconds is None and "report.json" in why
    (tmp_path / bench.STEP_FILE[bench.ORT]).write_text(json.dumps({"collect_data": 1.0}))
    seconds, why = bench.calibration_seconds(bench.ORT, tmp_path)
    assert seconds is None and "create_calibrator, compute_data" in why
