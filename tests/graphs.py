"""Tiny graph builders for tests. Pass-specific builders live in the pass's test file."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

OPSET = 17


def model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, extra_opsets=()) -> onnx.ModelProto:
    """A model from onnx.helper nodes.

    ``inputs``/``outputs``: (name, np dtype, shape) triples; shape entries may be str (dynamic)
    or None (unknown). ``initializers``: (name, array) pairs.
    """
    def vi(name, dtype, shape):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(
        list(nodes),
        "test",
        [vi(*i) for i in inputs],
        [vi(*o) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in initializers],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="onnxopt-tests")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def graph(*args, **kwargs) -> gs.Graph:
    return gs.import_onnx(model(*args, **kwargs))


def rand(*shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def positive(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape).astype(np.float32)
