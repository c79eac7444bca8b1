"""Low-rank factorization end to end: the math, the rank allocation and ``onnxopt --factorize``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from onnxopt import cli, data, io, runtime
from onnxopt.config import FactorizeConfig
from onnxopt.factorize import cheapest_ranks, factorize_model, split_samples
from onnxopt.lowrank import spectrum
from onnxopt.validate import Budget

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS, CALIB, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz", MODELS / "digits_cnn.test.npz"


def accuracy(model) -> float:
    images, labels = np.load(TEST)["image"], np.load(MODELS / "digits_cnn.test_labels.npy")
    sess = runtime.session(model if not isinstance(model, Path) else str(model))
    return float(np.mean(runtime.run(sess, {"image": images})["logits"].argmax(1) == labels))


def test_weighted_errors_are_the_output_errors_on_the_data_and_on_other_data():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16))
    x = rng.standard_normal((300, 24)) * np.linspace(0.05, 3, 24)
    x2 = rng.standard_normal((200, 24)) * np.linspace(3, 0.05, 24)
    spec = spectrum(w, x.T @ x / len(x), damping=0.0)
    on_other = spec.errors_on(x2.T @ x2 / len(x2))
    for r in (1, 5, 11, 16):
        a, b = spec.factors(r)
        approx = a.astype(np.float64) @ b.astype(np.float64)
        direct = np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w)
        other = np.linalg.norm(x2 @ (w - approx)) / np.linalg.norm(x2 @ w)
        assert spec.errors()[r] == pytest.approx(direct, abs=1e-5)
        assert on_other[r] == pytest.approx(other, abs=1e-5)
    assert spec.errors()[0] == pytest.approx(1.0) and spec.errors()[-1] == 0.0


def test_plain_spectrum_rank_rules():
    s = np.array([4.0, 2.0, 1.0, 0.5])
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((5, 4)))
    spec = spectrum((u * s) @ v.T)
    np.testing.assert_allclose(spec.singular[:4], s, rtol=1e-9)
    energy = s**2 / np.sum(s**2)  # 0.7529, 0.1882, 0.0471, 0.0118
    assert spec.energy_rank(0.75) == 1 and spec.energy_rank(0.95) == 3 and spec.energy_rank(1.0) == 4
    assert spec.error_rank(np.sqrt(energy[2:].sum()) + 1e-9) == 2


def test_cheapest_ranks_matches_brute_force():
    rng = np.random.default_rng(2)
    options = []
    for _ in range(4):
        macs = np.sort(rng.uniform(1, 10, 5))
        cost = np.sort(rng.uniform(0, 1, 5))[::-1].copy()
        cost[-1] = 0.0
        options.append((np.arange(5), macs, cost))
    for limit in (0.3, 0.8, 1.5, 2.5):
        choice = cheapest_ranks(options, limit)
        total_cost = sum(o[2][i] for o, i in zip(options, choice))
        total_macs = sum(o[1][i] for o, i in zip(options, choice))
        feasible = [sum(o[1][i] for o, i in zip(options, c)) for c in itertools.product(range(5), repeat=4)
                    if sum(o[2][i] for o, i in zip(options, c)) <= limit]
        assert total_cost <= limit + 1e-12
        # Lagrangian solutions lie on the convex hull: never better than brute force, close to it
        assert min(feasible) <= total_macs <= min(feasible) * 1.35


def test_split_samples_is_disjoint_and_complete():
    feeds = [{"x": np.arange(5)[:, None] + 10 * i} for i in range(2)] + [{"x": np.array([[99]])}]
    a, b = split_samples(feeds)
    got = sorted(int(v) for part in (a, b) for f in part for v in f["x"].ravel())
    assert got == sorted([0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 99])
    assert {int(v) for f in a for v in f["x"].ravel()}.isdisjoint({int(v) for f in b for v in f["x"].ravel()})


@pytest.fixture(scope="module")
def digits():
    model = io.load_model(DIGITS)
    return model, data.load_feeds(CALIB, model)


def test_digits_fc_chosen_from_the_data_keeps_test_accuracy(digits):
    model, calib = digits
    f = factorize_model(model, calib, FactorizeConfig(convs=False))
    fc1 = next(x for x in f.layers if x.shape == (1024, 256))
    assert fc1.applied and fc1.weighted and fc1.params_before >= 8 * fc1.params_after
    assert fc1.error <= FactorizeConfig.max_error
    assert accuracy(f.model) >= accuracy(model) - 0.005
    small = next(x for x in f.layers if x.shape == (256, 10))
    assert not small.applied and "MACs" in small.reason


def test_without_data_the_weight_error_rule_keeps_the_fc_whole(digits):
    model, _ = digits
    f = factorize_model(model, None, FactorizeConfig(convs=False))
    assert not any(x.applied for x in f.layers) and "weight error" in f.rule
    assert all(not x.weighted for x in f.layers)


def test_budget_is_met_on_held_out_samples_by_sensitivity_allocation(digits):
    model, calib = digits
    budget = Budget(lossy=True, min_cosine=0.99)
    f = factorize_model(model, calib, FactorizeConfig(convs=False), budget)
    checks = f.allocation["checks"]
    assert any(c["passed"] for c in checks) and f.allocation["sensitivity"][0]["sensitivity"] > 0
    assert any(x.applied for x in f.layers)
    test = data.load_feeds(TEST, model)
    from onnxopt import validate

    report = validate.compare(model, f.model, test, budget=budget)
    assert report.passed, report.summary()


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_cli_factorize_reports_each_layer(tmp_path, capsys):
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", out, "--factorize", "--calibrate", CALIB, "--data", TEST,
                    "--no-conv-factorize", "--report", rep)
    assert code == 0, io_.err
    r = json.loads(rep.read_text())["factorization"]
    assert r["layers_factorized"] == 1 and r["params_after"] * 5 < r["params_before"]
    assert "low-rank factorization" in io_.out and "/fc1/Gemm" in io_.out and "left whole" in io_.out
    assert accuracy(out) >= accuracy(DIGITS) - 0.005


@pytest.mark.parametrize("argv,message", [
    (["--calibrate", CALIB], "goes with --int8, --factorize or -O2"),
    (["--factorize", "--min-cosine", "0.99"], "needs --calibrate"),
    (["--factorize", "--rank-ratio", "1.5"], "rank-ratio must be between 0 and 1"),
    (["--factorize", "--rank-ratio", "0.5", "--rank-energy", "0.9"], "one of --rank-energy and --rank-ratio"),
])
def test_cli_bad_factorize_options_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "f.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, *argv)
    assert code == 2 and message in io_.err and len(io_.err.strip().splitlines()) == 1
    assert not out.exists()


def test_budget_allocation_spans_convs_and_fcs(digits):
    model, calib = digits
    budget = Budget(lossy=True, min_cosine=0.99)
    f = factorize_model(model, calib, FactorizeConfig(), budget)
    forms = {x.form for x in f.layers if x.applied}
    assert forms == {"svd", "spatial"}, [(x.node, x.form, x.applied) for x in f.layers]
    assert {x["node"] for x in f.allocation["sensitivity"]} >= {"/conv2/Conv", "/fc1/Gemm"}
    from onnxopt import validate

    report = validate.compare(model, f.model, data.load_feeds(TEST, model), budget=budget)
    assert report.passed, report.summary()


def test_no_convs_leaves_every_conv(digits):
    model, calib = digits
    f = factorize_model(model, calib, FactorizeConfig(convs=False, max_error=0.5))
    assert all(x.op != "Conv" for x in f.layers)
    assert [n.op_type for n in f.model.graph.node].count("Conv") == 2
