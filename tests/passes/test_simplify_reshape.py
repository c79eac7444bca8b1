import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.passes.simplify_reshape import SimplifyReshapePass
from tests import graphs, numerics


def dim_piece(prefix: str, src: str, j: int, opset: int, form: str = "unsqueeze"):
    """Nodes computing the 1-element tensor `prefix` = shape(src)[j] in one of the exporter forms."""
    shape = helper.make_node("Shape", [src], [f"{prefix}_shape"])
    if form == "unsqueeze":
        idx = helper.make_node("Constant", [], [f"{prefix}_idx"], value=helper.make_tensor("i", 7, [], [j]))
        gather = helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_idx"], [f"{prefix}_g"], axis=0)
        if opset < 13:
            unsq = helper.make_node("Unsqueeze", [f"{prefix}_g"], [prefix], axes=[0])
            return [shape, idx, gather, unsq]
        axes = helper.make_node("Constant", [], [f"{prefix}_ax"], value=helper.make_tensor("a", 7, [1], [0]))
        unsq = helper.make_node("Unsqueeze", [f"{prefix}_g", f"{prefix}_ax"], [prefix])
        return [shape, idx, gather, axes, unsq]
    if form == "slice":
        consts = [helper.make_node("Constant", [], [f"{prefix}_{n}"], value=helper.make_tensor(n, 7, [1], [v]))
                  for n, v in (("s", j), ("e", j + 1))]
        return [shape, *consts, helper.make_node("Slice", [f"{prefix}_shape", f"{prefix}_s", f"{prefix}_e"], [prefix])]
    raise ValueError(form)


def view_model(opset: int, form: str = "unsqueeze", positions=(0, 1), tail=(4, 16)):
    """x (N, S, 64) -> Reshape(x, concat(dims of x at `positions`, tail)) -> y."""
    nodes, pieces = [], []
    for pos, j in enumerate(positions):
        nodes += dim_piece(f"d{pos}", "x", j, opset, form)
        pieces.append(f"d{pos}")
    nodes.append(helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", 7, [len(tail)], list(tail))))
    nodes.append(helper.make_node("Concat", [*pieces, "tail"], ["target"], axis=0))
    nodes.append(helper.make_node("Reshape", ["x", "target"], ["y"]))
    rank = len(positions) + len(tail)
    out = [f"o{i}" for i in range(rank)]
    return graphs.model(nodes, [("x", np.float32, ["N", "S", 64])], [("y", np.float32, out)], opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("form", ["unsqueeze", "slice"])
def test_dims_of_the_data_become_zeros(opset, form):
    model = view_model(opset, form)
    graph = gs.import_onnx(model)
    result = SimplifyReshapePass()(graph)
    assert result.modified and result.stats == {"simplify_reshape": 1}
    assert [n.op for n in graph.nodes] == ["Reshape"]
    assert graph.nodes[0].inputs[1].values.tolist() == [0, 0, 4, 16]
    for shape in ((2, 5, 64), (1, 3, 64)):  # the rewrite must hold for every dynamic size
        numerics.assert_same_outputs(model, graph, {"x": graphs.rand(*shape)}, rtol=0, atol=0)
    assert not SimplifyReshapePass()(graph).modified


def test_dimension_moved_to_another_position_is_refused():
    model = view_model(13, positions=(1, 0))  # (S, N, ...): 0 would copy the wrong dimension
    graph = gs.import_onnx(model)
    assert not SimplifyReshapePass()(graph).modified
    assert len(graph.nodes) == len(model.graph.node)


def test_dims_of_another_tensor_are_refused():
    nodes = dim_piece("d0", "other", 0, 13) + [
        helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", 7, [1], [-1])),
        helper.make_node("Concat", ["d0", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, ["N", 8]), ("other", np.float32, ["M", 8])],
                         [("y", np.float32, ["a", "b"])], opset=13)
    assert not SimplifyReshapePass()(gs.import_onnx(model)).modified


def test_allowzero_is_refused():
    model = view_model(14)
    next(n for n in model.graph.node if n.op_type == "Reshape").attribute.append(helper.make_attribute("allowzero", 1))
    assert not SimplifyReshapePass()(gs.import_onnx(model)).modified


@pytest.mark.parametrize("opset", [11, 13])
def test_dims_read_from_a_tensor_with_provably_equal_dims_become_zeros(opset):
    """y = x @ W keeps x's leading dims: y.view(x.size(0), x.size(1), 4, 16) keeps them too."""
    nodes = dim_piece("d0", "x", 0, opset) + dim_piece("d1", "x", 1, opset) + [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", 7, [2], [4, 16])),
        helper.make_node("Concat", ["d0", "d1", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["z"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, ["N", "S", 64])], [("z", np.float32, ["a", "b", 4, 16])],
                         [("w", graphs.rand(64, 64))], opset=opset)
    graph = gs.import_onnx(model)
    result = SimplifyReshapePass()(graph)
    assert result.modified and result.stats == {"simplify_reshape": 1}
    assert [n.op for n in graph.nodes] == ["MatMul", "Reshape"]
    assert graph.nodes[1].inputs[1].values.tolist() == [0, 0, 4, 16]
    for shape in ((2, 5, 64), (1, 1, 64)):
        numerics.assert_same_outputs(model, graph, {"x": graphs.rand(*shape)})
    assert not SimplifyReshapePass()(graph).modified


def test_dims_that_only_sometimes_match_are_refused():
    """x (N, S, 64) + b (M, 1, 1): the sum's dim 0 is N or M, whichever is not 1, so M != dim 0."""
    nodes = dim_piece("d0", "b", 0, 13) + [
        helper.make_node("Add", ["x", "b"], ["y"]),
        helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", 7, [1], [-1])),
        helper.make_node("Concat", ["d0", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["z"]),
    ]
    model = graphs.model(nodes, [("x", np.float32, ["N", "S", 64]), ("b", np.float32, ["M", 1, 1])],
                         [("z", np.float32, ["a", "b"])], opset=13)
    assert not SimplifyReshapePass()(gs.import_onnx(model)).modified
