import math

import numpy as np
import pytest
from onnx import helper

from onnxopt import validate
from onnxopt.errors import DataError
from tests import graphs


def test_identical_outputs_are_exact():
    a = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    m = validate.metrics("y", a, a.copy())
    assert m.exact and m.passed and m.max_abs == 0 and m.rel_l2 == 0
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert m.sqnr_db == math.inf and m.top1 == 1.0


def test_known_perturbation():
    a = np.ones((4, 100), np.float32)
    b = a * 1.01  # every element 1% off: rel L2 = 0.01, SQNR = 40 dB, cosine 1
    m = validate.metrics("y", a, b)
    assert m.rel_l2 == pytest.approx(0.01, rel=1e-4)
    assert m.sqnr_db == pytest.approx(40.0, abs=1e-3)
    assert m.cosine == pytest.approx(1.0) and not m.passed
    assert m.max_abs == pytest.approx(0.01, rel=1e-4)


def test_top1_and_cosine_of_disagreeing_logits():
    a = np.array([[1, 0], [0, 1]], np.float32)
    b = np.array([[1, 0], [1, 0]], np.float32)
    m = validate.metrics("y", a, b)
    assert m.top1 == 0.5
    assert m.cosine == pytest.approx(0.5) and m.min_cosine == pytest.approx(0.0)


def test_integer_outputs_must_match_exactly():
    a = np.array([1, 2, 3], np.int64)
    assert validate.metrics("i", a, a.copy()).passed
    assert not validate.metrics("i", a, a + np.array([0, 0, 1])).passed


def test_nan_where_reference_has_none_fails():
    a = np.ones((2, 3), np.float32)
    b = a.copy()
    b[0, 0] = np.nan
    assert not validate.metrics("y", a, b).passed


def test_compare_runs_both_models(conv_model):
    feeds = [{"x": graphs.rand(2, 3, 8, 8, seed=9)}]
    other = type(conv_model)()
    other.CopyFrom(conv_model)
    other.graph.node[2].op_type = "Sigmoid"  # a different model with the same signature
    assert validate.compare(conv_model, conv_model, feeds)
    bad = validate.compare(conv_model, other, feeds)
    assert not bad and "'y' moved" in bad.summary()


def test_compare_needs_the_same_outputs(conv_model):
    m = graphs.model([helper.make_node("Relu", ["x"], ["z"])], [("x", np.float32, ["N", 3, 8, 8])],
                     [("z", np.float32, ["N", 3, 8, 8])])
    with pytest.raises(DataError, match="lacks outputs"):
        validate.compare(conv_model, m, [{"x": graphs.rand(1, 3, 8, 8)}])


def test_lossy_budget_judges_cosine_and_top1_only():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = a + 0.01  # far outside float tolerance, inside any sane int8 budget
    assert not validate.metrics("y", a, b).passed
    assert validate.metrics("y", a, b, validate.Budget(lossy=True, min_cosine=0.99, min_top1=1.0)).passed
    assert not validate.metrics("y", a, b, validate.Budget(lossy=True, min_cosine=0.99999)).passed
    flipped = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    assert not validate.metrics("y", a, flipped, validate.Budget(lossy=True, min_top1=0.9)).passed
    assert validate.metrics("y", a, flipped, validate.Budget(lossy=True)).passed  # no budget: report only
