"""Weights and biases of the layers insert_qdq quantizes: where they are, and their int8/int32 values.

The output-channel axis of the weight, which gets one scale per channel:

    Conv            W (Cout, Cin/g, k...)        axis 0
    ConvTranspose   W (Cin, Cout/g, k...)        axis 1; the bias (Cout) repeats the g scales
    MatMul          B (K, N)                     axis 1 (only 2-D constant B; A may be N-D)
    Gemm            B (K, N), or (N, K) transB   axis 1, or 0 with transB

Refused: weights that are not float32 constants, MatMul with a constant first operand
or two activations, Gemm with alpha != 1 or (with a bias) beta != 1, which QGemm's
bias scale does not express, and a Gemm bias that is not per column ((N,) or (1, N)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import const_value, optional_input
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
