"""Factorize 2-D convolutions (group 1, constant float kernel) into thinner convolutions.

Three forms, derived in ``_conv_factors``:
- "spatial", for a KHxKW kernel other than 1x1: the SVD of the kernel reshaped to
  (C KH, N KW) gives a KHx1 convolution C -> r (vertical stride, dilation and pads;
  stride 1 horizontally, so it keeps the input's width) then a 1xKW convolution r -> N
  (the horizontal ones, and the bias). Weight-only: the SVD's rows are (channel, row)
  pairs, for which no input statistics are collected. Kx1 and 1xK kernels take the
  same path (one of the two convolutions is then 1x1).
- "svd", for a 1x1 kernel: the (C, N) matrix ``W[:, :, 0, 0].T`` factorized exactly as a
  MatMul weight, weighted by the input's channel second moment when ``moments`` has the
  input's name. The first 1x1 takes the stride and pads: padding is zeros and the first
  factor has no bias, so padded pixels get exactly the bias from the second, as before.
- "flattened" (``flattened=True``), for kernels with KH, KW > 1: 1x1 C -> r, KHx1 and
  1xKW depthwise, 1x1 r -> N, from a rank-r CP fit of the kernel (ALS, weight-only).
  It replaces the spatial form only where it does better. Ranks (explicit ``ranks`` or a
  ``ratio`` policy) are spatial ranks: the flattened form then gets the largest rank
  within the MACs of the spatial one and wins on lower error. Under an error target
  (``max_error``, or ``energy`` e read as the error sqrt(1 - e), its meaning for an SVD)
  it gets the smallest rank within the target and wins on fewer MACs. Kernels whose fit
  would cost more than ``FLATTENED_MAX_WORK`` are not tried.

``auto_pad`` SAME_UPPER / SAME_LOWER / VALID stays on the factors that carry the
strides: padding is computed per axis from (size, kernel, stride, dilation), which the
factor shares with the original along its axis, while along the other axis its kernel
and stride are 1, which pads nothing. So no input shape is needed.

MACs are per output pixel, for decisions and ``layers``: N C KH KW before; for the
spatial form ``r C KH Win/Wout + r N KW`` (the first convolution runs at the input's
width), for the flattened form ``r C (Hin Win)/(Hout Wout) + r KH Win/Wout + r KW + r N``.
The ratios are exact when the input's spatial shape is known (declared, or from shape
inference), else approximated by the strides; fractional MACs round up.

A layer is factorized only when the policy's ``min_saving`` holds; otherwise it is left
alone and listed in ``skipped`` with its numbers. Refused in ``skipped``: a kernel shared
with other nodes. Silently left alone: grouped and depthwise convolutions, 1-D and 3-D
convolutions, non-constant or non-float kernels, factors (``factorize_matmul.MARK``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import Names, const_value, finish, is_standard, optional_input
from onnxopt.lowrank import LayerFactorization, RankPolicy, Spectrum, max_rank_within, spectrum
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes import _conv_factors as cf
from onnxopt.passes._shape_inference import dims_of, infer
from onnxopt.passes.factorize_matmul import MARK, label

logger = logging.getLogger(__name__)

# Flattened fits are tried only when kernel elements x rank stays under this: an ALS sweep
# costs about 8 times that many flops, a fit up to ALS_ITERATIONS sweeps, and an error
# target a bisection of fits. 1e7 covers 3x3 convolutions up to about 64 -> 64 channels.
FLATTENED_MAX_WORK = 1e7
DEFAULT_POLICY = RankPolicy(energy=0.99)  # as factorize_matmul's


@dataclass(frozen=True)
class ConvSite:
    """A Conv the pass can factorize, with its geometry."""

    node: gs.Node
    weight: np.ndarray  # (N, C, KH, KW) float64
    width_ratio: float  # input width / output width (the stride when unknown)
    area_ratio: float  # input pixels / output pixels (the strides' product when unknown)

    @property
    def label(self) -> str:
        return label(self.node)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(d) for d in self.weight.shape)

    @property
    def form(self) -> str:
        return "svd" if self.shape[2:] == (1, 1) else "spatial"

    @property
    def full_macs(self) -> int:
        return math.prod(self.shape)

    def macs(self, rank: int) -> int:
        n, c, kh, kw = self.shape
        if self.form == "svd":
            return rank * (c + n)
        return _ceil(rank * c * kh * self.width_ratio) + rank * n * kw

    def flat_macs(self, rank: int) -> int:
        n, c, kh, kw = self.shape
        return _ceil(rank * (c * self.area_ratio + kh * self.width_ratio)) + rank * (kw + n)

    def params(self, form: str, rank: int) -> int:
        n, c, kh, kw = self.shape
        return rank * {"svd": c + n, "spatial": c * kh + n * kw, "flattened": c + kh + kw + n}[form]

    def matrix(self) -> np.ndarray:
        """The 2-D weight the SVD forms factorize."""
        return self.weight[:, :, 0, 0].T if self.form == "svd" else cf.spatial_matrix(self.weight)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def geometry(node: gs.Node) -> tuple[list[int], list[int], list[int], str]:
    """strides, dilations, pads [top, left, bottom, right], auto_pad of a 2-D Conv."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return (list(node.attrs.get("strides", [1, 1])), list(node.attrs.get("dilations", [1, 1])),
            list(node.attrs.get("pads", [0, 0, 0, 0])), auto_pad)


