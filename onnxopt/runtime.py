"""onnxruntime sessions and model inputs: the one place that builds them.

Generated inputs follow the input signature. Dynamic dimensions take the user's
``--shape`` when given, else 1 for the leading (batch) axis and 32 for the others.
Integer inputs stay in a sane range: when an input is used as indices of a Gather
on a constant table (token ids into an embedding), below the table's size; inputs
named like masks are all ones; other integers are in [0, 2).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxopt.errors import DataError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 1
DEFAULT_DYNAMIC_DIM = 32

Shapes = Mapping[str, tuple[int, ...]]


def session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    *,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    threads: int = 0,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A CPU session from a model, its bytes or its path; models too large to serialize in
    memory go through a temp file. ``spinning=False``: idle intra-op threads sleep instead of
    spinning, leaving the core to other work of the process."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = optimization
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        if isinstance(model, bytes):
            return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() < (2 << 30) - (1 << 20):
                return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            with tempfile.TemporaryDirectory() as d:
                from onnxopt.io import save_model

                path = save_model(model, Path(d) / "model.onnx")
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every load failure
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {msg[:300]}") from e


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        outs = sess.run(names, dict(feeds))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in feeds.items())
        raise DataError(f"onnxruntime failed on inputs {shapes}: {msg[:300]} (try --shape or --data)") from e
    return dict(zip(names, outs))


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old exporters list weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(vi: onnx.ValueInfoProto, shapes: Shapes) -> tuple[int, ...]:
    if vi.name in shapes:
        return tuple(shapes[vi.name])
    dims = vi.type.tensor_type.shape.dim
    out = []
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        else:
            out.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM)
    return tuple(out)


def random_feeds(model: onnx.ModelProto, *, shapes: Shapes | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs generated from the model's input signature (see the module docstring)."""
    shapes = shapes or {}
    unknown = set(shapes) - {vi.name for vi in real_inputs(model)}
    if unknown:
        raise DataError(f"--shape names {sorted(unknown)} that are not model inputs")
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(model)
    feeds = {}
    for vi in real_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {vi.name!r} is not a tensor; give data with --data")
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = input_shape(vi, shapes)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype)
        elif "mask" in vi.name.lower():
            feeds[vi.name] = np.ones(shape, dtype)
        else:
            feeds[vi.name] = rng.integers(0, bounds.get(vi.name, 2), size=shape).astype(dtype)
    return feeds


def _gather_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> row count of the constant table it indexes through Gather (axis 0)."""
    init_rows = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in init_rows:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 0:
                name = node.input[1]
                bounds[name] = min(bounds.get(name, 1 << 62), init_rows[node.input[0]])
    return bounds
