"""Run the model over calibration data and keep streaming statistics of chosen tensors.

One onnxruntime session (CPU, all graph optimizations: they never remove a graph
output, and the layout ones make convolutions about a third cheaper) runs the model
with the requested tensors added as graph outputs. Each run's activations are folded
into the tensors' ``TensorStats`` on a worker thread while onnxruntime computes the
next run (both release the GIL for most of their work; onnxruntime's idle threads
sleep instead of spinning, so the worker gets the core), then dropped: memory holds
two runs' activations, whatever the number of samples.

Data is any iterable of feed dicts (``onnxopt.data.iter_feeds`` for .npz files,
or a user's own loader). Where every model input has a dynamic first axis, the
stream is re-batched: single samples are stacked (when their other dimensions
agree; a change of shape, e.g. text crops of another width, starts a new batch) and
large batches are split. The first run takes one sample; later runs take as many
as keep the exposed activations of a run under ``RUN_BYTES``, at most
``config.batch_size``. A batched run whose outputs do not all have the samples on
their first axis (a model that reshapes its batch away) is run again one sample at
a time, and so is the rest of the data. Models with a fixed batch dimension get the
feeds as they come. ``max_samples`` stops the stream.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxopt import runtime
from onnxopt.calibration.observers import TensorStats
from onnxopt.config import CalibrationConfig
from onnxopt.errors import DataError, UnsupportedModelError, UserError

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
# Exposed activations per run: a CNN at 224x224 runs one sample at a time, small models
# the whole ``batch_size``. Inference cost per sample is about flat from one sample up
# (ResNet-18, MobileNetV2, PP-OCR det and MiniLM: 16 to 96 MB per run within noise, 200
# to 800 MB slower), and small runs keep the peak low (MiniLM: 130 MB less than at 96).
RUN_BYTES = 16 << 20


def collect(
    model: onnx.ModelProto,
    data: Iterable[Feeds],
    tensors: Sequence[str],
    config: CalibrationConfig,
    *,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """Statistics of every tensor in ``tensors`` (node outputs or graph inputs) over ``data``."""
    tensors = list(dict.fromkeys(tensors))
    stats = {t: TensorStats(t, config.num_bins) for t in tensors}
    seen, start, pending = 0, time.perf_counter(), None
    bar = tqdm(total=_total(data, config.max_samples), unit="sample", desc="calibrating", disable=not progress)
    with bar, ThreadPoolExecutor(1, thread_name_prefix="calibration") as worker:
        try:
            for values, n in activations(model, data, tensors, config):
                for name, value in values.items():
                    if not np.issubdtype(value.dtype, np.floating):
                        raise UserError(f"tensor {name!r} is {value.dtype}; only float tensors can be calibrated")
                _wait(pending)
                pending = worker.submit(_fold, stats, values)
                del values
                seen += n
                bar.update(n)
            _wait(pending)
        finally:
            if pending is not None:
                pending.cancel()
    if not seen:
        raise DataError("no calibration samples")
    logger.info("calibration: %d samples, %d tensors, %.2f s", seen, len(tensors), time.perf_counter() - start)
    return stats


def activations(
    model: onnx.ModelProto, data: Iterable[Feeds], tensors: Sequence[str], config: CalibrationConfig
) -> Iterator[tuple[Feeds, int]]:
    """(tensor name -> value, sample count) per run of ``model`` over ``data``, batched as the module
    doc says. ``tensors`` are node outputs or graph inputs of the main graph."""
    inputs = {vi.name for vi in runtime.real_inputs(model)}
    _check_tensors(model, tensors, inputs)
    outputs = [t for t in tensors if t not in inputs]
    sess = session(model, outputs)
    stackable = _stackable(model)
    sizing = _Sizing(config.batch_size) if stackable else None
    for feeds, n in rebatch(data, stackable, sizing.size if sizing else config.batch_size, config.max_samples):
        values = dict(zip(outputs, _run(sess, outputs, feeds)))
        if sizing is not None and not sizing.fits(values, n):
            logger.info("calibration: a batched run moved the samples off the first axis of some tensor; "
                        "running one sample at a time")
            del values
            for i in range(n):
                one = {k: v[i : i + 1] for k, v in feeds.items()}
                yield _with_inputs(dict(zip(outputs, _run(sess, outputs, one))), one, tensors), 1
            continue
        yield _with_inputs(values, feeds, tensors), n


def session(model: onnx.ModelProto, outputs: Sequence[str]) -> ort.InferenceSession:
    """A session of ``model`` that also outputs ``outputs`` (types left to onnxruntime). They are added
    to ``model`` itself while it is serialized, and removed again: no copy of the weights."""
    with exposed(model, outputs):
        try:
            return runtime.session(model, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False)
        except UnsupportedModelError as e:  # an optimizer of onnxruntime's that fails on this model
            logger.info("calibration: %s; trying basic graph optimizations", e)
            return runtime.session(model, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   spinning=False)


@contextlib.contextmanager
def exposed(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """``model`` with ``names`` appended to its graph outputs for the duration of the block."""
    have = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in have]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
    try:
        yield model
    finally:
        del model.graph.output[len(model.graph.output) - len(added) :]


class _Sizing:
    """Samples per run: one at first, then as many as fit in ``RUN_BYTES`` of activations (at most
    ``limit``); one for good once a batched run's outputs lose the sample axis."""

    def __init__(self, limit: int):
        self.limit, self.per_sample, self.batched = limit, None, True

    def size(self) -> int:
        if self.per_sample is None or not self.batched:
            return 1
        return int(max(1, min(self.limit, RUN_BYTES // max(self.per_sample, 1))))

    def fits(self, values: Feeds, n: int) -> bool:
        """Whether every output of a run of ``n`` stacked samples has them on its first axis; records
        the activation bytes per sample."""
        if n > 1 and not all(v.ndim and v.shape[0] == n for v in values.values()):
            self.batched = False
            return False
        self.per_sample = sum(v.nbytes for v in values.values()) / n
        return True


def _fold(stats: dict[str, TensorStats], values: Feeds) -> None:
    for name, value in values.items():
        stats[name].update(value)


def _wait(pending: Future | None) -> None:
    if pending is not None:
        pending.result()  # the worker's exception, if any, is raised here


def _with_inputs(values: Feeds, feeds: Feeds, tensors: Sequence[str]) -> Feeds:
    values.update((t, feeds[t]) for t in tensors if t in feeds)
    return values


def rebatch(
    data: Iterable[Feeds], stackable: bool, batch_size: int | Callable[[], int], limit: int | None
) -> Iterator[tuple[Feeds, int]]:
    """(feeds, sample count) in batches of at most ``batch_size``, ``limit`` samples in all.
    A callable ``batch_size`` is asked again for each batch."""
    size = batch_size if callable(batch_size) else lambda: batch_size
    seen, pending, pending_n = 0, [], 0
    for feeds in data:
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        n = _count(feeds)
        if not stackable or n is None:
            if pending:
                yield _concat(pending), pending_n
                pending, pending_n = [], 0
            yield feeds, n or 1
            seen += n or 1
        else:
            n = n if limit is None else min(n, limit - seen)
            seen += n
            if pending and _signature(pending[0]) != _signature(feeds):
                yield _concat(pending), pending_n
                pending, pending_n = [], 0
            start = 0
            while start < n:
                target = size()
                take = max(min(target - pending_n, n - start), 1)
                pending.append({k: v[start : start + take] for k, v in feeds.items()})
                pending_n, start = pending_n + take, start + take
                if pending_n >= target:
                    yield _concat(pending), pending_n
                    pending, pending_n = [], 0
        if limit is not None and seen >= limit:
            break
    if pending:
        yield _concat(pending), pending_n


def _check_tensors(model: onnx.ModelProto, tensors: Sequence[str], inputs: set[str]) -> None:
    produced = {o for node in model.graph.node for o in node.output if o}
    weights = {t.name for t in model.graph.initializer}
    for t in tensors:
        if t in weights and t not in produced:
            raise UserError(f"tensor {t!r} is a weight (initializer), not an activation to calibrate")
        if t not in produced and t not in inputs:
            raise UserError(f"tensor {t!r} is not produced in the model's main graph")


def _run(sess: ort.InferenceSession, names: list[str], feeds: Feeds) -> list[np.ndarray]:
    if not names:
        return []
    try:
        return sess.run(names, feeds)
    except Exception as e:  # onnxruntime raises its own exception types for bad feeds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k}:{'x'.join(map(str, np.shape(v)))}" for k, v in feeds.items())
        raise DataError(f"calibration data {shapes} does not run: {msg[:300]}") from e


def _stackable(model: onnx.ModelProto) -> bool:
    """Every input has a first axis of free size, so samples can be stacked and split."""
    for vi in runtime.real_inputs(model):
        t = vi.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim or t.shape.dim[0].HasField("dim_value"):
            return False
    return True


def _count(feeds: Feeds) -> int | None:
    firsts = {np.shape(v)[0] if np.ndim(v) else None for v in feeds.values()}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def _signature(feeds: Feeds) -> tuple:
    return tuple((k, v.shape[1:], v.dtype) for k, v in sorted(feeds.items()))


def _concat(parts: list[Feeds]) -> Feeds:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _total(data: Iterable[Feeds], limit: int | None) -> int | None:
    if isinstance(data, (list, tuple)):
        n = sum(_count(f) or 1 for f in data)
        return n if limit is None else min(n, limit)
    return limit
