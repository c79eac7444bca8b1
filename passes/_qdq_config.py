"""Options of int8 quantization. TEMPORARY HOME.

The int8 contract of issue 3 puts these in ``onnxopt/config.py``; when they move there,
this module becomes ``from onnxopt.config import ActivationType, QuantConfig, QuantTarget``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ActivationType(enum.Enum):
    INT8 = "int8"
    UINT8 = "uint8"


class QuantTarget(enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"  # everything symmetric, zero points 0


@dataclass(frozen=True)
class QuantConfig:
    activation_type: ActivationType = ActivationType.INT8
    target: QuantTarget = QuantTarget.ONNXRUNTIME
    per_channel: bool = True
    exclude: tuple[str, ...] = ()  # node names or op types kept in float
