"""Fuse the residual Add before a LayerNorm into com.microsoft SkipLayerNormalization.

``SkipLayerNormalization(input, skip, gamma, beta, bias; epsilon)`` computes
``s = input + skip (+ bias)`` and LayerNorm(s) over the last axis in one pass over
the data; its output 3, when asked for, is ``s`` itself. It is an onnxruntime
contrib op, so the pass does nothing unless the target is ``Target.ONNXRUNTIME``.
Its CPU kernel's contract (contrib_ops/cpu/skip_layer_norm.cc and
skip_layer_norm_helper.h; checked against onnxruntime 1.32):

- input and skip are 2-D or 3-D with the hidden size H last; gamma, beta and bias
  are 1-D of size H; the outputs have input's shape;
- skip's last two dims must equal input's. When the shapes differ input must be
  3-D and skip (1, S, H) or (S, H): the kernel reads skip at ``offset % skip_size``,
  repeating it over the batch. A 3-D skip with a larger batch than input is read
  the same way and gives an output of input's (too small) shape, silently.

The pattern is ``LN(Add(a, b))`` where LN is a standard LayerNormalization over the
last axis (default stash_type, constant 1-D Scale and B, only Y read), as written by
``fuse_layer_norm`` or the exporter. When a or b is ``Add(y, c)`` with ``c`` a 1-D
constant of size H and nothing else reads it, c becomes the bias input (as in
onnxruntime's own SkipLayerNormFusion). When the Add's output has other readers or is
a graph output (the residual stream of a pre-norm block), output 3 writes it.

Shapes must be proven, not hoped for: with ``symbolic_dims`` (fuse_layer_norm) the
pass picks input and skip among the two operands so that both have rank 2 or 3 and
the static last dim H, their second-to-last dims are provably equal, and input's
batch provably covers skip's (equal, skip's a static 1, or skip of rank 2). A
transformer's residual Add reads the attention (or FFN) output, whose batch is the
broadcast of the hidden state's and the mask's, and the hidden state: the former
covers the latter whatever sizes the caller feeds. Anything unproven is refused
with the reason. float32 only (the kernel's double and float16 variants change the
arithmetic).

Not for onnxruntime's CPU execution provider: there, in 1.32, this kernel is 4-7x
slower than LayerNormalization plus the two Adds it replaces (one thread: 47 vs 16 us
at 1x128x64, 490 vs 91 us at 1x128x768), and the whole tiny_bert encoder gets slower.
onnxruntime's own online SkipLayerNormFusion (CPU included) only fires when both Add
inputs have the same shape with static sequence and hidden dims, which dynamic-length
exports never have. The pass is therefore not in -O1; run it by name for the GPU
providers (CUDA, ROCm, DirectML), whose kernels are the fast ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.config import OptimizeConfig, Target
from onnxopt.graph_utils import Names, finish, is_graph_output, is_standard, only_consumer, optional_input, producer
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes.fuse_conv_activation import MS_DOMAIN, with_ms_opset
from onnxopt.passes.fuse_layer_norm import Dims, constant, covers, symbolic_dims

logger = logging.getLogger(__name__)

SKIP_LN = "SkipLayerNormalization"
DEFAULT_LN_EPSILON = 1e-5


@dataclass
class LayerNormNode:
    """A node that computes LayerNorm(x) over the last axis, with its parameters."""

    node: gs.Node
    x: gs.Tensor
    gamma: gs.Tensor
    beta: gs.Tensor | None
    eps: float


@dataclass
class Plan:
    ln: LayerNormNode
    add: gs.Node
    input: gs.Tensor
    skip: gs.Tensor
    bias: gs.Tensor | None


def _vector(graph: gs.Graph, t: gs.Tensor | None) -> int | str | None:
    """The size of a 1-D float32 constant, a reason when ``t`` is something else, None when absent."""
    if t is None:
        return None
    v = constant(graph, t)
    if v is None or v.ndim != 1 or v.dtype != np.float32:
        return "scale and bias must be 1-D float32 constants"
    return v.shape[0]


def layer_norm_node(graph: gs.Graph, node: gs.Node, dims: dict[str, Dims]) -> LayerNormNode | str | None:
    """``node`` as a last-axis LayerNorm; a reason when it is one that cannot be fused; else None."""
    if node.op != "LayerNormalization" or not is_standard(node) or len(node.inputs) < 2:
        return None
    x, params = node.inputs[0], (node.inputs[1], optional_input(node, 2))
    rank = len(dims[x.name]) if x.name in dims else None
    axis = int(node.attrs.get("axis", -1))
    if rank is None or axis % rank != rank - 1:
        return "normalizes more than the last axis, or the rank is unknown"
    if int(node.attrs.get("stash_type", 1)) != 1:
        return "stash_type is not float"
    eps = float(node.attrs.get("epsilon", DEFAULT_LN_EPSILON))
    if any(t.outputs or is_graph_output(graph, t) for t in node.outputs[1:]):
        return "its mean / inverse std-dev outputs are read"
    sizes = [_vector(graph, t) for t in params]
    if any(isinstance(s, str) for s in sizes) or (sizes[1] is not None and sizes[1] != sizes[0]):
        return "scale and bias must be 1-D float32 constants of one size"
    return LayerNormNode(node, x, params[0], params[1], eps)


def _dims(t: gs.Tensor, dims: dict[str, Dims]) -> Dims | None:
    return tuple(int(d) for d in t.shape) if isinstance(t, gs.Constant) else dims.get(t.name)


def valid_order(inp: Dims | None, skip: Dims | None, hidden: int) -> bool:
    """The kernel accepts (input, skip) and computes input + skip with input's shape."""
    if inp is None or skip is None or len(inp) not in (2, 3) or len(skip) not in (2, len(inp)):
        return False
    if inp[-1] != hidden or skip[-1] != hidden or inp[-2] != skip[-2]:  # frozensets compare by content
        return False
    return len(skip) == 2 or len(inp) == 2 or covers(inp[0], skip[0])


