"""Graph passes, one module each; the module stem is the pass name used everywhere."""

from onnxopt.pass_base import GraphPass
from onnxopt.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from onnxopt.passes.eliminate_noops import EliminateNoopsPass
from onnxopt.passes.fold_affine_into_conv import FoldAffineIntoConvPass
from onnxopt.passes.fold_bn_into_conv import FoldBnIntoConvPass
from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.fuse_conv_activation import FuseConvActivationPass
from onnxopt.passes.fuse_gelu import FuseGeluPass
from onnxopt.passes.fuse_layer_norm import FuseLayerNormPass
from onnxopt.passes.fuse_skip_layer_norm import FuseSkipLayerNormPass
from onnxopt.passes.hoist_split_elementwise import HoistSplitElementwisePass
from onnxopt.passes.merge_parallel import MergeParallelPass
from onnxopt.passes.remove_dead_outputs import RemoveDeadOutputsPass
from onnxopt.passes.remove_split_concat import RemoveSplitConcatPass
from onnxopt.passes.simplify_reshape import SimplifyReshapePass

ALL_PASSES: tuple[type[GraphPass], ...] = (
    FoldConstantsPass,
    EliminateCommonSubexpressionsPass,
    EliminateNoopsPass,
    RemoveDeadOutputsPass,
    SimplifyReshapePass,
    FoldBnIntoConvPass,
    FoldAffineIntoConvPass,
    MergeParallelPass,
    HoistSplitElementwisePass,
    RemoveSplitConcatPass,
    FuseLayerNormPass,
    FuseGeluPass,
    FuseConvActivationPass,
    FuseSkipLayerNormPass,
)

PASSES: dict[str, type[GraphPass]] = {p.name: p for p in ALL_PASSES}
