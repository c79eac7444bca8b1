"""Fuse a decomposed LayerNorm into one node.

Exporters targeting opsets before 17, which has no LayerNormalization, write
``torch.nn.LayerNorm`` out as nine nodes::

    m = ReduceMean(x, axes)          d = Sub(x, m)
    v = ReduceMean(Pow(d, 2), axes)  n = Div(d, Sqrt(Add(v, eps)))
    y = Add(Mul(n, gamma), beta)

With ``axes`` the trailing k axes and keepdims=1, that is by definition
``LayerNormalization(x, gamma, beta; axis=-k, epsilon=eps)``. Matched variants:
``Mul(d, d)`` for the square; ``Mul(d, Reciprocal(Sqrt(...)))`` for the division;
either operand order of Add and Mul; axes as an attribute (opset < 18) or a constant
input (18+), negative or positive (then the rank must be known); gamma and beta each
optional (ones, zeros). A trailing Mul/Add is absorbed as gamma/beta only when its
constant is a scalar or per feature: of rank <= x's, and after leading 1s are
dropped, broadcastable to the normalized shape (x's trailing k dims, which must be
static). Otherwise it stays after the fused node.

The fused node is the standard LayerNormalization, so the pass needs opset >= 17
and is the same for both targets. Below 17 the pattern is left as it is, with the
reason, because nothing that onnxruntime runs is both valid and faster there:
onnxruntime runs a LayerNormalization at opset 14 (it registers the op in the ONNX
domain from version 1, a contrib registration its own online fusion emits), but the
onnx checker rejects it (no such op before 17) and com.microsoft has no
LayerNormalization. com.microsoft ``SkipLayerNormalization(x, x; epsilon=4 eps)``
is LN(x; eps) exactly (doubling scales mean, variance and the square root exactly),
but its CPU kernel in onnxruntime 1.32 is 2-2.5x slower than the nine decomposed
nodes (46 vs 23 us at 1x128x64, 518 vs 205 us at 1x128x768, one thread) and 4-7x
slower than LayerNormalization. Converting such a model to opset 17 first lets this
pass fuse it.

onnxruntime 1.32's LayerNormalization kernel is as accurate as the decomposed form
(checked on data whose mean is 1000 times its spread).

Every intermediate tensor must be read by the next node of the pattern only (d by
the square and the division) and must not be a graph output; the fused node writes
the pattern's last tensor, so its name, and any graph output name, is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    Names,
    const_value,
    finish,
    has_subgraph,
    is_graph_input,
    is_graph_output,
    is_standard,
    opset,
    optional_input,
    producer,
)
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes import _shape_inference as si
from onnxopt.passes.fuse_conv_activation import MS_DOMAIN

logger = logging.getLogger(__name__)

# --- Shapes ------------------------------------------------------------------------
# onnx shape inference stops at the first com.microsoft node and gives every broadcast
# of two different symbolic dims a fresh name, so after one residual Add it no longer
# relates the batch of two tensors. ``symbolic_dims`` keeps what it says and
# propagates, over the ops transformer encoders are made of, a dim as either a static
# size or the set of symbolic sizes it is the maximum of: broadcasting a and b gives
# max(a, b), which in a valid run is the larger of the two (the other is 1 or equal).
# Two dims with the same set are equal; a set containing another is >= it. Every
# symbolic graph input dim is a symbol of its own, even when two share a dim_param:
# onnxruntime does not check that they agree. A dim inference knows nothing about
# gets a symbol of its own too.

Dim = int | frozenset
Dims = tuple[Dim, ...]

ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual",
                         "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Sum", "Mean", "Mod", "PRelu"})
SAME_SHAPE = frozenset({"Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log",
                        "Cast", "CastLike", "Identity", "Dropout", "Softmax", "LogSoftmax", "LayerNormalization",
                        "Gelu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Softplus", "Not",
                        "Floor", "Ceil", "Round", "Sign", "IsNaN"})
MS_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})  # output: inputs broadcast
MS_SAME_SHAPE = {"SkipLayerNormalization": (0, 3), "SkipSimplifiedLayerNormalization": (0, 3)}  # outputs = input 0


def broadcast(*shapes: Dims | None) -> Dims | None:
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        static = {d for d in dims if isinstance(d, int) and d != 1}
        if len(static) > 1:
            return None
        symbols = frozenset().union(*(d for d in dims if not isinstance(d, int)))
        out.append(static.pop() if static else (symbols or 1))
    return tuple(out)


def covers(big: Dim, small: Dim) -> bool:
    """``big >= small`` in every run where they broadcast together."""
    if small == 1 or big == small:
        return True
    if isinstance(big, int):
        return big > 1 and not isinstance(small, int)
    return not isinstance(small, int) and small <= big


def _onnx_dims(graph: gs.Graph) -> dict[str, Dims]:
    try:
        light = si._light_model(graph)
        for vi in light.graph.input:
            for i, d in enumerate(vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()):
                if not d.HasField("dim_value"):
                    d.dim_param = f"{vi.name}[{i}]"
        model = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as e:  # inference (or the export) rejects some graphs onnxruntime runs
        logger.debug("shape inference failed (%s: %s)", type(e).__name__, e)
        return {}
    out = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        out[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") else frozenset({d.dim_param or f"?{vi.name}[{i}]"})
            for i, d in enumerate(tt.shape.dim))
    return out


def _reduced(node: gs.Node, x: Dims, graph: gs.Graph) -> Dims | None:
    if not x:
        return x
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant(graph, node.inputs[1])
        if axes is None:
            return None
    axes = {int(a) % len(x) for a in (range(len(x)) if axes is None else np.asarray(axes).reshape(-1))}
    keep = int(node.attrs.get("keepdims", 1))
    return tuple(1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes)


def _reshaped(node: gs.Node, x: Dims, graph: gs.Graph) -> Dims | None:
    target = constant(graph, node.inputs[1])
    if target is None:
        return None
    zero_copies = not node.attrs.get("allowzero", 0)
    out = node.outputs[0].name
    return tuple(x[i] if v == 0 and zero_copies and i < len(x) else int(v) if v > 0 else frozenset({f"?{out}[{i}]"})
                 for i, v in enumerate(target.reshape(-1).tolist()))


def _rule(graph: gs.Graph, node: gs.Node, get) -> list[Dims | None] | None:
    """The dims of ``node``'s outputs from its inputs', for the ops handled here."""
    ins = [get(t) for t in node.inputs]
    op, x = node.op, (ins[0] if ins else None)
    if not is_standard(node):
        if node.domain == MS_DOMAIN and op in MS_ELEMENTWISE:
            return [broadcast(*ins)]
        keep = MS_SAME_SHAPE.get(op) if node.domain == MS_DOMAIN else None
        return None if keep is None else [x if i in keep else None for i in range(len(node.outputs))]
    if x is None or has_subgraph(node):
        return None
    if op in ELEMENTWISE:
        return [broadcast(*ins)]
    if op in SAME_SHAPE:
        return [x]
    if op == "MatMul" and len(x) >= 2 and ins[1] is not None and len(ins[1]) >= 2:
        batch = broadcast(x[:-2], ins[1][:-2])
        return None if batch is None else [(*batch, x[-2], ins[1][-1])]
    if op == "Transpose":
        perm = node.attrs.get("perm", list(range(len(x)))[::-1])
        return [tuple(x[int(p)] for p in perm)]
    if op == "Reshape":
        return [_reshaped(node, x, graph)]
    if op.startswith("Reduce"):
        return [_reduced(node, x, graph)]
    if op == "Gather" and ins[1] is not None:
        axis = int(node.attrs.get("axis", 0)) % len(x)
        return [(*x[:axis], *ins[1], *x[axis + 1:])]
    if op == "Split":
        axis = int(node.attrs.get("axis", 0)) % len(x)
        return [(*x[:axis], frozenset({f"?{t.name}[{axis}]"}), *x[axis + 1:]) for t in node.outputs]
    return None


def symbolic_dims(graph: gs.Graph) -> dict[str, Dims]:
    """Tensor name -> dims (static ints or symbol sets) for every tensor whose rank is known."""
    base = _onnx_dims(graph)
    dims: dict[str, Dims] = {}

    def get(t: gs.Tensor) -> Dims | None:
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        return dims.get(t.name, base.get(t.name)) if t.name else None

    for node in graph.nodes:
        outs = _rule(graph, node, get) or []
        for t, d in zip(node.outputs, outs):
            known = base.get(t.name)
            if d is not None and known is not None and len(known) == len(d):
                d = tuple(k if isinstance(k, int) else m for k, m in zip(known, d))  # a static size wins
            if d is not None:
                dims[t.name] = d
    return {**base, **dims}


@dataclass
class LayerNormMatch:
    """A decomposed LayerNorm found in the graph, not yet checked against shapes."""

    x: gs.Tensor
    out: gs.Tensor
    axes: list[int] | None  # as written; None: all axes
    eps: float
    dtype: np.dtype
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    tail: list[gs.Node] = field(default_factory=list)  # the trailing Mul/Add candidates


def sole_reader(graph: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    """The one standard ``op`` node reading ``t``, when nothing else reads it."""
    if len(t.outputs) != 1 or is_graph_output(graph, t):
        return None
    node = t.outputs[0]
    return node if node.op == op and is_standard(node) else None


def constant(graph: gs.Graph, t: gs.Tensor) -> np.ndarray | None:
    """A constant's value; None for tensors a caller can override (graph inputs)."""
    return None if is_graph_input(graph, t) else const_value(t)


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The operand of a binary node that is not ``t`` (None unless it reads ``t`` once)."""
    ins = list(node.inputs)
    if len(ins) != 2 or sum(i is t for i in ins) != 1:
        return None
    return ins[1] if ins[0] is t else ins[0]


def reduce_axes(graph: gs.Graph, node: gs.Node) -> list[int] | str | None:
    """The axes of a keepdims ReduceMean (None: all), or a reason it does not qualify."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        return "ReduceMean without keepdims"
    if opset(graph) < 18:
        axes = node.attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]
    t = optional_input(node, 1)
    if t is None:
        return "ReduceMean with no axes is a no-op" if node.attrs.get("noop_with_empty_axes", 0) else None
    v = constant(graph, t)
    return "ReduceMean axes are not constant" if v is None else [int(a) for a in v.reshape(-1)]


