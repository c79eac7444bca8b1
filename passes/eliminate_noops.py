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
  dtype is known (graph inputs, value_info); it is never guessed.
- ``reshape``: target of the same rank whose every entry is a 0 copying the dim
  (not ``allowzero``), the static input dim itself, or the single -1 (which then
  infers that same dim, since all the others match).
- ``expand``: target rank <= input rank and every target dim is 1 or the static
  input dim it aligns with (right-aligned broadcasting leaves the shape as is).
- ``flatten``: rank-2 input with axis 1 (the output is (d0, d1)).
- ``squeeze``: no axes, and a fully static shape without a 1 (nothing to squeeze).
- ``unsqueeze``: an empty constant axes list.
- ``tile``: all repeats 1.
- ``slice``: every sliced axis has step 1, starts at 0 (or at -d or below for a
  static d) and ends at or past its static size, or at 2**31-1 or more when the
  size is dynamic (one axis of 2**31 elements is beyond any model we target).
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

Two rules merge a pair into one node when the first's output has no other reader
and is not a graph output:

- ``merge_transposes``: Transpose(Transpose(x, p1), p2) = Transpose(x, p1[p2]);
  when the composed perm is the identity the ``transpose`` rule then removes it.
- ``merge_reshapes``: Reshape(Reshape(x, s1), s2) = Reshape(x, s2): a reshape's
  result depends only on the element count and the target, except for 0 entries
  of s2 (copy the input dim) without ``allowzero``. Such a 0 is kept when s1 also
  has a copying 0 there (both copy x's dim), replaced by s1's entry when that is a
  positive literal, and otherwise the pair is left alone; a computed s2 is left alone.

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
from onnx import helper

from onnxopt import graph_utils as gu
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)

# A rule returns the input the output equals, None when it does not apply, or a
# string saying why a no-op candidate must stay.
Rule = Callable[[gs.Node, int], "gs.Tensor | str | None"]

INT32_MAX = 2**31 - 1
NEUTRAL = {"Mul": 1, "Div": 1, "Add": 0, "Sub": 0, "Pow": 1}
COMMUTATIVE = ("Mul", "Add")
MAX_SWEEPS = 8


def _np_dtype(dtype) -> np.dtype | None:
    if dtype is None or isinstance(dtype, int):  # gs keeps types numpy lacks (bfloat16) as onnx enums
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def _onnx_dtype(dtype) -> int | None:
    if isinstance(dtype, int):
        return dtype
    np_dtype = _np_dtype(dtype)
    return None if np_dtype is None else helper.np_dtype_to_tensor_dtype(np_dtype)




def _ints(node: gs.Node, attr: str, i: int, opset: int, since: int) -> list[int] | None:
    """A list of ints given as attribute before opset ``since`` and as input ``i`` after."""
    if opset < since:
        v = node.attrs.get(attr)
        return None if v is None else [int(a) for a in v]
    v = gu.const_value(gu.optional_input(node, i))
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _is_read(graph: gs.Graph, t: gs.Tensor) -> bool:
    return not t.is_empty() and (bool(t.outputs) or gu.is_graph_output(graph, t))


def _dropout(node, opset):
    if opset < 7 and not node.attrs.get("is_test", 0):
        return None
    if opset >= 12 and gu.optional_input(node, 2) is not None:
        mode = gu.const_value(node.inputs[2])
        if mode is None:
            return "training_mode is not a constant"
        if mode.any():
            return None
    return node.inputs[0]


def _cast(node, opset):
    x = node.inputs[0]
    want = node.attrs.get("to") if node.op == "Cast" else _onnx_dtype(node.inputs[1].dtype)
    have = _onnx_dtype(x.dtype)
    return x if have is not None and want is not None and int(want) == have else None


def _reshape(node, opset):
    x, target = node.inputs[0], gu.const_value(gu.optional_input(node, 1))
    if target is None or x.shape is None or target.ndim != 1 or len(target) != len(x.shape):
        return None
    allowzero = node.attrs.get("allowzero", 0)
    if np.count_nonzero(target == -1) > 1:
        return None
    for t, d in zip(target.tolist(), x.shape, strict=True):
        if not ((t == 0 and not allowzero) or t == -1 or (isinstance(d, int) and t == d)):
            return None
    return x


def _broadcasts_to(shape: tuple[int, ...], x_shape) -> bool:
    """True when broadcasting ``shape`` against ``x_shape`` yields ``x_shape``."""
    if len(shape) == 0:
        return True
    if x_shape is None or len(shape) > len(x_shape):
        return False
    pairs = zip(shape[::-1], x_shape[::-1], strict=False)  # right-aligned, x may be longer
    return all(t == 1 or (isinstance(d, int) and t == d) for t, d in pairs)


