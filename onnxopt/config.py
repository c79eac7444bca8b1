"""Typed, frozen options. Every default lives here and nowhere else."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from onnxopt.errors import UserError


class Target(enum.Enum):
    """Which runtime the output is meant for."""

    STANDARD = "standard"  # standard ONNX operators only: loads in any runtime
    ONNXRUNTIME = "onnxruntime"  # may use com.microsoft contrib ops onnxruntime runs (FusedConv)
    TENSORRT = "tensorrt"  # standard ops; int8 is symmetric with zero points 0, as TensorRT requires


@dataclass(frozen=True)
class OptimizeConfig:
    target: Target = Target.STANDARD
    # Keep only these graph outputs (by name) and prune what that leaves dead; None keeps all.
    outputs: tuple[str, ...] | None = None
    # Lossless passes are repeated until none changes the graph, at most this many rounds.
    max_steps: int = 10
    # Constant folding never creates a tensor larger than this many bytes unless it is no
    # larger than the constant inputs it replaces (so folding never grows the file much).
    fold_size_limit: int = 1 << 16
    # Convert the model to this default-domain opset before the passes (None: keep its opset).
    # Opt-in: newer opsets unlock fusions (LayerNormalization needs 17) but not every runtime has them.
    opset: int | None = None


# ---- int8: calibration ----


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
    # Entropy on |x| with one threshold (TensorRT's symmetric int8); otherwise each side of
    # an asymmetric activation gets its own threshold.
    symmetric: bool = False

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


# ---- int8: QDQ quantization ----


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


# ---- low-rank factorization ----


@dataclass(frozen=True)
class FactorizeConfig:
    """How ``--factorize`` picks ranks. With a lossy budget and calibration data, ranks are
    allocated across layers by measured sensitivity (the rules below are then not used).
    Otherwise one rule applies to every layer: ``rank_energy``, ``rank_ratio``, else
    ``max_error`` (relative output error on the calibration data; weight error without)."""

    max_error: float = 0.05
    rank_energy: float | None = None
    rank_ratio: float | None = None
    min_saving: float = 0.2  # factorize only layers keeping at most 1 - min_saving of their MACs
    convs: bool = True  # factorize convolutions too (KxK spatially, 1x1 by SVD)
    flattened: bool = False  # KxK as 1x1 + Kx1 + 1xK depthwise where that applies
    # The budget checked on the calibration data is this much stricter than the user's
    # (cosine >= 1 - margin (1 - C)), so that it holds on held-out data too.
    margin: float = 0.8

    def __post_init__(self):
        for name in ("max_error", "rank_energy", "rank_ratio", "min_saving", "margin"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                raise UserError(f"{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if self.rank_energy is not None and self.rank_ratio is not None:
            raise UserError("give one of --rank-energy and --rank-ratio")