def _operand_options(graph: gs.Graph, add: gs.Node, hidden: int):
    """(p, q, bias) triples to try: with a 1-D bias Add taken off either side first."""
    a, b = add.inputs
    for side, other in ((a, b), (b, a)):
        inner = producer(side)
        if inner is None or inner.op != "Add" or not is_standard(inner) or len(inner.inputs) != 2:
            continue
        if not only_consumer(graph, side, add):
            continue
        for y, c in (inner.inputs, inner.inputs[::-1]):
            if _vector(graph, c) == hidden and not isinstance(y, gs.Constant):
                yield y, other, c
    yield a, b, None


def plan_fusion(graph: gs.Graph, ln: LayerNormNode, dims: dict[str, Dims]) -> Plan | str | None:
    add = producer(ln.x)
    if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
        return None
    hidden = _vector(graph, ln.gamma)
    for p, q, bias in _operand_options(graph, add, hidden):
        for inp, skip in ((p, q), (q, p)):
            if valid_order(_dims(inp, dims), _dims(skip, dims), hidden):
                return Plan(ln, add, inp, skip, bias)
    return "cannot prove the Add's operands have the shapes SkipLayerNormalization needs"


def rewrite(graph: gs.Graph, plan: Plan, names: Names) -> list[str]:
    """Replace the Add (and bias Add) and the LayerNorm; returns the stats keys."""
    ln, s = plan.ln, plan.ln.x
    keep_sum = not only_consumer(graph, s, ln.node)
    inputs = [plan.input, plan.skip, ln.gamma]
    if ln.beta is not None or plan.bias is not None:
        inputs.append(ln.beta if ln.beta is not None else gs.Variable.empty())
    if plan.bias is not None:
        inputs.append(plan.bias)
    y = ln.node.outputs[0]
    ln.node.outputs.clear()
    ln.node.inputs.clear()
    outputs = [y]
    if keep_sum:
        plan.add.outputs.clear()
        outputs += [gs.Variable.empty(), gs.Variable.empty(), s]
    graph.nodes.append(gs.Node(SKIP_LN, names(f"{y.name}_{SKIP_LN}"), {"epsilon": ln.eps}, inputs, outputs,
                               domain=MS_DOMAIN))
    return ["skip_layer_norm", *(["bias"] if plan.bias is not None else []), *(["sum_output"] if keep_sum else [])]


class FuseSkipLayerNormPass(GraphPass):
    """Add (+ 1-D bias Add) + last-axis LayerNorm -> com.microsoft SkipLayerNormalization.

    Only with ``target=Target.ONNXRUNTIME``; float32; shapes proven as the module says.
    """

    name = "fuse_skip_layer_norm"

    def __init__(self, target: Target = OptimizeConfig.target):
        self.target = target

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> FuseSkipLayerNormPass:
        return cls(target=config.target)

    def call(self, graph: gs.Graph) -> PassResult:
        if self.target is not Target.ONNXRUNTIME:
            return PassResult(graph, False)
        stats: Counter = Counter()
        skipped = []
        names = Names(graph)
        dims: dict[str, Dims] | None = None
        for node in list(graph.nodes):
            if node.op != "LayerNormalization" or not node.inputs:
                continue
            add = producer(node.inputs[0])
            if add is None or add.op != "Add" or not is_standard(add):
                continue
            dims = symbolic_dims(graph) if dims is None else dims
            ln = layer_norm_node(graph, node, dims)
            result = plan_fusion(graph, ln, dims) if isinstance(ln, LayerNormNode) else ln
            if isinstance(result, Plan):
                stats.update(rewrite(graph, result, names))
            elif result:
                logger.debug("not fusing %s with the Add before it: %s", node.name, result)
                skipped.append(Skip(node.name, node.op, f"Add + LayerNorm not fused: {result}"))
        if stats:
            graph.import_domains = with_ms_opset(graph)
            finish(graph)
        return PassResult(graph, bool(stats), dict(stats), tuple(skipped))
