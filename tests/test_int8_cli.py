"""`onnxopt --int8`: the whole path on the bundled digits CNN, and its bad inputs."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import cli, runtime

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_cnn.calib.npz"
TEST = MODELS / "digits_cnn.test.npz"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr()


def accuracy(path) -> float:
    images = np.load(TEST)["image"]
    labels = np.load(MODELS / "digits_cnn.test_labels.npy")
    logits = runtime.run(runtime.session(str(path)), {"image": images})["logits"]
    return float(np.mean(logits.argmax(1) == labels))


@pytest.mark.slow
def test_int8_digits_keeps_test_accuracy_and_runs_int8_kernels(tmp_path, capsys):
    out, rep = tmp_path / "d8.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--data", TEST,
                    "--min-top1", "0.99", "--report", rep)
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    assert r["quantization"]["nodes_quantized"] == 6 and r["validation"]["passed"]
    assert r["validation"]["outputs"]["logits"]["top1"] >= 0.99
    assert accuracy(out) >= accuracy(DIGITS) - 0.005
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    assert r["after"]["size_bytes"] < r["before"]["size_bytes"] / 3  # int8 weights


@pytest.mark.slow
def test_calibration_cache_skips_calibration(tmp_path, capsys):
    cache = tmp_path / "ranges.json"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run(capsys, DIGITS, "-o", a, "--int8", "--calibrate", CALIB, "--calibration-cache", cache)[0] == 0
    assert json.loads(cache.read_text())["ranges"]
    # Second run: no --calibrate at all, the ranges come from the cache; same model bytes.
    assert run(capsys, DIGITS, "-o", b, "--int8", "--calibration-cache", cache, "--data", TEST)[0] == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_tensorrt_target_is_symmetric(tmp_path, capsys):
    out = tmp_path / "trt.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--target", "tensorrt")
    assert code == 0, io_.err
    model = onnx.load(out)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


@pytest.mark.slow
def test_missed_budget_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--min-cosine", "0.99999999")
    assert code == 1 and not out.exists() and "budget: cosine >= 0.99999999" in io_.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--int8"], "--int8 needs calibration samples"),
        (["--calibrate", str(CALIB)], "goes with --int8"),
        (["--int8", "--calibrate", str(TEST), "--min-cosine", "1.5"], "--min-cosine must be between 0 and 1"),
        (["--int8", "--calibrate", "{tmp}/wrong.npz"], "which the model does not take"),
        (["--int8", "--calibrate", str(CALIB), "--calibration-method", "magic"], "invalid choice"),
        (["--max-error", "0.1"], "--max-error goes with --factorize (per-layer error), --int8"),
        (["--int8", "--factorize", "--calibrate", str(CALIB), "--max-error", "0.1"], "is ambiguous"),
        (["--int8", "--calibrate", str(CALIB), "--max-error", "0"], "--max-error must be above 0"),
    ],
)
def test_int8_bad_input(argv, message, tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 1, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in io_.err and io_.err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("extra, rule", [([], "max error 0.05 "), (["--max-error", "0.2"], "max error 0.2 ")])
def test_max_error_stays_the_factorization_per_layer_error(extra, rule, tmp_path, capsys):
    """Without --int8, --max-error is the factorization's per-layer error, default unchanged; no output budget."""
    rep = tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", tmp_path / "f.onnx", "--factorize", "--calibrate", CALIB, *extra,
                    "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    assert r["factorization"]["rule"].startswith(rule) and r["validation"]["budget"]["max_rel_l2"] is None
