"""Element types, symbolic dims and small shape values, derived from the operators alone.

``Facts(graph)`` walks the (topologically sorted) graph once and records, per tensor:
- ``dtype``: the ONNX element type each operator's type constraints give its output;
- ``dims``: a tuple with, per axis, an int (static), or a ``Sym``: an unknown
  non-negative integer that is equal to itself only. Every dim no rule pins down
  gets a fresh ``Sym`` named after its tensor and axis, so ``Shape(x)[j]`` read
  twice gives the same symbol, and x's dim j read through another tensor whose
  dim provably equals it (MatMul rows, Transpose, an elementwise op, a Reshape
  target holding it) gives the same symbol too;
- ``value``: the elements of small int and bool tensors (shape arithmetic: Shape,
  Gather, Concat, Equal, Where...), each an int, a bool or a ``Sym``.

It is sound: two dims get the same symbol only when every run that does not fail
gives them the same value. No equality is assumed, not even between graph inputs
whose declared dims share a dim_param name (onnxruntime does not enforce that).
Broadcasting keeps a dim when the other side is 1 or the same symbol, and a static
dim other than 1 wins over a symbol (a valid run has the symbol at 1 or that value);
two different symbols give a fresh one. Reshape's -1 is solved when both sides
hold the same symbols and the static parts divide. Static dims annotated in the
model (value_info) fill in what the rules leave open; symbolic annotations do not.
Anything else (unknown ops, control flow, custom domains) gets fresh symbols of
the annotated rank, or no dims at all.

Facts stay valid for the tensors that survive a rewrite that keeps every tensor's
value (no-op removal, merges): passes compute them once per call.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxopt import graph_utils as gu

MAX_VALUE = 64  # elements of a value worth tracking (shape tensors, axes, masks' shapes)
INT_TYPES = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                       TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})


@dataclass(frozen=True)
class Sym:
    """An unknown non-negative integer, equal only to itself."""

    name: str

    def __repr__(self) -> str:
        return f"Sym({self.name})"


Dims = tuple  # per axis an int or a Sym


def onnx_dtype(dtype) -> int | None:
    """gs's dtype (numpy dtype, or onnx enum for types numpy lacks) as an onnx enum."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def np_value(values: np.ndarray) -> tuple | None:
    """A constant's elements as python ints/bools when it is a small int or bool tensor."""
    if values.ndim > 1 or values.size > MAX_VALUE or values.dtype.kind not in "iub":
        return None
    return tuple(bool(v) if values.dtype.kind == "b" else int(v) for v in values.reshape(-1))


