"""Static shapes from onnx shape inference, and the shape values they fold.

``infer(graph)`` runs ``onnx.shape_inference.infer_shapes(data_prop=True)`` on a light
export of the graph and returns, per tensor name, its element type and dims (``None``
for a symbolic or unknown dim). The export leaves out what could mislead or cost:
- no ``value_info``: shapes annotated by earlier passes may be stale, so every shape is
  derived again from the graph inputs, the initializers and the operators;
- graph outputs without their declared type: only the operators say what they hold;
- initializers over ``SMALL_INITIALIZER`` elements are declared as typed graph inputs.
  Only small tensors carry shape information (Reshape shapes, Slice starts, Resize
  scales), and the export then never copies the weights.

``shape_folds(graph, infos)`` lists the tensors whose values follow from static dims:
- ``Shape(x)`` (with the opset-15 ``start``/``end``) when every reported dim is static;
- ``Size(x)`` when every dim of ``x`` is static;
- ``Gather(Shape(x), idx)`` and ``Slice(Shape(x), ...)`` with constant indices, when
  the dims they select are static even if others are not (dynamic batch, static
  channels: ``x.size(1)`` folds, ``x.size(0)`` does not).
A dim is trusted only when inference gives it a value; a symbolic or unknown dim never
folds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt.graph_utils import const_value, is_standard

logger = logging.getLogger(__name__)

SMALL_INITIALIZER = 1024  # elements
NOT_A_TENSOR = -1  # elem_type of sequences, maps and optionals
STORABLE = frozenset(range(1, 8)) | {9, 10, 11, 12, 13}  # TensorProto types numpy holds natively


@dataclass(frozen=True)
class TensorInfo:
    elem_type: int  # onnx.TensorProto enum; 0 unknown, NOT_A_TENSOR for non-tensor types
    dims: tuple[int | None, ...] | None  # None: rank unknown

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        if self.dims is None or any(d is None for d in self.dims):
            return None
        return self.dims

    @property
    def nbytes(self) -> int | None:
        """Size of a numpy-storable tensor of static shape, else None."""
        if self.static_shape is None or self.elem_type not in STORABLE:
            return None
        itemsize = helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize
        return int(np.prod(self.static_shape, dtype=np.int64)) * itemsize


def onnx_type(dtype: np.dtype) -> int | None:
    try:
        return helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, TypeError, ValueError):
        return None



def elem_type(t: gs.Constant) -> int:
    if isinstance(t._values, LazyValues):
        return t._values.tensor.data_type
    return dtype_to_onnx(t.export_dtype)


def opset_imports(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    imports = list(graph.import_domains or [helper.make_opsetid("", graph.opset)])
    known = {o.domain for o in imports}
    for node in graph.nodes:
        if node.domain not in known and not is_standard(node):
            imports.append(helper.make_opsetid(node.domain, 1))
            known.add(node.domain)
    return imports


def ir_version(imports: list[onnx.OperatorSetIdProto]) -> int:
    return max(helper.find_min_ir_version_for(imports, ignore_unknown=True), 7)


def infer(graph: gs.Graph) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for every tensor onnx shape inference can type.

    Graph input shapes are taken as declared: they are the model's contract (ORT rejects
    inputs that do not match a static dim).
    """
    try:
        model = onnx.shape_inference.infer_shapes(_light_model(graph), strict_mode=False, data_prop=True)
    except Exception as e:  # inference (or gs's export) rejects some graphs ORT runs: nothing is known
        logger.debug("shape inference failed (%s: %s); no shape folds", type(e).__name__, e)
        return {}
    g = model.graph
    return {vi.name: _info(vi.type) for vi in [*g.input, *g.value_info, *g.output] if vi.name}


def _light_model(graph: gs.Graph) -> onnx.ModelProto:
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    inits = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        if math.prod(t.shape) <= SMALL_INITIALIZER and not isinstance(t._values, SparseValues):
            inits.append(OnnxExporter.export_tensor_proto(t))
        else:
            inputs.append(helper.make_tensor_value_info(t.name, elem_type(t), list(t.shape)))
    outputs = [onnx.ValueInfoProto(name=t.name) for t in graph.outputs]
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    imports = opset_imports(graph)
    model = helper.make_model(
        helper.make_graph(nodes, graph.name or "g", inputs, outputs, inits),
        opset_imports=imports,
        functions=[OnnxExporter.export_function(f) for f in graph.functions],
    )
    model.ir_version = ir_version(imports)
    return model


