"""`onnxopt --weight-form codebook|sparse`: ONNX-native weight forms, end to end, and their bad options."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt import cli, runtime
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS, CALIB, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz", MODELS / "digits_cnn.test.npz"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr()


def mlp() -> onnx.ModelProto:
    """x -> MatMul w1 (64x64) -> Relu -> MatMul w2 (64x32) -> y: two weights of at least 1024 elements."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return graphs.model(nodes, [("x", np.float32, ["N", 64])], [("y", np.float32, ["N", 32])],
                        [("w1", graphs.rand(64, 64, seed=1)), ("w2", graphs.rand(64, 32, seed=2))])


@pytest.fixture
def mlp_files(tmp_path):
    path, data = tmp_path / "mlp.onnx", tmp_path / "x.npz"
    onnx.save(mlp(), path)
    np.savez(data, x=graphs.rand(32, 64, seed=3))
    return path, data


def decoded(path: Path, name: str, data: Path) -> np.ndarray:
    """The value ``name`` takes when the model at ``path`` runs in onnxruntime (a weight the graph computes)."""
    m = onnx.load(path)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return runtime.run(runtime.session(m.SerializeToString()), {"x": np.load(data)["x"]})[name]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_codebook_form_is_uint8_indices_and_a_gather(mlp_files, tmp_path, capsys):
    path, data = mlp_files
    out, rep = tmp_path / "cb.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, path, "-o", out, "--weight-form", "codebook", "--data", data, "--max-error", "0.02",
                    "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    model = onnx.load(out)
    assert {n.op_type for n in model.graph.node} >= {"Gather", "Cast", "MatMul"}
    assert not {"w1", "w2"} & {t.name for t in model.graph.initializer}  # computed by the graph now
    assert sum(t.data_type == onnx.TensorProto.UINT8 for t in model.graph.initializer) == 2
    w1 = numpy_helper.to_array(next(t for t in mlp().graph.initializer if t.name == "w1"))
    got = decoded(out, "w1", data)
    assert len(np.unique(got)) <= 256 and 0 < rel_l2(w1, got) < 0.02  # shared to 8 bits, close
    r = json.loads(rep.read_text())
    wf = r["weight_form"]
    assert {n: (w["form"], w["bits"]) for n, w in wf["weights"].items()} == {"w1": ("codebook", 8),
                                                                             "w2": ("codebook", 8)}
    assert wf["model_bytes_after"] < wf["model_bytes_before"] / 2.5
    assert r["after"]["size_bytes"] == out.stat().st_size < path.stat().st_size / 2.5
    v = r["validation"]
    assert v["passed"] and v["budget"]["max_rel_l2"] == 0.02 and 0 < v["outputs"]["y"]["rel_l2"] <= 0.02
    assert "weight form codebook (--bits 8): 2 of 2 weights" in io_.out


def test_sparse_form_is_sparse_initializers(mlp_files, tmp_path, capsys):
    path, data = mlp_files
    out, rep = tmp_path / "sp.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, path, "-o", out, "--weight-form", "sparse", "--sparsity", "0.8", "--data", data,
                    "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    model = onnx.load(out)
    assert sorted(s.values.name for s in model.graph.sparse_initializer) == ["w1", "w2"]
    assert not model.graph.initializer and out.stat().st_size < 0.65 * path.stat().st_size
    original = {t.name: numpy_helper.to_array(t) for t in mlp().graph.initializer}
    sess = runtime.session(out.read_bytes())  # onnxruntime densifies them at load
    y = runtime.run(sess, {"x": np.load(data)["x"]})["y"]
    for s in model.graph.sparse_initializer:
        dense = np.zeros(np.prod(s.dims), np.float32)
        dense[numpy_helper.to_array(s.indices)] = numpy_helper.to_array(s.values)
        w = original[s.values.name].ravel()
        assert np.count_nonzero(dense) == round(0.2 * w.size)
        kept = dense != 0  # the largest magnitudes, their values all but exact
        assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()
        np.testing.assert_allclose(dense[kept], w[kept], rtol=1e-3, atol=1e-4)
    assert 0 < json.loads(rep.read_text())["validation"]["outputs"]["y"]["rel_l2"] < 1
    assert y.shape == (32, 32)
    weights = json.loads(rep.read_text())["weight_form"]["weights"]
    assert all(w["form"] == "sparse" and w["sparsity"] == 0.8 and w["bytes_after"] < w["bytes_before"]
               for w in weights.values())


