"""fold_constants: exporter shape chains, constant regions, size guard, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxopt.config import OptimizeConfig
from onnxopt.passes import fold_constants
from onnxopt.passes.fold_constants import FoldConstantsPass
from tests import graphs, numerics

DATA = Path(__file__).resolve().parent.parent / "data"


def i64(*v) -> np.ndarray:
    return np.array(v, np.int64)


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def unsqueeze0(src: str, dst: str, opset: int) -> list[onnx.NodeProto]:
    """Unsqueeze along axis 0: ``axes`` attribute before opset 13, an input from 13."""
    if opset < 13:
        return [helper.make_node("Unsqueeze", [src], [dst], axes=[0])]
    return [const(f"{dst}_axes", i64(0)), helper.make_node("Unsqueeze", [src, f"{dst}_axes"], [dst])]


def size_chain(index: int, opset: int) -> list[onnx.NodeProto]:
    """TorchScript's ``x.size(index)`` as a 1-element tensor: Shape -> Gather -> Unsqueeze."""
    return [
        helper.make_node("Shape", ["x"], [f"s{index}"]),
        const(f"i{index}", np.array(index, np.int64)),
        helper.make_node("Gather", [f"s{index}", f"i{index}"], [f"g{index}"], axis=0),
        *unsqueeze0(f"g{index}", f"u{index}", opset),
    ]