def _is_square(node: gs.Node, d: gs.Tensor, graph: gs.Graph) -> bool:
    if not is_standard(node) or len(node.inputs) != 2 or node.inputs[0] is not d:
        return False
    if node.op == "Mul":
        return node.inputs[1] is d
    exp = constant(graph, node.inputs[1]) if node.op == "Pow" else None
    return exp is not None and exp.size == 1 and float(exp.reshape(-1)[0]) == 2.0


def _variance_chain(graph: gs.Graph, sq: gs.Node, axes) -> tuple[gs.Tensor, float, np.dtype] | None:
    """From the square node: ReduceMean -> Add eps -> Sqrt; returns (sqrt output, eps, dtype)."""
    rm2 = sole_reader(graph, sq.outputs[0], "ReduceMean")
    if rm2 is None or reduce_axes(graph, rm2) != axes:
        return None
    add = sole_reader(graph, rm2.outputs[0], "Add")
    eps_t = None if add is None else other_input(add, rm2.outputs[0])
    eps = None if eps_t is None else constant(graph, eps_t)
    if eps is None or eps.size != 1 or eps.dtype.kind != "f" or not float(eps.reshape(-1)[0]) >= 0:
        return None
    sqrt = sole_reader(graph, add.outputs[0], "Sqrt")
    return None if sqrt is None else (sqrt.outputs[0], float(eps.reshape(-1)[0]), eps.dtype)


