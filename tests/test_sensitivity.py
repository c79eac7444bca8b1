"""Layer sensitivity and the budget fallback: a graph with one layer that int8 ruins.

``outlier_mlp``: x -> MatMul a -> Relu -> MatMul hard -> MatMul c -> logits. Column 0 of
``a``'s weights is 300x the others, so the Relu output that ``hard`` reads has one channel
300x larger than the rest (``hard``'s row 0 is scaled down by as much, so the float model
is well conditioned). Per-tensor activation quantization of that input spends the whole
int8 range on the outlier channel and rounds the other channels away: ``hard`` is the layer
that costs the accuracy. Every threshold below comes from onnxruntime runs of the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import cli, quantize
from onnxopt.calibration import TensorRange
from onnxopt.config import CalibrationConfig, CalibrationMethod, QuantConfig
from onnxopt.sensitivity import (
    InheritedRanges,
    LayerCost,
    Score,
    SensitivityConfig,
    SensitivityMethod,
    Variants,
    fallback,
    first_samples,
    measure,
    tune,
)
from onnxopt.validate import Budget
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS, CALIB, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz", MODELS / "digits_cnn.test.npz"
HARD = "hard"


def outlier_mlp(names=("a", HARD, "c")) -> onnx.ModelProto:
    wa, wh, wc = graphs.rand(16, 16, seed=1), graphs.rand(16, 16, seed=2), graphs.rand(16, 10, seed=3)
    wa[:, 0] *= 300.0
    wh[0, :] /= 300.0
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["ya"], name=names[0]),
        helper.make_node("Relu", ["ya"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wh"], ["yh"], name=names[1]),
        helper.make_node("MatMul", ["yh", "wc"], ["logits"], name=names[2]),
    ]
    return graphs.model(nodes, [("x", np.float32, ["N", 16])], [("logits", np.float32, ["N", 10])],
                        [("wa", wa), ("wh", wh), ("wc", wc)], opset=13)


def feeds(n: int = 64, batch: int = 16) -> list[dict[str, np.ndarray]]:
    x = graphs.rand(n, 16, seed=7)
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def setup():
    """The model, its full int8 version (min/max ranges, calibrated once) and its variants."""
    model, data = outlier_mlp(), feeds()
    config = QuantConfig()
    q = quantize.quantize_model(model, data, config, CalibrationConfig(method=CalibrationMethod.MINMAX))
    return model, q, Variants(model, q.ranges, config, data)


def test_sensitivity_ranks_the_outlier_layer_first(setup):
    model, q, v = setup
    costs = measure(v, q.plan.nodes)
    assert [c.node for c in costs][0] == HARD and {c.node for c in costs} == {"a", HARD, "c"}
    assert costs[0].cost > 10 * costs[1].cost > 0  # not a close call
    assert all(c.samples == 64 and c.top1 is not None for c in costs)
    # One at a time: the cost is what quantizing the layer alone does to the model.
    alone = v.score(v.build([n for n in q.plan.nodes if n != HARD]))
    assert costs[0].cosine == pytest.approx(alone.cosine) and costs[0].cost == pytest.approx(1 - alone.cosine)


def test_drop_one_ranks_it_first_too(setup):
    _, q, v = setup
    costs = measure(v, q.plan.nodes, SensitivityConfig(method=SensitivityMethod.DROP_ONE))
    full = v.score(q).cosine
    assert costs[0].node == HARD and costs[0].cost == pytest.approx(costs[0].cosine - full) and costs[0].cost > 0


def test_fallback_keeps_exactly_the_costly_layer_in_float(setup):
    model, q, v = setup
    full = v.score(q).cosine
    without_hard = v.score(v.build([HARD])).cosine
    assert full < without_hard
    budget = Budget(lossy=True, min_cosine=(full + without_hard) / 2)  # the full model misses it
    tuning = tune(model, q, QuantConfig(), feeds(), budget)
    assert not tuning.failure() and [c.node for c in tuning.fallback.kept] == [HARD]
    assert [c["float_layers"] for c in tuning.fallback.checks] == [0, 1]
    assert [c["passed"] for c in tuning.fallback.checks] == [False, True]
    dq_fed = {n.name for n in tuning.quantized.model.graph.node
              if any(i.endswith("_dequantized") for i in n.input)}
    assert HARD not in dq_fed and {"a", "c"} <= dq_fed
    facts = tuning.annotate(quantize.report(tuning.quantized, CalibrationConfig(), QuantConfig()))
    assert facts["fallback"]["met"] and facts["fallback"]["kept_in_float"][0]["node"] == HARD
    reason = next(e["reason"] for e in facts["kept_in_float"] if e["node"] == HARD)
    assert reason.startswith("sensitivity: costs ") and "cosine" in reason


def test_fallback_not_needed_keeps_the_full_model(setup):
    model, q, _ = setup
    tuning = tune(model, q, QuantConfig(), feeds(), Budget(lossy=True, min_cosine=0.0))
    assert tuning.quantized is q and tuning.layers is None and tuning.fallback.met and not tuning.fallback.kept


def test_fallback_fails_when_all_but_one_in_float_misses(setup):
    model, q, v = setup
    ranked = measure(v, q.plan.nodes)
    best = ranked[-1].cosine  # all but the cheapest layer in float: that layer alone quantized
    v_strict = Variants(model, q.ranges, QuantConfig(), feeds(), Budget(lossy=True, min_cosine=(best + 1) / 2))
    fb, built = fallback(v_strict, ranked, v_strict.score(q))
    assert not fb.met and built is None and fb.checks[-1]["float_layers"] == len(ranked) - 1
    assert "even with all but one layer in float" in fb.message()


class CountingVariants:
    """Stands in for ``Variants``: a model passes when at least ``need`` layers are in float."""

    budget, source = Budget(lossy=True, min_cosine=0.5), "fake"

    def __init__(self, need: int):
        self.need = need

    def build(self, exclude):
        return list(exclude)

    def score(self, q) -> Score:
        return Score(len(q) / 10, None, SimpleNamespace(passed=len(q) >= self.need))


@pytest.mark.parametrize("need", range(1, 10))
def test_fallback_search_finds_the_smallest_prefix_in_few_checks(need):
    ranked = [LayerCost(f"l{i}", "Conv", 1.0 / (i + 1), 0.9, None, 1) for i in range(8)]
    fb, built = fallback(CountingVariants(need), ranked, Score(0.0, None, SimpleNamespace(passed=False)))
    if need <= 7:  # all but one layer in float at most
        kept = [f"l{i}" for i in range(need)]
        assert fb.met and [c.node for c in fb.kept] == kept and built == kept
    else:
        assert not fb.met and built is None and max(c["float_layers"] for c in fb.checks) == 7
    assert len(fb.checks) <= 8  # the full model, doubling 1 2 4 7, bisection


def test_screen_measures_the_worst_again_on_every_sample(setup):
    _, q, v = setup
    costs = measure(v, q.plan.nodes, SensitivityConfig(screen_above=2, screen_samples=8, screen_keep=1))
    assert costs[0].node == HARD and costs[0].samples == 64
    assert [c.samples for c in costs[1:]] == [8, 8]


def test_unnamed_layers_are_measured_and_kept_in_float_by_label():
    model, data = outlier_mlp(names=("", "", "")), feeds()
    q = quantize.quantize_model(model, data, QuantConfig(), CalibrationConfig(method=CalibrationMethod.MINMAX))
    v = Variants(model, q.ranges, QuantConfig(), data)
    costs = measure(v, q.plan.nodes)
    assert costs[0].node == "yh"  # the label of an unnamed node: its output
    built = v.build(["yh"])
    assert [n.name for n in built.model.graph.node if n.op_type == "MatMul" and n.input[0] == "r"] == ["yh"]
    assert not any(i.endswith("_dequantized") for n in built.model.graph.node if n.name == "yh" for i in n.input)


def test_movement_output_inherits_its_input_range():
    g = graphs.graph([helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2]),
                      helper.make_node("Reshape", ["p", "s"], ["y"])],
                     [("x", np.float32, [1, 2, 4])], [("y", np.float32, [1, 4])], [("s", np.array([1, 4]))])
    r = InheritedRanges({"x": TensorRange("x", -1.0, 2.0)}, g)
    assert r["y"] == r["p"] == r["x"] and r.get("z") is None and len(r) == 1


def test_first_samples_cuts_the_last_batch():
    cut = first_samples(feeds(64, 16), 20)
    assert [f["x"].shape[0] for f in cut] == [16, 4]


# ---- command line, on the bundled digits CNN ----


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_cli_sensitivity_prints_and_reports_every_layer(tmp_path, capsys):
    out, rep = tmp_path / "d8.onnx", tmp_path / "r.json"
    code, io_ = run(capsys, DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--sensitivity", "--report", rep,
                    "--latency-repeat", "0")
    assert code == 0, io_.err
    s = json.loads(rep.read_text())["sensitivity"]
    assert s["method"] == "one_at_a_time" and s["samples"] == 64 and "digits_cnn.calib.npz" in s["source"]
    layers = s["layers"]
    assert sorted(c["node"] for c in layers) == ["/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    assert [c["cost"] for c in layers] == sorted((c["cost"] for c in layers), reverse=True)
    assert all(0 < c["cost"] < 1e-3 and c["top1"] is not None for c in layers)
    assert "sensitivity (quantized alone" in io_.out and layers[0]["node"] in io_.out


@pytest.mark.parametrize("option, key, loose", [("--min-cosine", "cosine", "0"), ("--max-error", "rel_l2", "1e9")])
def test_cli_budget_fallback_keeps_costly_layers_in_float(option, key, loose, tmp_path, capsys):
    out, rep = tmp_path / "d8.onnx", tmp_path / "r.json"
    args = [DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--latency-repeat", "0", "--report", rep]
    # First the numbers: full int8 cosine (rel L2) on the calibration samples, and each layer's cost.
    assert run(capsys, *args, "--sensitivity", option, loose)[0] == 0
    r = json.loads(rep.read_text())
    full = r["quantization"]["fallback"]["checks"][0][key]
    best = r["sensitivity"]["layers"][-1][key]  # all but the cheapest layer in float
    budget = full + (best - full) / 4
    code, io_ = run(capsys, *args, option, f"{budget:.9f}", "--data", TEST)
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    fb = r["quantization"]["fallback"]
    assert fb["met"] and fb["checks"][0][key] == pytest.approx(full) and not fb["checks"][0]["passed"]
    kept = [c["node"] for c in fb["kept_in_float"]]
    ranked = [c["node"] for c in r["sensitivity"]["layers"]]
    assert kept and kept == ranked[: len(kept)] and len(kept) < len(ranked)
    assert all(e["reason"].startswith("sensitivity: costs") for e in r["quantization"]["kept_in_float"]
               if e["node"] in kept)
    assert r["validation"]["passed"] and "digits_cnn.test.npz" in r["validation"]["source"]  # held out
    held_out = r["validation"]["outputs"]["logits"][key]
    assert held_out >= budget if key == "cosine" else held_out <= budget
    assert "budget fallback on 64 samples" in io_.out and out.exists()


def test_cli_unreachable_budget_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "d8.onnx"
    code, io_ = run(capsys, DIGITS, "-o", out, "--int8", "--calibrate", CALIB, "--min-cosine", "0.99999999",
                    "--latency-repeat", "0")
    assert code == 1 and not out.exists()
    assert "even with all but one layer in float" in io_.err and "not written" in io_.err


def test_cli_sensitivity_from_a_cache_runs_on_data_and_says_it_is_not_held_out(tmp_path, capsys):
    cache, rep = tmp_path / "ranges.json", tmp_path / "r.json"
    assert run(capsys, DIGITS, "-o", tmp_path / "a.onnx", "--int8", "--calibrate", CALIB, "--calibration-cache",
               cache, "--latency-repeat", "0")[0] == 0
    code, io_ = run(capsys, DIGITS, "-o", tmp_path / "b.onnx", "--int8", "--calibration-cache", cache, "--data", TEST,
                    "--sensitivity", "--report", rep, "--latency-repeat", "0")
    assert code == 0, io_.err
    s = json.loads(rep.read_text())["sensitivity"]
    assert s["samples"] == 360 and "digits_cnn.test.npz" in s["source"] and "not held out" in s["source"]


def test_cli_sensitivity_needs_int8(tmp_path, capsys):
    code, io_ = run(capsys, DIGITS, "-o", tmp_path / "o.onnx", "--sensitivity")
    assert code == 2 and "go with --int8" in io_.err


def test_cli_max_error_keeps_the_costly_layer_in_float_until_rel_l2_holds(tmp_path, capsys):
    """--max-error with --int8: every float output's relative L2 error <= E, met by the fallback."""
    path, calib, test, out, rep = (tmp_path / n for n in ("m.onnx", "c.npz", "t.npz", "o.onnx", "r.json"))
    onnx.save(outlier_mlp(), path)
    np.savez(calib, x=graphs.rand(64, 16, seed=7))
    np.savez(test, x=graphs.rand(64, 16, seed=8))
    args = [path, "-o", out, "--int8", "--calibrate", calib, "--calibration-method", "minmax", "--latency-repeat",
            "0", "--report", rep]
    # The numbers: rel L2 of the full int8 model, and with the outlier layer left in float.
    assert run(capsys, *args, "--max-error", "1e9")[0] == 0
    full = json.loads(rep.read_text())["quantization"]["fallback"]["checks"][0]["rel_l2"]
    assert run(capsys, *args, "--max-error", "1e9", "--exclude", HARD)[0] == 0
    without_hard = json.loads(rep.read_text())["quantization"]["fallback"]["checks"][0]["rel_l2"]
    assert without_hard < full / 3
    limit = (full * without_hard) ** 0.5
    code, io_ = run(capsys, *args, "--sensitivity", "--max-error", f"{limit:.6g}", "--data", test)
    assert code == 0, io_.err
    r = json.loads(rep.read_text())
    fb = r["quantization"]["fallback"]
    assert fb["met"] and [k["node"] for k in fb["kept_in_float"]] == [HARD] and f"rel L2 <= {limit:.6g}" in fb["budget"]
    assert [c["passed"] for c in fb["checks"]][0] is False and fb["checks"][-1]["rel_l2"] <= limit
    assert r["sensitivity"]["layers"][0]["node"] == HARD and r["sensitivity"]["layers"][0]["rel_l2"] > 0
    v = r["validation"]
    assert v["passed"] and "t.npz" in v["source"] and v["outputs"]["logits"]["rel_l2"] <= limit  # held out
    assert v["budget"]["max_rel_l2"] == pytest.approx(limit, rel=1e-5)

    out.unlink()
    code, io_ = run(capsys, *args, "--max-error", "1e-6")
    assert code == 1 and not out.exists()
    assert "rel L2 <= 1e-06" in io_.err and "even with all but one layer in float" in io_.err
