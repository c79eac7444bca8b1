"""Sample data: .npz files keyed by graph input name, first axis = samples.

An array whose rank equals the input's rank is a stack of samples along the batch
axis and is cut into batches; an array with one more axis than the input holds one
whole input per entry. A folder of .npz files is read file by file (their shapes may
differ where the model has dynamic axes), and one file a batch at a time
(``onnxopt.npz_stream``), so memory stays near one batch however many samples a
file holds. Names, ranks, static dimensions and
dtypes are checked against the model before anything runs, with a one-line
``DataError`` naming the first mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxopt.errors import DataError
from onnxopt.npz_stream import LazyNpz, NpyMember
from onnxopt.runtime import real_inputs

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 16

Feeds = dict[str, np.ndarray]


def npz_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DataError(f"{path}: folder holds no .npz files")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return [path]


def load_feeds(path: str | Path, model: onnx.ModelProto, *, limit: int | None = None) -> list[Feeds]:
    """Every batch of the data at ``path``, checked against ``model``'s inputs."""
    return list(iter_feeds(path, model, limit))


def iter_feeds(path: str | Path, model: onnx.ModelProto, limit: int | None = None) -> Iterator[Feeds]:
    """The batches of ``load_feeds`` one at a time, each read from its file when it is asked
    for, so that memory holds about one batch, never a whole file (calibration streams through this).
    A missing path fails here; data errors when the stream reaches them."""
    return _stream(npz_files(path), path, model, limit)


def _stream(files: list[Path], path: str | Path, model: onnx.ModelProto, limit: int | None) -> Iterator[Feeds]:
    if limit is not None and limit <= 0:
        return
    seen = 0
    for f in files:
        with _read_npz(f) as arrays:
            for feeds in _batches(arrays, model, f):
                n = next(iter(feeds.values())).shape[0] if feeds else 1
                if limit is not None and seen + n > limit:
                    feeds = {k: v[: limit - seen].copy() for k, v in feeds.items()}
                    n = limit - seen
                yield feeds
                seen += n
                if limit is not None and seen >= limit:
                    return
    if not seen:
        raise DataError(f"{path}: no samples")


def _read_npz(path: Path) -> LazyNpz:
    """The file's arrays, headers read and checked, rows not yet read; ``with`` closes it."""
    return LazyNpz(path)


def _batches(arrays: dict[str, NpyMember], model: onnx.ModelProto, path: Path) -> Iterator[Feeds]:
    inputs = {vi.name: vi for vi in real_inputs(model)}
    extra, missing = sorted(set(arrays) - set(inputs)), sorted(set(inputs) - set(arrays))
    if extra or missing:
        what = f"has {extra} which the model does not take" if extra else f"lacks {missing}"
        raise DataError(f"{path}: {what}; model inputs are {sorted(inputs)}")
    per_sample = {}
    for name, arr in arrays.items():
        per_sample[name] = _check_array(name, arr, inputs[name], path)
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise DataError(f"{path}: inputs have different sample counts {sorted(counts)}")
    total = counts.pop()
    if any(per_sample.values()):  # one whole input per entry
        for _ in range(total):
            yield {k: v.take(1, squeeze=per_sample[k]) for k, v in arrays.items()}
        return
    step = _batch_size(inputs.values())
    for start in range(0, total, step):
        yield {k: v.take(min(step, total - start)) for k, v in arrays.items()}


def _check_array(name: str, arr: NpyMember, vi: onnx.ValueInfoProto, path: Path) -> bool:
    """Validate one array; return True if it holds one whole input per entry."""
    want = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if arr.dtype != want:
        raise DataError(f"{path}: input {name!r} is {arr.dtype}, the model takes {np.dtype(want)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if arr.ndim == len(dims) + 1:
        shape, per_sample = arr.shape[1:], True
    elif arr.ndim == 0:
        raise DataError(f"{path}: input {name!r} is a single value; its first axis must count samples")
    elif arr.ndim == len(dims):
        shape, per_sample = arr.shape, False
    else:
        raise DataError(f"{path}: input {name!r} has rank {arr.ndim}, the model takes rank {len(dims)}")
    for axis, (got, need) in enumerate(zip(shape, dims)):
        if need and got != need and not (axis == 0 and not per_sample):
            raise DataError(
                f"{path}: input {name!r} has shape {tuple(arr.shape)}, dimension {axis} "
                f"must be {need} (model shape {_fmt_dims(dims)})"
            )
    if not per_sample and dims and dims[0] not in (None, 1) and arr.shape[0] % dims[0]:
        raise DataError(f"{path}: input {name!r} has {arr.shape[0]} samples, not a multiple of batch {dims[0]}")
    return per_sample


def _batch_size(inputs) -> int:
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return DEFAULT_BATCH


def _fmt_dims(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
