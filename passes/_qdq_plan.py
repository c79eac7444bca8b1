"""Which nodes insert_qdq quantizes, which tensors need a range, and why nodes stay in float.

One forward walk in topological order. A tensor is *int8-available* when a quantized
node produces it; each available tensor has a *root*, the tensor whose calibrated
range gives its scale and zero point (itself, or for the output of a data-movement
op the root of that op's input). Then:

- a weight op (Conv, MatMul, Gemm; ConvTranspose for TensorRT only) with constant
  float32 weights is quantized; its input is quantized too, with a range of its own
  when no quantized node produces it (that does not make it available to others);
- a QLinear op (Add, Mul, Concat, AveragePool, GlobalAveragePool, LeakyRelu, Sigmoid)
  and a data-movement op (MaxPool, Resize, Reshape, Transpose, ...) are quantized
  only when every data input is already available: quantizing them on float inputs
  would add a QuantizeLinear and its error for nothing;
- a Gather whose data is a float32 constant table (an embedding) gets an int8 table
  (``_qdq_weights.table_spec``); its output stays float for its readers, so it makes
  nothing available;
- a Relu, or Clip(0, c), that is the only reader of a weight op's or Add/Mul's output
  is *absorbed*: the QuantizeLinear goes after it, with the range of its output.

The outputs that get a QuantizeLinear are the data inputs of quantized nodes plus the
outputs onnxruntime's kernels require quantized: Conv (QLinearConv has no float
output), the QLinear ops and the data-movement ops. MatMul and Gemm feeding only float
nodes keep a float output (onnxruntime's MatMulIntegerToFloat, QGemm with float Y), as
does Conv for TensorRT, which fuses the requantization itself.

With int8 activations for onnxruntime, a quantized output must also have a single reader
(``single_reader_only``): when an absorbable Relu's output has several, the op's own
output is quantized and the Relu stays a float op; when the op's own output has several,
an op that needs its output quantized stays float, with the reason in ``excluded``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.config import ActivationType, QuantConfig, QuantTarget
from onnxopt.graph_utils import has_subgraph, is_graph_output, is_standard, optional_input
from onnxopt.pass_base import Skip
from onnxopt.passes._qdq_weights import TableSpec, WeightSpec, table_spec, weight_spec
from onnxopt.passes.fuse_conv_activation import clip_bounds

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# onnxruntime's QDQ selectors turn DQ -> op -> Q into a QLinear kernel (qdq_selector_action_transformer.cc).
QLINEAR_OPS = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid")
# onnxruntime drops the DQ and Q around these when both have the same scale and zero point
# (DropQDQNodesRules, SplitQDQRules): the output shares the input's parameters.
MOVEMENT_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                "Slice", "Expand", "Tile", "Gather", "Split")
ABSORB_AFTER = (*WEIGHT_OPS, "Add", "Mul")
FUSED_OPS = ("FusedConv", "FusedGemm", "FusedMatMul")
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                 "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm")


@dataclass
class Root:
    """The tensor whose range defines a scale: an absorbed Relu/Clip(0, c) output has floor 0 and top c."""

    name: str
    floor_zero: bool = False
    clip_max: float | None = None


@dataclass
class Decision:
    nodes: list[gs.Node] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)  # id(node) -> weight | qlinear | movement
    weights: dict[int, WeightSpec] = field(default_factory=dict)
    absorbed: dict[int, gs.Node] = field(default_factory=dict)  # id(node) -> its Relu/Clip
    root_of: dict[str, str] = field(default_factory=dict)  # available tensor -> root name
    roots: dict[str, Root] = field(default_factory=dict)
    outputs: dict[int, gs.Tensor] = field(default_factory=dict)  # id(node) -> its quantizable output
    excluded: list[Skip] = field(default_factory=list)
    qtensors: list[gs.Tensor] = field(default_factory=list)  # tensors that get Q -> DQ, in order
    tables: list[tuple[gs.Node, TableSpec]] = field(default_factory=list)  # Gathers of int8 tables

    def quantized(self, node: gs.Node) -> bool:
        return id(node) in self.kinds


def label(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def data_inputs(node: gs.Node) -> list[int]:
    if node.op == "Concat":
        return list(range(len(node.inputs)))
    if node.op in ("Add", "Mul"):
        return [0, 1]
    return [0]


def topo_order(graph: gs.Graph) -> list[gs.Node]:
    """graph.nodes in a topological order, without reordering the graph itself."""
    made = {id(t) for t in graph.inputs}
    pending, order = list(graph.nodes), []
    while pending:
        rest = []
        for n in pending:
            ready = all(isinstance(t, gs.Constant) or not t.inputs or id(t) in made or not t.name
                        for t in n.inputs)
            (order if ready else rest).append(n)
            if ready:
                made.update(id(t) for t in n.outputs)
        if len(rest) == len(pending):
            return order + rest  # a cycle or dangling input: keep the file's order for the rest
        pending = rest
    return order


def single_reader_only(config: QuantConfig) -> bool:
    """Whether every quantized output must have exactly one reader (int8 for onnxruntime).

    onnxruntime's int8 kernels are ARM-only (QDQIsInt8Allowed); on x86 it first turns each
    int8 Q -> DQ pair into uint8 (QDQS8ToU8Transformer), but only for a Q with one DQ, and it
    gives every reader of a DQ its own copy of the DQ before that (EnsureUniqueDQForNodeUnit).
    So an int8 QuantizeLinear fuses only when one node reads its DequantizeLinear: a tensor
    read by several nodes gets a Q/DQ pair per quantized reader, and a node whose kernel needs
    the Q after it (Conv, the QLinear and data-movement ops) stays float when its output has
    several readers. uint8 needs no conversion, and TensorRT fuses shared pairs itself.
    """
    return config.activation_type is ActivationType.INT8 and config.target is QuantTarget.ONNXRUNTIME


def edges(graph: gs.Graph, t: gs.Tensor) -> int:
    """How many node inputs read ``t`` (a graph output counts as one)."""
    return sum(1 for n in t.outputs for x in n.inputs if x is t) + is_graph_output(graph, t)


def reads(node: gs.Node, t: gs.Tensor) -> bool:
    """``node`` reads ``t`` as a data input (not as a shape, axes or other parameter)."""
    return any(i < len(node.inputs) and node.inputs[i] is t for i in data_inputs(node))


def movement_outputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.outputs if t.name]


def _many_readers(n: int) -> str:
    return (f"its output has {n} readers, and x86 onnxruntime fuses an int8 QuantizeLinear only with "
            "one: left in float (uint8 activations fuse it)")


class Planner:
    def __init__(self, graph: gs.Graph, config: QuantConfig, range_problem: Callable[[str], str | None]):
        """``range_problem(name)``: why tensor ``name`` has no usable range, None when it has one."""
        self.graph, self.config, self.range_problem = graph, config, range_problem
        self.strict = single_reader_only(config)
        self.d = Decision()
        self.absorbed_ids: set[int] = set()
        self.made: set[str] = set()  # tensors quantized nodes produce

    def run(self) -> Decision:
        if any(n.op in QUANTIZED_OPS for n in self.graph.nodes):
            return self.d  # already quantized: leave the whole graph alone
        for node in topo_order(self.graph):
            if id(node) in self.absorbed_ids:
                continue
            reason = self._visit(node)
            if reason:
                self.d.excluded.append(Skip(label(node), node.op, reason))
        self._select_tensors()
        return self.d

    def _visit(self, node: gs.Node) -> str | None:
        known = node.op in (*WEIGHT_OPS, *QLINEAR_OPS, *MOVEMENT_OPS)
        if has_subgraph(node):
            return "control-flow subgraph: its body is left in float"
        if not is_standard(node):
            return f"custom domain {node.domain}: left in float" if known or node.op in FUSED_OPS else None
        if not known:
            return None
        if node.name in self.config.exclude or node.op in self.config.exclude:
            return "excluded by the configuration"
        if node.op in WEIGHT_OPS:
            return self._weight_op(node)
        if node.op == "Gather":
            spec = table_spec(self.graph, node, self.config.exclude)
            if spec is not None:
                return self._table_op(node, spec)
        if not all(self._available(node, i) for i in data_inputs(node)):
            return None
        if node.op in QLINEAR_OPS:
            return self._qlinear_op(node)
        return self._movement_op(node)

    def _available(self, node: gs.Node, i: int) -> bool:
        """Input ``i`` comes out of a quantized node (not merely quantized for a weight op:
        running a MaxPool, say, on int8 data that only a QuantizeLinear of float made is no
        faster, and onnxruntime's NCHW int8 MaxPool is far slower than its float one)."""
        t = optional_input(node, i)
        return t is not None and t.name in self.made

    def _accept(self, node: gs.Node, kind: str) -> None:
        self.d.nodes.append(node)
        self.d.kinds[id(node)] = kind

    def _weight_op(self, node: gs.Node) -> str | None:
        if node.op == "ConvTranspose" and self.config.target is not QuantTarget.TENSORRT:
            return "onnxruntime has no int8 ConvTranspose kernel: left in float"
        spec = weight_spec(node)
        if isinstance(spec, str):
            return spec
        x = node.inputs[0]
        if isinstance(x, gs.Constant):
            return "constant input: fold it first (fold_constants)"
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            return f"input is {np.dtype(x.dtype)}, not float32"
        # QLinearConv has no float output; MatMul and Gemm do (MatMulIntegerToFloat, QGemm), and
        # TensorRT requantizes after any op itself.
        out = self._pick_output(node, node.op == "Conv" and self.config.target is QuantTarget.ONNXRUNTIME)
        if isinstance(out, str):
            return out
        problem = None if x.name in self.d.root_of else self.range_problem(x.name)
        if problem:
            return f"input {x.name!r}: {problem}"
        self._commit_output(node, out)
        if x.name not in self.d.root_of:
            self._add_root(x.name)
        self.d.weights[id(node)] = spec
        self._accept(node, "weight")
        return None

    def _table_op(self, node: gs.Node, spec: TableSpec | str) -> str | None:
        if isinstance(spec, str):
            return spec
        self.d.tables.append((node, spec))
        return None

    def _qlinear_op(self, node: gs.Node) -> str | None:
        if len(node.outputs) != 1:
            return None
        out = self._pick_output(node, True)
        if isinstance(out, str):
            return out
        self._commit_output(node, out)
        self._accept(node, "qlinear")
        return None

    def _movement_op(self, node: gs.Node) -> str | None:
        outs = movement_outputs(node)
        if node.op == "MaxPool" and len(outs) != 1:
            return None
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"Resize mode {node.attrs['mode']!r} can leave the input's range: left in float"
        if self.strict and any(edges(self.graph, t) != 1 for t in outs):
            return _many_readers(max(edges(self.graph, t) for t in outs))
        root = self.d.root_of[node.inputs[0].name]
        for t in outs:
            self.d.root_of[t.name] = root
            self.made.add(t.name)
        self._accept(node, "movement")
        return None

    def _pick_output(self, node: gs.Node, needs_q: bool) -> tuple[gs.Tensor, gs.Node | None] | str | None:
        """The tensor to quantize after ``node`` and the Relu/Clip absorbed on the way, if any.

        The output of an absorbable Relu/Clip comes first, then ``node``'s own output (with
        single readers only, a Relu read by several nodes stays a float op after the
        quantized output). None when neither can be quantized, or why when the kernel
        ``needs_q``.
        """
        y = node.outputs[0]
        act = self._absorbable(node, y)
        options = ([(act.outputs[0], act)] if act is not None else []) + [(y, None)]
        single = [(t, a) for t, a in options if not self.strict or edges(self.graph, t) == 1]
        if not single:
            return _many_readers(edges(self.graph, y)) if needs_q else None
        for t, a in single:
            if not self.range_problem(t.name):
                return t, a
        t = single[-1][0]
        return f"output {t.name!r}: {self.range_problem(t.name)}" if needs_q else None

    def _commit_output(self, node: gs.Node, pick: tuple[gs.Tensor, gs.Node | None] | None) -> None:
        if pick is None:
            return
        t, act = pick
        if act is None:
            self._add_root(t.name)
        else:
            self.d.absorbed[id(node)] = act
            self.absorbed_ids.add(id(act))
            self._add_root(t.name, floor_zero=True, clip_max=self._clip_max(act))
        self.d.outputs[id(node)] = t
        self.made.add(t.name)

    def _absorbable(self, node: gs.Node, y: gs.Tensor) -> gs.Node | None:
        if node.op not in ABSORB_AFTER or len(y.outputs) != 1 or is_graph_output(self.graph, y):
            return None
        act = y.outputs[0]
        if act.op not in ("Relu", "Clip") or not is_standard(act) or len(act.outputs) != 1:
            return None
        if act.name in self.config.exclude or act.op in self.config.exclude:
            return None
        if act.op == "Clip":
            bounds = clip_bounds(self.graph, act)
            if isinstance(bounds, str) or bounds[0] != 0.0:
                return None
        return act

    def _clip_max(self, act: gs.Node) -> float | None:
        if act.op != "Clip":
            return None
        top = clip_bounds(self.graph, act)[1]
        return None if top >= float(np.finfo(np.float32).max) else top

    def _add_root(self, name: str, *, floor_zero: bool = False, clip_max: float | None = None) -> None:
        self.d.root_of[name] = name
        self.d.roots[name] = Root(name, floor_zero, clip_max)

    def _select_tensors(self) -> None:
        """Data inputs of quantized nodes, plus the outputs the kernels need quantized."""
        chosen: dict[str, gs.Tensor] = {}
        for node in self.d.nodes:
            kind = self.d.kinds[id(node)]
            for i in data_inputs(node):
                t = node.inputs[i]
                chosen.setdefault(t.name, t)
            required = kind != "weight" or (node.op == "Conv" and self.config.target is QuantTarget.ONNXRUNTIME)
            if required:
                outs = movement_outputs(node) if kind == "movement" else [self.d.outputs[id(node)]]
                for t in outs:
                    chosen.setdefault(t.name, t)
        self.d.qtensors = list(chosen.values())
        used = {self.d.root_of[t.name] for t in self.d.qtensors}
        self.d.roots = {k: r for k, r in self.d.roots.items() if k in used}


def needed_roots(d: Decision) -> list[str]:
    """Root tensor names in the order they are first needed."""
    seen: dict[str, None] = {}
    for t in d.qtensors:
        seen.setdefault(d.root_of[t.name], None)
    return list(seen)