def view_chain(indices, opset: int, *, static: bool = False) -> onnx.ModelProto:
    """y = x.view(x.size(i) for i in indices, -1), x of shape (N, 3, 8, 8)."""
    nodes = [n for i in indices for n in size_chain(i, opset)]
    nodes += [
        const("minus1", i64(-1)),
        helper.make_node("Concat", [*(f"u{i}" for i in indices), "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    dims = {0: 2, 1: 3} if static else {0: "N", 1: 3}
    rest = 2 * 192 // int(np.prod([dims[i] for i in indices])) if static else "K"
    out = [dims[i] for i in indices] + [rest]
    return graphs.model(nodes, [("x", np.float32, [dims[0], 3, 8, 8])], [("z", np.float32, out)], opset=opset)


def run(model_or_graph, **kwargs):
    graph = model_or_graph if isinstance(model_or_graph, gs.Graph) else gs.import_onnx(model_or_graph)
    result = FoldConstantsPass(**kwargs)(graph)
    return graph, result


def ops(graph: gs.Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def assert_idempotent(graph: gs.Graph, **kwargs) -> None:
    again = FoldConstantsPass(**kwargs)(graph)
    assert not again.modified and again.stats == {}


def feeds(model, batch: int = 3):
    return numerics.random_feeds(model, shapes={"x": (batch, 3, 8, 8)})


# --- exporter shape chains -------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_static_channel_dim_folds_with_dynamic_batch(opset):
    model = view_chain([1], opset)  # Reshape(x, [x.size(1), -1]): channels are static
    graph, result = run(model)
    assert ops(graph) == ["Reshape", "Relu"]
    shape = graph.nodes[0].inputs[1]
    assert isinstance(shape, gs.Constant) and shape.values.tolist() == [3, -1]
    assert shape.values.dtype == np.int64
    n_consts = 2 if opset < 13 else 3
    assert result.stats == {"constant_nodes_to_initializers": n_consts, "shapes_folded": 1, "folded_nodes": 2}
    numerics.assert_same_outputs(model, graph, feeds(model))
    assert_idempotent(graph)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_dynamic_batch_dim_stays_static_one_folds(opset):
    # x.view(x.size(0), x.size(1), -1): size(0) is dynamic, size(1) is 3.
    model = view_chain([0, 1], opset)
    graph, result = run(model)
    assert ops(graph) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Relu"]
    concat = graph.nodes[3]
    assert [isinstance(t, gs.Constant) for t in concat.inputs] == [False, True, True]
    assert concat.inputs[1].values.tolist() == [3] and concat.inputs[1].values.dtype == np.int64
    assert result.stats["shapes_folded"] == 1 and result.stats["folded_nodes"] == 1
    numerics.assert_same_outputs(model, graph, feeds(model, batch=5))
    assert_idempotent(graph)


def test_fully_static_chain_folds_completely():
    model = view_chain([0, 1], 13, static=True)
    graph, result = run(model)
    assert ops(graph) == ["Reshape", "Relu"]
    assert graph.nodes[0].inputs[1].values.tolist() == [2, 3, -1]
    assert result.stats == {"constant_nodes_to_initializers": 5, "shapes_folded": 2, "folded_nodes": 5}
    numerics.assert_same_outputs(model, graph, feeds(model, batch=2))


def test_shape_start_end_size_and_negative_gather_fold():
    nodes = [
        helper.make_node("Shape", ["x"], ["tail"], start=1),  # [3, 8, 8] though N is dynamic
        helper.make_node("Shape", ["x"], ["mid"], start=-3, end=-1),
        helper.make_node("Shape", ["x"], ["s"]),
        const("last", np.array(-1, np.int64)),
        helper.make_node("Gather", ["s", "last"], ["w"], axis=0),  # 0-d int64 scalar 8
        helper.make_node("Size", ["x"], ["n"]),  # dynamic: stays
        helper.make_node("Size", ["tail"], ["three"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, ["N", 3, 8, 8])],
                         [("tail", np.int64, [3]), ("mid", np.int64, [2]), ("w", np.int64, []),
                          ("n", np.int64, []), ("three", np.int64, [])], opset=15)
    graph, result = run(model)
    assert ops(graph) == ["Size"]
    out = {t.name: t for t in graph.outputs}
    assert [t.name for t in graph.outputs] == ["tail", "mid", "w", "n", "three"]
    assert out["w"].values.shape == () and out["w"].values.dtype == np.int64 and out["w"].values == 8
    assert out["three"].values.shape == () and out["three"].values == 3
    numerics.assert_same_outputs(model, graph, feeds(model))


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_of_shape_folds_only_static_ranges(opset):
    def sl(dst, start, end):
        if opset < 10:
            return [helper.make_node("Slice", ["s"], [dst], starts=[start], ends=[end], axes=[0])]
        return [const(f"{dst}_st", i64(start)), const(f"{dst}_en", i64(end)), const(f"{dst}_ax", i64(0)),
                helper.make_node("Slice", ["s", f"{dst}_st", f"{dst}_en", f"{dst}_ax"], [dst])]

    nodes = [helper.make_node("Shape", ["x"], ["s"]), *sl("hw", -2, 2**62), *sl("head", 0, 2)]
    model = graphs.model(nodes, [("x", np.float32, ["N", 3, 8, 8])],
                         [("hw", np.int64, [2]), ("head", np.int64, [2])],
                         opset=opset)
    graph, result = run(model)
    hw, head = graph.outputs
    assert isinstance(hw, gs.Constant) and hw.values.tolist() == [8, 8]
    assert not isinstance(head, gs.Constant)  # s[0:2] holds the dynamic N
    assert ops(graph) == ["Shape", "Slice"] and result.stats["shapes_folded"] == 1
    numerics.assert_same_outputs(model, graph, feeds(model))


# --- constant regions ---------------------------------------------------------------


def test_constant_node_forms_become_initializers():
    nodes = [
        const("a", np.array([1.5, -2.0], np.float32)),
        helper.make_node("Constant", [], ["b"], value_float=2.5),
        helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["d"], value_int=3),
        helper.make_node("Constant", [], ["e"], value_ints=[3, 4]),
        helper.make_node("Constant", [], ["f"], value_string="kept"),
    ]
    outs = [("a", np.float32, [2]), ("b", np.float32, []), ("c", np.float32, [2]), ("d", np.int64, []),
            ("e", np.int64, [2])]
    model = graphs.model(nodes, [], outs)
    model.graph.output.append(helper.make_tensor_value_info("f", onnx.TensorProto.STRING, []))
    graph, result = run(model)
    assert result.stats == {"constant_nodes_to_initializers": 5}
    assert ops(graph) == ["Constant"]  # the string stays a node: gs cannot store string initializers
    got = {t.name: t.values for t in graph.outputs if isinstance(t, gs.Constant)}
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {
        "a": (np.float32, (2,)), "b": (np.float32, ()), "c": (np.float32, (2,)), "d": (np.int64, ()),
        "e": (np.int64, (2,))}
    before, after = numerics.run(model, {}), numerics.run(graph, {})
    assert list(before) == list(after) == list("abcdef")
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
        assert after[name].dtype == before[name].dtype
    assert_idempotent(graph)


def test_graph_output_of_constant_subgraph_keeps_name():
    w = graphs.rand(3, 4, seed=1)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("Neg", ["wt"], ["k"]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, ["N", 4])],
                         [("y", np.float32, ["N", 3]), ("k", np.float32, [4, 3])],
                         [("w", w)])
    graph, result = run(model)
    assert [t.name for t in graph.outputs] == ["y", "k"]
    assert isinstance(graph.outputs[1], gs.Constant)
    assert ops(graph) == ["MatMul"] and result.stats == {"folded_nodes": 2}
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(2, 4, seed=2)})
    assert_idempotent(graph)


