"""Merge duplicate constants and duplicate nodes (common subexpression elimination).

Exporters repeat themselves: ``Shape(x)`` once per ``x.size(i)`` call, the same
scale constant once per layer, the same ``Unsqueeze`` of a sequence length in every
attention block. Two nodes compute the same thing when they have the same op,
domain and attributes and read the very same input tensors; two constants are the
same when dtype, shape and bytes are equal. The later one is dropped and its readers
read the earlier one's outputs.

Nodes are visited in topological order, so once two producers merge their readers
become duplicates too and merge in the same sweep. Left alone: nondeterministic ops
(two RandomNormal draws differ), nodes with subgraph attributes, nodes with no
outputs, and duplicates whose outputs are graph outputs (their names must stay).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import finish, has_subgraph, is_graph_output, replace_uses
from onnxopt.pass_base import GraphPass, PassResult

logger = logging.getLogger(__name__)

NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


def _digest(values: np.ndarray) -> tuple:
    arr = np.asarray(values)  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
    return arr.dtype.str, arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).digest()


def _attr_key(value) -> object:
    if isinstance(value, gs.Constant):
        return ("tensor", _digest(value.values))
    if isinstance(value, np.ndarray):
        return ("array", _digest(value))
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, float) and value != value:  # NaN attributes still compare equal to themselves
        return ("nan",)
    return value


class EliminateCommonSubexpressionsPass(GraphPass):
    """Identical constants and identical nodes on identical inputs become one."""

    name = "eliminate_common_subexpressions"

    def call(self, graph: gs.Graph) -> PassResult:
        stats = {}
        constants = self._constants(graph)
        graph.toposort()
        nodes = self._nodes(graph)
        if constants:
            stats["constants"] = constants
        if nodes:
            stats["nodes"] = nodes
        if stats:
            finish(graph)
        return PassResult(graph, bool(stats), stats)

    @staticmethod
    def _constants(graph: gs.Graph) -> int:
        # Group by dtype, shape and leading bytes first: only tensors that collide there are
        # hashed whole, so distinct large weights are never read end to end.
        groups: dict[tuple, list[gs.Constant]] = {}
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.outputs and not is_graph_output(graph, t):
                arr = np.asarray(t.values)
                groups.setdefault((arr.dtype.str, arr.shape, arr.reshape(-1)[:16].tobytes()), []).append(t)
        merged = 0
        for group in groups.values():
            first: dict[tuple, gs.Constant] = {}
            for t in group if len(group) > 1 else ():
                keep = first.setdefault(_digest(t.values), t)
                if keep is not t:
                    replace_uses(t, keep)
                    merged += 1
        return merged

    @staticmethod
    def _nodes(graph: gs.Graph) -> int:
        first: dict[tuple, gs.Node] = {}
        merged = 0
        for node in list(graph.nodes):
            if node.op in NONDETERMINISTIC or not node.outputs or has_subgraph(node):
                continue
            key = (
                node.op,
                node.domain or "",
                tuple(t.name for t in node.inputs),
                len(node.outputs),
                tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())),
            )
            keep = first.setdefault(key, node)
            if keep is node or any(is_graph_output(graph, t) for t in node.outputs):
                continue
            for old, new in zip(node.outputs, keep.outputs):
                replace_uses(old, new)
            node.outputs.clear()
            merged += 1
        return merged
