"""The pair rules of ``eliminate_noops``: two nodes become one, or none.

Each rule is called on the second node of a pair and merges the first into it when
the first's output has no other reader and is not a graph output; the module
docstring of ``eliminate_noops`` says why each rewrite is exact. A rule returns
True when it changed the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph_utils as gu
from onnxopt.passes._symbolic_shapes import Facts


def perm_of(node: gs.Node, rank: int | None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is None:
        return None if rank is None else list(range(rank))[::-1]
    return [int(p) for p in perm]


def _mergeable_producer(graph: gs.Graph, node: gs.Node, op: str) -> gs.Node | None:
    """The ``op`` node feeding ``node``'s first input, if ``node`` is its only reader."""
    first = node.inputs[0] if node.inputs else None
    prod = None if first is None else gu.producer(first)
    if prod is None or prod.op != op or not gu.is_standard(prod) or len(prod.outputs) != 1:
        return None
    return prod if gu.only_consumer(graph, first, node) else None


def _merge_transposes(graph: gs.Graph, t2: gs.Node, names: Callable[[str], str], facts: Facts) -> bool:
    t1 = _mergeable_producer(graph, t2, "Transpose")
    if t1 is None:
        return False
    x = t1.inputs[0]
    rank = facts.rank(x)
    p1, p2 = perm_of(t1, rank), perm_of(t2, rank)
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


def _merge_reshapes(graph: gs.Graph, r2: gs.Node, names: Callable[[str], str], facts: Facts) -> bool:
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


def _merged_axes(rank: int | None, a1: list[int], a2: list[int]) -> list[int] | None:
    """The axes of one Unsqueeze equal to Unsqueeze(Unsqueeze(x, a1), a2), x of ``rank``."""
    if any(a < 0 for a in a1 + a2):
        if rank is None:
            return None
        a1 = [a % (rank + len(a1)) for a in a1]
        a2 = [a % (rank + len(a1) + len(a2)) for a in a2]
    second = set(a2)
    # the first result's axis i lands on the i-th output position the second leaves free
    free = [p for p in range(max(a1, default=0) + len(a2) + 1) if p not in second]
    return sorted(second | {free[a] for a in a1})


def _merge_unsqueezes(graph: gs.Graph, u2: gs.Node, names: Callable[[str], str], facts: Facts) -> bool:
    u1 = _mergeable_producer(graph, u2, "Unsqueeze")
    if u1 is None:
        return False
    a1, a2 = facts.arg(u1, "axes", 1, 13), facts.arg(u2, "axes", 1, 13)
    if a1 is None or a2 is None or not all(isinstance(a, int) for a in a1 + a2):
        return False
    axes = _merged_axes(facts.rank(u1.inputs[0]), a1, a2)
    if axes is None:
        return False
    if facts.opset < 13:
        u2.attrs["axes"] = axes
    else:
        u2.inputs[1] = gs.Constant(names(f"{u2.name or 'unsqueeze'}_axes"), np.array(axes, np.int64))
    u2.inputs[0] = u1.inputs[0]
    u1.inputs.clear()
    u1.outputs.clear()
    return True


def _axes_set(node: gs.Node, facts: Facts, rank: int | None) -> set[int] | None:
    axes = facts.arg(node, "axes", 1, 13)
    if not axes or not all(isinstance(a, int) for a in axes) or (rank is None and min(axes) < 0):
        return None  # absent (Squeeze: every 1-dim), computed, or negative with unknown rank
    return {a % rank if rank is not None else a for a in axes}


def _cancel_squeeze_pair(graph: gs.Graph, n2: gs.Node, names: Callable[[str], str], facts: Facts) -> bool:
    other = "Squeeze" if n2.op == "Unsqueeze" else "Unsqueeze"
    n1 = _mergeable_producer(graph, n2, other)
    if n1 is None:
        return False
    # both axes lists index the rank of the Squeeze's input (the Unsqueeze's output, or x)
    rank = facts.rank((n1 if n1.op == "Squeeze" else n2).inputs[0])
    a1, a2 = _axes_set(n1, facts, rank), _axes_set(n2, facts, rank)
    return a1 is not None and a1 == a2 and gu.bypass(graph, n2, n1.inputs[0], n2.outputs[0])


def _holds(src: np.dtype, mid: np.dtype) -> bool:
    """True when every value of type ``src`` survives a cast to ``mid`` and back."""
    if src.kind == "b":
        return mid.kind in "biuf"
    if src.kind in "iu" and mid.kind in "iu":
        return np.iinfo(mid).min <= np.iinfo(src).min and np.iinfo(src).max <= np.iinfo(mid).max
    if src.kind in "iu" and mid.kind == "f":
        return np.finfo(mid).nmant + 1 >= np.iinfo(src).bits - (src.kind == "i")
    if src.kind == "f" and mid.kind == "f":
        a, b = np.finfo(src), np.finfo(mid)
        return b.nmant >= a.nmant and b.maxexp >= a.maxexp and b.minexp <= a.minexp
    return False


def _values_fit(values: tuple | None, mid: np.dtype) -> bool:
    """Shape values (ints, or dims below 2**31) that a cast to ``mid`` keeps."""
    if values is None or mid.kind not in "iu":
        return False
    info = np.iinfo(mid)
    return all(info.min <= a <= info.max if type(a) is int else info.bits >= 32 for a in values)


def _merge_casts(graph: gs.Graph, c2: gs.Node, names: Callable[[str], str], facts: Facts) -> bool:
    """Cast(Cast(x, T1), T) with T x's own type and T1 holding x's values: x (the cast rule removes it)."""
    c1 = _mergeable_producer(graph, c2, "Cast")
    if c1 is None:
        return False
    x = c1.inputs[0]
    src, mid = facts.np_dtype(x), facts.np_dtype(c1.outputs[0])
    if src is None or mid is None or facts.dtype(x) != int(c2.attrs.get("to", 0)):
        return False
    if not (_holds(src, mid) or _values_fit(facts.value(x), mid)):
        return False
    c2.inputs[0] = x
    c1.inputs.clear()
    c1.outputs.clear()
    return True


PAIR_RULES = {"Transpose": (("merge_transposes", _merge_transposes),),
              "Reshape": (("merge_reshapes", _merge_reshapes),),
              "Unsqueeze": (("merge_unsqueezes", _merge_unsqueezes), ("squeeze_unsqueeze", _cancel_squeeze_pair)),
              "Squeeze": (("squeeze_unsqueeze", _cancel_squeeze_pair),),
              "Cast": (("merge_casts", _merge_casts),)}
