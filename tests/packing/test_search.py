import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt import validate
from onnxopt.errors import UserError
from onnxopt.packing import pack as P
from onnxopt.packing import policy
from onnxopt.packing import search as SR
from onnxopt.packing.policy import Kind, Weight, candidates, find_weights
from onnxopt.packing.policy import TensorSetting as S
from tests import graphs

TOP = max(SR.SearchConfig().bits)  # the finest grid, checked first

BUDGET = validate.Budget(lossy=True, min_cosine=0.99)
CONFIG = SR.SearchConfig()


def encoder() -> onnx.ModelProto:
    """Gather(emb) -> MatMul(w1) -> Relu -> MatMul(w2) -> + e -> MatMul(w3): weights of unlike sensitivity."""
    rng = np.random.default_rng(0)
    w2 = graphs.rand(96, 32, seed=3) * np.geomspace(0.05, 1.0, 32, dtype=np.float32)  # column scales differ
    w3 = graphs.rand(32, 48, seed=4)
    w3[rng.integers(0, 32, 6), rng.integers(0, 48, 6)] *= 12  # a few outliers stretch a per-tensor grid
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]), helper.make_node("Add", ["o", "e"], ["s"]),
             helper.make_node("MatMul", ["s", "w3"], ["y"])]
    inits = [("emb", graphs.rand(400, 32, seed=1)), ("w1", graphs.rand(32, 96, seed=2) / 6), ("w2", w2 / 10),
             ("w3", w3)]
    return graphs.model(nodes, [("ids", np.int64, ["n", 8])], [("y", np.float32, ["n", 8, 48])], inits)


def samples(n: int = 48, seed: int = 0) -> list[dict]:
    return [{"ids": np.random.default_rng(seed).integers(0, 400, (n, 8))}]


@pytest.fixture(scope="module")
def model():
    return encoder()


@pytest.fixture(scope="module")
def found(model):
    return SR.search(model, samples(), BUDGET)


def cosine(model, settings, feeds) -> float:
    report = validate.compare(model, P.quantize_model(model, settings)[0], feeds, budget=validate.Budget(lossy=True))
    return report.outputs[0].cosine


def test_meets_the_stricter_budget_and_beats_8_bits(model, found):
    assert found.met and set(found.settings) == {"emb", "w1", "w2", "w3"}
    assert found.budget.min_cosine == pytest.approx(1 - 0.8 * 0.01)
    assert cosine(model, found.settings, samples()) >= found.budget.min_cosine
    assert cosine(model, found.settings, samples(seed=1)) >= BUDGET.min_cosine  # held out
    eight = {name: S(8, 0.0, False) for name in found.settings}
    assert len(P.pack(model, found.settings)[0]) < 0.8 * len(P.pack(model, eight)[0])
    assert len({s.bits for s in found.settings.values()}) > 1  # not one width for all
    assert found.checks[0]["bits"] == TOP and found.checks[0]["passed"]


def test_returns_only_a_setting_that_passed_its_check(model, monkeypatch):
    seen = []
    check = SR._Runner.check

    def spy(self, settings, **facts):
        ok = check(self, settings, **facts)
        seen.append((dict(settings), ok))
        return ok

    monkeypatch.setattr(SR._Runner, "check", spy)
    result = SR.search(model, samples(), BUDGET)
    assert (result.settings, True) in seen
    assert any(not ok for _, ok in seen)  # the search went past the budget at least once
    assert len(result.checks) == len({str(sorted(s.items())) for s, _ in seen})


def test_every_check_failing_but_the_finest_returns_the_finest(model, monkeypatch):
    check = SR._Runner.check
    monkeypatch.setattr(SR._Runner, "check", lambda self, settings, **facts: check(self, settings, **facts) and
                        "bits" in facts)  # only the first check, every weight at its finest, passes
    result = SR.search(model, samples(), BUDGET)
    assert result.met and {s.bits for s in result.settings.values()} == {TOP}
    assert result.settings == dict(zip(result.settings, (
        min(((b, s) for b, s in zip(t.sizes, t.settings) if s.bits == TOP and not s.sparsity), key=lambda p: p[0])[1]
        for t in result.tensors)))


def test_an_impossible_budget_returns_nothing_and_says_why():
    """4 channels of 4096 weights: even the finest grid moves the output a little."""
    m = graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, ["n", 4096])],
                     [("y", np.float32, ["n", 4])], [("w", graphs.rand(4096, 4, seed=9))])
    result = SR.search(m, [{"x": graphs.rand(8, 4096, seed=10)}], validate.Budget(lossy=True, min_cosine=1.0))
    assert not result.met and result.settings is None
    assert len(result.checks) == 1 and not result.tensors  # nothing measured after the finest setting missed
    assert "cannot meet the budget: cosine >= 1.0 on 8 calibration samples" in result.message()
    assert f"even with every weight at {TOP} bits (cosine " in result.message()


