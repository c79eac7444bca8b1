"""Second moments ``E[x^T x]`` of layer inputs over calibration data, in bounded memory.

Low-rank factorization weighted by the data (``onnxopt.lowrank``) needs, for each layer
input x, the (K, K) matrix of its features' second moments, K being the features a
weight contracts: the last axis for MatMul/Gemm, the channel axis 1 for a 1x1 Conv
(NCHW). Every other axis (batch, tokens, pixels) contributes rows. The model runs in
onnxruntime with those tensors exposed as outputs, batch by batch (the same session
and batching as ``collect``); each batch adds ``rows^T rows`` (float32 products,
float64 sums) and is dropped, so memory is K^2 per tensor, whatever the sample count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm import tqdm

from onnxopt.calibration.collect import Feeds, _total, activations
from onnxopt.config import CalibrationConfig
from onnxopt.errors import DataError, UserError

logger = logging.getLogger(__name__)


@dataclass
class Moment:
    """The running sum of ``rows^T rows`` of one tensor."""

    name: str
    axis: int  # the feature axis
    total: np.ndarray | None = None  # (K, K) float64
    rows: int = 0
    samples: int = 0

    def update(self, x: np.ndarray, samples: int) -> None:
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"tensor {self.name!r} is {x.dtype}; only float layer inputs are measured")
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float32, copy=False)
        if self.total is not None and self.total.shape[0] != rows.shape[1]:
            raise DataError(f"tensor {self.name!r} changed feature size {self.total.shape[0]} -> {rows.shape[1]}")
        gram = (rows.T @ rows).astype(np.float64)
        self.total = gram if self.total is None else self.total + gram
        self.rows += rows.shape[0]
        self.samples += samples

    def __add__(self, other: Moment) -> Moment:
        """The moment over both sets of rows."""
        total = other.total if self.total is None else self.total if other.total is None else self.total + other.total
        return Moment(self.name, self.axis, total, self.rows + other.rows, self.samples + other.samples)

    @property
    def matrix(self) -> np.ndarray:
        """E[x^T x] over every row seen."""
        return self.total / max(self.rows, 1)

    @property
    def rows_per_sample(self) -> float:
        return self.rows / max(self.samples, 1)


def second_moments(
    model: onnx.ModelProto,
    data: Iterable[Feeds],
    tensors: Mapping[str, int],
    config: CalibrationConfig = CalibrationConfig(),
    *,
    progress: bool = False,
) -> dict[str, Moment]:
    """``Moment`` of each tensor in ``tensors`` (name -> feature axis) over ``data``."""
    moments = {t: Moment(t, axis) for t, axis in tensors.items()}
    seen, start = 0, time.perf_counter()
    with tqdm(total=_total(data, config.max_samples), unit="sample", desc="measuring layer inputs",
              disable=not progress) as bar:
        for values, n in activations(model, data, list(tensors), config):
            for name, value in values.items():
                moments[name].update(value, n)
            del values
            seen += n
            bar.update(n)
    if not seen:
        raise DataError("no calibration samples")
    logger.info("layer inputs: %d samples, %d tensors, %.2f s", seen, len(tensors), time.perf_counter() - start)
    return moments