def _expand(node, opset):
    x, target = node.inputs[0], gu.const_value(gu.optional_input(node, 1))
    return x if target is not None and _broadcasts_to(tuple(target.tolist()), x.shape) else None


def _flatten(node, opset):
    x = node.inputs[0]
    return x if x.shape is not None and len(x.shape) == 2 and node.attrs.get("axis", 1) in (1, -1) else None


def _squeeze(node, opset):
    x = node.inputs[0]
    if opset < 13 and node.attrs.get("axes"):
        return None
    if opset >= 13 and gu.optional_input(node, 1) is not None:
        axes = gu.const_value(node.inputs[1])
        if axes is None or axes.size:
            return None
    static = x.shape is not None and all(isinstance(d, int) for d in x.shape)
    return x if static and 1 not in x.shape else None


def _unsqueeze(node, opset):
    axes = _ints(node, "axes", 1, opset, 13)
    return node.inputs[0] if axes == [] else None


def _tile(node, opset):
    x, reps = node.inputs[0], gu.const_value(gu.optional_input(node, 1))
    if reps is None or not np.all(reps == 1) or (x.shape is not None and reps.size != len(x.shape)):
        return None
    return x


def _slice(node, opset):
    x = node.inputs[0]
    starts, ends = _ints(node, "starts", 1, opset, 10), _ints(node, "ends", 2, opset, 10)
    axes, steps = _ints(node, "axes", 3, opset, 10), _ints(node, "steps", 4, opset, 10)
    if starts is None or ends is None:
        return None
    if (axes is None and gu.optional_input(node, 3) is not None) or (steps is None and gu.optional_input(node, 4) is not None):
        return None  # computed axes or steps
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    rank = None if x.shape is None else len(x.shape)
    for s, e, a, step in zip(starts, ends, axes, steps, strict=True):
        if a < 0 and rank is None:
            return None
        d = None if rank is None else x.shape[a % rank]
        static = isinstance(d, int)
        if step != 1 or not (s == 0 or (static and s <= -d)) or not (e >= INT32_MAX or (static and e >= d)):
            return None
    return x


def _pad(node, opset):
    pads = _ints(node, "pads", 1, opset, 11)
    return node.inputs[0] if pads is not None and not any(pads) else None


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is None:
        return None if rank is None else list(range(rank))[::-1]
    return [int(p) for p in perm]


def _transpose(node, opset):
    x = node.inputs[0]
    perm = _perm(node, None if x.shape is None else len(x.shape))
    return x if perm is not None and perm == list(range(len(perm))) else None


def _neutral_operand(node, opset):
    neutral = NEUTRAL[node.op]
    sides = [(0, 1), (1, 0)] if node.op in COMMUTATIVE else [(0, 1)]
    for xi, ci in sides:
        c = gu.const_value(node.inputs[ci])
        x = node.inputs[xi]
        if c is not None and c.size and np.all(c == neutral) and _broadcasts_to(c.shape, x.shape):
            return x
    return None


def _bound_is_open(node: gs.Node, i: int, opset: int, lower: bool) -> bool:
    x = node.inputs[0]
    if opset < 11:
        v = node.attrs.get("min" if lower else "max")
        v = None if v is None else np.asarray(v, np.float32)
    else:
        v = gu.const_value(gu.optional_input(node, i))
        if v is None and gu.optional_input(node, i) is not None:
            return False
    dtype = _np_dtype(x.dtype) or (None if v is None else v.dtype)
    if dtype is None:
        return False
    if np.issubdtype(dtype, np.floating):
        return v is not None and bool(v == (-np.inf if lower else np.inf))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return v is None or bool(v <= info.min if lower else v >= info.max)
    return False


def _clip(node, opset):
    both = _bound_is_open(node, 1, opset, True) and _bound_is_open(node, 2, opset, False)
    return node.inputs[0] if both else None


RULES: dict[str, tuple[str, Rule]] = {
    "Identity": ("identity", lambda node, opset: node.inputs[0]),
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
    "Split": ("single_input", lambda node, opset: node.inputs[0] if len(node.outputs) == 1 else None),
    **{op: ("single_input", lambda node, opset: node.inputs[0] if len(node.inputs) == 1 else None)
       for op in ("Concat", "Sum", "Max", "Min", "Mean")},
    **{op: ("neutral_operand", _neutral_operand) for op in NEUTRAL},
}


