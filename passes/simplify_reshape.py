"""Turn Reshape targets computed from the data's own shape into constants.

Exporters write ``x.view(x.size(0), x.size(1), 4, 16)`` as

    Shape(x) -> Gather(0) -> Unsqueeze ─┐
    Shape(x) -> Gather(1) -> Unsqueeze ─┼─ Concat -> Reshape(x, ·)
                         Constant [4, 16] ─┘

With dynamic axes constant folding cannot remove this chain, but Reshape has its own
way to say "keep input dimension j here": the value 0 at position j (when
``allowzero`` is 0, the default). So when every piece of the Concat is either a
constant or dimension j of the Reshape's own data input placed at position j, the
target becomes one constant with 0 at those positions and the chain dies.

More generally (``_symbolic_shapes``), any computed target whose every entry is
known from the operators becomes a constant: an entry equal to x's own dim at its
position becomes 0 (even when read from another tensor whose dim provably equals
it, as attention's ``Shape(q)[2]`` for the rows of ``softmax(q k^T) v``), a static
entry becomes its value, and the target is left alone if any other entry remains.
When x's rank is unknown, the Concat pieces are matched structurally instead.

Recognised forms of "dimension j of x" (1-element int64 tensors):
    Unsqueeze(Gather(Shape(x), j), axes=[0])   (axes as attribute or input)
    Gather(Shape(x), [j])
    Slice(Shape(x), [j], [j+1])                 (steps 1 or absent)
    Shape(x, start=j, end=j+1)                  (opset 15)
Refused: a dimension placed at another position (0 would copy the wrong one),
``allowzero=1`` (0 would mean a zero-size dimension), constant pieces containing 0
(legal, but then the constant already says "copy"; kept as they are only if the
Reshape's input rank covers that position), more than one -1, unknown data rank.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import Names, const_value, finish, is_standard, optional_input, producer
from onnxopt.pass_base import GraphPass, PassResult
from onnxopt.passes._symbolic_shapes import Facts, Sym

logger = logging.getLogger(__name__)


def _int(v: np.ndarray | None) -> int | None:
    return int(v.reshape(-1)[0]) if v is not None and v.size == 1 and v.dtype.kind in "iu" else None


def _shape_source(t: gs.Tensor) -> tuple[gs.Tensor, int, int] | None:
    """(x, start, end) when ``t`` is Shape(x)[start:end] (Shape with its opset 15 range)."""
    node = producer(t)
    if node is None or node.op != "Shape" or not is_standard(node):
        return None
    x = node.inputs[0]
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    rank = len(x.shape) if x.shape is not None else None
    if start < 0 or (end is not None and int(end) < 0):
        if rank is None:
            return None
        start = start % rank if start < 0 else start
        end = int(end) % rank if end is not None and int(end) < 0 else end
    return x, start, (int(end) if end is not None else 1 << 62)


def dim_of(t: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """(x, j) when the 1-element tensor ``t`` holds dimension j of x (forms in the docstring)."""
    node = producer(t)
    if node is None or not is_standard(node):
        return None
    if node.op == "Unsqueeze":
        axes = node.attrs.get("axes") if "axes" in node.attrs else const_value(optional_input(node, 1))
        if axes is None or list(np.asarray(axes).reshape(-1)) not in ([0], [-1]):
            return None
        inner = producer(node.inputs[0])
        if inner is None or inner.op != "Gather" or not is_standard(inner):
            return None
        index = const_value(inner.inputs[1])
        if index is None or index.ndim != 0:
            return None
        return _pick(inner.inputs[0], int(index), int(inner.attrs.get("axis", 0)))
    if node.op == "Gather":
        index = const_value(node.inputs[1])
        if index is None or index.shape != (1,):
            return None
        return _pick(node.inputs[0], int(index[0]), int(node.attrs.get("axis", 0)))
    if node.op == "Slice":
        return _slice_dim(node)
    if node.op == "Shape":
        src = _shape_source(t)
        if src and src[2] - src[1] == 1:
            return src[0], src[1]
    return None


def _pick(shape_t: gs.Tensor, index: int, axis: int) -> tuple[gs.Tensor, int] | None:
    src = _shape_source(shape_t)
    if src is None or axis != 0:
        return None
    x, start, end = src
    if index < 0:
        if x.shape is None:
            return None
        index += min(end, len(x.shape)) - start
    j = start + index
    return (x, j) if start <= j < end else None


def _slice_dim(node: gs.Node) -> tuple[gs.Tensor, int] | None:
    if len(node.inputs) < 3:
        return None
    starts, ends = const_value(node.inputs[1]), const_value(node.inputs[2])
    axes = const_value(node.inputs[3]) if len(node.inputs) > 3 else np.array([0])
    steps = const_value(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes[0]) != 0 or int(steps[0]) != 1:
        return None
    s, e = int(starts[0]), int(ends[0])
    if s < 0 or e != s + 1:
        return None
    return _pick(node.inputs[0], s, 0)


def _known_target(node: gs.Node, facts: Facts) -> np.ndarray | None:
    """The target as a constant when every entry is static or x's own dim at its position."""
    value, dims = facts.value(node.inputs[1]), facts.dims(node.inputs[0])
    if value is None or dims is None or list(value).count(-1) > 1:
        return None
    out = []
    for i, v in enumerate(value):
        if type(v) is int:
            out.append(v)  # the runtime value itself: a 0 means "copy" exactly as it did
        elif isinstance(v, Sym) and i < len(dims) and dims[i] == v:
            out.append(0)
        else:
            return None
    return np.array(out, dtype=np.int64)


class SimplifyReshapePass(GraphPass):
    """Reshape(x, Concat(dims of x, constants)) -> Reshape(x, constant with 0 = keep dim)."""

    name = "simplify_reshape"

    def call(self, graph: gs.Graph) -> PassResult:
        names = Names(graph)
        facts = None
        count = 0
        for node in list(graph.nodes):
            if node.op != "Reshape" or not is_standard(node) or int(node.attrs.get("allowzero", 0)):
                continue
            if len(node.inputs) < 2 or const_value(node.inputs[1]) is not None:
                continue
            facts = facts or Facts(graph)  # a constant target keeps every tensor's value: facts stay true
            target = _known_target(node, facts)
            target = target if target is not None else self._target(node)
            if target is None:
                continue
            node.inputs[1] = gs.Constant(names(f"{node.name or 'reshape'}_shape"), target)
            count += 1
        if count:
            finish(graph)
        return PassResult(graph, bool(count), {"simplify_reshape": count} if count else {})

    @staticmethod
    def _target(node: gs.Node) -> np.ndarray | None:
        data, shape = node.inputs[0], node.inputs[1]
        concat = producer(shape)
        if concat is None or concat.op != "Concat" or not is_standard(concat) or const_value(shape) is not None:
            return None
        rank = len(data.shape) if data.shape is not None else None
        values: list[int] = []
        const_zero = False  # a constant 0 already means "copy"; then the rank must cover it
        for piece in concat.inputs:
            value = const_value(piece)
            if value is not None:
                if value.ndim > 1 or value.dtype.kind not in "iu":
                    return None
                values.extend(int(v) for v in value.reshape(-1))
                const_zero |= bool((value == 0).any())
                continue
            found = dim_of(piece)
            if found is None or found[0] is not data or found[1] != len(values):
                return None
            values.append(0)
        # A dimension read from Shape(x)[j] proves rank(x) > j; constant zeros need the rank.
        if values.count(-1) > 1 or const_zero and (rank is None or len(values) > rank and 0 in values[rank:]):
            return None
        return np.array(values, dtype=np.int64)
