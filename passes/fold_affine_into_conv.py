"""Fold a per-channel Mul/Add/Sub/Div by a constant into the Conv, ConvTranspose, Gemm or MatMul before it.

Each of these, with a constant ``c`` that varies only along the output-channel axis,
is ``s * y + t`` per channel, with ``y = x (*) W + b`` the layer's output::

    y * c, c * y -> s = c        y + c, c + y -> t = c        y / c -> s = 1 / c
    y - c        -> t = -c       c - y        -> s = -1, t = c

and folds as ``x (*) (W * s) + (b * s + t)`` (see ``fold_bn_into_conv``, which does
the weight and bias arithmetic for both passes). An Add alone leaves the weight as it
is and only creates or changes the bias.

The channel axis is 1 for Conv and ConvTranspose and the last axis for Gemm and
MatMul. ``c`` is accepted when, aligned to the output's rank as broadcasting aligns
it, every axis but the channel axis is 1 and the channel axis is 1 or C: shapes
(C,1,1), (1,C,1,1) or a scalar for a 2-D Conv; (C,), (1,C) or a scalar for Gemm. A
constant of higher rank than the output would change the output shape; (C,) after a
Conv is per column, not per channel: both are refused. When a MatMul input's rank is
unknown only constants of rank <= 1 are accepted.

A MatMul gains a bias by becoming a Gemm, which needs 2-D input; a MatMul on N-D
input followed by Add is already the canonical "matmul plus bias" and is left as it
is, without a report. Division by a constant containing zero and ``c / y`` are
refused; weights shared with other nodes follow ``fold_bn_into_conv``'s rule.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    Names,
    const_value,
    finish,
    is_graph_input,
    is_standard,
    only_consumer,
    producer,
)
from onnxopt.pass_base import PassResult, Skip
from onnxopt.passes.fold_bn_into_conv import (
    FOLD_TARGETS,
    LinearLayer,
    SizeLimitedFoldPass,
    apply_fold,
    linear_layer,
    per_channel,
    plan_fold,
)

logger = logging.getLogger(__name__)

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")

Affine = tuple[np.ndarray | None, np.ndarray | None]


def split_operands(graph: gs.Graph, node: gs.Node) -> tuple[int, gs.Tensor, np.ndarray] | None:
    """(index of the layer output among the inputs, that tensor, the constant), or None."""
    if len(node.inputs) != 2:
        return None
    for i in (0, 1):
        y, c_t = node.inputs[i], node.inputs[1 - i]
        prod = producer(y)
        c = const_value(c_t)
        if prod is not None and prod.op in FOLD_TARGETS and c is not None and not is_graph_input(graph, c_t):
            return i, y, c
    return None


def affine_of(op: str, y_index: int, c: np.ndarray) -> Affine | str | None:
    """(s, t) such that the node computes s * y + t, or a reason, or None when not affine."""
    if op == "Mul":
        return c, None
    if op == "Add":
        return None, c
    if op == "Sub":
        return (None, -c) if y_index == 0 else (-np.ones_like(c), c)
    if y_index == 1:
        return None  # c / y
    if np.any(c == 0):
        return "divides by a constant that contains zero"
    return 1.0 / c.astype(np.float64), None


class FoldAffineIntoConvPass(SizeLimitedFoldPass):
    """Per-channel constant Mul/Add/Sub/Div folded into the Conv/ConvTranspose/Gemm/MatMul before it.

    Either operand order; grouped/depthwise Conv, ConvTranspose with any group, Gemm
    (transB 0/1, alpha, beta, C absent or per-channel), MatMul with a constant (K, N)
    weight (a bias turns a 2-D MatMul into Gemm), with or without bias. The folded
    node's output keeps its name. Refused with a reason in ``skipped``: constants that
    are not per-channel, a layer output with other readers or being a graph output,
    non-constant weights or bias, division by zero, large shared weights.
    """

    name = "fold_affine_into_conv"

    def call(self, graph: gs.Graph) -> PassResult:
        names = Names(graph)
        stats: dict[str, int] = {}
        skipped = []
        for node in list(graph.nodes):
            if node.op not in AFFINE_OPS or not is_standard(node) or not node.inputs:
                continue
            reason = self._fold(graph, names, node)
            if reason is True:
                key = f"fold_{node.op.lower()}"
                stats[key] = stats.get(key, 0) + 1
            elif reason:
                logger.debug("not folding %s: %s", node.name, reason)
                skipped.append(Skip(node.name, node.op, reason))
        if stats:
            finish(graph)
        return PassResult(graph, bool(stats), stats, tuple(skipped))

    def _fold(self, graph: gs.Graph, names: Names, node: gs.Node) -> bool | str | None:
        """True when folded, a reason when refused, None when there is nothing to fold."""
        operands = split_operands(graph, node)
        if operands is None:
            return None
        y_index, y, c = operands
        layer = linear_layer(graph, producer(y))
        if layer is None or isinstance(layer, str):
            return layer
        affine = affine_of(node.op, y_index, c)
        if affine is None or isinstance(affine, str):
            return affine
        s, t = affine
        if layer.node.op == "MatMul" and t is not None and layer.out_rank != 2:
            return None  # N-D MatMul + Add is already the canonical matmul-plus-bias: nothing to gain
        vectors = self._vectors(layer, s, t, c)
        if isinstance(vectors, str):
            return vectors
        if not only_consumer(graph, y, node):
            return f"{layer.node.op} output is also read elsewhere or is a graph output"
        fold = plan_fold(layer, *vectors, self.fold_size_limit)
        if isinstance(fold, str):
            return fold
        apply_fold(names, layer, fold, node)
        return True

    @staticmethod
    def _vectors(layer: LinearLayer, s, t, c: np.ndarray) -> Affine | str:
        """s and t as (channels,) vectors, or why the constant is not per output channel."""
        if c.dtype != layer.weight.dtype:
            return f"constant dtype {c.dtype} differs from the weight's {layer.weight.dtype}"
        out = []
        for v in (s, t):
            vec = None if v is None else per_channel(v, layer.out_rank, layer.channel_axis, layer.channels)
            if v is not None and vec is None:
                rank = "unknown rank" if layer.out_rank is None else f"rank {layer.out_rank}"
                return (f"constant of shape {tuple(c.shape)} is not per output channel of the "
                        f"{layer.node.op} output ({rank}, {layer.channels} channels)")
            out.append(vec)
        return out[0], out[1]
