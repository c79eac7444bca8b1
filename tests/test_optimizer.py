"""The whole -O1 pipeline on graphs that stress what passes must leave alone."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxopt
from onnxopt import presets
from onnxopt.config import OptimizeConfig, Target
from onnxopt.errors import UserError
from onnxopt.optimizer import optimize_model
from tests import graphs, numerics

F = onnx.TensorProto.FLOAT
MODELS = Path(__file__).resolve().parent.parent / "models"


def if_model():
    """Conv -> BN -> c; If(cond): then Relu(c) (+ a dead Identity), else Neg(c) -> y. Branches read c from outside."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["t"]), helper.make_node("Identity", ["t"], ["t_out"]),
         helper.make_node("Identity", ["c"], ["unused"])],
        "then", [], [helper.make_tensor_value_info("t_out", F, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", F, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["pre"], name="conv"),
        helper.make_node("BatchNormalization", ["pre", "s", "b", "m", "v"], ["c"], name="bn", epsilon=1e-2),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    inits = [("w", graphs.rand(4, 3, 3, 3, seed=1)), ("s", graphs.positive(4, seed=2)), ("b", graphs.rand(4, seed=3)),
             ("m", graphs.rand(4, seed=4)), ("v", graphs.positive(4, seed=5))]
    return graphs.model(nodes, [("x", np.float32, [1, 3, 6, 6]), ("cond", np.bool_, [])],
                        [("y", np.float32, [1, 4, 4, 4])], inits, opset=13)


def test_control_flow_readers_keep_outer_tensors():
    model = if_model()
    out = onnxopt.optimize(model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "If"]
    for cond in (True, False):
        feeds = {"x": graphs.rand(1, 3, 6, 6, seed=7), "cond": np.array(cond)}
        numerics.assert_same_outputs(model, out, feeds)


def test_custom_domain_nodes_are_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gelu", ["r"], ["y"], domain="com.microsoft")]
    model = graphs.model(nodes, [("x", np.float32, [2, 8])], [("y", np.float32, [2, 8])],
                         extra_opsets=[("com.microsoft", 1)])
    out = onnxopt.optimize(model)
    assert [(n.op_type, n.domain) for n in out.graph.node] == [("Relu", ""), ("Gelu", "com.microsoft")]
    numerics.assert_same_outputs(model, out)


def test_outputs_option_prunes_the_other_head():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["a"]),
             helper.make_node("Exp", ["r"], ["b"])]
    model = graphs.model(nodes, [("x", np.float32, [4])], [("a", np.float32, [4]), ("b", np.float32, [4])])
    out = optimize_model(model, [], OptimizeConfig(outputs=("b",)), strict=True).model  # with -O0 too
    assert [o.name for o in out.graph.output] == ["b"]
    assert [n.op_type for n in out.graph.node] == ["Relu", "Exp"]


def test_target_onnxruntime_fuses_conv_activation_and_standard_does_not():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    names = presets.pass_names("O1")
    standard = optimize_model(model, names, OptimizeConfig(), strict=True).model
    ort = optimize_model(model, names, OptimizeConfig(target=Target.ONNXRUNTIME), strict=True).model
    assert {n.domain for n in standard.graph.node} == {""}
    assert [n.op_type for n in ort.graph.node].count("FusedConv") == 2
    feeds = {"image": np.random.default_rng(0).random((4, 1, 8, 8), np.float32)}
    numerics.assert_same_outputs(model, ort, feeds)


def test_graph_is_not_modified_in_place():
    model = if_model()
    before = model.SerializeToString()
    onnxopt.optimize(model)
    assert model.SerializeToString() == before
    assert gs.import_onnx(model)  # still importable


def test_opset_conversion_unlocks_layer_norm_fusion():
    model = onnx.load(MODELS / "tiny_bert.onnx")  # opset 14: LayerNorm stays decomposed without conversion
    names = presets.pass_names("O1")
    plain = optimize_model(model, names, OptimizeConfig(), strict=True).model
    converted = optimize_model(model, names, OptimizeConfig(opset=17), strict=True).model
    assert "LayerNormalization" not in {n.op_type for n in plain.graph.node}
    assert [n.op_type for n in converted.graph.node].count("LayerNormalization") == 5
    assert {(o.domain, o.version) for o in converted.opset_import} >= {("", 17)}
    feeds = numerics.random_feeds(model, shapes={"input_ids": (2, 7), "attention_mask": (2, 7)})
    numerics.assert_same_outputs(model, converted, feeds)


def test_opset_downgrade_is_refused(conv_model):
    with pytest.raises(UserError, match="does not downgrade"):
        optimize_model(conv_model, [], OptimizeConfig(opset=13))
