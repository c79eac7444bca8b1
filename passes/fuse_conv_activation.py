"""Fuse Conv + activation into onnxruntime's com.microsoft FusedConv (``--target onnxruntime`` only).

FusedConv is Conv with the activation applied in the same kernel, on the output
still in cache: ``FusedConv(x, W, B; activation, activation_params) = act(Conv(x, W, B))``.
It is an onnxruntime contrib op, so the pass does nothing unless the config's target
is ``Target.ONNXRUNTIME``: the portable standard-ONNX output keeps Conv and the
activation apart.

The activations are those the CPU kernel (contrib_ops/cpu/fused_activation.cc) has
parameters for, with the parameters it expects:

    Relu, Tanh, Sigmoid            no activation_params
    LeakyRelu                      [alpha]            (default 0.01)
    HardSigmoid                    [alpha, beta]      (defaults 0.2, 0.5)
    Clip                           [min, max]         attributes before opset 11,
                                                      constant scalar inputs from 11 on

An absent Clip bound is the float32 lowest/max, as in the ONNX spec and in
onnxruntime's own ConvActivationFusion. onnxruntime 1.32 also accepts HardSwish, but
only recent releases do (2026) and a model made for an edge device must load in the
onnxruntime it ships with, so HardSwish is left out; Silu is no ONNX op. The kernel is
registered for float32 only in older releases (float16 is recent), so only float32
Conv is fused. 1-D, 2-D and 3-D convolutions (and any group) run in the same kernel
as Conv and were checked numerically against Conv + activation.

Refused, with the reason in ``skipped``: a Conv output read by anything else or
being a graph output, a Conv that is not known to be float32, a Clip whose bounds are
not constants or whose min exceeds max. The activation's output keeps its name.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.config import OptimizeConfig, Target
from onnxopt.graph_utils import (
    const_value,
    finish,
    is_graph_input,
    is_standard,
    only_consumer,
    opset,
    optional_input,
    producer,
)
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Clip")
FLOAT_LOWEST = float(np.finfo(np.float32).min)
FLOAT_MAX = float(np.finfo(np.float32).max)


def clip_bounds(graph: gs.Graph, clip: gs.Node) -> list[float] | str:
    """[min, max] of a Clip, from attributes (opset < 11) or constant inputs (11+)."""
    if opset(graph) < 11:
        lo, hi = float(clip.attrs.get("min", FLOAT_LOWEST)), float(clip.attrs.get("max", FLOAT_MAX))
    else:
        bounds = []
        for i, default in ((1, FLOAT_LOWEST), (2, FLOAT_MAX)):
            t = optional_input(clip, i)
            v = None if t is None else const_value(t)
            if t is not None and (v is None or v.size != 1 or is_graph_input(graph, t)):
                return "Clip min/max is not a constant scalar"
            bounds.append(default if v is None else float(v.reshape(-1)[0]))
        lo, hi = bounds
    if lo > hi:
        return f"Clip min {lo} > max {hi}"
    return [lo, hi]


def activation_params(graph: gs.Graph, act: gs.Node) -> list[float] | str:
    """The FusedConv activation_params for ``act`` (empty for none), or why not."""
    if act.op == "LeakyRelu":
        return [float(act.attrs.get("alpha", 0.01))]
    if act.op == "HardSigmoid":
        return [float(act.attrs.get("alpha", 0.2)), float(act.attrs.get("beta", 0.5))]
    if act.op == "Clip":
        return clip_bounds(graph, act)
    return []


def conv_dtype(conv: gs.Node) -> np.dtype | None:
    """The element type of a Conv, from its weight value or any typed input/output."""
    for t in (conv.inputs[1] if len(conv.inputs) > 1 else None, conv.inputs[0], conv.outputs[0]):
        v = const_value(t)
        if v is not None:
            return v.dtype
        if t is not None and t.dtype is not None:
            return np.dtype(t.dtype)
    return None


def with_ms_opset(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """The graph's opset imports with com.microsoft (version 1) added when missing.

    A new list: ``gs.Graph.copy`` shares this list between copies.
    """
    domains = list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)])
    if not any(d.domain == MS_DOMAIN for d in domains):
        domains.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return domains


class FuseConvActivationPass(GraphPass):
    """Conv + Relu/Tanh/Sigmoid/LeakyRelu/HardSigmoid/Clip -> com.microsoft FusedConv.

    Only with ``target=Target.ONNXRUNTIME``; with the default standard target the pass
    changes nothing. Any group, 1-D to 3-D, with or without bias, float32 only.
    """

    name = "fuse_conv_activation"

    def __init__(self, target: Target = OptimizeConfig.target):
        self.target = target

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> FuseConvActivationPass:
        return cls(target=config.target)

    def call(self, graph: gs.Graph) -> PassResult:
        if self.target is not Target.ONNXRUNTIME:
            return PassResult(graph, False)
        stats: dict[str, int] = {}
        skipped = []
        for act in list(graph.nodes):
            if act.op not in ACTIVATIONS or not is_standard(act) or not act.inputs:
                continue
            reason = self._fuse(graph, act)
            if reason is True:
                key = f"fuse_conv_{act.op.lower()}"
                stats[key] = stats.get(key, 0) + 1
            elif reason:
                logger.debug("not fusing %s: %s", act.name, reason)
                skipped.append(Skip(act.name, act.op, reason))
        if stats:
            graph.import_domains = with_ms_opset(graph)
            finish(graph)
        return PassResult(graph, bool(stats), stats, tuple(skipped))

    @staticmethod
    def _fuse(graph: gs.Graph, act: gs.Node) -> bool | str | None:
        """True when fused, a reason when refused, None when there is no Conv before ``act``."""
        x = act.inputs[0]
        conv = producer(x)
        if conv is None or conv.op != "Conv" or not is_standard(conv) or len(conv.inputs) < 2:
            return None
        if not only_consumer(graph, x, act):
            return "Conv output is also read elsewhere or is a graph output"
        dtype = conv_dtype(conv)
        if dtype != np.float32:
            return f"FusedConv is float32 only; this Conv is {'of unknown type' if dtype is None else dtype}"
        params = activation_params(graph, act)
        if isinstance(params, str):
            return params
        attrs = {**conv.attrs, "activation": act.op}
        if params:
            attrs["activation_params"] = params
        out = act.outputs[0]
        act.inputs.clear()
        act.outputs.clear()
        conv.op, conv.domain, conv.attrs = "FusedConv", MS_DOMAIN, attrs
        conv.outputs[0] = out
        return True
