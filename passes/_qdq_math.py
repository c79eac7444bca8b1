"""The arithmetic of int8 QDQ quantization: pure numpy, no graph.

Affine quantization maps a float x to q = clamp(round(x / s) + z, qmin, qmax) and back
to s * (q - z). For a calibrated range [lo, hi], widened to contain 0 so that 0 (padding,
Relu's floor) is exact:

    asymmetric   s = (hi - lo) / (qmax - qmin),  z = clamp(round(qmin - lo / s))
    symmetric    s = max(|lo|, |hi|) / 127,      z = 0           (TensorRT: int8 only)

A range [0, hi] gives z = qmin exactly (-128 for int8, 0 for uint8): that is what lets
onnxruntime drop a Relu (or Clip(0, c)) in front of the QuantizeLinear, since the
quantizer's own floor is then the activation's. For Clip the quantizer's top,
s * (qmax - z) computed in float32 as onnxruntime does, must also stay within c
(ClipQuantFusion's test in onnxruntime's source, to float32 epsilon), so s is nudged
down an ulp at a time; c / 255 alone can round up (c = 7.9813337).

Weights are symmetric int8 in [-127, 127], one scale per output channel:
s_c = max|W_c| / 127, so s_c * q reconstructs W within s_c / 2. The bias of Conv and
Gemm is int32 with scale s_x * s_c, computed in float32 (onnxruntime fuses the layer
only when the bias scale is exactly that product: 2 % off and the Conv stays float,
measured with 1.32) and zero point 0. A channel whose bias would overflow int32 gets a
larger weight scale, s_c >= |b_c| / (s_x * 2^30), the adjustment onnxruntime's own
quantizer makes. Scales are never below ``MIN_SCALE``: a constant or dead tensor
(range of width 0) would otherwise get s = 0 and divide by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SCALE = 1e-10
WEIGHT_QMAX = 127
INT32_MAX = 2**31 - 1
BIAS_QMAX = 2**30
F32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one per-tensor quantized activation."""

    scale: np.float32
    zero_point: int
    dtype: type  # np.int8 or np.uint8

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.scale, np.float32), np.array(self.zero_point, self.dtype)


def qrange(dtype: type) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def activation_qparams(lo: float, hi: float, dtype: type, *, symmetric: bool,
                       clip_max: float | None = None) -> QParams:
    """Quantization parameters for values in [lo, hi] (see the module docstring)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = qrange(dtype)
    if symmetric:
        s, zp = np.float32(max(max(-lo, hi) / qmax, MIN_SCALE)), 0
    else:
        s = np.float32(max((hi - lo) / (qmax - qmin), MIN_SCALE))
        zp = qmin if lo == 0 else int(np.clip(np.round(qmin - lo / float(s)), qmin, qmax))
    if clip_max is not None:
        top = np.float32(clip_max) + np.float32(F32_EPS)
        while s > MIN_SCALE and s * np.float32(qmax - zp) > top:
            s = np.nextafter(s, np.float32(0))
    return QParams(s, zp, dtype)


def channel_amax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per slice along ``axis`` (a scalar when axis is None)."""
    a = np.abs(w.astype(np.float64))
    if axis is None:
        return np.array(a.max() if a.size else 0.0)
    return a.max(axis=tuple(i for i in range(w.ndim) if i != axis), initial=0.0)


def weight_scale(w: np.ndarray, axis: int | None, min_scale: np.ndarray | float = 0.0) -> np.ndarray:
    """Symmetric int8 scale per channel (axis) or per tensor (None), float32, never below MIN_SCALE."""
    s = np.maximum(channel_amax(w, axis) / WEIGHT_QMAX, np.maximum(min_scale, MIN_SCALE))
    return s.astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 values of ``w`` for the given per-channel (axis) or per-tensor scale."""
    s = scale.astype(np.float64)
    if axis is not None:
        s = s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    return np.clip(np.round(w / s), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)


def weight_error(w: np.ndarray, axis: int | None) -> float:
    """Relative L2 error of ``w`` quantized with symmetric int8 scales along ``axis`` (None: one scale)."""
    s = weight_scale(w, axis)
    q = quantize_weight(w, s, axis).astype(np.float64)
    if axis is not None:
        s = s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(q * s - w)) / norm if norm else 0.0


def bias_min_weight_scale(bias: np.ndarray, x_scale: np.float32) -> np.ndarray:
    """The smallest weight scale per channel for which round(b / (s_x * s_w)) fits int32
    (within 2^30, a margin for the float32 rounding of the scales and for the accumulator)."""
    return np.abs(bias.astype(np.float64)) / (float(x_scale) * BIAS_QMAX)


def bias_scale(x_scale: np.float32, w_scale: np.ndarray) -> np.ndarray:
    """s_x * s_w in float32, as onnxruntime multiplies them."""
    return (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32)
