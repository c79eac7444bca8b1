"""int8 QDQ quantization of an (already losslessly optimized) model.

    opset >= 13 (per-channel DequantizeLinear) -> plan (nodes, tensors needing ranges)
    -> calibrate those tensors on sample data (or read the range cache) -> insert Q/DQ

The caller runs the lossless preset first, without com.microsoft fusions (a FusedConv
cannot be quantized), so BN is folded and activations sit next to their convs
before ranges are measured.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt import io, runtime
from onnxopt.calibration import TensorRange, calibrate
from onnxopt.config import CalibrationConfig, QuantConfig
from onnxopt.errors import InternalError, UnsupportedModelError
from onnxopt.pass_base import PassResult
from onnxopt.passes.insert_qdq import PER_CHANNEL_OPSET, InsertQDQPass, QuantPlan, ensure_opset, plan_quantization

logger = logging.getLogger(__name__)


@dataclass
class Quantized:
    model: onnx.ModelProto
    plan: QuantPlan
    ranges: dict[str, TensorRange]
    result: PassResult
    data: bytes | None  # the model serialized once, reused to check, run and save it
    facts: dict | None = None  # what the report says about it
    calibrate_seconds: float | None = None  # the calibrate() call: statistics and ranges, or the cache read


def quantize_model(
    model: onnx.ModelProto,
    data: Iterable[dict[str, np.ndarray]],
    config: QuantConfig = QuantConfig(),
    calibration: CalibrationConfig = CalibrationConfig(),
    *,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> Quantized:
    """Quantize ``model`` with ranges calibrated on ``data`` (not read on a cache hit)."""
    model = ensure_opset(model, PER_CHANNEL_OPSET)
    plan = plan_quantization(io.to_graph(model), config)
    t = time.perf_counter()
    ranges = calibrate(model, data, plan.tensors, calibration, cache=cache, progress=progress) if plan.tensors else {}
    seconds = time.perf_counter() - t
    graph = io.to_graph(model)
    result = InsertQDQPass(ranges, config)(graph)
    out = io.to_model(graph, like=model)
    serialized = io.serialize(out)
    try:  # a quantized model that does not load is a bug in insert_qdq, never the user's fault
        io.check_model(out, "quantized model", data=serialized)
        runtime.session(serialized if serialized is not None else out)
    except UnsupportedModelError as e:
        raise InternalError(f"{e} (insert_qdq produced it)") from e
    logger.info("int8: %d nodes quantized, %d kept in float", len(plan.nodes), len(plan.excluded))
    return Quantized(out, plan, ranges, result, serialized, calibrate_seconds=seconds)


def report(q: Quantized, calibration: CalibrationConfig, config: QuantConfig) -> dict:
    """The quantization facts for the run report."""
    return {
        "method": calibration.method.value,
        "activation_type": config.activation_type.value,
        "target": config.target.value,
        "nodes_quantized": len(q.plan.nodes),
        "tensors_calibrated": len(q.ranges),
        "changes": dict(q.result.stats),
        "kept_in_float": [{"node": s.node, "op": s.op, "reason": s.reason} for s in q.result.skipped],
    }
