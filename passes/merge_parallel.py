"""Merge parallel Conv, Gemm and MatMul nodes that read the same tensor into one wider node.

Branches y_i = op(x, W_i) + b_i that share x and every attribute are the column blocks
of a single product:

    [y_1 | y_2 | ... | y_n] = op(x, [W_1 | W_2 | ... | W_n]) + [b_1 | b_2 | ... | b_n]

where ``|`` stacks along the output-channel axis: Conv weight axis 0 (output axis 1),
Gemm B axis 1 (axis 0 when transB; output axis 1), MatMul constant 2-D B axis 1 (output
axis -1, any activation rank: the Q/K/V projections of a transformer). A Split on the
output axis with sizes N_i hands every branch its own y_i, under its original name, so
graph outputs keep their names. One wide kernel reads x once and keeps the hardware
busier than n thin ones (Inception branches, Q/K/V). ``hoist_split_elementwise`` and
``remove_split_concat`` then move what follows the Split above it, or drop the Split.

Convolutions merge only where the Split disappears again: the branches must flow,
through the same element-wise activations, into one Concat on the channel axis at
consecutive positions (the Inception pattern). Measured on onnxruntime's CPU provider,
a merged Conv that stays split is not faster (1x1 convs are already GEMMs there) and
the Split adds a copy: 1-4% slower with ORT_ENABLE_ALL on Inception blocks from 32x32
to GoogLeNet's 192 channels at 28x28. MatMul and Gemm siblings (Q/K/V) merge with a
Split: one larger GEMM was measured no slower and usually faster.

Gemm computes alpha * A'B' + beta * C. alpha must match; beta is folded into the bias
(beta_i * C_i, then beta = 1), so branches with different beta merge too. A per-column C
((N,), (1, N), (1,), (1, 1) or a scalar) is broadcast to (N_i,); a missing C or Conv bias
becomes zeros when another branch has one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import Names, const_value, finish, has_subgraph, is_standard, opset
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)


SHARED = "weight or bias is also read by other nodes: merging would store it twice"


@dataclass(frozen=True)
class Branch:
    """One node that can join a merge, with its weight in concatenation order."""

    node: gs.Node
    key: tuple  # branches merge only with the same input, op and key
    weight: np.ndarray
    bias: np.ndarray | None  # (width,), Gemm's beta already applied
    width: int  # output channels N_i
    w_axis: int  # weight axis to concatenate along
    out_axis: int  # output axis to split along


class MergeParallelPass(GraphPass):
    """Merge Conv / Gemm / MatMul siblings on one input into one node and a Split.

    Handled: Conv with group 1 and equal kernel shape, input channels, strides, pads,
    auto_pad and dilations, with or without bias; Gemm with equal transA, transB, alpha
    and K, any beta, per-column or missing C; MatMul with a constant 2-D right operand
    and activations of any rank. Groups are formed in node order, so the output is
    deterministic; a group of one is left alone.

    Refused (listed in ``skipped`` when a sibling could have been merged): weights or
    biases that are not constants, weights or biases also read by other nodes, a bias
    whose dtype differs from its weight, grouped convolutions, Gemm C that varies along
    rows ((M, N) or (M, 1)), MatMul weights that are not 2-D.
    """

    name = "merge_parallel"

    def call(self, graph: gs.Graph) -> PassResult:
        groups, skipped = _collect(graph)
        if not groups:
            return PassResult(graph, False, {}, skipped)
        names, version, stats = Names(graph), opset(graph), Counter()
        for group in groups:
            _merge(graph, names, group, version)
            stats[f"merge_{group[0].node.op.lower()}"] += 1
        finish(graph)
        return PassResult(graph, True, dict(stats), skipped)


def _collect(graph: gs.Graph) -> tuple[list[list[Branch]], tuple[Skip, ...]]:
    """Mergeable groups (two or more branches), in node order, and refusals worth telling."""
    groups: dict[tuple, list[Branch]] = {}
    refused: list[tuple[tuple, Skip]] = []
    for node in graph.nodes:
        analyse = _ANALYSERS.get(node.op)
        if analyse is None or not is_standard(node) or has_subgraph(node) or len(node.outputs) != 1:
            continue
        x = node.inputs[0] if node.inputs else None
        if not isinstance(x, gs.Variable) or not x.name:
            continue
        site = (x.name, node.op)
        found = analyse(node)
        if isinstance(found, Branch):
            groups.setdefault((site, found.key), []).append(found)
        elif found is not None:
            refused.append((site, Skip(node.name, node.op, found)))
    # A refusal matters only where something else on the same input could have merged.
    live = {site for site, _ in groups}
    skipped = tuple(skip for site, skip in refused if site in live)
    for skip in skipped:
        logger.debug("merge_parallel: %s %s: %s", skip.op, skip.node, skip.reason)
    merged = []
    for group in groups.values():
        merged += _concat_runs(graph, group) if group[0].node.op == "Conv" else [group]
    return [g for g in merged if len(g) > 1], skipped


# Activations the hoist pass can move above a Split (no inputs but the data).
_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                          "Softplus", "Celu", "Gelu"})


def _concat_slot(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int, tuple] | None:
    """(Concat, input position, activation chain) when the node's output reaches a channel
    Concat through single-reader activations only; None otherwise."""
    t, chain = node.outputs[0], []
    while len(t.outputs) == 1 and not any(t is o for o in graph.outputs):
        reader = t.outputs[0]
        if not is_standard(reader):
            return None
        if reader.op == "Concat" and int(reader.attrs.get("axis", 0)) in (1, -3 if len(t.shape or ()) == 4 else 1):
            return reader, [i for i, x in enumerate(reader.inputs) if x is t][0], tuple(chain)
        if reader.op not in _ACTIVATIONS or len(reader.inputs) != 1:
            return None
        chain.append((reader.op, tuple(sorted((k, repr(v)) for k, v in reader.attrs.items()))))
        t = reader.outputs[0]
    return None


def _concat_runs(graph: gs.Graph, group: list[Branch]) -> list[list[Branch]]:
    """The branches of a Conv group that end, in order, at consecutive inputs of one Concat."""
    slots: dict[tuple, list[tuple[int, Branch]]] = {}
    for b in group:
        slot = _concat_slot(graph, b.node)
        if slot is not None:
            concat, position, chain = slot
            slots.setdefault((concat.name, id(concat), chain), []).append((position, b))
    runs = []
    for members in slots.values():
        members.sort(key=lambda m: m[0])
        run = [members[0]]
        for m in members[1:]:
            if m[0] == run[-1][0] + 1:
                run.append(m)
            else:
                runs.append([b for _, b in run])
                run = [m]
        runs.append([b for _, b in run])
    return runs


def _optional(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _weights(node: gs.Node, with_bias: bool) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The constant weight (input 1) and optional bias (input 2), or why not."""
    w_t, b_t = node.inputs[1], _optional(node, 2) if with_bias else None
    w = const_value(w_t)
    if w is None:
        return "weight is not a constant"
    b = None if b_t is None else const_value(b_t)
    if b_t is not None and b is None:
        return "bias is not a constant"
    # Reading a shared weight is harmless, but the merged copy would sit next to the original.
    if len(w_t.outputs) > 1 or (b_t is not None and len(b_t.outputs) > 1):
        return SHARED
    if b is not None and b.dtype != w.dtype:
        return f"bias dtype {b.dtype} differs from weight dtype {w.dtype}"
    return w, b


