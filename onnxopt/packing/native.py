"""ONNX-native forms of a packed model, which need no decoder: any runtime reads them.

Both start from ``pack.quantize_model``'s pruned and shared weights, so they compute what
``unpack(pack(model))`` computes (to float rounding of the Gather, none in practice):

- ``codebook_gather``: each shared weight as uint8 (uint16 past 256 codes) indices plus a
  float codebook and a ``Gather`` in the graph (onnxruntime folds it at session creation);
- ``sparse_initializers``: each pruned weight as a COO ``graph.sparse_initializer``.

Each form is applied only where it makes the weight smaller, never to a weight that is also
a graph input (a caller may feed another value).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.packing.pack import Quantized, quantize_all
from onnxopt.packing.policy import FLOAT_TYPES, TensorSetting
from onnxopt.packing.scales import Scale

logger = logging.getLogger(__name__)


def codebook_gather(model: onnx.ModelProto, settings: Mapping[str, TensorSetting],
                    scales: Mapping[str, Scale] | None = None) -> onnx.ModelProto:
    """``quantize_model``'s model with shared weights as uint8/uint16 indices + codebook + Gather (no decoder).

    Each weight ``w`` becomes ``Gather(codebook, Cast(indices, INT32) [+ channel offsets])``, its
    output named ``w``. Per channel, the codebook rows are flattened and a small int32 tensor
    of row offsets (broadcast along the channel axis) is added: one Gather, no GatherElements
    reshapes, and onnxruntime folds the whole chain at session creation (constant inputs).
    Pruned weights index a 0.0 appended to each row. A scaled weight (``scales``) adds a ``Mul``
    by its multipliers (float32 only). A weight stays dense when this form is not smaller, or
    when it is also a graph input (overridable).
    """
    out, _, quantized = quantize_all(model, settings, scales)
    taken = _names(out)
    inputs = {i.name for i in model.graph.input}
    nodes, moved = [], set()
    for t in out.graph.initializer:
        q = quantized.get(t.name)
        if q is None or t.name in inputs:
            continue
        form = _gather_form(t, q, taken)
        if form is not None:
            out.graph.initializer.extend(form[0])
            nodes += form[1]
            moved.add(t.name)
    _drop_initializers(out, moved)
    nodes.extend(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _gather_form(t: TensorProto, q: Quantized, taken: set[str]) -> tuple[list, list] | None:
    if q.scale is not None and t.data_type != TensorProto.FLOAT:
        return None  # a float16 Mul would round the product once more than unpack does
    pruned = q.mask is not None
    sizes = q.sizes + pruned
    starts = np.cumsum(sizes) - sizes
    codebook = np.zeros(int(sizes.sum()), FLOAT_TYPES[t.data_type])  # with pruning, each row ends in a 0.0
    codebook[np.arange(q.codebook.size) + pruned * np.repeat(np.arange(len(q.sizes)), q.sizes)] = q.codebook
    shape = [1] * q.indices.ndim
    if q.axis is not None:
        shape[q.axis] = -1
    local = q.indices if not pruned else np.where(q.mask, q.indices, q.sizes.reshape(shape))
    local = local.astype(np.uint8 if sizes.max() <= 256 else np.uint16)
    cb, idx, wide, off, flat = (_fresh(f"{t.name}_{s}", taken) for s in ("codebook", "indices", "i32", "off", "sum"))
    inits = [numpy_helper.from_array(codebook, cb), numpy_helper.from_array(local, idx)]
    nodes = [helper.make_node("Cast", [idx], [wide], to=TensorProto.INT32, name=wide)]
    if q.axis is not None:
        inits.append(numpy_helper.from_array(starts.astype(np.int32).reshape(shape), off))
        nodes.append(helper.make_node("Add", [wide, off], [flat], name=flat))
        wide = flat
    out = _fresh(f"{t.name}_unscaled", taken) if q.scale is not None else t.name
    nodes.append(helper.make_node("Gather", [cb, wide], [out], name=_fresh(f"{t.name}_gather", taken), axis=0))
    if q.scale is not None:  # centroid times its input channel's multiplier, a float32 product as in unpack
        mult = _fresh(f"{t.name}_scales", taken)
        shape = [-1 if i == q.scale.axis else 1 for i in range(q.indices.ndim)]
        inits.append(numpy_helper.from_array(q.scale.multipliers.reshape(shape), mult))
        nodes.append(helper.make_node("Mul", [out, mult], [t.name], name=_fresh(f"{t.name}_scale", taken)))
    if sum(p.ByteSize() for p in inits + nodes) >= t.ByteSize():
        return None
    return inits, nodes


def sparse_initializers(model: onnx.ModelProto, settings: Mapping[str, TensorSetting],
                        scales: Mapping[str, Scale] | None = None) -> onnx.ModelProto:
    """``quantize_model``'s model with pruned weights as ``graph.sparse_initializer`` (COO, int64 flat indices).

    Only where smaller than dense: int64 indices (the checker refuses narrower ones) cost 8
    bytes per kept float32 weight, so this pays above ~67% sparsity. onnxruntime densifies
    sparse initializers at load. onnx's strict shape inference does not know them.
    """
    out, _, quantized = quantize_all(model, settings, scales)
    inputs = {i.name for i in model.graph.input}
    moved = set()
    for t in out.graph.initializer:
        q = quantized.get(t.name)
        if q is None or q.mask is None or t.name in inputs:
            continue
        positions = np.flatnonzero(q.mask.ravel())
        dtype = np.dtype(FLOAT_TYPES[t.data_type])
        if positions.size * (8 + dtype.itemsize) >= q.mask.size * dtype.itemsize:
            continue
        values = numpy_helper.from_array(q.values.ravel()[positions].astype(dtype), t.name)
        indices = numpy_helper.from_array(positions.astype(np.int64), f"{t.name}_indices")
        out.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(t.dims)))
        moved.add(t.name)
    _drop_initializers(out, moved)
    return out


def _drop_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in [*g.input, *g.output, *g.value_info]}
    return names | {n.name for n in g.node} | {x for n in g.node for x in [*n.input, *n.output]}


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
