"""Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Inference BatchNormalization is a per-channel affine map on axis 1::

    bn(y) = scale * (y - mean) / sqrt(var + eps) + B = s * y + t
    s = scale / sqrt(var + eps),   t = B - mean * s

and the layer before it is linear per output channel, ``y = x (*) W + b``, so
``s * y + t = x (*) (W * s) + (b * s + t)``: the weights scale along their
output-channel axis and the bias becomes ``(b - mean) * s + B``. The output-channel
axis of the weight is 0 for Conv, 1 for Gemm (transB=0) and MatMul, 0 for Gemm with
transB=1; ConvTranspose stores (Cin, Cout/group, k...), so its weight is scaled on
axis 1 within each group. Gemm's ``beta * C`` becomes part of the bias (beta=1
afterwards); ``alpha`` stays as it is, since it commutes with the scaling.

A MatMul has no bias input, so a folded MatMul becomes a Gemm (A, W*s, bias). This
is only valid when A is 2-D, which is also exactly when BatchNormalization's channel
axis 1 is the MatMul's last (output-channel) axis, so no case needs a MatMul + Add.
One Gemm is one kernel in every runtime; onnxruntime itself fuses MatMul+Add so.

``linear_layer``, ``plan_fold`` and ``apply_fold`` are shared with
``fold_affine_into_conv`` (any per-channel ``s * y + t`` folds the same way).

Refused, with the reason in ``skipped``: training-mode BatchNormalization
(training_mode=1, running-stat outputs, opset < 7, spatial=0), statistics or
bias that are not constants, a layer output read by anything else or being a
graph output, a MatMul whose input is not known to be 2-D, channel count mismatch,
non-finite folded values, and a weight shared with other nodes when the folded copy
would be larger than ``fold_size_limit``: the other readers keep the original, so
the fold adds a second copy of the weight to the file. A small weight is worth one
node less; a large one would grow the model by its whole size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.config import OptimizeConfig
from onnxopt.graph_utils import (
    Names,
    const_value,
    finish,
    is_graph_input,
    is_standard,
    only_consumer,
    opset,
    optional_input,
    producer,
)
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)

FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LinearLayer:
    """A node computing ``y = x (*) W + b`` with a constant W, seen per output channel."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None  # (channels,) float64, Gemm's beta already applied
    channels: int
    out_rank: int | None  # None: depends on an input whose rank is unknown
    channel_axis: int  # axis of the output holding the channels (negative: from the end)


@dataclass(frozen=True)
class Fold:
    weight: np.ndarray | None  # None: keep the weight
    bias: np.ndarray | None  # None: no bias before or after


def per_channel(c: np.ndarray, out_rank: int | None, axis: int, n: int) -> np.ndarray | None:
    """``c`` as an (n,) float64 vector, or None unless broadcasting ``c`` against the
    output varies only along ``axis`` and leaves the output shape as it is."""
    if out_rank is None:
        # Only the trailing axis is known to be the channel axis; a 2-D+ constant
        # could add axes to an output of lower rank.
        if axis != -1 or c.ndim > 1:
            return None
        out_rank = 1
    if c.ndim > out_rank:
        return None
    ax = axis % out_rank
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if shape[ax] not in (1, n) or any(d != 1 for i, d in enumerate(shape) if i != ax):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (n,)).copy()


def linear_layer(graph: gs.Graph, node: gs.Node | None) -> LinearLayer | str | None:
    """None when ``node`` is no fold target; a reason when it is one that cannot take a fold.

    A node whose weight is not a constant is no layer (attention's MatMul(q, k) is the
    common case): None, so that the Div or Add after it is not reported.
    """
    if node is None or node.op not in FOLD_TARGETS or not is_standard(node) or len(node.inputs) < 2:
        return None
    w_t = node.inputs[1]
    w = const_value(w_t)
    if w is None or is_graph_input(graph, w_t):
        return None
    if not np.issubdtype(w.dtype, np.floating):
        return f"{node.op} weight has non-float dtype {w.dtype}"
    shape = _layout(node, w)
    if isinstance(shape, str):
        return shape
    channels, out_rank, axis = shape
    b_t = optional_input(node, 2)
    if b_t is None:
        return LinearLayer(node, w, None, channels, out_rank, axis)
    b = const_value(b_t)
    if b is None or is_graph_input(graph, b_t):
        return f"{node.op} bias is not a constant"
    if node.op == "Gemm":
        bias = per_channel(b, 2, 1, channels)
        bias = None if bias is None else bias * float(node.attrs.get("beta", 1.0))
    else:
        bias = b.reshape(-1).astype(np.float64) if b.size == channels else None
    if bias is None:
        return f"{node.op} bias of shape {tuple(b.shape)} is not per output channel"
    return LinearLayer(node, w, bias, channels, out_rank, axis)