def _conv(node: gs.Node) -> Branch | str | None:
    if len(node.inputs) < 2:
        return None
    if int(node.attrs.get("group", 1)) != 1:
        return "grouped convolution (group != 1)"
    found = _weights(node, with_bias=True)
    if isinstance(found, str):
        return found
    w, b = found
    nd = w.ndim - 2
    if nd < 1 or list(node.attrs.get("kernel_shape", w.shape[2:])) != list(w.shape[2:]):
        return None
    if b is not None and b.shape != (w.shape[0],):
        return None
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    pads = tuple(node.attrs.get("pads", [0] * 2 * nd)) if auto_pad == "NOTSET" else ()
    key = (
        w.shape[1:], str(w.dtype), auto_pad, pads,
        tuple(node.attrs.get("strides", [1] * nd)), tuple(node.attrs.get("dilations", [1] * nd)),
    )
    return Branch(node, key, w, b, w.shape[0], w_axis=0, out_axis=1)


def _gemm(node: gs.Node) -> Branch | str | None:
    if len(node.inputs) < 2:
        return None
    found = _weights(node, with_bias=True)
    if isinstance(found, str):
        return found
    w, c = found
    if w.ndim != 2:
        return None
    trans_b = int(node.attrs.get("transB", 0))
    k, n = w.shape[::-1] if trans_b else w.shape
    bias = None
    if c is not None:
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim and c.shape[-1] not in (1, n)):
            return f"bias C of shape {tuple(c.shape)} varies along rows; only a per-column C is merged"
        beta = float(node.attrs.get("beta", 1.0))
        bias = np.broadcast_to(c.reshape(-1), (n,)).copy()
        if beta != 1.0:
            bias = (bias * beta).astype(w.dtype)
    key = (int(node.attrs.get("transA", 0)), trans_b, float(node.attrs.get("alpha", 1.0)), k, str(w.dtype))
    return Branch(node, key, w, bias, n, w_axis=0 if trans_b else 1, out_axis=1)


