"""Named pass pipelines (the -O levels) and resolution of --passes / --skip.

    O0  load and save only: no pass runs
    O1  lossless (the default): folding, cleanup, fusion and horizontal merging,
        repeated to a fixed point; outputs stay equal to float tolerance

Registered but not in a preset (run with --passes): fuse_skip_layer_norm, because
onnxruntime 1.32's CPU SkipLayerNormalization kernel is slower than the
LayerNormalization and Adds it replaces (useful for GPU providers).
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxopt.config import OptimizeConfig
from onnxopt.errors import UserError
from onnxopt.pass_base import GraphPass

# Order matters within a round: folding exposes constants to the fusions, fusion runs
# before merging (a BN after each branch is then inside the conv), and activation fusion
# comes last because a FusedConv no longer merges with its siblings.
PRESETS: dict[str, tuple[str, ...]] = {
    "O0": (),
    "O1": (
        "fold_constants",
        "eliminate_common_subexpressions",
        "eliminate_noops",
        "remove_dead_outputs",
        "simplify_reshape",
        "fold_bn_into_conv",
        "fold_affine_into_conv",
        "merge_parallel",
        "hoist_split_elementwise",
        "remove_split_concat",
        "fuse_layer_norm",
        "fuse_gelu",
        "fuse_conv_activation",
    ),
}


def pass_names(preset: str = "O1", passes: Sequence[str] | None = None, skip: Sequence[str] = ()) -> list[str]:
    """The pass names to run: an explicit list, or a preset less ``skip``; all checked."""
    from onnxopt.passes import PASSES

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    names = list(passes) if passes is not None else list(PRESETS[preset])
    for name in [*names, *skip]:
        if name not in PASSES:
            raise UserError(f"unknown pass {name!r}; choose from {', '.join(sorted(PASSES))}")
    return [n for n in names if n not in set(skip)]


def build(names: Sequence[str], config: OptimizeConfig) -> list[GraphPass]:
    from onnxopt.passes import PASSES

    return [PASSES[n].from_config(config) for n in names]