class Facts:
    """What the operators say about every tensor of ``graph`` (see the module docstring)."""

    def __init__(self, graph: gs.Graph):
        self.opset = gu.opset(graph)
        self._dtype: dict[str, int] = {}
        self._dims: dict[str, Dims] = {}
        self._value: dict[str, tuple] = {}
        from onnxopt.passes._shape_rules import RULES  # the rules build on this module's algebra

        self._rules = RULES
        for t in graph.inputs:
            self._seed(t)
        for node in graph.nodes:
            self._visit(node)

    # --- queries -----------------------------------------------------------------

    def dtype(self, t: gs.Tensor) -> int | None:
        if isinstance(t, gs.Constant):
            return onnx_dtype(t.dtype)
        return self._dtype.get(t.name) or onnx_dtype(t.dtype)

    def np_dtype(self, t: gs.Tensor) -> np.dtype | None:
        d = self.dtype(t)
        try:
            return None if d is None else np.dtype(helper.tensor_dtype_to_np_dtype(d))
        except (KeyError, TypeError, ValueError):
            return None

    def dims(self, t: gs.Tensor | None) -> Dims | None:
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        return self._dims.get(t.name)

    def rank(self, t: gs.Tensor) -> int | None:
        d = self.dims(t)
        return None if d is None else len(d)

    def arg(self, node: gs.Node, attr: str, i: int, since: int) -> list | None:
        """A list given as attribute before opset ``since`` and as input ``i`` from it on.

        An input's entries are ints or, when computed from shapes, symbolic dims.
        """
        if self.opset < since:
            v = node.attrs.get(attr)
            return None if v is None else [int(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
        v = self.value(gu.optional_input(node, i))
        return None if v is None else list(v)

    def value(self, t: gs.Tensor | None) -> tuple | None:
        if t is None:
            return None
        v = gu.const_value(t)
        if v is not None:
            return np_value(v)
        return self._value.get(t.name)

    # --- propagation ---------------------------------------------------------------

    def set(self, t: gs.Tensor, dtype: int | None = None, dims=None, value: tuple | None = None) -> None:
        """Record what a rule found for ``t``; unknown dims become fresh symbols."""
        if not t.name or isinstance(t, gs.Constant):
            return
        dtype = dtype or onnx_dtype(t.dtype)
        if dtype:
            self._dtype[t.name] = dtype
        dims = self._with_annotation(t, dims)
        if dims is not None:
            self._dims[t.name] = tuple(d if d is not None else Sym(f"{t.name}:{i}") for i, d in enumerate(dims))
            if value is not None and len(value) == math.prod(d if isinstance(d, int) else 0 for d in dims):
                self._value[t.name] = tuple(value)

    @staticmethod
    def _with_annotation(t: gs.Tensor, dims) -> tuple | None:
        shape = t.shape
        if shape is None or (dims is not None and len(dims) != len(shape)):
            return dims
        noted = [d if isinstance(d, int) and d >= 0 else None for d in shape]
        if dims is None:
            return tuple(noted)
        return tuple(d if d is not None else n for d, n in zip(dims, noted, strict=True))

    def _seed(self, t: gs.Tensor) -> None:
        self.set(t)

    def _visit(self, node: gs.Node) -> None:
        rule = self._rules.get(node.op) if gu.is_standard(node) and not gu.has_subgraph(node) else None
        if rule is not None:
            try:
                rule(self, node)
                return
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
                pass  # a malformed or unusual node: nothing is derived, annotations still count
        for out in node.outputs:
            self.set(out)


def broadcast_dim(a, b):
    """The broadcast of two dims (None: unknown)."""
    if a == b:
        return a
    if a == 1:
        return b
    if b == 1:
        return a
    if isinstance(a, int) and not isinstance(b, int):
        return a  # a valid run has b == 1 or b == a
    if isinstance(b, int) and not isinstance(a, int):
        return b
    return None


def broadcast(*shapes: Dims | None) -> Dims | None:
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d = dims[0]
        for e in dims[1:]:
            d = broadcast_dim(d, e) if d is not None else None
        out.append(d)
    return tuple(out)


def product(dims) -> object | None:
    """The product of dims: an int, a single Sym (others 1), or None."""
    ints = [d for d in dims if isinstance(d, int)]
    syms = [d for d in dims if isinstance(d, Sym)]
    if len(ints) + len(syms) != len(dims):
        return None
    if not syms:
        return math.prod(ints)
    return syms[0] if len(syms) == 1 and math.prod(ints) == 1 else None


def solve_minus_one(in_dims: Dims, known: list) -> object | None:
    """The dim a Reshape's -1 stands for, given the input dims and the other target dims."""
    if any(d is None for d in (*in_dims, *known)):
        return None
    in_syms = Counter(d for d in in_dims if isinstance(d, Sym))
    out_syms = Counter(d for d in known if isinstance(d, Sym))
    in_static = math.prod(d for d in in_dims if isinstance(d, int))
    out_static = math.prod(d for d in known if isinstance(d, int))
    if in_syms == out_syms:
        return in_static // out_static if out_static and in_static % out_static == 0 else None
    extra = in_syms - out_syms
    if not (out_syms - in_syms) and sum(extra.values()) == 1 and in_static == out_static:
        return next(iter(extra))
    return None