def _layout(node: gs.Node, w: np.ndarray) -> tuple[int, int | None, int] | str:
    """(output channels, output rank, channel axis) of a fold target with weight ``w``."""
    if node.op in ("Conv", "ConvTranspose"):
        if w.ndim < 3:
            return f"{node.op} weight has rank {w.ndim}"
        if node.op == "Conv":
            return w.shape[0], w.ndim, 1
        group = int(node.attrs.get("group", 1))
        if group < 1 or w.shape[0] % group:
            return f"ConvTranspose weight of shape {w.shape} does not fit group={group}"
        return w.shape[1] * group, w.ndim, 1
    if w.ndim != 2:
        return f"{node.op} weight is not 2-D"
    if node.op == "Gemm":
        return (w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]), 2, 1
    a_shape = node.inputs[0].shape
    a_rank = len(a_shape) if a_shape is not None else None
    return w.shape[1], (None if a_rank is None else max(a_rank, 1)), -1


def scaled_weight(layer: LinearLayer, s: np.ndarray) -> np.ndarray:
    """The weight with output channel ``i`` multiplied by ``s[i]``, in its own dtype."""
    w = layer.weight.astype(np.float64)
    op = layer.node.op
    if op == "Conv":
        out = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op == "ConvTranspose":
        g = int(layer.node.attrs.get("group", 1))
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        out = (grouped * s.reshape((g, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)
    elif op == "Gemm" and layer.node.attrs.get("transB", 0):
        out = w * s[:, None]
    else:
        out = w * s[None, :]
    return out.astype(layer.weight.dtype)


def plan_fold(layer: LinearLayer, s: np.ndarray | None, t: np.ndarray | None, size_limit: int) -> Fold | str:
    """New weight and bias for ``s * layer(x) + t`` (s, t: (channels,) or None), or why not."""
    w_t = layer.node.inputs[1]
    others = len(w_t.outputs) - 1
    if s is not None and others and layer.weight.nbytes > size_limit:
        return (f"weight {w_t.name!r} is shared with {others} other node(s); folding would add "
                f"a {layer.weight.nbytes}-byte copy (fold_size_limit={size_limit})")
    weight = bias = None
    with np.errstate(all="ignore"):  # overflow and 0 * inf are caught by the finiteness check below
        if s is not None:
            weight = scaled_weight(layer, s)
        if layer.bias is not None or t is not None:
            b = layer.bias if layer.bias is not None else np.zeros(layer.channels)
            bias = (b * (1.0 if s is None else s) + (0.0 if t is None else t)).astype(layer.weight.dtype)
    if layer.node.op == "MatMul" and bias is not None and layer.out_rank != 2:
        return "MatMul input is not known to be 2-D, so it cannot take a bias as a Gemm"
    if any(a is not None and not np.all(np.isfinite(a)) for a in (weight, bias)):
        return "folded weights would not be finite"
    return Fold(weight, bias)


def apply_fold(names: Names, layer: LinearLayer, fold: Fold, consumer: gs.Node) -> None:
    """Rewrite ``layer`` with ``fold`` and make it write ``consumer``'s output instead."""
    node = layer.node
    base = node.name or node.outputs[0].name
    if fold.weight is not None:
        node.inputs[1] = gs.Constant(names(f"{base}_w_folded"), np.ascontiguousarray(fold.weight))
    if fold.bias is not None:
        bias = gs.Constant(names(f"{base}_b_folded"), np.ascontiguousarray(fold.bias))
        if node.op == "MatMul":
            node.op, node.attrs = "Gemm", {}
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
    out = consumer.outputs[0]
    consumer.inputs.clear()
    consumer.outputs.clear()
    node.outputs[0] = out


class SizeLimitedFoldPass(GraphPass):
    """A fold that writes new weights: a shared weight whose folded copy would exceed
    ``fold_size_limit`` bytes is refused, since the other reader keeps the original."""

    def __init__(self, fold_size_limit: int = OptimizeConfig.fold_size_limit):
        self.fold_size_limit = fold_size_limit

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> SizeLimitedFoldPass:
        return cls(fold_size_limit=config.fold_size_limit)


class FoldBnIntoConvPass(SizeLimitedFoldPass):
    """BatchNormalization (inference) folded into the Conv/ConvTranspose/Gemm/MatMul before it.

    Handles grouped and depthwise Conv, ConvTranspose with any group, Gemm with
    transB 0/1, alpha, beta and a scalar/(N,)/(1,N) or absent C, MatMul with a constant
    (K, N) weight on 2-D input, all with or without bias, BatchNormalization opset
    7-17 (training_mode=0 included). The BN output keeps its name (it may be a graph
    output). Refusals are listed in the module docstring and reported in ``skipped``.
    """

    name = "fold_bn_into_conv"

    def call(self, graph: gs.Graph) -> PassResult:
        names = Names(graph)
        count, skipped = 0, []
        for bn in list(graph.nodes):
            if bn.op != "BatchNormalization" or not is_standard(bn) or not bn.inputs:
                continue
            reason = self._fold(graph, names, bn)
            if reason is True:
                count += 1
            elif reason:
                logger.debug("not folding %s: %s", bn.name, reason)
                skipped.append(Skip(bn.name, bn.op, reason))
        if count:
            finish(graph)
        return PassResult(graph, bool(count), {self.name: count} if count else {}, tuple(skipped))

    def _fold(self, graph: gs.Graph, names: Names, bn: gs.Node) -> bool | str | None:
        """True when folded, a reason when refused, None when there is nothing to fold into."""
        x = bn.inputs[0]
        layer = linear_layer(graph, producer(x))
        if layer is None or isinstance(layer, str):
            return layer
        affine = bn_affine(graph, bn)
        if isinstance(affine, str):
            return affine
        if not only_consumer(graph, x, bn):
            return f"{layer.node.op} output is also read elsewhere or is a graph output"
        if layer.out_rank is None or layer.channel_axis % layer.out_rank != 1:
            return "channel axis 1 is not the MatMul's output-channel axis (input not known to be 2-D)"
        s, t = affine
        if s.shape[0] != layer.channels:
            return f"{s.shape[0]} BatchNormalization channels vs {layer.channels} {layer.node.op} channels"
        fold = plan_fold(layer, s, t, self.fold_size_limit)
        if isinstance(fold, str):
            return fold
        apply_fold(names, layer, fold, bn)
        return True


def bn_affine(graph: gs.Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) with bn(y) = s * y + t per channel, or why this BN is not an inference BN."""
    if opset(graph) and opset(graph) < 7:
        return "BatchNormalization before opset 7 (is_test form)"
    if int(bn.attrs.get("training_mode", 0)) or int(bn.attrs.get("spatial", 1)) == 0:
        return "training_mode=1 or spatial=0 (not a per-channel inference BatchNormalization)"
    # Before opset 14 the output count is the mode: with its running-stat outputs
    # (even unread) a BatchNormalization normalizes with batch statistics, and
    # onnxruntime runs it so. From opset 14 on they are invalid unless training_mode=1.
    if any(o.name for o in bn.outputs[1:]):
        return "it has running mean/variance outputs (training mode)"
    params = [None if is_graph_input(graph, t) else const_value(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "scale, bias, mean or variance is not a constant"
    scale, b, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    if not scale.shape == b.shape == mean.shape == var.shape:
        return "parameter shapes differ"
    with np.errstate(all="ignore"):  # a negative variance gives NaN, which plan_fold refuses
        s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        return s, b - mean * s