def _matmul(node: gs.Node) -> Branch | str | None:
    if len(node.inputs) != 2:
        return None
    found = _weights(node, with_bias=False)
    if isinstance(found, str):
        return found
    w = found[0]
    if w.ndim != 2:
        return "weight is not 2-D"
    x = node.inputs[0]
    # The output has the rank of x (1-D x gives 1-D output); split its last axis.
    out_axis = max(len(x.shape) - 1, 0) if x.shape is not None else -1
    return Branch(node, (w.shape[0], str(w.dtype)), w, None, w.shape[1], w_axis=1, out_axis=out_axis)


_ANALYSERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}


def _wide_shape(node: gs.Node, outs: list[gs.Tensor], axis: int, total: int) -> list | None:
    """Shape of the merged output: from the branches' shapes, else as far as x's shape tells.

    Knowing at least the rank lets the passes after this one normalise the Split axis.
    """
    shapes = [o.shape for o in outs]
    if all(s is not None for s in shapes) and len({len(s) for s in shapes}) == 1 and shapes[0]:
        merged = list(shapes[0])
        merged[axis % len(merged)] = total
        return merged
    x = node.inputs[0].shape
    if x is None or not x:
        return None
    if node.op == "MatMul":
        return [*x[:-1], total] if len(x) > 1 else [total]
    if node.op == "Gemm":
        return [x[1] if node.attrs.get("transA", 0) else x[0], total]
    return [x[0], total, *([None] * (len(x) - 2))]


def make_split(names: Names, base: str, src: gs.Tensor, outs: list[gs.Tensor], axis: int,
               sizes: list[int], version: int) -> gs.Node:
    """A Split of ``src`` into ``outs`` with ``sizes`` along ``axis``, in the form of ``version``."""
    attrs: dict = {"axis": axis}
    inputs = [src]
    if version < 13:
        attrs["split"] = [int(s) for s in sizes]
    elif version >= 18 and len(set(sizes)) == 1:
        attrs["num_outputs"] = len(sizes)
    else:
        inputs.append(gs.Constant(names(f"{base}_split_sizes"), np.array(sizes, dtype=np.int64)))
    return gs.Node("Split", names(f"{base}_split"), attrs, inputs, outs)


def _merge(graph: gs.Graph, names: Names, group: list[Branch], version: int) -> None:
    """Replace the group by one wide node and a Split; arrays are built before any rewiring."""
    first, head = group[0].node, group[0]
    base = first.name or first.op.lower()
    weight = np.concatenate([b.weight for b in group], axis=head.w_axis)
    bias = None
    if any(b.bias is not None for b in group):
        zeros = [np.zeros(b.width, weight.dtype) for b in group]
        bias = np.concatenate([z if b.bias is None else b.bias for b, z in zip(group, zeros, strict=True)])
    x, outs = first.inputs[0], [b.node.outputs[0] for b in group]
    attrs = dict(first.attrs)
    if first.op == "Gemm":
        attrs.pop("beta", None)  # folded into the bias
    inputs = [x, gs.Constant(names(f"{base}_merged_w"), weight)]
    if bias is not None:
        inputs.append(gs.Constant(names(f"{base}_merged_b"), bias))
    shape = _wide_shape(first, outs, head.out_axis, weight.shape[head.w_axis])
    wide = gs.Variable(names(f"{base}_merged_out"), dtype=outs[0].dtype or weight.dtype, shape=shape)
    for b in group:
        b.node.inputs.clear()
        b.node.outputs.clear()
    merged = gs.Node(first.op, names(f"{base}_merged"), attrs, inputs, [wide])
    split = make_split(names, base, wide, outs, head.out_axis, [b.width for b in group], version)
    gone = {id(b.node) for b in group}
    nodes = []
    for node in graph.nodes:
        if node is first:
            nodes += [merged, split]
        elif id(node) not in gone:
            nodes.append(node)
    graph.nodes = nodes
    logger.debug("merge_parallel: %s -> %s", [b.node.name for b in group], merged.name)
