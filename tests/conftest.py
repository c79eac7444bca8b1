import numpy as np
import onnx
import pytest
from onnx import helper

from tests import graphs


@pytest.fixture
def conv_model() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu with a dynamic batch, non-default BN epsilon."""
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], name="bn", epsilon=1e-2),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    inits = [
        ("w", graphs.rand(c, 3, 3, 3, seed=1)),
        ("b", graphs.rand(c, seed=2)),
        ("s", graphs.positive(c, seed=3)),
        ("bb", graphs.rand(c, seed=4)),
        ("m", graphs.rand(c, seed=5)),
        ("v", graphs.positive(c, seed=6)),
    ]
    m = graphs.model(nodes, [("x", np.float32, ["N", 3, 8, 8])], [("y", np.float32, ["N", c, 8, 8])], inits)
    m.doc_string = "model doc"
    m.model_version = 3
    helper.set_model_props(m, {"author": "tests"})
    return m


@pytest.fixture
def conv_path(tmp_path, conv_model):
    path = tmp_path / "model.onnx"
    onnx.save(conv_model, path)
    return path
