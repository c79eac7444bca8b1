"""Weights and biases of the layers insert_qdq quantizes: where they are, and their int8/int32 values.

The output-channel axis of the weight, which gets one scale per channel:

    Conv            W (Cout, Cin/g, k...)        axis 0
    ConvTranspose   W (Cin, Cout/g, k...)        axis 1; the bias (Cout) repeats the g scales
    MatMul          B (K, N)                     axis 1 (only 2-D constant B; A may be N-D)
    Gemm            B (K, N), or (N, K) transB   axis 1, or 0 with transB

Refused: weights that are not float32 constants, MatMul with a constant first operand
or two activations, Gemm with alpha != 1 or (with a bias) beta != 1, which QGemm's
bias scale does not express, and a Gemm bias that is not per column ((N,) or (1, N)).

Gather tables (embeddings): a float32 constant of rank >= 2 that Gather reads as its data
and indexes with a tensor computed at run time. The table is symmetric int8, with one scale
per feature (column of an embedding) or per row, whichever reconstructs the table better,
or one scale for the whole table. A single outlier sets the step of every value that
shares its scale: all-MiniLM-L6-v2's feature 99 reaches 1.87 where the other values of its
rows have a standard deviation of 0.03, which spoils the rows of [CLS], position 0 and the
two token types under per-row scales (tables alone: 1 - pooled cosine 1.2e-4, against
1.7e-5 per feature and 8e-4 per table). Refused: a table some
other node (or another Gather kept in float, or a graph output) also reads, since its
float copy would stay; constant indices (``fold_constants`` folds the Gather away); tables
of another float type or of rank 1 (a codebook). Integer tables (shape arithmetic) are not
tables to quantize and pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import const_value, is_graph_output, is_standard, optional_input
from onnxopt.passes import _qdq_math as qm


@dataclass(frozen=True)
class WeightSpec:
    w: gs.Tensor
    w_value: np.ndarray
    axis: int
    b: gs.Tensor | None = None
    b_value: np.ndarray | None = None
    bias_axis: int = 0
    repeat: int = 1  # bias channels = repeat x weight channels (grouped ConvTranspose)


@dataclass(frozen=True)
class QuantizedWeight:
    w: np.ndarray  # int8
    w_scale: np.ndarray  # float32, (C,) or ()
    b: np.ndarray | None = None  # int32
    b_scale: np.ndarray | None = None


def weight_spec(node: gs.Node) -> WeightSpec | str:
    """Where ``node``'s weight and bias are and the weight's channel axis, or why it is refused."""
    if len(node.inputs) < 2:
        return "no weight input"
    w = const_value(node.inputs[1])
    if w is None:
        if node.op == "MatMul":
            first = const_value(node.inputs[0]) is not None
            return "constant first operand: left in float" if first else "both operands are activations: left in float"
        return "weight is not a constant"
    if w.dtype != np.float32:
        return f"weights are {w.dtype}, not float32"
    if node.op in ("Conv", "ConvTranspose"):
        return _conv_spec(node, w)
    if w.ndim != 2:
        return f"weight of rank {w.ndim}: only 2-D weights are quantized"
    if node.op == "MatMul":
        return WeightSpec(node.inputs[1], w, axis=1)
    return _gemm_spec(node, w)


def _bias(node: gs.Node, i: int, n: int) -> tuple[gs.Tensor, np.ndarray] | str | None:
    t = optional_input(node, i)
    if t is None:
        return None
    b = const_value(t)
    if b is None:
        return "bias is not a constant"
    if b.dtype != np.float32 or b.size != n or b.ndim not in (1, 2) or b.shape[-1] != n:
        return f"bias of shape {b.shape} and type {b.dtype}: expected float32 ({n},)"
    return t, b


def _conv_spec(node: gs.Node, w: np.ndarray) -> WeightSpec | str:
    if w.ndim < 3:
        return f"weight of rank {w.ndim}"
    transpose = node.op == "ConvTranspose"
    group = int(node.attrs.get("group", 1))
    axis = 1 if transpose else 0
    repeat = group if transpose else 1
    bias = _bias(node, 2, w.shape[axis] * repeat)
    if isinstance(bias, str):
        return bias
    b, b_value = bias or (None, None)
    return WeightSpec(node.inputs[1], w, axis, b, b_value, 0, repeat)


def _gemm_spec(node: gs.Node, w: np.ndarray) -> WeightSpec | str:
    if float(node.attrs.get("alpha", 1.0)) != 1.0:
        return f"alpha {node.attrs['alpha']} != 1"
    axis = 0 if int(node.attrs.get("transB", 0)) else 1
    bias = _bias(node, 2, w.shape[axis])
    if isinstance(bias, str):
        return bias
    if bias is not None and float(node.attrs.get("beta", 1.0)) != 1.0:
        return f"beta {node.attrs['beta']} != 1 with a bias"
    b, b_value = bias or (None, None)
    return WeightSpec(node.inputs[1], w, axis, b, b_value, 0 if b_value is None else b_value.ndim - 1)


def quantize(spec: WeightSpec, x_scale: np.float32, per_channel: bool, int32_bias: bool = True) -> QuantizedWeight:
    """int8 weight (per channel or per tensor) and int32 bias with scale x_scale * w_scale
    (no bias when ``int32_bias`` is False: it stays float)."""
    axis = spec.axis if per_channel else None
    min_scale: np.ndarray | float = 0.0
    bias = spec.b_value is not None and int32_bias
    if bias:
        need = qm.bias_min_weight_scale(spec.b_value.reshape(spec.repeat, -1), x_scale).max(axis=0)
        min_scale = need if per_channel else float(need.max())
    w_scale = qm.weight_scale(spec.w_value, axis, min_scale)
    w_q = qm.quantize_weight(spec.w_value, w_scale, axis)
    if not bias:
        return QuantizedWeight(w_q, w_scale)
    b_scale = qm.bias_scale(x_scale, np.tile(w_scale, spec.repeat) if per_channel else w_scale)
    flat = qm.quantize_bias(spec.b_value.reshape(-1), b_scale)
    return QuantizedWeight(w_q, w_scale, flat.reshape(spec.b_value.shape), b_scale)


@dataclass(frozen=True)
class TableSpec:
    table: gs.Tensor
    value: np.ndarray
    axis: int  # the Gather axis, >= 0

    @property
    def channel_axis(self) -> int:
        """The axis of a row's features (an embedding's dimensions): the last, unless Gather picks along it."""
        return self.value.ndim - 1 if self.axis != self.value.ndim - 1 else 0


@dataclass(frozen=True)
class QuantizedTable:
    q: np.ndarray  # int8, the table's shape
    scale: np.ndarray  # float32: () per tensor, else one per slice along ``axis``
    axis: int | None


def _reads_as_table(node: gs.Node, t: gs.Tensor, exclude: tuple[str, ...]) -> bool:
    return (node.op == "Gather" and is_standard(node) and len(node.inputs) == 2 and node.inputs[0] is t
            and node.name not in exclude and node.op not in exclude and const_value(node.inputs[1]) is None)


def table_spec(graph: gs.Graph, node: gs.Node, exclude: tuple[str, ...]) -> TableSpec | str | None:
    """The constant table Gather ``node`` reads and its axis, why it stays float, or None
    when the data is not a float constant (an activation, or integer shape arithmetic)."""
    t = node.inputs[0]
    w = const_value(t)
    if w is None or not np.issubdtype(w.dtype, np.floating) or len(node.inputs) != 2:
        return None
    if w.dtype != np.float32:
        return f"table is {w.dtype}, not float32"
    if w.ndim < 2:
        return f"table of rank {w.ndim}: only tables of rows are quantized"
    if const_value(node.inputs[1]) is not None:
        return "constant indices: fold it first (fold_constants)"
    others = [n for n in t.outputs if not _reads_as_table(n, t, exclude)]
    if others or is_graph_output(graph, t):
        what = f"{others[0].op} {others[0].name!r}" if others else "a graph output"
        return f"table {t.name!r} is also read by {what}, which keeps it in float: left in float"
    axis = int(node.attrs.get("axis", 0))
    return TableSpec(t, w, axis + w.ndim if axis < 0 else axis)


def quantize_table(spec: TableSpec, per_channel: bool) -> QuantizedTable:
    """Symmetric int8 table: one scale for it, or per channel along whichever of its feature
    axis and its Gather axis reconstructs it with the smaller error (features on a tie)."""
    axes = (spec.channel_axis, spec.axis) if per_channel else (None,)
    axis = min(axes, key=lambda a: qm.weight_error(spec.value, a))
    scale = qm.weight_scale(spec.value, axis)
    return QuantizedTable(qm.quantize_weight(spec.value, scale, axis), scale, axis)
