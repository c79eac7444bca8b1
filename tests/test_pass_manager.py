import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.errors import PassError
from onnxopt.graph_utils import bypass, finish
from onnxopt.pass_base import GraphPass, PassManager, PassResult
from tests import graphs, numerics


class DropOneIdentity(GraphPass):
    """Removes one Identity per call, so reaching the fixed point takes several rounds."""

    name = "drop_one_identity"

    def call(self, graph):
        for node in graph.nodes:
            if node.op == "Identity" and bypass(graph, node, node.inputs[0], node.outputs[0]):
                finish(graph)
                return PassResult(graph, True, {"identity": 1})
        return PassResult(graph, False)


class Broken(GraphPass):
    name = "broken"

    def call(self, graph):
        graph.nodes.clear()  # half a rewrite, then a crash
        raise RuntimeError("boom")


def chain(n: int):
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes += [helper.make_node("Neg", [f"t{n}"], ["y"])]
    return graphs.model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])])


def test_repeats_to_fixed_point_and_records():
    model = chain(3)
    graph = gs.import_onnx(model)
    pm = PassManager([DropOneIdentity()], max_steps=10, strict=True)
    graph = pm.run(graph)
    assert [n.op for n in graph.nodes] == ["Relu", "Neg"]
    assert [r.modified for r in pm.records] == [True, True, True, False]
    assert [(r.nodes_before, r.nodes_after) for r in pm.records[:3]] == [(5, 4), (4, 3), (3, 2)]
    numerics.assert_same_outputs(model, graph)


def test_max_steps_bounds_the_rounds():
    pm = PassManager([DropOneIdentity()], max_steps=2)
    graph = pm.run(gs.import_onnx(chain(3)))
    assert len(pm.records) == 2 and sum(n.op == "Identity" for n in graph.nodes) == 1


def test_after_each_runs_only_on_change():
    seen = []
    PassManager([DropOneIdentity()], max_steps=10, after_each=[lambda p, g, r: seen.append(r.stats)]).run(
        gs.import_onnx(chain(2))
    )
    assert seen == [{"identity": 1}, {"identity": 1}]


def test_strict_names_the_failing_pass():
    with pytest.raises(PassError, match="'broken' failed at step 1"):
        PassManager([Broken()], strict=True).run(gs.import_onnx(chain(1)))


def test_failing_pass_is_undone_and_recorded():
    model = chain(1)
    pm = PassManager([Broken(), DropOneIdentity()], max_steps=5)
    graph = pm.run(gs.import_onnx(model))
    assert [n.op for n in graph.nodes] == ["Relu", "Neg"]
    assert pm.records[0].error == "RuntimeError: boom"
    numerics.assert_same_outputs(model, graph)