def _out_size(size: int, k: int, s: int, d: int, pad: int, auto_pad: str) -> int:
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // s)
    return (size + (0 if auto_pad == "VALID" else pad) - (k - 1) * d - 1) // s + 1


def _ratios(node: gs.Node, kernel: tuple[int, int], hw: tuple | None) -> tuple[float, float]:
    strides, dil, pads, auto_pad = geometry(node)
    if hw is not None and all(isinstance(d, int) and d > 0 for d in hw):
        out = [_out_size(hw[i], kernel[i], strides[i], dil[i], pads[i] + pads[i + 2], auto_pad) for i in (0, 1)]
        if min(out) > 0:
            return hw[1] / out[1], hw[0] * hw[1] / (out[0] * out[1])
    return float(strides[1]), float(strides[0] * strides[1])


def find_sites(graph: gs.Graph) -> tuple[list[ConvSite], list[Skip]]:
    """Every Conv the pass could factorize, and those refused for a stated reason."""
    found, skipped = [], []
    for node in graph.nodes:
        if node.op != "Conv" or not is_standard(node) or MARK in node.name or len(node.inputs) < 2:
            continue
        w = const_value(node.inputs[1])
        if (w is None or w.ndim != 4 or not np.issubdtype(w.dtype, np.floating)
                or node.attrs.get("group", 1) != 1 or const_value(node.inputs[0]) is not None):
            continue
        if len(node.inputs[1].outputs) > 1:
            others = len(node.inputs[1].outputs) - 1
            reason = f"weight shared with {others} other nodes: factorizing saves nothing"
            skipped.append(Skip(label(node), node.op, reason))
            continue
        found.append((node, w.astype(np.float64)))
    infos = None
    sites = []
    for node, w in found:
        hw = _static_hw(node.inputs[0].shape)
        if hw is None and w.shape[2:] != (1, 1):
            infos = infer(graph) if infos is None else infos
            hw = _static_hw(dims_of(node.inputs[0], infos))
        sites.append(ConvSite(node, w, *_ratios(node, w.shape[2:], hw)))
    return sites, skipped


def _static_hw(shape) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])


class FactorizeConvPass(GraphPass):
    name = "factorize_conv"
    lossless = False

    def __init__(self, policy: RankPolicy = DEFAULT_POLICY, ranks: Mapping[str, int] | None = None,
                 moments: Mapping[str, np.ndarray] | None = None, spectra: Mapping[str, Spectrum] | None = None,
                 flattened: bool = False):
        self.policy = policy
        self.ranks = dict(ranks or {})
        self.moments = dict(moments or {})  # input tensor name -> E[x^T x] over channels (C, C)
        self.spectra = dict(spectra or {})  # node label -> precomputed spectrum
        self.flattened = flattened
        self.layers: list[LayerFactorization] = []  # every decision of the last call

    def spectrum(self, site: ConvSite) -> Spectrum:
        if site.label not in self.spectra:
            moment = self.moments.get(site.node.inputs[0].name) if site.form == "svd" else None
            self.spectra[site.label] = spectrum(site.matrix(), moment)
        return self.spectra[site.label]

    def call(self, graph: gs.Graph) -> PassResult:
        sites, skipped = find_sites(graph)
        self.layers = []
        names = Names(graph)
        for site in sites:
            if self.ranks and site.label not in self.ranks:
                continue
            layer, weights = self._plan(site)
            self.layers.append(layer)
            if layer.applied:
                _rewrite(graph, site, layer.form, weights(), names)
            else:
                skipped.append(Skip(site.label, site.node.op, layer.reason))
        done = sum(layer.applied for layer in self.layers)
        if done:
            finish(graph)
        return PassResult(graph, bool(done), {"factorize_conv": done} if done else {}, tuple(skipped))

    def _plan(self, site: ConvSite):
        """The decision for one layer and a function building its factor weights."""
        spec = self.spectrum(site)
        rank = min(self.ranks.get(site.label) or self.policy.rank(spec, site.macs, site.full_macs), spec.full_rank)
        layer = self._decision(site, site.form, rank, spec.full_rank, site.macs, spec.errors()[rank], spec.weighted)
        matrix_layer = (layer, lambda: _svd_weights(site, spec, rank))
        n, c, kh, kw = site.shape
        if not self.flattened or kh == 1 or kw == 1:
            return matrix_layer
        target = None if site.label in self.ranks else _error_target(self.policy)
        flat = self._flattened(site, site.macs(rank), target)
        if flat is None or not flat[0].applied:
            return matrix_layer
        if not layer.applied:
            return flat
        # Same MAC budget: the lower error wins; same error target: the fewer MACs.
        key = (lambda p: p[0].error) if target is None else (lambda p: p[0].macs_after)
        return min([flat, matrix_layer], key=key)

    def _flattened(self, site: ConvSite, budget: int, target: float | None):
        """The flattened form within ``budget`` MACs, or at the smallest rank within the error
        ``target`` (searched up to the largest rank that saves MACs); None if not tried."""
        full = cf.cp_full_rank(site.shape)
        limit = budget if target is None else (1 - self.policy.min_saving) * site.full_macs
        rank = max_rank_within(site.flat_macs, limit, full)
        if site.full_macs * rank > FLATTENED_MAX_WORK:
            logger.debug("%s: a rank-%d flattened fit costs too much, not tried", site.label, rank)
            return None
        rank, (factors, error) = (rank, cf.cp_als(site.weight, rank)) if target is None else \
            _smallest_rank(site.weight, target, rank)
        layer = self._decision(site, "flattened", rank, full, site.flat_macs, error, False)
        if target is not None and error > target and layer.applied:
            _refuse(layer, f"flattened rank {rank}, the largest that saves MACs, has error {error:.3g} > {target:.3g}")
        return layer, lambda: cf.flattened_weights(factors)

    def _decision(self, site: ConvSite, form: str, rank: int, full_rank: int, macs, error: float,
                  weighted: bool) -> LayerFactorization:
        params = math.prod(site.shape)
        layer = LayerFactorization(
            node=site.label, op=site.node.op, form=form, shape=site.shape, rank=rank, full_rank=full_rank,
            macs_before=site.full_macs, macs_after=macs(rank), params_before=params,
            params_after=site.params(form, rank), error=float(error), weighted=weighted,
        )
        if not self.policy.saves(layer.macs_after, layer.macs_before):
            _refuse(layer, f"{form} rank {rank} of {full_rank} keeps {layer.macs_after / layer.macs_before:.0%} of "
                           f"the MACs; factorizing needs at most {1 - self.policy.min_saving:.0%}")
        return layer