def test_estimates_match_the_packed_tensors(model):
    weights = find_weights(model)
    for name in ("emb", "w2", "w3"):
        values = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        tensor = candidates(values.astype(np.float32), weights[name], CONFIG.bits, CONFIG.sparsities)
        for i, setting in enumerate(tensor.settings):
            if setting.bits not in (3, 6, 10) or setting.sparsity not in (0.0, 0.5):
                continue
            axis = weights[name].axis if setting.per_channel else None
            q = P.quantize_tensor(values, setting, axis)
            true = np.linalg.norm(q.values - values) / np.linalg.norm(values)
            assert tensor.errors[i] == pytest.approx(true, rel=0.02, abs=1e-4), (name, setting)
            size = P.pack(model, {name: setting})[1]["tensors"][name]["huffman_bytes"]
            assert tensor.sizes[i] == pytest.approx(size, rel=0.12), (name, setting)


def test_estimates_on_a_subsample_are_unbiased():
    values = graphs.rand(512, 300, seed=5) * np.linspace(0.2, 2, 300, dtype=np.float32)
    weight = find_weights(graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, [1, 512])],
                                         [("y", np.float32, [1, 300])], [("w", values)]))["w"]
    full = candidates(values, weight, (6, 4), (0.0, 0.5))
    sampled = candidates(values, weight, (6, 4), (0.0, 0.5), estimate_values=4096)
    np.testing.assert_allclose(sampled.errors, full.errors, rtol=0.05)
    assert sampled.settings == full.settings


def test_channels_with_few_values_are_exact():
    """A depthwise 3x3 channel has 9 values: 16 levels share it exactly, 4 do not."""
    values = graphs.rand(32, 1, 3, 3, seed=6)
    weight = Weight(Kind.CONV, 0)
    tensor = candidates(values, weight, (4, 2), (0.0,))
    errors = {(s.bits, s.per_channel): e for s, e in zip(tensor.settings, tensor.errors)}
    assert errors[4, True] == 0.0 and errors[2, True] > 0.1
    assert errors[4, False] > 0.0  # 288 distinct values in one grid
    assert P.quantize_tensor(values, S(4, per_channel=True, iters=0), 0).values.tobytes() == values.tobytes()


def test_stressed_top1_counts_flips_of_the_amplified_error():
    scorer = object.__new__(SR.Scorer)
    scorer.stress = 3.0
    a = np.array([[1.0, 0.0], [1.0, 0.5], [1.0, 0.9], [0.0, 1.0]])
    scorer.reference = [{"y": a}]
    b = a + np.array([[0, 0.2], [0, 0.2], [0, 0.2], [0, 0.0]])  # no flip at 1x; at 3x row 1 and 2 flip
    assert scorer._stressed("y", [{"y": b}]) == pytest.approx(1 - 0.5 / 3)


def test_a_top1_budget_is_checked_with_the_stress(model):
    logits = graphs.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", np.float32, ["n", 64])],
                          [("y", np.float32, ["n", 10])], [("w", graphs.rand(64, 10, seed=7))])
    feeds = [{"x": graphs.rand(64, 64, seed=8)}]
    result = SR.search(logits, feeds, validate.Budget(lossy=True, min_top1=0.95))
    assert result.met and result.budget.min_top1 == pytest.approx(0.96)
    assert all(c["stressed_top1"] <= c["top1"] for c in result.checks)
    assert all(c["passed"] == (c["stressed_top1"] >= 0.96) for c in result.checks)


def test_bad_configs_and_budgets(model):
    for kwargs in ({"bits": ()}, {"bits": (0,)}, {"bits": (17,)}, {"sparsities": (1.0,)}, {"margin": 1.5},
                   {"top1_stress": 0.5}):
        with pytest.raises(UserError):
            SR.SearchConfig(**kwargs)
    with pytest.raises(UserError, match="needs a budget"):
        SR.search(model, samples(), validate.Budget(lossy=True))
    assert math.isclose(SR.SearchConfig().margin, 0.8)


def test_ranks_within_rows():
    ranks = policy._ranks(np.array([3.0, 1.0, 3.0, 2.0, 5.0, -1.0]), np.array([0, 0, 0, 1, 1, 1]))
    assert ranks.tolist() == [1, 0, 1, 1, 2, 0]