def _info(tp: onnx.TypeProto) -> TensorInfo:
    kind = tp.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(0 if kind is None else NOT_A_TENSOR, None)
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim)
    return TensorInfo(tt.elem_type, dims)


def dims_of(t: gs.Tensor, infos: dict[str, TensorInfo]) -> tuple[int | None, ...] | None:
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    info = infos.get(t.name)
    return info.dims if info else None


def shape_folds(graph: gs.Graph, infos: dict[str, TensorInfo]) -> list[tuple[gs.Node, np.ndarray]]:
    """Nodes (single output) whose output value follows from static dims, with that value."""
    folds: list[tuple[gs.Node, np.ndarray]] = []
    for node in graph.nodes:
        if not is_standard(node) or len(node.outputs) != 1 or not node.inputs:
            continue
        if node.op == "Size":
            dims = dims_of(node.inputs[0], infos)
            if dims is not None and None not in dims:
                folds.append((node, np.array(math.prod(dims), np.int64)))
        elif node.op == "Shape":
            dims = _shape_dims(node, infos)
            if dims is not None and None not in dims:
                folds.append((node, np.array(dims, np.int64)))
            elif dims is not None:
                users = {id(u): u for u in node.outputs[0].outputs}  # a node may read it twice
                for user in users.values():
                    value = _select(user, node.outputs[0], dims, graph.opset)
                    if value is not None:
                        folds.append((user, value))
    return folds


def _shape_dims(node: gs.Node, infos: dict[str, TensorInfo]) -> tuple[int | None, ...] | None:
    """The dims a Shape node reports, its opset-15 ``start``/``end`` applied."""
    dims = dims_of(node.inputs[0], infos)
    if dims is None:
        return None
    rank = len(dims)

    def clamp(i: int) -> int:
        return min(max(i + rank if i < 0 else i, 0), rank)

    return dims[clamp(int(node.attrs.get("start", 0))):clamp(int(node.attrs.get("end", rank)))]


def _select(user: gs.Node, shape: gs.Tensor, dims: tuple[int | None, ...], opset: int) -> np.ndarray | None:
    """The value of Gather/Slice ``user`` reading ``shape`` (whose entries are ``dims``), if static."""
    if not is_standard(user) or len(user.outputs) != 1 or not user.inputs or user.inputs[0] is not shape:
        return None
    if user.op == "Gather" and len(user.inputs) == 2 and int(user.attrs.get("axis", 0)) in (0, -1):
        idx = const_value(user.inputs[1])
        if idx is None or idx.dtype.kind not in "iu" or not np.all((idx >= -len(dims)) & (idx < len(dims))):
            return None
        picked = [dims[int(i)] for i in idx.reshape(-1)]
        shape_out = idx.shape
    elif user.op == "Slice":
        args = _slice_args(user, opset)
        if args is None:
            return None
        picked = list(dims[slice(*args)])
        shape_out = (len(picked),)
    else:
        return None
    if None in picked:
        return None
    return np.array(picked, np.int64).reshape(shape_out)


def _slice_args(node: gs.Node, opset: int) -> tuple[int, int, int] | None:
    """(start, end, step) of a Slice along axis 0 of a 1-D tensor, if all constant."""
    if opset < 10:
        a = node.attrs
        vals = [a.get("starts"), a.get("ends"), a.get("axes", [0]), [1]]
    else:
        ins = [*node.inputs[1:], *[None] * (5 - len(node.inputs))]
        vals = [const_value(ins[0]), const_value(ins[1]),
                [0] if ins[2] is None or not ins[2].name else const_value(ins[2]),
                [1] if ins[3] is None or not ins[3].name else const_value(ins[3])]
    if any(v is None or np.size(v) != 1 for v in vals):
        return None
    start, end, axis, step = (int(np.asarray(v).reshape(-1)[0]) for v in vals)
    # Python slicing clamps starts and ends exactly as ONNX Slice does, for both step signs.
    return (start, end, step) if axis in (0, -1) and step != 0 else None

