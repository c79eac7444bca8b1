"""Insert QuantizeLinear/DequantizeLinear pairs: int8 QDQ quantization from calibrated ranges.

The output is a standard-ONNX QDQ model: every quantized value is written as the float
``DequantizeLinear(QuantizeLinear(x))`` that int8 kernels compute, so any runtime can
load it, and a runtime with int8 kernels (onnxruntime's QDQ fusions, TensorRT, OpenVINO)
replaces each ``DQ -> op -> Q`` group by one int8 op. The arithmetic is in ``_qdq_math``
(scales, zero points, int32 bias), the weights in ``_qdq_weights``, the choice of nodes
and tensors in ``_qdq_plan``; this module applies them to the graph.

Placement (onnxruntime 1.32's optimized graph is checked in the tests):

- weights: int8 initializer -> DequantizeLinear(axis = output channel) -> Conv/MatMul/Gemm;
  the bias: int32 -> DequantizeLinear(scale = s_x * s_w, zero point 0); TensorRT, which
  reads only int8 QDQ, keeps the float bias;
- when a quantized node produces a quantized tensor, the node writes a new float tensor
  that only the QuantizeLinear reads and the DequantizeLinear takes over the original
  tensor and its name (graph outputs keep theirs): a QLinear fusion needs the Q to be
  the op's only reader. A tensor from a float producer or a graph input keeps its float
  readers; only the quantized readers move to the DequantizeLinear;
- uint8, and TensorRT: one Q and one DQ per tensor, whatever the number of readers
  (onnxruntime copies the DQ per reader itself). int8 for onnxruntime: on x86 it fuses an
  int8 Q only when a single node reads its DQ (see ``_qdq_plan.single_reader_only``), so
  each quantized reader gets its own pair (same scale, own constants, or onnxruntime's
  CSE merges them back), and a node whose int8 output several nodes would read stays float;
- Relu or Clip(0, c) after a quantized op stays where it is, with the QuantizeLinear after
  it and the activation's range [0, hi] (zero point qmin): onnxruntime's ReluQuantFusion /
  ClipQuantFusion delete it, the quantizer clamping the same way. With TensorRT every zero
  point is 0 and the activation stays a float op between DQ and Q, the layout TensorRT fuses;
- data-movement ops (MaxPool, Reshape, Transpose, Resize, Split, ...) reuse their input's
  scale and zero point, so onnxruntime drops their DQ/Q and runs them on int8 data
  (except linear Resize, which onnxruntime 1.32 keeps in float between the two);
- constant Gather tables (embeddings) are stored in int8 and gathered before they are
  dequantized, so that only the rows read are converted: int8 table -> Gather -> Cast ->
  Mul(scales), the scales one per feature, or per row gathered with the same indices
  (DequantizeLinear's arithmetic, which DequantizeLinear itself cannot express for a
  scale per gathered row before opset 21's blocks); with one scale for the table,
  int8 table -> Gather -> DequantizeLinear (see ``_table_form``). onnxruntime 1.32 folds
  no DequantizeLinear of a constant in a QDQ model, nor does it turn DQ -> Gather -> Q
  into a Gather on int8 data for int8 tables on x86, so ``DQ(table) -> Gather`` would
  dequantize the whole table on every run (MiniLM: 30522 x 384, +35 % latency).
  TensorRT gets ``DQ(int8 table, axis) -> Gather``: it folds a DequantizeLinear of a
  constant into the weights, and reads no int8 Gather.

Per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13: ``requires``
refuses older graphs, and ``ensure_opset(model, 13)`` converts the model first. A graph
that already holds QuantizeLinear/DequantizeLinear or QLinear ops is left as it is. A
tensor without a finite range leaves the nodes that need it in float, listed in
``skipped``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.calibration.ranges import TensorRange
from onnxopt.config import ActivationType, QuantConfig, QuantTarget
from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.graph_utils import Names, finish, opset, producer
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes import _qdq_math as qm
from onnxopt.passes import _qdq_plan as qp
from onnxopt.passes._qdq_weights import QuantizedTable, QuantizedWeight, TableSpec, quantize, quantize_table

logger = logging.getLogger(__name__)

__all__ = ["ActivationType", "InsertQDQPass", "QuantConfig", "QuantPlan", "QuantTarget", "TensorRange",
           "ensure_opset", "plan_quantization"]

PER_CHANNEL_OPSET = 13
QDQ_OPSET = 10


@dataclass(frozen=True)
class QuantPlan:
    """What quantization will do to a graph, before any range is known."""

    nodes: tuple[str, ...]  # nodes that will run in int8 (an unnamed node: its first output's name)
    tensors: tuple[str, ...]  # activation tensors that need a calibrated range (graph inputs too)
    excluded: tuple[Skip, ...]  # nodes of a quantizable type kept in float, and why


def _check_config(config: QuantConfig) -> None:
    if config.target is QuantTarget.TENSORRT and config.activation_type is not ActivationType.INT8:
        raise UserError("--target tensorrt quantizes to symmetric int8 only; drop --activation-type uint8")


def plan_quantization(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """The nodes ``InsertQDQPass`` will quantize and the tensors it needs ranges for."""
    _check_config(config)
    d = qp.Planner(graph, config, lambda name: None).run()
    nodes = (*d.nodes, *(n for n, _ in d.tables))
    return QuantPlan(tuple(qp.label(n) for n in nodes), tuple(qp.needed_roots(d)), tuple(d.excluded))


def ensure_opset(model: onnx.ModelProto, version: int = PER_CHANNEL_OPSET) -> onnx.ModelProto:
    """``model`` at default-domain opset ``version`` or newer (never a downgrade)."""
    from onnxopt.optimizer import convert_opset  # the optimizer imports the passes

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return model if current >= version else convert_opset(model, version)


def range_problem(r: TensorRange | None) -> str | None:
    """Why ``r`` cannot be quantized to, or None."""
    if r is None:
        return "no calibrated range"
    if not (math.isfinite(r.min) and math.isfinite(r.max)) or r.min > r.max:
        return f"calibrated range [{r.min}, {r.max}] is not a finite interval"
    if getattr(r, "nonfinite", 0):
        # Usually an attention mask's -inf or finfo.min: clipping it to a range would unmask.
        return f"{r.nonfinite} non-finite values seen in calibration"
    return None


class InsertQDQPass(GraphPass):
    """QuantizeLinear/DequantizeLinear around Conv, MatMul, Gemm and the ops onnxruntime runs in int8.

    Handled: Conv (any group, 1-3-D), MatMul with a constant 2-D weight (N-D input),
    Gemm (transA/transB, per-column bias), ConvTranspose for TensorRT; Gather of a constant
    float32 table (int8 weights only: its output stays float); Add, Mul, Concat,
    AveragePool, GlobalAveragePool, LeakyRelu, Sigmoid on int8 inputs; data-movement ops
    on int8 inputs; Relu/Clip(0, c) absorbed into the following quantizer.
    Refused (listed in ``skipped``): nodes excluded by the configuration, custom
    domains, control-flow nodes, non-float32 or non-constant weights, a Gather table that
    another node also reads in float, MatMul of two
    activations, ConvTranspose for onnxruntime (no int8 kernel), tensors without a finite
    calibrated range, and with int8 for onnxruntime a node whose quantized output would
    have several readers. Built with its ranges, not from the optimizer config.
    """

    name = "insert_qdq"
    lossless = False

    def __init__(self, ranges: Mapping[str, TensorRange], config: QuantConfig | None = None):
        self.config = config or QuantConfig()
        _check_config(self.config)
        self.ranges = ranges

    def requires(self, graph: gs.Graph) -> None:
        need = PER_CHANNEL_OPSET if self.config.per_channel else QDQ_OPSET
        if opset(graph) < need:
            what = "per-channel DequantizeLinear (axis)" if self.config.per_channel else "QuantizeLinear"
            raise UnsupportedModelError(f"int8 quantization needs opset {need} for {what}; the model is at "
                                        f"opset {opset(graph)}: convert it first (ensure_opset, --opset {need})")

    def call(self, graph: gs.Graph) -> PassResult:
        d = qp.Planner(graph, self.config, lambda name: range_problem(self.ranges.get(name))).run()
        if not d.nodes and not d.tables:
            return PassResult(graph, False, {}, tuple(d.excluded))
        params = {name: self._qparams(root) for name, root in d.roots.items()}
        # TensorRT reads int8 QDQ only and adds a float bias in its own kernels.
        int32_bias = self.config.target is QuantTarget.ONNXRUNTIME
        weights = {id(n): quantize(d.weights[id(n)], params[d.root_of[n.inputs[0].name]].scale,
                                   self.config.per_channel, int32_bias) for n in d.nodes if id(n) in d.weights}
        tables = {id(s.table): quantize_table(s, self.config.per_channel) for _, s in d.tables}
        stats = _stats(d)
        rewriter = _Rewriter(graph, d, params, qp.single_reader_only(self.config))
        rewriter.apply(weights, tables, tensorrt=self.config.target is QuantTarget.TENSORRT)
        stats["activation_quantizers"] = rewriter.quantizers
        finish(graph)
        return PassResult(graph, True, stats, tuple(d.excluded))

    def _qparams(self, root: qp.Root) -> qm.QParams:
        r = self.ranges[root.name]
        lo, hi = (0.0, r.max) if root.floor_zero else (r.min, r.max)
        if root.clip_max is not None:
            hi = min(hi, root.clip_max)
        dtype = np.uint8 if self.config.activation_type is ActivationType.UINT8 else np.int8
        symmetric = self.config.target is QuantTarget.TENSORRT
        return qm.activation_qparams(lo, hi, dtype, symmetric=symmetric, clip_max=root.clip_max)


def _table_form(spec: TableSpec, qt: QuantizedTable) -> str:
    """How onnxruntime dequantizes the gathered int8 rows: "gathered" scales (one per row:
    Gather(scales) -> Mul), "broadcast" scales (one per feature after the Gather axis: Mul),
    or "dq" (one scale, or per feature before the Gather axis: DequantizeLinear). Per-feature
    scales on the last axis are a Mul rather than DequantizeLinear(axis=-1), which onnxruntime
    1.32 runs as blocks of one element: +2 % MiniLM latency for its two small tables."""
    if qt.axis == spec.axis:
        return "gathered"
    return "broadcast" if qt.axis is not None and qt.axis > spec.axis else "dq"


def _stats(d: qp.Decision) -> dict[str, int]:
    stats: dict[str, int] = {}
    for n in d.nodes:
        key = f"quantize_{n.op.lower()}"
        stats[key] = stats.get(key, 0) + 1
    quantized = {t.name for t in d.qtensors}
    for act in d.absorbed.values():
        if act.outputs[0].name in quantized:
            key = f"absorb_{act.op.lower()}"
            stats[key] = stats.get(key, 0) + 1
    if d.tables:
        stats["quantize_gather_table"] = len(d.tables)
        stats["int8_tables"] = len({id(s.table) for _, s in d.tables})
    return stats


class _Rewriter:
    """Applies a decision: every array is computed before the first edit."""

    def __init__(self, graph: gs.Graph, d: qp.Decision, params: dict[str, qm.QParams], strict: bool):
        self.graph, self.d, self.params = graph, d, params
        self.strict = strict
        self.quantizers = 0
        self.names = Names(graph)
        self.consts: dict[str, tuple[gs.Constant, gs.Constant]] = {}
        self.int8_weights: dict[tuple, list[gs.Constant]] = {}
        self.int8_tables: dict[int, list[gs.Tensor]] = {}
        self.made = {id(n) for n in d.nodes} | {id(a) for a in d.absorbed.values()}

    def apply(self, weights: dict[int, QuantizedWeight], tables: dict[int, QuantizedTable], *,
              tensorrt: bool) -> None:
        for n in self.d.nodes:
            if id(n) in weights:
                self._weight(n, weights[id(n)])
        for n, spec in self.d.tables:  # before the tensors: a Gather's output may need its own Q/DQ
            self._table(n, spec, tables[id(spec.table)], tensorrt)
        for t in self.d.qtensors:
            self._tensor(t)

    def _table(self, node: gs.Node, spec: TableSpec, qt: QuantizedTable, tensorrt: bool) -> None:
        """int8 table -> Gather -> dequantized rows (TensorRT: DQ(int8 table) -> Gather)."""
        form = _table_form(spec, qt)
        if id(spec.table) not in self.int8_tables:  # a table several Gathers read is stored once
            base, scale = spec.table.name, qt.scale
            if form == "gathered" and not tensorrt:  # shaped to broadcast once gathered like the table
                scale = scale.reshape([-1 if i == spec.axis else 1 for i in range(qt.q.ndim)])
            elif form == "broadcast" and not tensorrt:  # aligned with the gathered rows from the end
                scale = scale.reshape([-1] + [1] * (qt.q.ndim - 1 - qt.axis))
            consts = [self._const(f"{base}_quantized", qt.q), self._const(f"{base}_scale", scale),
                      self._const(f"{base}_zero_point", np.zeros(qt.scale.shape, np.int8))]
            if tensorrt:
                consts = [self._dq(base, consts, spec.table, qt.axis)]
            self.int8_tables[id(spec.table)] = consts
        consts = self.int8_tables[id(spec.table)]
        node.inputs[0] = consts[0]
        if tensorrt:
            return
        out, name = node.outputs[0], qp.label(node)
        rows = gs.Variable(self.names(f"{name}_int8"), np.int8, out.shape)
        node.outputs[0] = rows
        if form == "dq":
            self._dq(name, [rows, consts[1], consts[2]], out, qt.axis, out=out)
            return
        scales = consts[1]
        if form == "gathered":
            scales = gs.Variable(self.names(f"{name}_row_scales"), np.float32)
            self.graph.nodes.append(gs.Node("Gather", self.names(f"{name}_scales"), {"axis": spec.axis},
                                            [consts[1], node.inputs[1]], [scales]))
        rows_f = gs.Variable(self.names(f"{name}_rows"), np.float32, out.shape)
        self.graph.nodes.extend([
            gs.Node("Cast", self.names(f"{name}_Cast"), {"to": onnx.TensorProto.FLOAT}, [rows], [rows_f]),
            gs.Node("Mul", self.names(f"{name}_dequantize"), {}, [rows_f, scales], [out])])

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(base), np.array(value))  # a copy; 0-d stays 0-d

    def _dq(self, base: str, inputs: list[gs.Tensor], like: gs.Tensor, axis: int | None,
            out: gs.Tensor | None = None) -> gs.Tensor:
        out = out or gs.Variable(self.names(f"{base}_dequantized"), np.float32, like.shape)
        attrs = {} if axis is None else {"axis": axis}
        self.graph.nodes.append(gs.Node("DequantizeLinear", self.names(f"{base}_DequantizeLinear"), attrs,
                                        inputs, [out]))
        return out

    def _weight(self, node: gs.Node, qw: QuantizedWeight) -> None:
        spec = self.d.weights[id(node)]
        axis = spec.axis if qw.w_scale.ndim else None
        key = (spec.w.name, axis, qw.w_scale.tobytes())
        if key not in self.int8_weights:  # a weight shared by several layers is stored once
            base = spec.w.name
            self.int8_weights[key] = [
                self._const(f"{base}_quantized", qw.w), self._const(f"{base}_scale", qw.w_scale),
                self._const(f"{base}_zero_point", np.zeros(qw.w_scale.shape, np.int8))]
        node.inputs[1] = self._dq(spec.w.name, self.int8_weights[key], spec.w, axis)
        if qw.b is None:
            return
        base = spec.b.name
        b = [self._const(f"{base}_quantized", qw.b), self._const(f"{base}_scale", qw.b_scale),
             self._const(f"{base}_zero_point", np.zeros(qw.b_scale.shape, np.int32))]
        node.inputs[2] = self._dq(base, b, spec.b, spec.bias_axis if qw.b_scale.ndim else None)

    def _scale_zp(self, root: str) -> tuple[gs.Constant, gs.Constant]:
        if root not in self.consts:
            scale, zp = self.params[root].arrays()
            self.consts[root] = (self._const(f"{root}_scale", scale), self._const(f"{root}_zero_point", zp))
        return self.consts[root]

    def _tensor(self, t: gs.Tensor) -> None:
        root = self.d.root_of[t.name]
        scale, zp = self._scale_zp(root)
        p = producer(t)
        if p is not None and id(p) in self.made:
            src = gs.Variable(self.names(f"{t.name}_float"), t.dtype, t.shape)
            p.outputs[p.outputs.index(t)] = src
            self._pair(t, src, scale, zp, out=t)
            return
        slots = [(n, i) for n in t.outputs if id(n) in self.made
                 for i in qp.data_inputs(n) if i < len(n.inputs) and n.inputs[i] is t]
        dq = None
        for k, (n, i) in enumerate(slots):
            if self.strict and k:  # own constants, or onnxruntime's CSE merges the pairs back into one
                scale, zp = (self._const(c.name, c.values) for c in self._scale_zp(root))
            if dq is None or self.strict:
                dq = self._pair(t, t, scale, zp)
            n.inputs[i] = dq

    def _pair(self, t: gs.Tensor, src: gs.Tensor, scale: gs.Constant, zp: gs.Constant,
              out: gs.Tensor | None = None) -> gs.Tensor:
        """src -> QuantizeLinear -> DequantizeLinear -> out (a new tensor unless given)."""
        q = gs.Variable(self.names(f"{t.name}_quantized"), zp.values.dtype, t.shape)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self.names(f"{t.name}_QuantizeLinear"), {},
                                        [src, scale, zp], [q]))
        self.quantizers += 1
        return self._dq(t.name, [q, scale, zp], t, None, out=out)
