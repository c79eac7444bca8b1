"""The command line as users type it: success paths, reports and every bad input."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import cli
from onnxopt.pass_base import GraphPass, PassResult
from tests import graphs, numerics


def run(*argv, capsys=None):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_optimize_writes_report_and_folds_bn(conv_path, tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, io_ = run(conv_path, "-o", out, "--report", rep, capsys=capsys)
    assert code == 0, io_.err
    assert "PASS" in io_.out and "BatchNormalization" in io_.out
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "BatchNormalization" not in ops
    numerics.assert_same_outputs(onnx.load(conv_path), onnx.load(out))
    r = json.loads(rep.read_text())
    for side in ("before", "after"):
        assert {"nodes", "params", "macs", "size_bytes", "latency_ms"} <= set(r[side])
    assert r["before"]["nodes"] == 3 and r["after"]["nodes"] == 2
    assert r["before"]["macs"] == r["after"]["macs"] == 4 * 8 * 8 * 3 * 9
    assert r["after"]["params"] == r["before"]["params"] - 4 * 4
    assert r["validation"]["passed"] and r["validation"]["outputs"]["y"]["rel_l2"] < 1e-6
    assert any(p["pass"] == "fold_bn_into_conv" and p["modified"] for p in r["pass_runs"])


def test_output_is_deterministic(conv_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli.main([str(conv_path), "-o", str(a), "-q"]) == 0
    assert cli.main([str(conv_path), "-o", str(b), "-q", "--no-validate"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_O0_only_round_trips(conv_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert cli.main([str(conv_path), "-o", str(out), "-O0", "-q"]) == 0
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "BatchNormalization", "Relu"]


def test_skip_and_passes(conv_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert cli.main([str(conv_path), "-o", str(out), "--skip", "fold_bn_into_conv", "-q"]) == 0
    assert "BatchNormalization" in [n.op_type for n in onnx.load(out).graph.node]
    assert cli.main([str(conv_path), "-o", str(out), "--passes", "fold_bn_into_conv", "-q"]) == 0
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]


def test_validate_command(conv_path, tmp_path, capsys):
    other = onnx.load(conv_path)
    other.graph.node[2].op_type = "Sigmoid"
    other_path = tmp_path / "other.onnx"
    onnx.save(other, other_path)
    code, io_ = run("validate", conv_path, conv_path, "--latency-repeat", 2, capsys=capsys)
    assert code == 0 and "PASS" in io_.out
    code, io_ = run("validate", conv_path, other_path, "--report", tmp_path / "v.json", capsys=capsys)
    assert code == 1 and "FAIL" in io_.out and "validation failed" in io_.err
    assert json.loads((tmp_path / "v.json").read_text())["validation"]["passed"] is False


class BreakNumerics(GraphPass):
    """A deliberately wrong rewrite: turns every Relu into a Sigmoid."""

    name = "break_numerics"

    def call(self, graph):
        relus = [n for n in graph.nodes if n.op == "Relu"]
        for n in relus:
            n.op = "Sigmoid"
        return PassResult(graph, bool(relus), {"broken": len(relus)})


@pytest.fixture
def broken_registry(monkeypatch):
    from onnxopt.passes import PASSES

    monkeypatch.setitem(PASSES, "break_numerics", BreakNumerics)


def test_failed_validation_exits_1_and_writes_nothing(broken_registry, conv_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, io_ = run(conv_path, "-o", out, "--passes", "fold_bn_into_conv,break_numerics", capsys=capsys)
    assert code == 1 and not out.exists()
    assert "not written" in io_.err


def test_verify_each_names_the_pass(broken_registry, conv_path, tmp_path, capsys):
    code, io_ = run(conv_path, "-o", tmp_path / "o.onnx", "--verify-each",
                    "--passes", "fold_bn_into_conv,break_numerics", capsys=capsys)
    assert code == 1 and "pass 'break_numerics' changed the outputs" in io_.err


def test_data_drives_validation(conv_path, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=graphs.rand(5, 3, 8, 8))
    code, io_ = run(conv_path, "-o", tmp_path / "o.onnx", "--data", tmp_path / "d.npz", capsys=capsys)
    assert code == 0 and "validation on 5 samples" in io_.out


# ---- bad input: one line on stderr, exit 2, nothing written, input untouched ----

def _bad_models(tmp_path, conv_path):
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n" * 10)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(conv_path.read_bytes()[:200])
    invalid = tmp_path / "invalid.onnx"
    g = helper.make_graph([helper.make_node("Relu", ["ghost"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), invalid)
    return {"missing": tmp_path / "missing.onnx", "text": text, "truncated": trunc, "invalid": invalid}


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "invalid"])
def test_bad_model_files(kind, conv_path, tmp_path, capsys):
    path = _bad_models(tmp_path, conv_path)[kind]
    out = tmp_path / "out.onnx"
    code, io_ = run(path, "-o", out, capsys=capsys)
    assert code == 2 and not out.exists()
    assert io_.err.count("\n") == 1 and io_.err.startswith("onnxopt: error: ") and "Traceback" not in io_.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--passes", "no_such_pass"], "unknown pass 'no_such_pass'"),
        (["--skip", "nope"], "unknown pass 'nope'"),
        (["--shape", "x:1xAx8"], "expected NAME:DxDxD"),
        (["--shape", "ghost:1x3x8x8"], "not model inputs"),
        (["--outputs", "ghost"], "ghost"),
        (["-O", "7"], "invalid choice"),
        (["--target", "tpu"], "invalid choice"),
        (["--data", "{tmp}/wrong_name.npz"], "which the model does not take"),
        (["--data", "{tmp}/wrong_dtype.npz"], "the model takes float32"),
        (["--data", "{tmp}/wrong_shape.npz"], "dimension 1 must be 3"),
        (["--data", "{tmp}/absent.npz"], "no such file"),
    ],
)
def test_bad_options_and_data(argv, message, conv_path, tmp_path, capsys):
    np.savez(tmp_path / "wrong_name.npz", image=graphs.rand(2, 3, 8, 8))
    np.savez(tmp_path / "wrong_dtype.npz", x=np.zeros((2, 3, 8, 8), np.int64))
    np.savez(tmp_path / "wrong_shape.npz", x=graphs.rand(2, 4, 8, 8))
    out = tmp_path / "out.onnx"
    code, io_ = run(conv_path, "-o", out, *[a.format(tmp=tmp_path) for a in argv], capsys=capsys)
    assert code == 2, io_.err
    assert message in io_.err and io_.err.count("\n") == 1 and not out.exists()


def test_missing_output_folder(conv_path, tmp_path, capsys):
    code, io_ = run(conv_path, "-o", tmp_path / "no" / "out.onnx", capsys=capsys)
    assert code == 2 and "does not exist" in io_.err


def test_input_is_never_overwritten(conv_path, capsys):
    before = conv_path.read_bytes()
    code, io_ = run(conv_path, "-o", conv_path, capsys=capsys)
    assert code == 2 and "--force" in io_.err and conv_path.read_bytes() == before


def test_entry_point_without_traceback(tmp_path):
    """The installed command and `python -m onnxopt` both give one line and exit 2."""
    for cmd in (["onnxopt"], [sys.executable, "-m", "onnxopt"]):
        p = subprocess.run([*cmd, str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx")],
                           capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "no such file" in p.stderr
