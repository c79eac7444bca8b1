"""Remove operators that do nothing at inference time.

Each rule proves that a node's output equals one of its inputs (same values, same
shape, same dtype) and then removes the node with ``graph_utils.bypass``: the
readers of the output read the input instead. When the output is a graph output
and its name cannot be kept (the input is a graph input, a constant, or has other
readers), bypass refuses and the node stays; graph input and output names never
change. The rules, by ``stats`` key, and why each is safe:

- ``identity``: Identity.
- ``dropout``: Dropout in inference mode (opset < 7: ``is_test``; opset 7-11 has no
  training flag; opset 12+: ``training_mode`` absent or a constant false). Its mask
  output must be unread.
- ``cast``: Cast/CastLike to the dtype the input already has. Only when the input's
  dtype is known: graph inputs, value_info, or the type constraints of the operator
  that computes it (``_symbolic_shapes``: Shape gives int64, Greater bool, Relu its
  input's type...); it is never guessed (the output of a custom op stays unknown).
- ``reshape``: target of the same rank whose every entry is a 0 copying the dim
  (not ``allowzero``), the input dim itself, or the single -1 (which then infers
  that same dim, since all the others match). The target may be computed: an entry
  read from a shape is "the input dim itself" when ``_symbolic_shapes`` proves the
  two dims equal for every input (``x.view(x.size(0), -1, q.size(2), 32)`` after
  ``x = softmax(q k) v``, whose rows are q's).
- ``expand``: target (constant or computed) of rank <= input rank whose every dim
  is 1 or the input dim it aligns with (right-aligned broadcasting leaves the shape
  as is).
- ``flatten``: rank-2 input with axis 1 (the output is (d0, d1)).
- ``squeeze``: no axes, and a fully static shape without a 1 (nothing to squeeze).
- ``unsqueeze``: an empty constant axes list.
- ``tile``: all repeats 1.
- ``slice``: every sliced axis has step 1, starts at 0 (or at -d or below for a
  static d) and ends at or past its static size, at the dim itself read from a
  shape, or at 2**31-1 or more when the size is dynamic (one axis of 2**31
  elements is beyond any model we target).
- ``pad``: all pads 0 (whatever the mode and pad value).
- ``transpose``: perm is the identity (or absent with rank <= 1).
- ``single_input``: Concat, Sum, Max, Min, Mean with one input; Split with one output.
- ``neutral_operand``: x*1, 1*x, x/1, x+0, 0+x, x-0, x**1 when the constant is all
  neutral and its broadcast leaves x's shape as is (rank 0, or rank <= x's known
  rank and each dim 1 or equal to x's static dim). The output dtype is x's by the
  op's type constraints. x+0 turns -0.0 into +0.0, which compares equal.
- ``clip``: float bounds that are exactly -inf/+inf, integer bounds absent or at the
  dtype's limits. An absent float bound is not a no-op: it means the dtype's
  lowest/max, so onnxruntime turns +-inf into +-FLT_MAX.

These rules merge a pair into one node (or none) when the first's output has no
other reader and is not a graph output:

- ``merge_transposes``: Transpose(Transpose(x, p1), p2) = Transpose(x, p1[p2]);
  when the composed perm is the identity the ``transpose`` rule then removes it.
- ``merge_reshapes``: Reshape(Reshape(x, s1), s2) = Reshape(x, s2): a reshape's
  result depends only on the element count and the target, except for 0 entries
  of s2 (copy the input dim) without ``allowzero``. Such a 0 is kept when s1 also
  has a copying 0 there (both copy x's dim), replaced by s1's entry when that is a
  positive literal, and otherwise the pair is left alone; a computed s2 is left alone.
- ``merge_unsqueezes``: Unsqueeze(Unsqueeze(x, a1), a2) = Unsqueeze(x, a): a2's axes
  and, for each axis i of a1, the i-th position of the output a2 leaves free
  (torch's ``mask[:, None, None, :]`` exports one Unsqueeze per axis). Negative axes
  need x's rank.
- ``squeeze_unsqueeze``: Unsqueeze(Squeeze(x, a), a) and Squeeze(Unsqueeze(x, a), a)
  are x (the Squeeze succeeded, so those dims are 1); both vanish.
- ``merge_casts``: Cast(Cast(x, T1), T) with T the type of x is x when T1 holds
  every value of x's type (int32 -> int64, float32 -> float64, bool -> anything...)
  or every value x can take: shape values (dims, below 2**31) through int32, as
  paddle2onnx writes them. The pair becomes Cast(x, T), removed by ``cast``.

A no-op with a second output that something reads (a Dropout mask) stays and is
listed in ``skipped``. Only nodes of the top-level graph in the standard domain are
touched; nodes inside control-flow subgraphs are left as they are (a top-level
no-op whose output a subgraph reads is removed: gs rewires the inner reader). The
pass sweeps until a sweep changes nothing, since one removal can expose a merge,
so a second run finds nothing to do.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph_utils as gu
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes._noop_pairs import PAIR_RULES, perm_of
from onnxopt.passes._symbolic_shapes import Facts

logger = logging.getLogger(__name__)

# A rule returns the input the output equals, None when it does not apply, or a
# string saying why a no-op candidate must stay. ``Facts`` gives every tensor's dtype,
# dims (ints, or symbols equal only to themselves) and small int values.
Rule = Callable[[gs.Node, Facts], "gs.Tensor | str | None"]

INT32_MAX = 2**31 - 1
NEUTRAL = {"Mul": 1, "Div": 1, "Add": 0, "Sub": 0, "Pow": 1}
COMMUTATIVE = ("Mul", "Add")
MAX_SWEEPS = 8


def _is_read(graph: gs.Graph, t: gs.Tensor) -> bool:
    return not t.is_empty() and (bool(t.outputs) or gu.is_graph_output(graph, t))


def _dropout(node, facts):
    opset = facts.opset
    if opset < 7 and not node.attrs.get("is_test", 0):
        return None
    if opset >= 12 and gu.optional_input(node, 2) is not None:
        mode = gu.const_value(node.inputs[2])
        if mode is None:
            return "training_mode is not a constant"
        if mode.any():
            return None
    return node.inputs[0]


def _cast(node, facts):
    x = node.inputs[0]
    want = node.attrs.get("to") if node.op == "Cast" else facts.dtype(node.inputs[1])
    have = facts.dtype(x)
    return x if have is not None and want is not None and int(want) == have else None


def _reshape(node, facts):
    x, target = node.inputs[0], facts.value(gu.optional_input(node, 1))
    dims = facts.dims(x)
    if target is None or dims is None or len(target) != len(dims) or target.count(-1) > 1:
        return None
    allowzero = node.attrs.get("allowzero", 0)
    for t, d in zip(target, dims, strict=True):
        if not ((t == 0 and not allowzero) or t == -1 or t == d):
            return None
    return x


def _broadcasts_to(shape: tuple, dims: tuple | None) -> bool:
    """True when broadcasting ``shape`` against ``dims`` yields ``dims``."""
    if len(shape) == 0:
        return True
    if dims is None or len(shape) > len(dims):
        return False
    pairs = zip(shape[::-1], dims[::-1], strict=False)  # right-aligned, x may be longer
    return all(t == 1 or t == d for t, d in pairs)


def _expand(node, facts):
    x, target = node.inputs[0], facts.value(gu.optional_input(node, 1))
    return x if target is not None and _broadcasts_to(target, facts.dims(x)) else None


def _flatten(node, facts):
    x = node.inputs[0]
    return x if facts.rank(x) == 2 and node.attrs.get("axis", 1) in (1, -1) else None


def _squeeze(node, facts):
    x = node.inputs[0]
    if facts.opset < 13 and node.attrs.get("axes"):
        return None
    if facts.opset >= 13 and gu.optional_input(node, 1) is not None:
        axes = gu.const_value(node.inputs[1])
        if axes is None or axes.size:
            return None
    dims = facts.dims(x)
    static = dims is not None and all(isinstance(d, int) for d in dims)
    return x if static and 1 not in dims else None


def _unsqueeze(node, facts):
    axes = facts.arg(node, "axes", 1, 13)
    return node.inputs[0] if axes == [] else None


def _tile(node, facts):
    x, reps = node.inputs[0], facts.value(gu.optional_input(node, 1))
    rank = facts.rank(x)
    if reps is None or any(r != 1 for r in reps) or (rank is not None and len(reps) != rank):
        return None
    return x


def _slice(node, facts):
    x = node.inputs[0]
    starts, ends = facts.arg(node, "starts", 1, 10), facts.arg(node, "ends", 2, 10)
    axes, steps = facts.arg(node, "axes", 3, 10), facts.arg(node, "steps", 4, 10)
    if starts is None or ends is None:
        return None
    computed_axes = axes is None and gu.optional_input(node, 3) is not None
    if computed_axes or (steps is None and gu.optional_input(node, 4) is not None):
        return None  # computed axes or steps
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    dims = facts.dims(x)
    for s, e, a, step in zip(starts, ends, axes, steps, strict=True):
        if not isinstance(a, int) or (a < 0 and dims is None) or step != 1:
            return None
        d = None if dims is None else dims[a % len(dims)]
        static = isinstance(d, int)
        # e == d: an end read from the dim itself (x.size(a)) is the end too
        full_end = (isinstance(e, int) and (e >= INT32_MAX or (static and e >= d))) or (d is not None and e == d)
        if not (s == 0 or (static and isinstance(s, int) and s <= -d)) or not full_end:
            return None
    return x


def _pad(node, facts):
    pads = facts.arg(node, "pads", 1, 11)
    return node.inputs[0] if pads is not None and all(p == 0 for p in pads) else None


def _transpose(node, facts):
    x = node.inputs[0]
    perm = perm_of(node, facts.rank(x))
    return x if perm is not None and perm == list(range(len(perm))) else None


def _neutral_operand(node, facts):
    neutral = NEUTRAL[node.op]
    sides = [(0, 1), (1, 0)] if node.op in COMMUTATIVE else [(0, 1)]
    for xi, ci in sides:
        c = gu.const_value(node.inputs[ci])
        x = node.inputs[xi]
        if c is not None and c.size and np.all(c == neutral) and _broadcasts_to(c.shape, facts.dims(x)):
            return x
    return None


def _bound_is_open(node: gs.Node, i: int, facts: Facts, lower: bool) -> bool:
    x = node.inputs[0]
    if facts.opset < 11:
        v = node.attrs.get("min" if lower else "max")
        v = None if v is None else np.asarray(v, np.float32)
    else:
        v = gu.const_value(gu.optional_input(node, i))
        if v is None and gu.optional_input(node, i) is not None:
            return False
    dtype = facts.np_dtype(x) or (None if v is None else v.dtype)
    if dtype is None:
        return False
    if np.issubdtype(dtype, np.floating):
        return v is not None and bool(v == (-np.inf if lower else np.inf))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return v is None or bool(v <= info.min if lower else v >= info.max)
    return False


def _clip(node, facts):
    both = _bound_is_open(node, 1, facts, True) and _bound_is_open(node, 2, facts, False)
    return node.inputs[0] if both else None


RULES: dict[str, tuple[str, Rule]] = {
    "Identity": ("identity", lambda node, facts: node.inputs[0]),
    "Dropout": ("dropout", _dropout),
    "Cast": ("cast", _cast),
    "CastLike": ("cast", _cast),
    "Reshape": ("reshape", _reshape),
    "Expand": ("expand", _expand),
    "Flatten": ("flatten", _flatten),
    "Squeeze": ("squeeze", _squeeze),
    "Unsqueeze": ("unsqueeze", _unsqueeze),
    "Tile": ("tile", _tile),
    "Slice": ("slice", _slice),
    "Pad": ("pad", _pad),
    "Transpose": ("transpose", _transpose),
    "Clip": ("clip", _clip),
    "Split": ("single_input", lambda node, facts: node.inputs[0] if len(node.outputs) == 1 else None),
    **{op: ("single_input", lambda node, facts: node.inputs[0] if len(node.inputs) == 1 else None)
       for op in ("Concat", "Sum", "Max", "Min", "Mean")},
    **{op: ("neutral_operand", _neutral_operand) for op in NEUTRAL},
}


class EliminateNoopsPass(GraphPass):
    """Remove inference-time no-ops and merge or cancel pairs (see the module docstring).

    Refused, and listed in ``skipped``: a no-op with another output that is read (a
    Dropout mask), a Dropout whose training_mode is computed, and a no-op whose
    removal would rename a graph output (e.g. Identity from a graph input to a graph
    output).
    """

    name = "eliminate_noops"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        skipped: dict[int, Skip] = {}  # keyed by node identity only to drop stale entries
        # Removals and merges keep every surviving tensor's value: the facts stay true.
        facts = Facts(graph)
        for _ in range(MAX_SWEEPS):  # a removal can expose another (a merge, a dead reader gone)
            if not self._sweep(graph, facts, stats, skipped):
                break
            gu.finish(graph)
        alive = {id(n) for n in graph.nodes}  # a skipped node may have died since
        kept = tuple(s for key, s in skipped.items() if key in alive)
        return PassResult(graph, bool(stats), dict(stats), kept)

    def _sweep(self, graph: gs.Graph, facts: Facts, stats: Counter, skipped: dict[int, Skip]) -> bool:
        names = None
        changed = False
        for node in list(graph.nodes):
            if not node.outputs or not gu.is_standard(node) or gu.has_subgraph(node):
                continue  # removed earlier in this sweep, custom, or control flow
            for kind, merge in PAIR_RULES.get(node.op, ()):
                names = names or gu.Names(graph)
                if merge(graph, node, names, facts):
                    stats[kind] += 1
                    changed = True
                    break
            verdict = self._verdict(graph, node, facts)
            if isinstance(verdict, str):
                skipped[id(node)] = Skip(node.name, node.op, verdict)
            elif verdict is not None:
                kind, dst = RULES[node.op][0], node.outputs[0]
                if gu.bypass(graph, node, verdict, dst):
                    stats[kind] += 1
                    skipped.pop(id(node), None)
                    changed = True
                else:
                    skipped[id(node)] = Skip(node.name, node.op, f"a no-op, but removing it would rename "
                                                                 f"graph output {dst.name!r}")
        return changed

    @staticmethod
    def _verdict(graph: gs.Graph, node: gs.Node, facts: Facts) -> gs.Tensor | str | None:
        _, rule = RULES.get(node.op, (None, None))
        if rule is None or not node.inputs or node.inputs[0].is_empty():
            return None
        verdict = rule(node, facts)
        if verdict is None or isinstance(verdict, str):
            return verdict
        read = [o.name for o in node.outputs[1:] if _is_read(graph, o)]
        return f"a no-op, but its output {read[0]!r} is read" if read else verdict
