"""Move an element-wise op that follows every output of a Split above the Split.

If each part p_i = Split(x)_i is read only by f(p_i), with the same f everywhere, then
[f(p_1), ..., f(p_n)] = Split(f(x)): one node on the whole tensor instead of n small ones.
This is what turns Conv, Split, Relu, Relu into Conv, Relu, Split after
``merge_parallel``, and MatMul, Split, Add, Add, Add into MatMul, Add, Split.

For a binary op with a constant, f_i(p) = p op c_i (or c_i op p, same side in every
branch, since Sub, Div and Pow are not symmetric), the hoisted constant is
C = concat_axis(broadcast(c_i, part_i)) along the split axis, so that
Split(x op C)_i = p_i op c_i. This holds only when c_i broadcasts to part_i without
changing its shape: rank(c_i) <= rank(x), and every dim of c_i (aligned from the right)
is 1 or the part's dim: the split size s_i on the split axis, x's dim elsewhere (which
must then be known). Dims of size 1 off the split axis stay 1 in C, so C is no larger
than needed; identical constants that are 1 along the split axis are used as they are.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import Names, const_value, finish, is_graph_output, is_standard
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)


# Shape- and dtype-preserving ops of one tensor input (Clip's min/max inputs must agree).
UNARY = frozenset({
    "Abs", "Ceil", "Celu", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu",
    "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
})
# Binary ops hoisted when the other operand is a constant; PRelu's slope is on the right.
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu"})
ELEMENTWISE = UNARY | BINARY


class HoistSplitElementwisePass(GraphPass):
    """Replace n identical element-wise nodes after a Split's n outputs by one before it.

    Handled: the unary ops in ``UNARY`` with equal attributes (Clip with equal constant
    min/max); Add, Sub, Mul, Div, Pow with a constant operand on the same side in every
    branch, and PRelu with a constant slope; Split in every opset form (``split``
    attribute, input, ``num_outputs``). Chains (Relu then Mul) are hoisted in one run.

    Refused: a Split output with another reader or that is a graph output; ops or
    attributes that differ between branches; constants that would change a part's shape
    or whose fit cannot be checked (unknown rank, dims or split sizes): those are listed
    in ``skipped``.
    """

    name = "hoist_split_elementwise"

    def call(self, graph: gs.Graph) -> PassResult:
        names, count, skipped = Names(graph), 0, []
        for split in [n for n in graph.nodes if n.op == "Split" and is_standard(n)]:
            while True:
                found = _hoist(graph, names, split)
                if isinstance(found, str):
                    skipped.append(Skip(split.name, split.op, found))
                if found is not True:
                    break
                count += 1
        if count:
            finish(graph)
        stats = {"hoist_split_elementwise": count} if count else {}
        return PassResult(graph, bool(count), stats, tuple(skipped))


def _readers(graph: gs.Graph, split: gs.Node) -> list[gs.Node] | None:
    """The one element-wise reader of each Split output, all of the same op and attributes."""
    readers = []
    for out in split.outputs:
        if len(out.outputs) != 1 or is_graph_output(graph, out):
            return None
        node = out.outputs[0]
        if node.op not in ELEMENTWISE or not is_standard(node) or len(node.outputs) != 1:
            return None
        readers.append(node)
    first = readers[0]
    if len({id(n) for n in readers}) != len(readers):
        return None
    if any(n.op != first.op or not _same_attrs(n.attrs, first.attrs) for n in readers):
        return None
    return readers


def _same_attrs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _same_const(a: gs.Tensor, b: gs.Tensor) -> bool:
    if a is b or (not a.name and not b.name):
        return True
    va, vb = const_value(a), const_value(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and np.array_equal(va, vb)


def _operands(split: gs.Node, readers: list[gs.Node]) -> tuple[int, list[np.ndarray] | None] | None:
    """(position of the Split part, per-branch constants or None for a unary op), else None."""
    op = readers[0].op
    if op in UNARY:
        ok = all(
            n.inputs[0] is out and not any(t is out for t in n.inputs[1:])
            and len(n.inputs) == len(readers[0].inputs)
            and all(_same_const(t, t0) for t, t0 in zip(n.inputs[1:], readers[0].inputs[1:], strict=False))
            for n, out in zip(readers, split.outputs, strict=False)
        )
        return (0, None) if ok else None
    pos = 0 if readers[0].inputs[0] is split.outputs[0] else 1
    if op == "PRelu" and pos != 0:
        return None
    consts = []
    for n, out in zip(readers, split.outputs, strict=False):
        if len(n.inputs) != 2 or n.inputs[pos] is not out or n.inputs[1 - pos] is out:
            return None
        c = const_value(n.inputs[1 - pos])
        if c is None:
            return None
        consts.append(c)
    return pos, consts


def _rank(tensors) -> int | None:
    return next((len(t.shape) for t in tensors if t.shape is not None), None)


def _split_sizes(split: gs.Node, dim) -> list[int] | None:
    n = len(split.outputs)
    if "split" in split.attrs:
        return [int(s) for s in split.attrs["split"]]
    if len(split.inputs) > 1 and split.inputs[1].name:
        v = const_value(split.inputs[1])
        return None if v is None else [int(s) for s in v.reshape(-1)]
    if not isinstance(dim, int):
        return None
    # Equal parts; with num_outputs (opset 18) the last one may be smaller.
    chunk = math.ceil(dim / n)
    return [chunk] * (n - 1) + [dim - chunk * (n - 1)]


def _fits(c: np.ndarray, size: int | None, neg: int, rank: int | None, x_shape) -> bool:
    """Whether ``c`` broadcasts to the part (split size ``size`` at axis ``neg``) unchanged."""
    if c.ndim > (rank if rank is not None else -neg):
        return False
    for j in range(1, c.ndim + 1):
        d = c.shape[-j]
        if d == 1:
            continue
        if -j == neg:
            if d != size:
                return False
        elif x_shape is None or x_shape[-j] != d:
            return False
    return True


def _hoisted_constant(consts, sizes, neg, rank, x_shape) -> np.ndarray | str:
    """The constant C with Split(x op C)_i == part_i op c_i, or why there is none."""
    c0 = consts[0]
    same = all(c.dtype == c0.dtype and c.shape == c0.shape and np.array_equal(c, c0) for c in consts)
    if same and (c0.ndim < -neg or c0.shape[c0.ndim + neg] == 1):
        return c0 if _fits(c0, None, neg, rank, x_shape) else "constant would change the shape of a part"
    if sizes is None or len(sizes) != len(consts) or len({c.dtype for c in consts}) != 1:
        return "split sizes unknown or constants of different dtypes"
    if not all(_fits(c, s, neg, rank, x_shape) for c, s in zip(consts, sizes, strict=False)):
        return "constant would change the shape of a part"
    k = max(-neg, max(c.ndim for c in consts))
    full = [c.reshape((1,) * (k - c.ndim) + c.shape) for c in consts]
    axis = k + neg
    common = [max(c.shape[j] for c in full) for j in range(k)]
    parts = []
    for c, s in zip(full, sizes, strict=False):
        common[axis] = s
        parts.append(np.broadcast_to(c, common))
    return np.concatenate(parts, axis=axis)


def _hoist(graph: gs.Graph, names: Names, split: gs.Node) -> bool | str | None:
    """Hoist one layer of readers above ``split``: True when done, a reason when refused."""
    if not split.inputs or not split.outputs:
        return None
    readers = _readers(graph, split)
    found = readers and _operands(split, readers)
    if not found:
        return None
    pos, consts = found
    x, first, finals = split.inputs[0], readers[0], [n.outputs[0] for n in readers]
    base = first.name or first.op.lower()
    inputs = [x, *first.inputs[1:]]
    if consts is not None:
        const = _binary_constant(split, x, consts)
        if isinstance(const, str):
            return f"{first.op} after split: {const}"
        inputs = [x, x]
        inputs[1 - pos] = gs.Constant(names(f"{base}_hoisted_c"), np.array(const))
    whole = gs.Variable(names(f"{base}_hoisted_out"),
                        dtype=finals[0].dtype or x.dtype, shape=None if x.shape is None else list(x.shape))
    for n in readers:
        n.inputs.clear()
        n.outputs.clear()
    hoisted = gs.Node(first.op, names(f"{base}_hoisted"), dict(first.attrs), inputs, [whole])
    split.inputs[0] = whole
    for i, t in enumerate(finals):
        split.outputs[i] = t
    gone = {id(n) for n in readers}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone] + [hoisted]
    logger.debug("hoist_split_elementwise: %s above %s", first.op, split.name)
    return True


def _binary_constant(split: gs.Node, x: gs.Tensor, consts: list[np.ndarray]) -> np.ndarray | str:
    rank = _rank([x, *split.outputs])
    axis = int(split.attrs.get("axis", 0))
    if axis >= 0 and rank is None:
        return "rank unknown"
    neg = axis - rank if axis >= 0 else axis
    # Off the split axis every part has x's dims, so any known part shape gives them.
    known = [t.shape for t in [x, *split.outputs] if t.shape is not None and len(t.shape) == rank]
    x_shape = known[0] if known else None
    dim = x.shape[neg] if x.shape is not None and len(x.shape) >= -neg else None
    return _hoisted_constant(consts, _split_sizes(split, dim), neg, rank, x_shape)