def _normalized(graph: gs.Graph, norm: gs.Node, d: gs.Tensor, s: gs.Tensor) -> bool:
    """``norm`` computes d / s, as Div(d, s) or Mul(d, Reciprocal(s))."""
    if norm.op == "Div":
        return sole_reader(graph, s, "Div") is norm and norm.inputs[0] is d and norm.inputs[1] is s
    rec = sole_reader(graph, s, "Reciprocal")
    return (rec is not None and norm.op == "Mul" and sole_reader(graph, rec.outputs[0], "Mul") is norm
            and other_input(norm, d) is rec.outputs[0])


def match_layer_norm(graph: gs.Graph, rm1: gs.Node) -> LayerNormMatch | None:
    """The decomposed LayerNorm whose first node is the ReduceMean ``rm1``, if any."""
    if not rm1.inputs or isinstance(rm1.inputs[0], gs.Constant):
        return None
    x, m = rm1.inputs[0], rm1.outputs[0]
    axes = reduce_axes(graph, rm1)
    sub = sole_reader(graph, m, "Sub")
    if isinstance(axes, str) or sub is None or sub.inputs[0] is not x or sub.inputs[1] is not m:
        return None
    d = sub.outputs[0]
    readers = list({id(n): n for n in d.outputs}.values())
    if is_graph_output(graph, d) or len(readers) != 2:
        return None
    sq, norm = readers if _is_square(readers[0], d, graph) else readers[::-1]
    if not _is_square(sq, d, graph) or len(d.outputs) != (3 if sq.op == "Mul" else 2):
        return None
    var = _variance_chain(graph, sq, axes)
    if var is None or not is_standard(norm) or not _normalized(graph, norm, d, var[0]):
        return None
    match = LayerNormMatch(x, norm.outputs[0], axes, var[1], var[2])
    mul = sole_reader(graph, match.out, "Mul")
    add = sole_reader(graph, mul.outputs[0] if mul else match.out, "Add")
    match.tail = [n for n in (mul, add) if n is not None]
    return match


