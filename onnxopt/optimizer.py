"""The optimization pipeline behind ``onnxopt IN -o OUT`` and ``onnxopt.optimize``.

load (caller) -> graph -> pass manager (preset or explicit passes, fixed point,
optional verification after every pass) -> model with the original's opsets and
metadata -> (caller) validate, save, report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxopt import io, presets, runtime, validate
from onnxopt.config import OptimizeConfig
from onnxopt.errors import InternalError, UnsupportedModelError, UserError, VerificationError
from onnxopt.pass_base import GraphPass, PassManager, PassRecord, PassResult

logger = logging.getLogger(__name__)


@dataclass
class Optimized:
    model: onnx.ModelProto
    records: list[PassRecord]
    passes: list[str]
    data: bytes | None = None  # the model serialized once, reused to check, run and save it


class VerifyEach:
    """After-each hook: the graph must still compute the reference outputs, or the pass is named."""

    def __init__(self, like: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]):
        self.like, self.feeds = like, list(feeds)
        sess = runtime.session(like)
        self.reference = [runtime.run(sess, f) for f in self.feeds]
        self.checked = 0

    def __call__(self, p: GraphPass, graph: gs.Graph, result: PassResult) -> None:
        model = io.to_model(graph.copy(), self.like)
        try:
            sess = runtime.session(model)
        except UnsupportedModelError as e:
            raise VerificationError(f"pass {p.name!r} produced an invalid model: {e}") from e
        report = validate.compare_runs(self.reference, sess, self.feeds)
        self.checked += 1
        if not report:
            raise VerificationError(f"pass {p.name!r} changed the outputs: {report.summary()}")


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model at default-domain opset ``target`` (onnx's version converter); never a downgrade."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if target < current:
        raise UserError(f"--opset {target}: the model is already at opset {current}; onnxopt does not downgrade")
    if target == current:
        return model
    try:
        converted = version_converter.convert_version(model, target)
        io.check_model(converted, f"model converted to opset {target}")
    except (RuntimeError, ValueError, UnsupportedModelError, onnx.checker.ValidationError) as e:
        raise UserError(f"--opset {target}: cannot convert from opset {current}: {str(e).splitlines()[0][:200]}") from e
    return converted


def optimize_model(
    model: onnx.ModelProto,
    names: Sequence[str],
    config: OptimizeConfig = OptimizeConfig(),
    *,
    verify_feeds: Sequence[dict[str, np.ndarray]] | None = None,
    strict: bool = False,
) -> Optimized:
    """Run the named passes on ``model`` (not modified) and return the new model and records."""
    names = list(names)
    if config.outputs is not None and "remove_dead_outputs" not in names:
        names.append("remove_dead_outputs")  # --outputs must take effect even with -O0
    if config.opset is not None:
        model = convert_opset(model, config.opset)
    hooks = []
    if verify_feeds is not None:
        hooks.append(VerifyEach(model, verify_feeds))
    manager = PassManager(presets.build(names, config), max_steps=config.max_steps, after_each=hooks, strict=strict)
    graph = manager.run(io.to_graph(model))
    out = io.to_model(graph, like=model)
    data = io.serialize(out)
    try:  # the input loaded, so an output that does not is a bug in a pass, never the user's fault
        io.check_model(out, "optimized model", data=data)
        runtime.session(data if data is not None else out)
    except UnsupportedModelError as e:
        changed = [r.name for r in manager.records if r.modified]
        raise InternalError(f"{e} (passes that changed the graph: {', '.join(dict.fromkeys(changed))}; "
                            "rerun with --verify-each to name the first bad one)") from e
    return Optimized(out, manager.records, names, data)