def test_dtypes_and_scalars_as_onnxruntime_computes_them():
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    nodes = [helper.make_node("ReduceSum", ["t"], ["sum"], keepdims=0),  # 0-d int32
             helper.make_node("Cast", ["sum"], ["half"], to=onnx.TensorProto.FLOAT16),
             helper.make_node("Div", ["sum", "seven"], ["q"]),  # integer division, not float
             helper.make_node("Add", ["x", "half"], ["y"])]
    model = graphs.model(nodes, [("x", np.float16, [2])], [("y", np.float16, [2]), ("q", np.int32, [])],
                         [("t", table), ("seven", np.array(7, np.int32))])
    graph, result = run(model)
    assert ops(graph) == ["Add"]
    half, q = graph.nodes[0].inputs[1], graph.outputs[1]
    assert (half.values.dtype, half.values.shape) == (np.float16, ())
    assert (q.values.dtype, q.values.shape, int(q.values)) == (np.int32, (), 66 // 7)
    numerics.assert_same_outputs(model, graph, {"x": np.array([0.5, -1.0], np.float16)})


def test_scalar_expanded_to_millions_of_elements_is_not_folded():
    # The Expand's shape is computed; inference may or may not know it, the guard holds either way.
    nodes = [const("dims", i64(4, 1000, 1000)), const("one", i64(1)),
             helper.make_node("Mul", ["dims", "one"], ["dims2"]),
             helper.make_node("Expand", ["scalar", "dims2"], ["big"]),
             helper.make_node("Add", ["x", "big"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [1000])], [("y", np.float32, [4, 1000, 1000])],
                         [("scalar", np.array(0.5, np.float32))])
    graph, result = run(model)
    assert ops(graph) == ["Expand", "Add"]
    assert graph.nodes[0].inputs[1].values.tolist() == [4, 1000, 1000]  # its small inputs did fold
    assert [(s.op, "bytes" in s.reason) for s in result.skipped] == [("Expand", True)]
    x = graphs.rand(1000, seed=3)
    numerics.assert_same_outputs(model, graph, {"x": x})
    assert_idempotent(graph)


def test_size_guard_after_evaluation_when_shape_is_unknown(monkeypatch):
    # With no shape information, the value is computed, found too big, and not stored.
    monkeypatch.setattr(fold_constants.si, "infer", lambda graph: {})
    nodes = [helper.make_node("ConstantOfShape", ["dims"], ["big"],
                              value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("Mul", ["x", "big"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [1, 1, 1000])], [("y", np.float32, [1, 1000, 1000])],
                         [("dims", i64(1, 1000, 1000))])
    graph, result = run(model)
    assert ops(graph) == ["ConstantOfShape", "Mul"] and not result.modified
    assert result.skipped[0].op == "ConstantOfShape" and "4000000 bytes" in result.skipped[0].reason


def test_big_weight_transpose_folds_but_upcast_does_not():
    w = graphs.rand(256, 512, seed=4)  # 512 KB, over the 64 KB limit
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Cast", ["h"], ["hf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "hf"], ["z"])]
    model = graphs.model(nodes, [("x", np.float32, [2, 512])],
                         [("y", np.float32, [2, 256]), ("z", np.float32, [2, 256])],
                         [("w", w), ("h", w.T.astype(np.float16))])
    graph, result = run(model)
    assert ops(graph) == ["MatMul", "Cast", "MatMul"]  # the float16 weight would double in size
    assert result.stats == {"folded_nodes": 1}
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(2, 512, seed=5)})


