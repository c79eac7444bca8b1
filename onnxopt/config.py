"""Typed, frozen options. Every default lives here and nowhere else."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Target(enum.Enum):
    """Which runtime the output is meant for."""

    STANDARD = "standard"  # standard ONNX operators only: loads in any runtime
    ONNXRUNTIME = "onnxruntime"  # may use com.microsoft contrib ops onnxruntime runs (FusedConv)


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