def _error_target(policy: RankPolicy) -> float | None:
    if policy.max_error is not None:
        return policy.max_error
    return math.sqrt(1 - policy.energy) if policy.energy is not None else None


def _refuse(layer: LayerFactorization, reason: str) -> None:
    layer.applied, layer.reason = False, reason
    layer.macs_after, layer.params_after = layer.macs_before, layer.params_before


def _smallest_rank(w: np.ndarray, target: float, limit: int):
    """The smallest rank up to ``limit`` whose CP fit is within ``target`` (else ``limit``),
    by bisection: ALS errors fall with the rank, though not strictly (local optima)."""
    best = (limit, cf.cp_als(w, limit))
    if best[1][1] > target:
        return best
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        fit = cf.cp_als(w, mid)
        if fit[1] <= target:
            hi, best = mid, (mid, fit)
        else:
            lo = mid + 1
    return best


def _svd_weights(site: ConvSite, spec: Spectrum, rank: int) -> tuple[np.ndarray, ...]:
    a, b = spec.factors(rank)
    return cf.pointwise_weights(a, b) if site.form == "svd" else cf.spatial_weights(a, b, site.shape)


def _pad_attrs(auto_pad: str, pads: list[int]) -> dict:
    return {"auto_pad": auto_pad} if auto_pad != "NOTSET" else {"pads": pads}


def _factor_attrs(node: gs.Node, form: str, kernel: tuple[int, int], rank: int) -> list[dict]:
    """Attributes of each factor convolution, in order (see the module docstring)."""
    (sh, sw), (dh, dw), (top, left, bottom, right), auto_pad = geometry(node)
    kh, kw = kernel
    one = {"kernel_shape": [1, 1]}
    vertical = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1],
                **_pad_attrs(auto_pad, [top, 0, bottom, 0])}
    horizontal = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw],
                  **_pad_attrs(auto_pad, [0, left, 0, right])}
    if form == "svd":
        return [{**one, "strides": [sh, sw], "dilations": [dh, dw], **_pad_attrs(auto_pad, [top, left, bottom, right])},
                one]
    if form == "spatial":
        return [vertical, horizontal]
    return [one, {**vertical, "group": rank}, {**horizontal, "group": rank}, one]


def _rewrite(graph: gs.Graph, site: ConvSite, form: str, weights: tuple[np.ndarray, ...], names: Names) -> None:
    node, base = site.node, site.label
    dtype = const_value(node.inputs[1]).dtype
    attrs = _factor_attrs(node, form, site.shape[2:], weights[0].shape[0])
    suffixes = "ab" if len(weights) == 2 else "avhb"
    bias = optional_input(node, 2)
    current, new = node.inputs[0], []
    for i, (suffix, w, a) in enumerate(zip(suffixes, weights, attrs)):
        last = i == len(weights) - 1
        mid = None if last else gs.Variable(names(f"{base}{MARK}{suffix}_out"), dtype=node.outputs[0].dtype)
        outputs = list(node.outputs) if last else [mid]
        inputs = [current, gs.Constant(names(f"{base}{MARK}{suffix}_weight"), w.astype(dtype))]
        if last and bias is not None:
            inputs.append(bias)
        new.append(gs.Node("Conv", names(f"{base}{MARK}{suffix}"), attrs=a, inputs=inputs, outputs=outputs))
        current = outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(new)
