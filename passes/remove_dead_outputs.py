"""Remove everything no graph output needs.

In order:

1. With ``config.outputs`` (``--outputs``), keep only the graph outputs named there.
   They keep the graph's order, not the order the user typed: the order of a
   model's outputs is part of its interface (positional consumers, runtimes that
   return a list), so dropping heads must not also permute the rest. A name that is
   not a graph output is a ``UserError`` listing the valid names.
2. Remove nodes none of whose outputs reaches a graph output (gs ``cleanup``, which
   also recurses into subgraphs). A tensor read only inside an If/Loop/Scan body is
   needed: gs counts the tensors a subgraph reads from outside as inputs of the node
   that owns the subgraph. Initializers nothing reads go with the nodes.
3. Drop node outputs that nothing reads, where the op's schema (``onnx.defs`` at
   the model's opset) marks that output optional: Dropout's mask, LSTM/GRU/RNN's Y
   or Y_h, MaxPool's Indices, LayerNormalization's Mean/InvStdDev, the running
   statistics of BatchNormalization in opset 14+, ... A trailing output is removed;
   one followed by a read output becomes the empty name, the spec's way to omit an
   optional output. Nodes of non-standard domains are never trimmed (their schema
   is unknown), nor are If/Loop/Scan (their outputs are variadic, not optional).
   Refused, and listed in ``skipped``: BatchNormalization before opset 14, whose
   extra outputs *are* its training mode (onnxruntime then normalizes with the
   batch statistics); removing them would change Y.
4. Remove graph inputs that are initializers nothing reads (IR < 4 models list
   weights as inputs). gs's importer already leaves initializers out of the graph
   inputs and drops unread ones, so this only meets constant inputs that code put
   back. Real graph inputs are never removed, even when unused: they are the
   model's interface.

``stats`` counts ``nodes``, ``node_outputs``, ``graph_outputs``, ``initializers`` and
``graph_inputs`` removed; ``modified`` compares counts before and after, because
gs ``cleanup`` does not say what it removed. gs removes any node whose outputs are
unused, custom-domain nodes included: ONNX has no side-effecting operators.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs
from onnx.defs import OpSchema

from onnxopt import graph_utils as gu
from onnxopt.config import OptimizeConfig
from onnxopt.errors import UserError
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)

OPTIONAL = OpSchema.FormalParameterOption.Optional


def select_outputs(graph: gs.Graph, wanted: Iterable[str]) -> None:
    """Keep only the graph outputs named in ``wanted``, in the graph's order."""
    wanted = list(wanted)
    valid = [o.name for o in graph.outputs]
    unknown = [n for n in wanted if n not in valid]
    if unknown or not wanted:
        what = f"no graph output named {', '.join(map(repr, unknown))}" if unknown else "names no output"
        raise UserError(f"--outputs: {what} (graph outputs: {', '.join(valid)})")
    graph.outputs = [o for o in graph.outputs if o.name in set(wanted)]


def census(graph: gs.Graph) -> Counter[str]:
    """What the pass can remove, counted over the graph, its subgraphs and functions."""
    graphs = list(gu.iter_graphs(graph))
    for f in graph.functions:
        graphs.extend(gu.iter_graphs(f))
    initializers = {name for g in graphs for name, t in g.tensors().items() if isinstance(t, gs.Constant)}
    return Counter(
        nodes=sum(len(g.nodes) for g in graphs),
        initializers=len(initializers),
        graph_outputs=len(graph.outputs),
        graph_inputs=len(graph.inputs),
    )


def _read_names(graph: gs.Graph) -> set[str]:
    """Names of tensors some node reads or some (sub)graph returns."""
    names = set()
    for g in gu.iter_graphs(graph):
        names.update(t.name for t in g.outputs)
        for node in g.nodes:
            names.update(t.name for t in node.inputs)
    return names


def _optional_outputs(node: gs.Node, opset: int) -> set[int]:
    """Indices of the node's outputs its schema marks optional."""
    if not gu.is_standard(node):
        return set()
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return set()
    formal = schema.outputs
    return {i for i in range(len(node.outputs)) if i < len(formal) and formal[i].option == OPTIONAL}


def _trim(node: gs.Node, drop: list[int]) -> None:
    for i in drop:
        node.outputs[i] = gs.Variable.empty()
    while node.outputs and node.outputs[-1].is_empty():
        node.outputs.pop()


def trim_optional_outputs(graph: gs.Graph, skipped: list[Skip]) -> int:
    """Drop unread optional node outputs everywhere (step 3); return how many."""
    opset = gu.opset(graph)
    read = _read_names(graph)
    removed = 0
    for g in gu.iter_graphs(graph):
        for node in g.nodes:
            optional = _optional_outputs(node, opset)
            drop = [i for i, t in enumerate(node.outputs)
                    if i in optional and not t.is_empty() and t.name not in read]
            if not drop or len(drop) == sum(not t.is_empty() for t in node.outputs):
                continue  # nothing to drop, or a dead node cleanup removes whole
            if node.op == "BatchNormalization" and opset < 14:
                skipped.append(Skip(node.name, node.op, "training-mode BatchNormalization (opset < 14): "
                                    "removing its unused statistics outputs would change Y"))
                continue
            _trim(node, drop)
            removed += len(drop)
    return removed


def remove_unused_constant_inputs(graph: gs.Graph) -> None:
    """Drop initializers listed as graph inputs that nothing reads (step 4)."""
    read = _read_names(graph)
    graph.inputs = [t for t in graph.inputs if not (isinstance(t, gs.Constant) and t.name not in read)]


class RemoveDeadOutputsPass(GraphPass):
    """Keep the chosen graph outputs and remove what none of them needs (see the module docstring)."""

    name = "remove_dead_outputs"

    def __init__(self, outputs: Iterable[str] | None = None):
        self.outputs = None if outputs is None else tuple(outputs)

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> RemoveDeadOutputsPass:
        return cls(config.outputs)

    def call(self, graph: gs.Graph) -> PassResult:
        before = census(graph)
        if self.outputs is not None:
            select_outputs(graph, self.outputs)
        graph.cleanup(remove_unused_graph_inputs=False)
        skipped: list[Skip] = []
        trimmed = trim_optional_outputs(graph, skipped)
        remove_unused_constant_inputs(graph)
        after = census(graph)
        stats = {k: before[k] - after[k] for k in before if before[k] != after[k]}
        if trimmed:
            stats["node_outputs"] = trimmed
        if stats:
            gu.finish(graph)
            logger.debug("removed %s", stats)
        return PassResult(graph, bool(stats), stats, tuple(skipped))