def accuracy(path) -> float:
    logits = runtime.run(runtime.session(str(path)), {"image": np.load(TEST)["image"]})["logits"]
    return float(np.mean(logits.argmax(1) == np.load(MODELS / "digits_cnn.test_labels.npy")))


def test_codebook_digits_keeps_accuracy_at_a_quarter_of_the_size(tmp_path, capsys):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", out, "--weight-form", "codebook", "--data", TEST, "--min-top1", "0.99",
                    "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    assert out.stat().st_size < DIGITS.stat().st_size / 3.5
    assert accuracy(out) >= accuracy(DIGITS) - 0.005
    r = json.loads(rep.read_text())
    assert r["validation"]["passed"] and r["validation"]["outputs"]["logits"]["top1"] >= 0.99
    assert len(r["weight_form"]["weights"]) == 3


def test_codebook_budget_keeps_the_costliest_weights_float(tmp_path, capsys):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    args = [DIGITS, "-o", out, "--weight-form", "codebook", "--bits", "3", "--calibrate", CALIB, "--data", TEST,
            "--report", rep, "--latency-repeat", "0"]
    assert run(capsys, *args, "--min-cosine", "0")[0] == 0
    full = json.loads(rep.read_text())["weight_form"]["fallback"]["checks"][0]["cosine"]
    budget = 1 - (1 - full) / 4  # 3-bit codebooks everywhere miss it
    code, io_ = run(capsys, *args, "--min-cosine", f"{budget:.9f}")
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    fb, weights = r["weight_form"]["fallback"], r["weight_form"]["weights"]
    assert fb["met"] and not fb["checks"][0]["passed"] and fb["checks"][-1]["passed"]
    kept = [k["weight"] for k in fb["kept_in_float"]]
    assert kept and len(kept) < len(weights)
    assert [k["cost"] for k in fb["kept_in_float"]] == sorted((k["cost"] for k in fb["kept_in_float"]), reverse=True)
    assert all(weights[k]["form"] == "float (budget)" and weights[k]["bytes_after"] == weights[k]["bytes_before"]
               for k in kept)
    assert r["validation"]["passed"] and r["validation"]["outputs"]["logits"]["cosine"] >= budget  # held out

    code, io_ = run(capsys, *args[:2], tmp_path / "no.onnx", *args[3:], "--min-cosine", "0.99999999")
    assert code == 1 and not (tmp_path / "no.onnx").exists()
    assert "the codebook form cannot meet" in io_.err and "all but one weight in float" in io_.err


def test_factorize_then_codebook(tmp_path, capsys):
    """The factors get the codebook form (a budget would go to the ranks, so none is given here)."""
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", out, "--factorize", "--calibrate", CALIB, "--weight-form", "codebook",
                    "--data", TEST, "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    assert r["factorization"]["layers_factorized"] >= 1
    factors = [n for n, w in r["weight_form"]["weights"].items() if w["form"] == "codebook" and "lowrank" in n]
    assert len(factors) == 2, list(r["weight_form"]["weights"])
    assert out.stat().st_size < DIGITS.stat().st_size / 10
    assert accuracy(out) >= accuracy(DIGITS) - 0.01


@pytest.mark.parametrize("argv, message", [
    (["--weight-form", "codebook", "--int8", "--calibrate", str(CALIB)], "--weight-form and --int8"),
    (["--weight-form", "codebook", "--sparsity", "0.9"], "--sparsity saves nothing"),
    (["--weight-form", "sparse", "--bits", "4"], "--bits goes with --weight-form codebook"),
    (["--weight-form", "codebook", "--bits", "9"], "--bits must be between 1 and 8"),
    (["--weight-form", "sparse"], "--weight-form sparse needs --sparsity"),
    (["--weight-form", "sparse", "--sparsity", "0.5"], "--sparsity must be above 0.667"),
    (["--bits", "4"], "go with --weight-form"),
    (["--weight-form", "codebook", "--calibrate", str(CALIB)], "keeps weights in float to meet a budget"),
    (["--weight-form", "sparse", "--calibrate", str(CALIB), "--sparsity", "0.8", "--min-cosine", "0.9"],
     "--calibrate chooses it per weight"),
    (["--weight-form", "codebook", "--factorize", "--max-error", "0.1"], "--max-error with --factorize and"),
    (["--weight-form", "nibbles"], "invalid choice"),
])
def test_bad_combinations_exit_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, *argv)
    assert code == 2 and message in io_.err and io_.err.count("\n") == 1 and not out.exists(), io_.err