def trailing_axes(axes: list[int] | None, rank: int | None) -> int | None:
    """k when ``axes`` are exactly the last k axes, else None."""
    if axes is None:
        return rank
    if all(a < 0 for a in axes):
        k = len(axes)
        return k if sorted(axes) == list(range(-k, 0)) and len(set(axes)) == k else None
    if rank is None:
        return None
    norm = sorted(a + rank if a < 0 else a for a in axes)
    return len(norm) if norm == list(range(rank - len(norm), rank)) else None


def per_feature(c: np.ndarray, norm_shape: tuple[int, ...], rank: int) -> np.ndarray | None:
    """``c`` broadcast to the normalized shape, when it varies along it only."""
    if c.ndim > rank or c.dtype.kind != "f":
        return None
    dims = list(c.shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    if len(dims) > len(norm_shape):
        return None
    try:
        if np.broadcast_shapes(tuple(dims), norm_shape) != norm_shape:
            return None
    except ValueError:
        return None
    return np.broadcast_to(c.reshape(dims), norm_shape).copy()


def absorb_tail(graph: gs.Graph, match: LayerNormMatch, norm_shape, rank: int) -> None:
    """Take the trailing Mul(gamma) and Add(beta) into the match where they qualify."""
    for node in match.tail:
        other = other_input(node, match.out)
        value = None if other is None else constant(graph, other)
        vec = None if value is None else per_feature(value, norm_shape, rank)
        if vec is None or vec.dtype != match.dtype:
            return
        if node.op == "Mul":
            match.gamma = vec
        else:
            match.beta = vec
        match.out = node.outputs[0]


class FuseLayerNormPass(GraphPass):
    """Decomposed LayerNorm (opset >= 17) -> LayerNormalization; same for every target."""

    name = "fuse_layer_norm"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {}
        skipped = []
        shapes: dict[str, Dims] | None = None
        names = Names(graph)
        for rm1 in list(graph.nodes):
            if rm1.op != "ReduceMean" or not is_standard(rm1):
                continue
            match = match_layer_norm(graph, rm1)
            if match is None:
                continue
            if opset(graph) < 17:
                reason = f"opset {opset(graph)} < 17 has no LayerNormalization (convert the model to opset 17)"
            else:
                shapes = symbolic_dims(graph) if shapes is None else shapes
                reason = rewrite(graph, match, shapes.get(match.x.name), names)
            if reason is None:
                stats["layer_norm"] = stats.get("layer_norm", 0) + 1
            else:
                logger.debug("not fusing the LayerNorm at %s: %s", rm1.name, reason)
                skipped.append(Skip(rm1.name, rm1.op, f"LayerNorm pattern left decomposed: {reason}"))
        if stats:
            finish(graph)
        return PassResult(graph, bool(stats), stats, tuple(skipped))


def rewrite(graph: gs.Graph, match: LayerNormMatch, dims: Dims | None, names: Names) -> str | None:
    """Replace ``match`` (x has ``dims``) by a LayerNormalization; None, or the reason it cannot."""
    rank = None if dims is None else len(dims)
    k = trailing_axes(match.axes, rank)
    if not k:
        return "the reduced axes are not the trailing axes (or the rank is unknown)"
    if dims is None or not all(isinstance(d, int) for d in dims[-k:]):
        return "the normalized dims are not static"
    norm_shape = tuple(int(d) for d in dims[-k:])
    absorb_tail(graph, match, norm_shape, rank)
    gamma = match.gamma if match.gamma is not None else np.ones(norm_shape, match.dtype)
    base = match.out.name
    inputs = [match.x, gs.Constant(names(f"{base}_ln_scale"), gamma)]
    if match.beta is not None:
        inputs.append(gs.Constant(names(f"{base}_ln_bias"), match.beta))
    producer(match.out).outputs.clear()
    graph.nodes.append(gs.Node("LayerNormalization", names(f"{base}_LayerNormalization"),
                               {"axis": -k, "epsilon": match.eps}, inputs, [match.out]))
    return None
