"""Run the model over calibration data and keep streaming statistics of chosen tensors.

One onnxruntime session (CPU, basic graph optimizations: constant folding and the
like, which never remove a graph output) runs a copy of the model with the
requested tensors added as graph outputs. Each batch's activations are folded
into the tensors' ``TensorStats`` and dropped, so memory depends on the batch
size and the model, never on the number of samples.

Data is any iterable of feed dicts (``onnxopt.data.iter_feeds`` for .npz files,
or a user's own loader). Where every model input has a dynamic first axis, the
stream is re-batched to ``batch_size`` samples: single samples are stacked (when
their other dimensions agree; a change of shape, e.g. text crops of another
width, starts a new batch) and large batches are split. Models with a fixed
batch dimension get the feeds as they come. ``max_samples`` stops the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxopt import runtime
from onnxopt.calibration.observers import TensorStats
from onnxopt.config import CalibrationConfig
from onnxopt.errors import DataError, UserError

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


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
    inputs = {vi.name for vi in runtime.real_inputs(model)}
    _check_tensors(model, tensors, inputs)
    outputs = [t for t in tensors if t not in inputs]
    sess = runtime.session(with_outputs(model, outputs), optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    stats = {t: TensorStats(t, config.num_bins) for t in tensors}
    batches = rebatch(data, _stackable(model), config.batch_size, config.max_samples)
    seen, start = 0, time.perf_counter()
    with tqdm(total=_total(data, config.max_samples), unit="sample", desc="calibrating", disable=not progress) as bar:
        for feeds, n in batches:
            values = dict(zip(outputs, _run(sess, outputs, feeds)))
            values.update((t, feeds[t]) for t in tensors if t in inputs)
            for name, value in values.items():
                if not np.issubdtype(value.dtype, np.floating):
                    raise UserError(f"tensor {name!r} is {value.dtype}; only float tensors can be calibrated")
                stats[name].update(value)
            del values
            seen += n
            bar.update(n)
    if not seen:
        raise DataError("no calibration samples")
    logger.info("calibration: %d samples, %d tensors, %.2f s", seen, len(tensors), time.perf_counter() - start)
    return stats


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (types left to onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return out


def rebatch(
    data: Iterable[Feeds], stackable: bool, batch_size: int, limit: int | None
) -> Iterator[tuple[Feeds, int]]:
    """(feeds, sample count) in batches of at most ``batch_size``, ``limit`` samples in all."""
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
                take = min(batch_size - pending_n, n - start)
                pending.append({k: v[start : start + take] for k, v in feeds.items()})
                pending_n, start = pending_n + take, start + take
                if pending_n == batch_size:
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
