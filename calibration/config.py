"""Calibration options.

TEMPORARY HOME: the int8 contract puts ``CalibrationMethod`` and ``CalibrationConfig``
in onnxopt/config.py. When they move there, this module becomes
``from onnxopt.config import CalibrationConfig, CalibrationMethod``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from onnxopt.errors import UserError


class CalibrationMethod(enum.Enum):
    ENTROPY = "entropy"  # TensorRT KL-divergence threshold on the histogram of |x|
    MINMAX = "minmax"  # observed min and max
    PERCENTILE = "percentile"  # the given percentile of |x|


@dataclass(frozen=True)
class CalibrationConfig:
    method: CalibrationMethod = CalibrationMethod.ENTROPY
    num_bins: int = 2048  # histogram of |x|
    num_quant_bins: int = 128  # KL: candidate quantized levels (int8 -> 128)
    percentile: float = 99.99
    batch_size: int = 16  # samples per onnxruntime run
    max_samples: int | None = None

    def __post_init__(self):
        if not isinstance(self.method, CalibrationMethod):
            raise UserError(f"calibration method {self.method!r} is not one of {[m.value for m in CalibrationMethod]}")
        if self.num_quant_bins < 1 or self.num_bins < self.num_quant_bins:
            raise UserError(f"need 1 <= num_quant_bins ({self.num_quant_bins}) <= num_bins ({self.num_bins})")
        if not 0 < self.percentile <= 100:
            raise UserError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise UserError(f"calibration batch size must be at least 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"calibration samples must be at least 1, got {self.max_samples}")
