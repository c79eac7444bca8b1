"""The -O1 preset on every bundled sample model (models/), with its own sample data."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import data, presets, runtime, validate
from onnxopt.optimizer import optimize_model

MODELS = Path(__file__).resolve().parent.parent / "models"
SAMPLES = sorted(MODELS.glob("*.onnx"))


def sample_data(path: Path) -> Path:
    own = MODELS / f"{path.stem}.calib.npz"
    return own if own.exists() else MODELS / f"{path.stem.split('_opset')[0]}.calib.npz"


@pytest.fixture(scope="module", params=SAMPLES, ids=lambda p: p.stem)
def optimized(request):
    model = onnx.load(request.param)
    feeds = data.load_feeds(sample_data(request.param), model)
    result = optimize_model(model, presets.pass_names("O1"), verify_feeds=feeds, strict=True)
    return model, result, feeds


def test_sample_models_exist():
    assert {p.stem for p in SAMPLES} >= {"digits_cnn", "inception_block", "tiny_bert", "crnn_ocr"}


@pytest.mark.slow
def test_outputs_stay_within_float_tolerance(optimized):
    model, result, feeds = optimized
    report = validate.compare(model, result.model, feeds)
    assert report, report.summary()
    assert all(o.rel_l2 <= 1e-5 for o in report.outputs), report.summary()


@pytest.mark.slow
def test_no_batchnorm_left_and_fewer_nodes(optimized):
    model, result, _ = optimized
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert "BatchNormalization" not in ops
    assert len(result.model.graph.node) < len(model.graph.node)
    assert not [r for r in result.records if r.error]


@pytest.mark.slow
def test_optimizing_twice_changes_nothing(optimized):
    _, result, _ = optimized
    again = optimize_model(result.model, presets.pass_names("O1"), strict=True)
    assert len(again.model.graph.node) == len(result.model.graph.node)
    assert not any(r.modified for r in again.records)


@pytest.mark.slow
def test_digits_cnn_keeps_its_test_accuracy():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    images = np.load(MODELS / "digits_cnn.test.npz")["image"]
    labels = np.load(MODELS / "digits_cnn.test_labels.npy")
    opt = onnxopt.optimize(model)
    # Exporter chain, BN, Dropout all gone: Conv-Relu x2, MaxPool, Reshape, Gemm-Relu-Gemm (onnxslim: 9 too).
    assert [n.op_type for n in opt.graph.node] == ["Conv", "Relu", "Conv", "Relu", "MaxPool", "Reshape",
                                                   "Gemm", "Relu", "Gemm"]
    accuracy = {}
    for name, m in (("before", model), ("after", opt)):
        logits = runtime.run(runtime.session(m), {"image": images})["logits"]
        accuracy[name] = float(np.mean(logits.argmax(1) == labels))
    assert accuracy["after"] == accuracy["before"] >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_bert_opset17"])
def test_bert_qkv_projections_become_one_matmul_per_layer(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    opt = onnxopt.optimize(model)
    const = {t.name for t in opt.graph.initializer}
    weight_matmuls = Counter(n.input[0] for n in opt.graph.node if n.op_type == "MatMul" and n.input[1] in const)
    before = Counter(n.input[0] for n in model.graph.node if n.op_type == "MatMul"
                     and n.input[1] in {t.name for t in model.graph.initializer})
    assert max(before.values()) == 3  # q, k, v read the same tensor in each of the 2 layers
    assert max(weight_matmuls.values()) == 1
    assert sum(weight_matmuls.values()) == sum(before.values()) - 4


@pytest.mark.slow
def test_inception_reductions_that_stay_split_are_not_merged():
    """Only b1 goes straight into the Concat; the other 1x1 convs feed 3x3/5x5 convs (GoogLeNet's
    layout). Merging them would leave a Split, measured slower on onnxruntime, so none is merged."""
    model = onnx.load(MODELS / "inception_block.onnx")
    opt = onnxopt.optimize(model)
    ops = Counter(n.op_type for n in opt.graph.node)
    assert ops["Conv"] == Counter(n.op_type for n in model.graph.node)["Conv"] and "Split" not in ops


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_bert", "inception_block", "crnn_ocr"])
def test_output_is_byte_identical_across_processes(name, tmp_path):
    """Separate processes with different string-hash seeds: set or dict ordering must not leak out."""
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-m", "onnxopt", str(MODELS / f"{name}.onnx"), "-o", str(out),
                        "--no-validate", "-q"], check=True, env=env)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
