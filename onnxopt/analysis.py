"""What a model costs: nodes by op type, parameters, multiply-accumulates, bytes.

MACs come from shapes inferred with the concrete input shapes used for validation
(so dynamic axes count at the size actually run):
    Conv           N * Cout * prod(out spatial) * Cin/group * prod(kernel)
    ConvTranspose  N * Cin * prod(in spatial) * Cout/group * prod(kernel)
    MatMul         prod(broadcast batch dims) * M * K * N
    Gemm           M * K * N
Parameters are the elements of floating-point initializers and Constant values, and
of the 8-bit and int32 initializers that hold quantized weights and biases.
Nodes inside control-flow subgraphs are counted as nodes; their MACs are not.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference

from onnxopt import runtime
from onnxopt.runtime import real_inputs

logger = logging.getLogger(__name__)

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv")


@dataclass
class ModelStats:
    nodes: int
    nodes_by_op: dict[str, int]
    params: int
    macs: int | None  # None when shapes could not be inferred
    size_bytes: int
    macs_by_op: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "nodes": self.nodes,
            "nodes_by_op": self.nodes_by_op,
            "params": self.params,
            "macs": self.macs,
            "macs_by_op": self.macs_by_op,
            "size_bytes": self.size_bytes,
        }


def model_stats(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None, size_bytes: int) -> ModelStats:
    """Statistics of ``model``; MACs at the shapes of ``feeds`` (one batch), None without feeds."""
    ops = Counter(n.op_type for n in _all_nodes(model.graph))
    by_op = _macs(model, feeds) if feeds else None
    return ModelStats(
        nodes=sum(ops.values()),
        nodes_by_op=dict(sorted(ops.items())),
        params=count_params(model),
        macs=sum(by_op.values()) if by_op is not None else None,
        size_bytes=size_bytes,
        macs_by_op=by_op or {},
    )


def count_params(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if _is_param(helper.tensor_dtype_to_np_dtype(t.data_type)):
            total += int(np.prod(t.dims)) if t.dims else 1
    for n in _all_nodes(model.graph):
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and helper.tensor_dtype_to_np_dtype(a.t.data_type).kind == "f":
                    total += int(np.prod(a.t.dims)) if a.t.dims else 1
    return total


def _is_param(dtype: np.dtype) -> bool:
    """Weights and biases: floats, and the int8/uint8/int32 storage of quantized ones (shapes are int64)."""
    return dtype.kind == "f" or dtype in (np.int8, np.uint8, np.int32)


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def _macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int] | None:
    shapes = _infer_shapes(model, {k: v.shape for k, v in feeds.items()})
    if shapes is None:
        return None
    missing = [t for n in model.graph.node if n.op_type in MAC_OPS for t in (n.input[0], n.output[0])
               if t not in shapes]
    if missing:
        shapes.update(_run_shapes(model, feeds, missing))
    total: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in MAC_OPS:
            macs = _node_macs(node, shapes)
            if macs is not None:
                total[node.op_type] += macs
    return dict(sorted(total.items()))


def _infer_shapes(model: onnx.ModelProto, input_shapes) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor with the given concrete input shapes; None if inference fails."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in real_inputs(m):
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    try:
        inferred = shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # inference gives up on some custom or malformed nodes: MACs unknown
        logger.info("shape inference failed, MACs not counted: %s", e)
        return None
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        static = tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)
        if vi.type.HasField("tensor_type") and static:
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    for t in inferred.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _run_shapes(model: onnx.ModelProto, feeds, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes shape inference could not give (exporter Reshape chains), read off one real run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    try:
        sess = runtime.session(m, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        outs = sess.run(None, feeds)
    except Exception as e:  # MACs are a report figure: a failure here must not fail the run
        logger.info("could not run the model for shapes, MACs partly counted: %s", e)
        return {}
    return {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), outs) if isinstance(v, np.ndarray)}


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    ins = [shapes.get(i) for i in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    if any(s is None for s in ins[:2]) or out is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = ins[1]
    if node.op_type in ("Conv", "FusedConv"):
        return int(np.prod(out)) * (w[1]) * int(np.prod(w[2:]))
    if node.op_type == "ConvTranspose":
        x = ins[0]
        return int(np.prod(x)) * (w[1]) * int(np.prod(w[2:]))
    if node.op_type == "Gemm":
        k = ins[0][0] if attrs.get("transA", 0) else ins[0][-1]
        return int(np.prod(out)) * k
    if node.op_type == "MatMul":
        k = ins[0][-1]
        return int(np.prod(out)) * k
    return None