def test_big_weight_read_elsewhere_is_not_duplicated():
    # W stays for the first MatMul, so a stored W^T would add 512 KB to the file.
    w = graphs.rand(512, 256, seed=19, scale=0.05)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Transpose", ["w"], ["wt"]),
             helper.make_node("MatMul", ["y", "wt"], ["z"])]
    model = graphs.model(nodes, [("x", np.float32, [2, 512])], [("z", np.float32, [2, 512])], [("w", w)])
    graph, result = run(model)
    assert ops(graph) == ["MatMul", "Transpose", "MatMul"] and not result.modified
    assert [(s.op, "524288 bytes" in s.reason) for s in result.skipped] == [("Transpose", True)]
    graph, result = run(model, size_limit=1 << 20)  # under the limit, duplicating is fine
    assert ops(graph) == ["MatMul", "MatMul"]
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(2, 512, seed=20)})


def test_random_custom_and_dequantize_are_left_alone():
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[2], seed=1.0),
             helper.make_node("Add", ["x", "r"], ["y"]),
             helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("MyOp", ["cr"], ["m"], domain="custom"),
             helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"]),
             helper.make_node("Add", ["x", "dq"], ["z"])]
    model = graphs.model(nodes, [("x", np.float32, [2])], [("y", np.float32, [2]), ("m", np.float32, [2]),
                                                            ("z", np.float32, [2])],
                         [("c", graphs.rand(2, seed=6)), ("q", np.array([3, -4], np.int8)),
                          ("scale", np.array(0.5, np.float32))], extra_opsets=[("custom", 1)])
    graph, result = run(model)
    assert sorted(ops(graph)) == ["Add", "Add", "DequantizeLinear", "MyOp", "RandomNormal"]  # Relu folded
    assert result.stats == {"folded_nodes": 1}
    assert [(s.op, s.reason) for s in result.skipped] == [
        ("RandomNormal", "nondeterministic operator"),
        ("MyOp", "operator of domain 'custom': cannot evaluate it")]
    assert_idempotent(graph)


def test_training_dropout_and_subgraphs_are_left_alone():
    branch = helper.make_graph([helper.make_node("Neg", ["c"], ["branch_out"])], "b", [],
                               [helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Dropout", ["c", "ratio", "train"], ["d_train"]),
             helper.make_node("Dropout", ["c", "ratio"], ["d_infer"]),  # identity at inference: folds
             helper.make_node("If", ["cond"], ["branch"], then_branch=branch, else_branch=branch),
             helper.make_node("Sum", ["x", "d_train", "d_infer", "branch"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [2])], [("y", np.float32, [2])],
                         [("c", graphs.rand(2, seed=13)), ("ratio", np.array(0.5, np.float32)),
                          ("train", np.array(True)), ("cond", np.array(True))])
    graph, result = run(model)
    assert sorted(ops(graph)) == ["Dropout", "If", "Sum"] and result.stats == {"folded_nodes": 1}
    assert sorted((s.op, s.reason) for s in result.skipped) == [
        ("Dropout", "nondeterministic operator (training-mode Dropout)"), ("If", "has a subgraph")]


def test_sequence_as_an_intermediate_value_folds():
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
             helper.make_node("SequenceAt", ["seq", "one"], ["picked"]),
             helper.make_node("Add", ["x", "picked"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])],
                         [("a", graphs.rand(3, seed=14)), ("b", graphs.rand(3, seed=15)),
                          ("one", np.array(1, np.int64))])
    graph, result = run(model)
    assert ops(graph) == ["Add"] and result.stats == {"folded_nodes": 2}
    np.testing.assert_array_equal(graph.nodes[0].inputs[1].values, graphs.rand(3, seed=15))
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(3, seed=16)})


