"""Small helpers over onnx-graphsurgeon graphs that several passes share.

Rules every pass follows, encoded here once:
- graph input and output tensors keep their names: to remove a node whose output is
  a graph output, the producer of its input is made to write that output instead;
- a tensor consumed inside a control-flow subgraph is a consumer like any other
  (gs gives inner nodes the outer tensor object, so ``tensor.outputs`` sees them);
- new tensors get deterministic names derived from the node they come from.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

STANDARD_DOMAINS = ("", "ai.onnx", None)  # gs leaves the domain None for standard nodes


def is_standard(node: gs.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


# Constant-node attributes that hold a plain value, and the dtype the op gives them.
_CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t is None or len(t.inputs) != 1:
        return None
    prod = t.inputs[0]
    if prod.op != "Constant" or not is_standard(prod):
        return None
    if "value" in prod.attrs:
        v = prod.attrs["value"]
        return np.asarray(v.values) if isinstance(v, gs.Constant) else None
    for key, dtype in _CONSTANT_ATTRS.items():
        if key in prod.attrs:
            return np.asarray(prod.attrs[key], dtype)
    return None


def optional_input(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input ``i``, or None when it is absent or given as the empty name."""
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    return None if isinstance(t, gs.Variable) and not t.name else t


def is_const(t: gs.Tensor | None) -> bool:
    return const_value(t) is not None


def is_graph_input(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(t is i for i in graph.inputs)


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(t is o for o in graph.outputs)


def only_consumer(graph: gs.Graph, t: gs.Tensor, node: gs.Node) -> bool:
    """True when ``node`` is the only reader of ``t`` and ``t`` is not a graph output."""
    return len(t.outputs) == 1 and t.outputs[0] is node and not is_graph_output(graph, t)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor, dst: gs.Tensor) -> bool:
    """Remove ``node`` whose output ``dst`` equals its input ``src``.

    Returns False, changing nothing, when that would rename a graph input or output.
    """
    if not is_graph_output(graph, dst):
        replace_uses(dst, src)
        node.outputs.clear()
        node.inputs.clear()
        return True
    # dst is a graph output: its name must survive, so src's producer writes dst.
    prod = producer(src)
    if (
        prod is None
        or isinstance(src, gs.Constant)
        or is_graph_input(graph, src)
        or is_graph_output(graph, src)
        or len(src.outputs) != 1
    ):
        return False
    node.outputs.clear()
    node.inputs.clear()
    prod.outputs[prod.outputs.index(src)] = dst
    return True


class Names:
    """Hands out tensor and node names not yet used in the graph, deterministically."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every control-flow subgraph in it, outermost first."""
    yield graph
    for node in graph.nodes:
        for v in node.attrs.values():
            if isinstance(v, gs.Graph):
                yield from iter_graphs(v)


def opset(graph: gs.Graph, domain: str = "") -> int:
    if domain == "" and graph.opset:
        return int(graph.opset)
    return int(graph.import_domains and next(
        (o.version for o in graph.import_domains if o.domain in (domain, "ai.onnx" if domain == "" else domain)),
        0,
    ) or 0)


def finish(graph: gs.Graph) -> None:
    """Leave the graph clean and sorted, as every pass must hand it back."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
