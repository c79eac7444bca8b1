"""Calibration cache: selected ranges saved as JSON and reused, like TensorRT's cache.

File format (``version`` 2; version 1 entropy ranges were one threshold on |x|
whatever the target, so they are recalibrated)::

    {"format": "onnxopt-calibration-ranges", "version": 2,
     "fingerprint": "<hex>", "method": "entropy",
     "settings": {"num_bins": 2048, "num_quant_bins": 128, "symmetric": false},
     "ranges": {"<tensor>": {"min": -1.5, "max": 2.25, "nonfinite": 0}, ...}}

The fingerprint hashes what the ranges depend on in the model: opsets, graph inputs
and outputs, every node (with attributes), every initializer's contents, and the
names of the calibrated tensors. A retrained model with the same structure is a
different model. The data is not hashed (that would cost a pass over it, the very
thing the cache saves), so delete the cache when the data changes.

A cache that no longer matches (other fingerprint, method, settings or format
version) is ignored with a warning and rewritten after calibrating. It is derived
data, like a build cache: re-running the same command after editing the model
should just work, not fail until the user deletes the file. A file that is not an
onnxopt cache at all is a ``UserError``, because it was never ours to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxopt import io
from onnxopt.calibration.collect import collect
from onnxopt.calibration.ranges import TensorRange, select_ranges
from onnxopt.config import CalibrationConfig, CalibrationMethod
from onnxopt.errors import UserError
from onnxopt.io import check_output_path

logger = logging.getLogger(__name__)

FORMAT = "onnxopt-calibration-ranges"
VERSION = 2


def calibrate(
    model: onnx.ModelProto,
    data: Iterable[dict[str, np.ndarray]],
    tensors: Sequence[str],
    config: CalibrationConfig,
    *,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, TensorRange]:
    """``collect`` + ``select_ranges``, served from ``cache`` when it matches (no inference
    then, and ``data`` is never iterated); a fresh result is written to ``cache``."""
    key = fingerprint(model, tensors) if cache is not None else ""
    if cache is not None:
        ranges = load_ranges(cache, key, config=config)
        if ranges is not None:
            logger.info("calibration: %d ranges from cache %s", len(ranges), cache)
            return ranges
    ranges = select_ranges(collect(model, data, tensors, config, progress=progress), config)
    if cache is not None:
        save_ranges(cache, ranges, key, config=config)
    return ranges


def fingerprint(model: onnx.ModelProto, tensors: Iterable[str]) -> str:
    """Hex digest of the model's graph (structure and weights) and the tensor names."""
    h = hashlib.sha256()

    def add(tag: bytes, blob: bytes) -> None:
        h.update(tag + len(blob).to_bytes(8, "little") + blob)

    for op in model.opset_import:
        add(b"opset", f"{op.domain}:{op.version}".encode())
    g = model.graph
    for kind, items in ((b"in", g.input), (b"out", g.output), (b"node", g.node),
                        (b"init", g.initializer), (b"sparse", g.sparse_initializer)):
        for item in items:
            add(kind, item.SerializeToString(deterministic=True))
    for name in sorted(set(tensors)):
        add(b"tensor", name.encode())
    return h.hexdigest()


def save_ranges(
    path: str | os.PathLike,
    ranges: Mapping[str, TensorRange],
    fingerprint: str,
    *,
    config: CalibrationConfig | None = None,
) -> None:
    """Write the cache atomically (see the module doc for the format)."""
    check_output_path(path)
    config = config or CalibrationConfig()
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "method": config.method.value,
        "settings": _settings(config),
        "ranges": {n: {"min": float(r.min), "max": float(r.max), "nonfinite": int(r.nonfinite)}
                   for n, r in sorted(ranges.items())},
    }
    io.write_atomic(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def load_ranges(
    path: str | os.PathLike,
    fingerprint: str,
    *,
    config: CalibrationConfig | None = None,
) -> dict[str, TensorRange] | None:
    """The cached ranges, or None when there is no cache or it is stale (with a warning).

    ``config``: also require the same method and settings."""
    path = Path(path)
    if not path.exists():
        return None
    doc = _read(path)
    config = config or CalibrationConfig()
    stale = (
        "it was written by another cache version" if doc.get("version") != VERSION
        else "the model or the calibrated tensors changed" if doc.get("fingerprint") != fingerprint
        else f"it holds {doc.get('method')!r} ranges, {config.method.value!r} asked"
        if doc.get("method") != config.method.value
        else "the calibration settings changed" if doc.get("settings") != _settings(config)
        else None
    )
    if stale:
        logger.warning("calibration cache %s is stale (%s): calibrating again", path, stale)
        return None
    try:
        return {n: TensorRange(n, float(r["min"]), float(r["max"]), int(r.get("nonfinite", 0)))
                for n, r in doc["ranges"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: calibration cache has a malformed range ({e})") from e



def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not an onnxopt calibration cache ({str(e).splitlines()[0][:200]})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not an onnxopt calibration cache (no \"format\": \"{FORMAT}\")")
    return doc


def _settings(config: CalibrationConfig) -> dict:
    """The settings the method's ranges depend on."""
    if config.method is CalibrationMethod.ENTROPY:
        return {"num_bins": config.num_bins, "num_quant_bins": config.num_quant_bins,
                "symmetric": config.symmetric}
    if config.method is CalibrationMethod.PERCENTILE:
        return {"num_bins": config.num_bins, "percentile": config.percentile}
    return {}