def test_bfloat16_constant_node_keeps_its_bits():
    bf16 = helper.make_tensor("v", onnx.TensorProto.BFLOAT16, [3], [1.5, -2.25, 3.0e4])
    nodes = [helper.make_node("Constant", [], ["w"], value=bf16),
             helper.make_node("Cast", ["w"], ["wf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["x", "wf"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])
    graph = gs.import_onnx(model)
    fold_constants._constant_nodes_to_initializers(graph)
    (init,) = numerics.to_model(graph).graph.initializer
    init.name = bf16.name
    assert init.data_type == onnx.TensorProto.BFLOAT16
    assert init.SerializeToString() == bf16.SerializeToString()
    graph, result = run(model)
    assert ops(graph) == ["Add"]
    assert result.stats == {"constant_nodes_to_initializers": 1, "folded_nodes": 1}
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(3, seed=17)}, rtol=0, atol=0)


def test_empty_constants_fold():
    # Empty tensors (Resize's roi, exporters' Concat of []) weigh 0 bytes; the rule still holds.
    nodes = [helper.make_node("Concat", ["empty", "empty"], ["ee"], axis=0),
             helper.make_node("Concat", ["ee", "six"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [2, 3])], [("y", np.float32, [6])],
                         [("empty", np.zeros(0, np.int64)), ("six", i64(6))])
    graph, result = run(model)
    assert ops(graph) == ["Reshape"] and result.stats == {"folded_nodes": 2}
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(2, 3, seed=18)})


def test_nothing_to_fold_is_not_modified():
    model = graphs.model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["y"])],
                         [("x", np.float32, ["N", 3])], [("y", np.float32, ["N", 3]), ("s", np.int64, [2])])
    graph, result = run(model)
    assert not result.modified and result.stats == {} and ops(graph) == ["Shape", "Relu"]


def test_node_onnxruntime_cannot_evaluate_is_skipped_not_fatal():
    # Reshape of 6 values to [4] fails in ORT; a node reading it cannot fold either.
    nodes = [helper.make_node("Reshape", ["six", "four"], ["bad"]),
             helper.make_node("Neg", ["bad"], ["bad2"]),
             helper.make_node("Neg", ["c"], ["good"]),
             helper.make_node("Add", ["x", "good"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [2])], [("y", np.float32, [2])],
                         [("six", np.ones(6, np.float32)), ("four", i64(4)), ("c", graphs.rand(2, seed=7))])
    graph = gs.import_onnx(model)
    graph.outputs.append(graph.tensors()["bad2"].to_variable(np.float32, [4]))  # keep the bad chain alive
    result = FoldConstantsPass()(graph)
    assert sorted(ops(graph)) == ["Add", "Neg", "Reshape"]
    assert result.stats == {"folded_nodes": 1}
    assert [(s.op, s.reason.startswith("onnxruntime cannot evaluate it")) for s in result.skipped] == [
        ("Reshape", True)]


