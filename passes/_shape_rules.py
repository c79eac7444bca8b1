"""Per-operator rules for ``_symbolic_shapes.Facts``: output dtype, dims and small values.

Each rule reads what ``Facts`` knows about a node's inputs and records its outputs
with ``facts.set``. A rule leaves a dim None when the operator does not pin it down
(``set`` turns it into a fresh symbol) and leaves a value None when it is not a
plain function of known elements. Only the forms of opsets 11 to 17 are handled
(attribute before, input after: Squeeze/Unsqueeze/ReduceSum axes, Split sizes).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from onnxopt import graph_utils as gu
from onnxopt.passes._symbolic_shapes import INT_TYPES, Sym, broadcast, np_value, onnx_dtype, product, solve_minus_one

BOOL, INT64 = TensorProto.BOOL, TensorProto.INT64
WIDE_INTS = frozenset({TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32, TensorProto.UINT64})
INT_MAX = 2**31 - 1

SAME = ("Identity", "Dropout", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Erf", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
        "Elu", "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Clip", "Softmax", "LogSoftmax",
        "Hardmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization", "LpNormalization",
        "MeanVarianceNormalization", "Shrink", "ThresholdedRelu", "CumSum", "Trilu")
PREDICATES = ("IsNaN", "IsInf", "Not")
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitShift", "Max", "Min", "Sum", "Mean")
LOGIC = ("And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# Ops whose axes moved from attribute to input, and the opset that moved them.
AXES_INPUT_SINCE = {"Squeeze": 13, "Unsqueeze": 13, "ReduceSum": 13, "Split": 13}


def ints(f, node, attr: str, i: int) -> list | None:
    """An int list given as attribute, or (from its opset) as input ``i``: None if unknown/absent."""
    v = f.arg(node, attr, i, AXES_INPUT_SINCE.get(node.op, 18))
    return None if v is None or any(type(a) is not int for a in v) else v


def axis_of(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError("axis out of range")
    return axis % rank


def out(f, node, dtype=None, dims=None, value=None) -> None:
    f.set(node.outputs[0], dtype, dims, value)
    for o in node.outputs[1:]:
        f.set(o)


def same(f, node):
    x = node.inputs[0]
    out(f, node, f.dtype(x), f.dims(x), f.value(x) if node.op == "Identity" else None)


def predicate(f, node):
    x = node.inputs[0]
    v = f.value(x)
    value = tuple(not a for a in v) if node.op == "Not" and v and all(isinstance(a, bool) for a in v) else None
    out(f, node, BOOL, f.dims(x), value)


def _cast_value(a, to: int):
    """``a`` cast to integer type ``to``, when that keeps the number (else None)."""
    if isinstance(a, Sym):  # a dim: below 2**31 in any model we target, so 32 bits hold it
        return a if to in WIDE_INTS else None
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(to))
    return int(a) if info.min <= a <= info.max else None


def cast(f, node):
    x, to = node.inputs[0], int(node.attrs.get("to", 0))
    v = f.value(x)
    if v is not None and to in INT_TYPES:
        v = tuple(_cast_value(a, to) for a in v)
        v = None if None in v else v
    elif v is not None and to == BOOL and all(type(a) is int for a in v):
        v = tuple(bool(a) for a in v)
    else:
        v = None
    out(f, node, to, f.dims(x), v)


def cast_like(f, node):
    out(f, node, f.dtype(node.inputs[1]), f.dims(node.inputs[0]))


def _elementwise(fn, values: list[tuple | None]) -> tuple | None:
    if any(v is None for v in values):
        return None
    n = max(len(v) for v in values)
    if any(len(v) not in (1, n) for v in values):
        return None
    rows = [tuple(v[i if len(v) == n else 0] for v in values) for i in range(n)]
    result = tuple(fn(*r) for r in rows)
    return None if any(r is None for r in result) else result


def _arith(op):
    def fn(a, b):
        if op == "Mul" and (a == 1 or b == 1) and not isinstance(a, bool) and not isinstance(b, bool):
            return b if a == 1 else a
        if op in ("Add", "Sub") and b == 0 and not isinstance(b, bool):
            return a
        if op == "Add" and a == 0 and not isinstance(a, bool):
            return b
        if not (type(a) is int and type(b) is int):
            return None
        if op == "Div":
            return a // b if a >= 0 and b > 0 else None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b}.get(op)
    return fn


def _compare(op):
    def fn(a, b):
        if type(a) is int and type(b) is int or isinstance(a, bool) and isinstance(b, bool):
            return {"Equal": a == b, "Less": a < b, "Greater": a > b, "LessOrEqual": a <= b,
                    "GreaterOrEqual": a >= b, "And": a and b, "Or": a or b, "Xor": a != b}[op]
        if op == "Equal" and isinstance(a, Sym) and a == b:
            return True
        if op == "Equal" and {type(a), type(b)} == {Sym, int} and min(x for x in (a, b) if type(x) is int) < 0:
            return False  # a dim is never negative
        return None
    return fn


def arithmetic(f, node):
    values = [f.value(t) for t in node.inputs]
    value = None
    if len(values) == 2 and node.op in ("Add", "Sub", "Mul", "Div"):
        value = _elementwise(_arith(node.op), values)
    out(f, node, f.dtype(node.inputs[0]), broadcast(*(f.dims(t) for t in node.inputs)), value)


def logic(f, node):
    value = _elementwise(_compare(node.op), [f.value(t) for t in node.inputs])
    out(f, node, BOOL, broadcast(*(f.dims(t) for t in node.inputs)), value)


def where(f, node):
    pick = lambda c, a, b: (a if c else b) if isinstance(c, bool) else None  # noqa: E731
    value = _elementwise(pick, [f.value(t) for t in node.inputs])
    out(f, node, f.dtype(node.inputs[1]), broadcast(*(f.dims(t) for t in node.inputs)), value)


def matmul(f, node):
    a, b = f.dims(node.inputs[0]), f.dims(node.inputs[1])
    dims = None
    if a is not None and b is not None and len(a) >= 2 and len(b) >= 2:
        batch = broadcast(a[:-2], b[:-2])
        dims = None if batch is None else (*batch, a[-2], b[-1])
    out(f, node, f.dtype(node.inputs[0]), dims)


def gemm(f, node):
    a, b = f.dims(node.inputs[0]), f.dims(node.inputs[1])
    dims = None
    if a is not None and b is not None and len(a) == len(b) == 2:
        dims = (a[1] if node.attrs.get("transA", 0) else a[0], b[0] if node.attrs.get("transB", 0) else b[1])
    out(f, node, f.dtype(node.inputs[0]), dims)


def transpose(f, node):
    x = f.dims(node.inputs[0])
    perm = node.attrs.get("perm")
    dims = None
    if x is not None:
        perm = list(range(len(x)))[::-1] if perm is None else [int(p) for p in perm]
        dims = tuple(x[p] for p in perm)
    out(f, node, f.dtype(node.inputs[0]), dims)


def shape(f, node):
    x = f.dims(node.inputs[0])
    if x is None:
        return out(f, node, INT64)
    r = len(x)
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", r))
    picked = x[min(max(start + r if start < 0 else start, 0), r):min(max(end + r if end < 0 else end, 0), r)]
    out(f, node, INT64, (len(picked),), picked)


def size(f, node):
    n = product(f.dims(node.inputs[0]) or [None])
    out(f, node, INT64, (), (n,) if n is not None else None)


def gather(f, node):
    data, idx = f.dims(node.inputs[0]), f.dims(node.inputs[1])
    dims = value = None
    if data is not None and idx is not None:
        axis = axis_of(int(node.attrs.get("axis", 0)), len(data))
        dims = (*data[:axis], *idx, *data[axis + 1:])
        v, i = f.value(node.inputs[0]), f.value(node.inputs[1])
        if v is not None and i is not None and len(data) == 1 and all(type(k) is int for k in i):
            value = tuple(v[k] for k in i)
    out(f, node, f.dtype(node.inputs[0]), dims, value)


def unsqueeze(f, node):
    x, axes = f.dims(node.inputs[0]), ints(f, node, "axes", 1)
    dims = None
    if x is not None and axes is not None:
        r = len(x) + len(axes)
        axes = sorted(axis_of(a, r) for a in axes)
        rest = iter(x)
        dims = tuple(1 if i in axes else next(rest) for i in range(r))
    out(f, node, f.dtype(node.inputs[0]), dims, f.value(node.inputs[0]))


def squeeze(f, node):
    x, axes = f.dims(node.inputs[0]), ints(f, node, "axes", 1)
    dims = None
    if x is not None and axes is not None:
        drop = {axis_of(a, len(x)) for a in axes}
        dims = tuple(d for i, d in enumerate(x) if i not in drop)
    elif x is not None and all(isinstance(d, int) for d in x):
        dims = tuple(d for d in x if d != 1)
    out(f, node, f.dtype(node.inputs[0]), dims, f.value(node.inputs[0]))


def concat(f, node):
    shapes = [f.dims(t) for t in node.inputs]
    dims = value = None
    if shapes and all(s is not None for s in shapes) and len({len(s) for s in shapes}) == 1:
        axis = axis_of(int(node.attrs["axis"]), len(shapes[0]))
        along = [s[axis] for s in shapes]
        total = sum(along) if all(isinstance(d, int) for d in along) else None
        others = [next((s[i] for s in shapes if s[i] is not None), None) for i in range(len(shapes[0]))]
        dims = tuple(total if i == axis else d for i, d in enumerate(others))
        values = [f.value(t) for t in node.inputs]
        if len(dims) == 1 and all(v is not None for v in values):
            value = tuple(a for v in values for a in v)
    out(f, node, f.dtype(node.inputs[0]), dims, value)


def reshape_dims(in_dims, target: tuple | None, allowzero: bool) -> tuple | None:
    """Output dims of Reshape(x of ``in_dims``, ``target``)."""
    if target is None:
        return None
    dims = []
    for i, t in enumerate(target):
        if t == 0 and not isinstance(t, bool) and not allowzero:
            dims.append(in_dims[i] if in_dims is not None and i < len(in_dims) else None)
        else:
            dims.append(t if not (type(t) is int and t < 0) else None)
    if list(target).count(-1) == 1 and in_dims is not None:
        k = list(target).index(-1)
        dims[k] = solve_minus_one(in_dims, dims[:k] + dims[k + 1:])
    return tuple(dims)


def reshape(f, node):
    x = node.inputs[0]
    dims = reshape_dims(f.dims(x), f.value(node.inputs[1]), bool(node.attrs.get("allowzero", 0)))
    out(f, node, f.dtype(x), dims, f.value(x))


def flatten(f, node):
    x = f.dims(node.inputs[0])
    dims = None
    if x is not None:
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(x) if axis < 0 else axis
        dims = (product(x[:axis]), product(x[axis:]))
    out(f, node, f.dtype(node.inputs[0]), dims)


def expand(f, node):
    target = f.value(node.inputs[1])
    dims = broadcast(f.dims(node.inputs[0]), target) if target is not None else None
    out(f, node, f.dtype(node.inputs[0]), dims)


def constant_of_shape(f, node):
    v = node.attrs.get("value")
    dtype = TensorProto.FLOAT if v is None else f.dtype(v)
    out(f, node, dtype, f.value(node.inputs[0]))


def range_(f, node):
    start, limit, delta = (f.value(t) for t in node.inputs[:3])
    n = None
    if start == (0,) and delta == (1,) and limit is not None:
        n = limit[0]
    elif all(v is not None and type(v[0]) is int for v in (start, limit, delta)) and delta[0]:
        n = max(math.ceil((limit[0] - start[0]) / delta[0]), 0)
    out(f, node, f.dtype(node.inputs[0]), (n if not isinstance(n, bool) else None,))


def _slice_dim(d, s, e, step):
    if s == 0 and step == 1 and (e == d or (type(e) is int and e >= INT_MAX)):
        return d  # the whole axis, also when its size is a symbol
    if not (isinstance(d, int) and all(type(a) is int for a in (s, e, step))) or step == 0:
        return None
    return len(range(*slice(s, e, step).indices(d)))


def slice_(f, node):
    x = f.dims(node.inputs[0])
    starts, ends = f.arg(node, "starts", 1, 10), f.arg(node, "ends", 2, 10)
    axes, steps = f.arg(node, "axes", 3, 10), f.arg(node, "steps", 4, 10)
    absent = lambda a, i: a is None and (f.opset < 10 or gu.optional_input(node, i) is None)  # noqa: E731
    dims = value = None
    if x is not None:
        dims = [None] * len(x)  # Slice keeps the rank
        known = starts is not None and ends is not None and (axes is not None or absent(axes, 3)) \
            and (steps is not None or absent(steps, 4))
        if known and all(type(a) is int for a in (axes or [])):
            axes = list(range(len(starts))) if axes is None else [axis_of(a, len(x)) for a in axes]
            steps = [1] * len(starts) if steps is None else steps
            dims = list(x)
            for axis, s, e, step in zip(axes, starts, ends, steps, strict=True):
                dims[axis] = _slice_dim(x[axis], s, e, step)
            v = f.value(node.inputs[0])
            args = (starts[0], ends[0], steps[0])
            if v is not None and len(x) == 1 and len(axes) == 1 and all(type(a) is int for a in args):
                value = v[slice(*args)]  # Python clamps starts and ends as ONNX Slice does
    out(f, node, f.dtype(node.inputs[0]), dims, value)


def split(f, node):
    x = f.dims(node.inputs[0])
    sizes = ints(f, node, "split", 1)
    if x is None:
        return out(f, node, f.dtype(node.inputs[0]))
    axis = axis_of(int(node.attrs.get("axis", 0)), len(x))
    n = len(node.outputs)
    if sizes is None and isinstance(x[axis], int) and x[axis] % n == 0:
        sizes = [x[axis] // n] * n
    for i, o in enumerate(node.outputs):
        dims = list(x)
        dims[axis] = sizes[i] if sizes is not None and len(sizes) == n else None
        f.set(o, f.dtype(node.inputs[0]), tuple(dims))


def reduce(f, node):
    x = f.dims(node.inputs[0])
    axes = ints(f, node, "axes", 1)
    keep = int(node.attrs.get("keepdims", 1))
    dims = None
    if x is not None:
        if axes is None and len(node.inputs) < 2 and not node.attrs.get("noop_with_empty_axes", 0):
            axes = list(range(len(x)))
        if axes is not None:
            drop = {axis_of(a, len(x)) for a in axes}
            dims = tuple(1 if i in drop else d for i, d in enumerate(x) if keep or i not in drop)
    out(f, node, f.dtype(node.inputs[0]), dims)


def arg_reduce(f, node):
    x = f.dims(node.inputs[0])
    dims = None
    if x is not None:
        axis = axis_of(int(node.attrs.get("axis", 0)), len(x))
        keep = int(node.attrs.get("keepdims", 1))
        dims = tuple(1 if i == axis else d for i, d in enumerate(x) if keep or i != axis)
    out(f, node, INT64, dims)


def _window(d, k, s, dil, pad):
    return (d + pad - dil * (k - 1) - 1) // s + 1 if isinstance(d, int) else None


def conv_pool(f, node):
    x = f.dims(node.inputs[0])
    dims = None
    if x is not None and len(x) >= 3:
        n_sp = len(x) - 2
        if node.op == "Conv":
            w = f.dims(node.inputs[1])
            channels, kernel = (w[0], w[2:]) if w is not None else (None, None)
        else:
            channels, kernel = x[1], node.attrs.get("kernel_shape")
        strides = node.attrs.get("strides", [1] * n_sp)
        dil = node.attrs.get("dilations", [1] * n_sp)
        pads = node.attrs.get("pads", [0] * 2 * n_sp)
        spatial = [None] * n_sp
        # ceil_mode has its own rule for a last window starting in the padding: not derived
        if node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and kernel is not None \
                and not node.attrs.get("ceil_mode", 0):
            spatial = [_window(x[2 + i], kernel[i], strides[i], dil[i], pads[i] + pads[i + n_sp])
                       for i in range(n_sp)]
        dims = (x[0], channels, *spatial)
    out(f, node, f.dtype(node.inputs[0]), dims)


def global_pool(f, node):
    x = f.dims(node.inputs[0])
    out(f, node, f.dtype(node.inputs[0]), None if x is None else (*x[:2], *[1] * (len(x) - 2)))


def resize(f, node):
    x = f.dims(node.inputs[0])
    if f.opset < 11 or "axes" in node.attrs or node.attrs.get("keep_aspect_ratio_policy", "stretch") not in (
            "stretch", b"stretch"):
        return out(f, node, f.dtype(node.inputs[0]), None if x is None else (None,) * len(x))
    sizes = f.value(gu.optional_input(node, 3))
    if sizes is None and x is not None:
        scales = gu.const_value(gu.optional_input(node, 2))
        if scales is not None and scales.size == len(x):  # output dim = floor(dim * scale)
            sizes = tuple(d if sc == 1 else (math.floor(d * sc) if isinstance(d, int) else None)
                          for d, sc in zip(x, scales.tolist(), strict=True))
    ok = x is not None and sizes is not None and len(sizes) == len(x)
    out(f, node, f.dtype(node.inputs[0]), sizes if ok else None)


def constant(f, node):
    v = gu.const_value(node.outputs[0])
    if v is None:
        return out(f, node)
    out(f, node, onnx_dtype(v.dtype), v.shape, np_value(v))


def tile(f, node):
    x, reps = f.dims(node.inputs[0]), f.value(node.inputs[1])
    dims = None
    if x is not None and reps is not None and len(reps) == len(x):
        dims = tuple(d if r == 1 else (d * r if isinstance(d, int) and type(r) is int else None)
                     for d, r in zip(x, reps, strict=True))
    out(f, node, f.dtype(node.inputs[0]), dims)


RULES = {
    **{op: same for op in SAME},
    **{op: predicate for op in PREDICATES},
    **{op: arithmetic for op in ARITHMETIC},
    **{op: logic for op in LOGIC},
    **{op: reduce for op in REDUCE},
    "Cast": cast, "CastLike": cast_like, "Where": where, "MatMul": matmul, "Gemm": gemm,
    "Transpose": transpose, "Shape": shape, "Size": size, "Gather": gather, "Unsqueeze": unsqueeze,
    "Squeeze": squeeze, "Concat": concat, "Reshape": reshape, "Flatten": flatten, "Expand": expand,
    "ConstantOfShape": constant_of_shape, "Range": range_, "Slice": slice_, "Split": split,
    "ArgMax": arg_reduce, "ArgMin": arg_reduce, "Conv": conv_pool, "MaxPool": conv_pool,
    "AveragePool": conv_pool, "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool,
    "Resize": resize, "Tile": tile, "Constant": constant,
}
