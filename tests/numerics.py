"""Numeric checks shared by the tests: run graphs in onnxruntime and compare outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt import runtime


def to_model(g: gs.Graph | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(g, onnx.ModelProto):
        return g
    model = gs.export_onnx(g)
    model.ir_version = min(model.ir_version, 10)
    return model


def run(g: gs.Graph | onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    """Check the model strictly, then run it on CPU with ORT's own rewrites off."""
    model = to_model(g)
    onnx.checker.check_model(model, full_check=True)
    sess = runtime.session(model, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return runtime.run(sess, feeds)


def random_feeds(g: gs.Graph | onnx.ModelProto, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    return runtime.random_feeds(to_model(g), shapes=shapes, seed=seed)


def assert_same_outputs(before, after, feeds=None, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Both graphs give the same outputs (same names) on the same inputs."""
    feeds = feeds if feeds is not None else random_feeds(before)
    a, b = run(before, feeds), run(after, feeds)
    assert list(a) == list(b), f"output names changed: {list(a)} -> {list(b)}"
    for name in a:
        assert a[name].shape == b[name].shape, f"{name}: shape {a[name].shape} -> {b[name].shape}"
        assert a[name].dtype == b[name].dtype, f"{name}: dtype {a[name].dtype} -> {b[name].dtype}"
        np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=atol, err_msg=name)


def assert_untouched(model: onnx.ModelProto, graph: gs.Graph, result, reason: str | None = None) -> None:
    """A pass left ``model`` exactly as it was; with ``reason``, it reported one refusal saying so."""
    assert not result.modified and not result.stats
    assert gs.export_onnx(graph).graph == gs.export_onnx(gs.import_onnx(model)).graph
    if reason is None:
        assert not result.skipped, result.skipped
    else:
        assert len(result.skipped) == 1 and reason in result.skipped[0].reason, result.skipped
