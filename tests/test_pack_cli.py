"""``onnxopt pack`` / ``onnxopt unpack`` through ``cli.main``: exit codes, what is written, the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt import cli, cli_pack
from onnxopt.packing import container

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = str(MODELS / "digits_cnn.onnx")
CALIB = str(MODELS / "digits_cnn.calib.npz")
TEST = str(MODELS / "digits_cnn.test.npz")
FAST = ["--latency-repeat", "0"]


def accuracy(path) -> float:
    images = np.load(TEST)["image"]
    labels = np.load(MODELS / "digits_cnn.test_labels.npy")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"image": images})[0].argmax(1) == labels))


def one_error_line(capsys, code: int, argv: list[str]) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """digits_cnn packed to the budget and unpacked again: (folder, pack exit code, unpack exit code)."""
    d = tmp_path_factory.mktemp("packed")
    code = cli.main(["pack", DIGITS, "-o", str(d / "d.onnxz"), "--calibrate", CALIB, "--data", TEST,
                     "--min-top1", "0.99", "--report", str(d / "r.json"), "-q", *FAST])
    back = cli.main(["unpack", str(d / "d.onnxz"), "-o", str(d / "d.onnx"), "-q"])
    return d, code, back


def test_pack_meets_the_budget_and_unpack_gives_a_model_that_runs(packed):
    d, code, back = packed
    assert code == 0 and back == 0
    assert abs(accuracy(d / "d.onnx") - accuracy(DIGITS)) <= 0.005
    ratio = Path(DIGITS).stat().st_size / (d / "d.onnxz").stat().st_size
    assert ratio > 12  # measured 19.8x (1.14 MB -> 56 KB), with 100% held-out top-1 agreement
    head = (d / "d.onnxz").read_bytes()[:16]
    assert head[10:12] == b"\x01\x01" and head[12] & container.XZ_SKELETON  # format 1.1: the skeleton in xz


def test_the_report_has_every_stage_and_the_compressors(packed):
    d, _, _ = packed
    r = json.loads((d / "r.json").read_text())
    assert r["output"].endswith("d.onnxz") and r["validation"]["passed"]
    assert r["validation"]["source"] == f"data: {TEST}"
    assert "fold_bn_into_conv" in r["lossless_passes"] and "merge_parallel" not in r["lossless_passes"]
    assert r["settings_rule"].startswith("budget search")
    total = r["packing"]["total"]
    assert total["original_bytes"] == 4 * total["numel"] == 1_132_544 and total["kept"] <= total["numel"]
    assert total["original_bytes"] >= total["pruned_bytes"]
    assert total["shared_bytes"] > total["huffman_bytes"] == sum(t["huffman_bytes"] for t in
                                                                r["packing"]["tensors"].values())
    assert r["output_size_bytes"] == (d / "d.onnxz").stat().st_size == r["packing"]["file_bytes"]
    assert r["ratio"] == pytest.approx(r["input_size_bytes"] / r["output_size_bytes"])
    assert set(r["compressors"]) == {"gzip", "xz", "zstd"}
    assert 1 < r["compressors"]["gzip"]["ratio"] < 1.2 and 1 < r["compressors"]["xz"]["ratio"] < 1.2
    search = r["search"]
    assert search["met"] and search["budget_checked"] == "budget: top-1 >= 0.992"
    assert search["checks"][0]["passed"] and all(c["stressed_top1"] is not None for c in search["checks"])


def test_pack_prints_the_table_and_the_validation(tmp_path, capsys):
    assert cli.main(["pack", DIGITS, "-o", str(tmp_path / "d.onnxz"), "--bits", "6", *FAST]) == 0
    out = capsys.readouterr().out
    for word in ("fc1.weight", "original", "pruned", "shared", "huffman", "bits/w", "total", "gzip", "xz", "zstd",
                 "PASS", "generated inputs"):
        assert word in out, word
    assert container.read_file(tmp_path / "d.onnxz")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "empty", "folder", "missing"])
def test_unpack_refuses_damaged_files_with_one_line(packed, tmp_path, capsys, damage):
    blob = (packed[0] / "d.onnxz").read_bytes()
    bad = tmp_path / "bad.onnxz"
    if damage == "truncated":
        bad.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped":
        bad.write_bytes(blob[:300] + bytes([blob[300] ^ 4]) + blob[301:])
    elif damage == "foreign":
        bad.write_bytes(Path(DIGITS).read_bytes())
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "folder":
        bad.mkdir()
    err = one_error_line(capsys, 2, ["unpack", str(bad), "-o", str(tmp_path / "out.onnx")])
    assert str(bad) in err
    assert not (tmp_path / "out.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == (
        [] if damage == "missing" else ["bad.onnxz"])


def test_an_impossible_budget_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "d.onnxz"
    err = one_error_line(capsys, 1, ["pack", DIGITS, "-o", str(out), "--calibrate", CALIB, "--min-cosine", "1",
                                     "--report", str(tmp_path / "r.json"), *FAST])
    assert "not written" in err and "cosine" in err  # the search's checks or the final validation
    assert not out.exists() and json.loads((tmp_path / "r.json").read_text())["output"] is None
    err = one_error_line(capsys, 1, ["pack", DIGITS, "-o", str(out), "--bits", "1", "--data", TEST,
                                     "--min-top1", "0.999", *FAST])
    assert "moved" in err and not out.exists()


@pytest.mark.parametrize("argv", [
    ["--bits", "0"], ["--bits", "17"], ["--sparsity", "1.5"], ["--bits", "4", "--calibrate", CALIB],
    ["--calibrate", CALIB, "--calibration-samples", "0"], ["--calibration-samples", "4"], ["--min-cosine", "2"],
    ["--calibrate", CALIB, "--margin", "3"], ["--calibrate", str(MODELS / "tiny_bert.calib.npz")], ["--nope"],
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, argv):
    one_error_line(capsys, 2, ["pack", DIGITS, "-o", str(tmp_path / "d.onnxz"), *argv])
    assert not list(tmp_path.iterdir())


def test_bad_paths_exit_2(tmp_path, capsys):
    one_error_line(capsys, 2, ["pack", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "d.onnxz")])
    one_error_line(capsys, 2, ["pack", DIGITS, "-o", str(tmp_path / "no" / "d.onnxz")])
    one_error_line(capsys, 2, ["pack", DIGITS])  # no -o
    copy = tmp_path / "m.onnxz"
    copy.write_bytes(b"x")
    one_error_line(capsys, 2, ["unpack", str(copy), "-o", str(copy)])  # the input itself, without --force
    assert copy.read_bytes() == b"x"


def test_native_forms_for_the_lead(tmp_path):
    from onnxopt import io

    model = io.load_model(DIGITS)
    settings, found, rule = cli_pack.choose_settings(model, bits=5, sparsity=0.9)
    assert found is None and "--bits 5" in rule and all(s.bits == 5 for s in settings.values())
    for form in cli_pack.NATIVE_FORMS:
        out = cli_pack.native_model(model, form, settings)
        assert out.ByteSize() < model.ByteSize() / 2
        ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_installed_command_exits_2_on_a_foreign_file(tmp_path):
    p = subprocess.run([sys.executable, "-m", "onnxopt", "unpack", DIGITS, "-o", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "bad magic" in p.stderr
    assert not list(tmp_path.iterdir())