def test_falls_back_to_node_by_node_when_the_error_names_no_node(monkeypatch):
    real_run, calls = fold_constants._run, []

    def flaky_run(nodes, graph, feeds, uncertain):
        calls.append(len(nodes))
        if len(nodes) > 1:
            raise fold_constants._EvalError("anonymous failure", None)
        return real_run(nodes, graph, feeds, uncertain)

    monkeypatch.setattr(fold_constants, "_run", flaky_run)
    model = chain_model(5)
    graph, result = run(model)
    assert calls == [5, 1, 1, 1, 1, 1] and result.stats == {"folded_nodes": 5}
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(4, seed=8)})


def chain_model(n: int) -> onnx.ModelProto:
    """y = x + c + 1 + 1 + ... (n Adds on constants) folds to one Add."""
    nodes = [helper.make_node("Add", [f"c{i}", "one"], [f"c{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Add", ["x", f"c{n}"], ["y"]))
    return graphs.model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])],
                        [("c0", graphs.rand(4, seed=9)), ("one", np.ones(4, np.float32))])


def test_long_chain_folds_in_one_session(monkeypatch):
    real_run, returned = fold_constants._run, []

    def spy(nodes, graph, feeds, uncertain):
        values = real_run(nodes, graph, feeds, uncertain)
        returned.append(sorted(values))
        return values

    monkeypatch.setattr(fold_constants, "_run", spy)
    model = chain_model(2000)
    graph, result = run(model)
    assert ops(graph) == ["Add"] and result.stats == {"folded_nodes": 2000}
    assert returned == [["c2000"]]  # one session, and only the value read outside is kept
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(4, seed=10)})


def test_from_config_reads_the_size_limit():
    assert FoldConstantsPass.from_config(OptimizeConfig(fold_size_limit=123)).size_limit == 123
    nodes = [helper.make_node("Tile", ["c", "reps"], ["t"]), helper.make_node("Add", ["x", "t"], ["y"])]
    model = graphs.model(nodes, [("x", np.float32, [64])], [("y", np.float32, [64])],
                         [("c", graphs.rand(4, seed=11)), ("reps", i64(16))])
    assert run(model, size_limit=16)[0].nodes[0].op == "Tile"  # 256 bytes > 16 and > 16-byte source
    graph, result = run(model, size_limit=256)
    assert ops(graph) == ["Add"]
    numerics.assert_same_outputs(model, graph, {"x": graphs.rand(64, seed=12)})


# --- a real exporter ------------------------------------------------------------------


def test_pytorch_export_with_dynamic_batch():
    """tests/data/torch_cnn_view.onnx: TorchScript export (see ``export_torch_cnn``)."""
    model = onnx.load(str(DATA / "torch_cnn_view.onnx"))
    graph, result = run(model)
    # x.size(1) folds to 8; x.size(0) (dynamic) is left to simplify_reshape.
    counts = [ops(graph).count(op) for op in ("Shape", "Gather", "Unsqueeze", "Concat", "Constant")]
    assert counts == [1, 1, 2, 2, 0]
    assert result.stats == {"constant_nodes_to_initializers": 7, "shapes_folded": 1, "folded_nodes": 1}
    pieces = [n.inputs for n in graph.nodes if n.op == "Concat"][0]
    assert isinstance(pieces[1], gs.Constant) and pieces[1].values.tolist() == [8]
    for batch in (1, 5):
        numerics.assert_same_outputs(model, graph, feeds(model, batch=batch))
    assert_idempotent(graph)


def export_torch_cnn(path: Path = DATA / "torch_cnn_view.onnx") -> None:  # pragma: no cover - needs torch
    """Rebuild the test model: ``python -m tests.passes.test_fold_constants`` (CPU torch)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc, self.fc2 = nn.Linear(8 * 4 * 4, 10), nn.Linear(8, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
            pooled = x.view(x.size(0), x.size(1), -1).mean(-1)
            return self.fc(x.view(x.size(0), -1)) + self.fc2(pooled)

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 8, 8), str(path), dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})


if __name__ == "__main__":  # pragma: no cover
    export_torch_cnn()