def _mergeable_producer(graph: gs.Graph, node: gs.Node, op: str) -> gs.Node | None:
    """The ``op`` node feeding ``node``'s first input, if ``node`` is its only reader."""
    first = node.inputs[0] if node.inputs else None
    prod = None if first is None else gu.producer(first)
    if prod is None or prod.op != op or not gu.is_standard(prod) or len(prod.outputs) != 1:
        return None
    return prod if gu.only_consumer(graph, first, node) else None


def _merge_transposes(graph: gs.Graph, t2: gs.Node, names: Callable[[str], str]) -> bool:
    t1 = _mergeable_producer(graph, t2, "Transpose")
    if t1 is None:
        return False
    x = t1.inputs[0]
    rank = None if x.shape is None else len(x.shape)
    p1, p2 = _perm(t1, rank), _perm(t2, rank)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return False
    t2.attrs["perm"] = [p1[i] for i in p2]
    t2.inputs[0] = x
    t1.inputs.clear()
    t1.outputs.clear()
    return True


def _merged_shape(r1: gs.Node, r2: gs.Node) -> np.ndarray | None:
    """The target that makes Reshape(x, .) equal r2(r1(x)), or None."""
    s2 = gu.const_value(gu.optional_input(r2, 1))
    if s2 is None or r2.attrs.get("allowzero", 0) or not np.any(s2 == 0):
        return s2
    s1 = gu.const_value(gu.optional_input(r1, 1))
    zero_copies = not r1.attrs.get("allowzero", 0)
    merged = s2.copy()
    for i in np.flatnonzero(s2 == 0):
        if s1 is None or i >= s1.size or s1[i] < 0 or (s1[i] == 0 and not zero_copies):
            return None
        merged[i] = s1[i]
    return merged


def _merge_reshapes(graph: gs.Graph, r2: gs.Node, names: Callable[[str], str]) -> bool:
    r1 = _mergeable_producer(graph, r2, "Reshape")
    if r1 is None:
        return False
    target = _merged_shape(r1, r2)
    if target is None and not r2.attrs.get("allowzero", 0):
        return False
    old = gu.const_value(gu.optional_input(r2, 1))
    if target is not None and not np.array_equal(target, old):
        r2.inputs[1] = gs.Constant(names(f"{r2.name or 'reshape'}_shape"), target.astype(np.int64))
    r2.inputs[0] = r1.inputs[0]
    r1.inputs.clear()
    r1.outputs.clear()
    return True


PAIR_RULES = {"Transpose": ("merge_transposes", _merge_transposes),
              "Reshape": ("merge_reshapes", _merge_reshapes)}


class EliminateNoopsPass(GraphPass):
    """Remove inference-time no-ops and merge Transpose/Reshape pairs (see the module docstring).

    Refused, and listed in ``skipped``: a no-op with another output that is read (a
    Dropout mask), a Dropout whose training_mode is computed, and a no-op whose
    removal would rename a graph output (e.g. Identity from a graph input to a graph
    output).
    """

    name = "eliminate_noops"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        skipped: dict[int, Skip] = {}  # keyed by node identity only to drop stale entries
        for _ in range(MAX_SWEEPS):  # a removal can expose another (a merge, a dead reader gone)
            if not self._sweep(graph, stats, skipped):
                break
            gu.finish(graph)
        alive = {id(n) for n in graph.nodes}  # a skipped node may have died since
        kept = tuple(s for key, s in skipped.items() if key in alive)
        return PassResult(graph, bool(stats), dict(stats), kept)

    def _sweep(self, graph: gs.Graph, stats: Counter, skipped: dict[int, Skip]) -> bool:
        opset = gu.opset(graph)
        names = None
        changed = False
        for node in list(graph.nodes):
            if not node.outputs or not gu.is_standard(node) or gu.has_subgraph(node):
                continue  # removed earlier in this sweep, custom, or control flow
            if node.op in PAIR_RULES:
                names = names or gu.Names(graph)
                kind, merge = PAIR_RULES[node.op]
                if merge(graph, node, names):
                    stats[kind] += 1
                    changed = True
            verdict = self._verdict(graph, node, opset)
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
    def _verdict(graph: gs.Graph, node: gs.Node, opset: int) -> gs.Tensor | str | None:
        _, rule = RULES.get(node.op, (None, None))
        if rule is None or not node.inputs or node.inputs[0].is_empty():
            return None
        verdict = rule(node, opset)
        if verdict is None or isinstance(verdict, str):
            return verdict
        read = [o.name for o in node.outputs[1:] if _is_read(graph, o)]
        return f"a no-op, but its output {read[0]!r} is read" if read else verdict
