"""Input-channel scales for weight sharing: quantize where the layer's inputs make errors cost.

What a weight error costs is the error of the layer's output, ``||X dW||``. With independent
errors of the weights, ``E||x dW||^2 = sum_k a_k sum_j dW_kj^2``, ``a_k = E[x_k^2]`` the second
moment of input feature ``k``: an error in a row whose input is large costs more. An
entropy-coded uniform grid of step ``D_k`` on row ``k`` costs ``D_k^2 / 12`` per weight in error
and ``h - log2 D_k`` bits; the bits for a given output error are fewest for ``D_k ~ 1/sqrt(a_k)``
(reverse water-filling), saving ``0.5 log2(mean a / geomean a)`` bits per weight. BERT-like
encoders have a few outlier features (``a_k`` 50-130x the mean), which makes that 0.3-0.8 bits.

So a weight ``w`` is shared as ``v = w / r`` with one float32 multiplier ``r_k`` per input
feature, on a uniform grid through zero (``pack``), and rebuilt as ``centroid * r_k``
(float32). The multipliers are ``r_k = (a_k / g)^(-ALPHA / 2)``, ``g`` the geometric mean of
``a`` (so the grid keeps the weights' scale), ``a_k`` floored at ``FLOOR`` times the mean (a
dead input gets a coarse grid, not an infinite multiplier). ``ALPHA`` = 0.5, not the 1 of the
derivation: on all-MiniLM-L6-v2, bits for the same output error (measured with the full
second-moment matrix, Huffman-coded) fall by 0.38 bits per weight at 0.5, 0.40 at 0.75 and
0.36 at 1 (the derivation ignores correlated inputs and the low-rate rows); 0.5 leans least
on the calibration samples. The grid goes through zero: a grid from the smallest to the
largest value puts the near-zero weights of a row with a small multiplier all on one level
off zero, an error the same for the whole row that adds up over rows with a non-zero mean
input (GELU outputs: output error 15x the weights').

Which axis: MatMul B (..., K, N) rows (-2); Gemm B axis 0, or 1 with transB; Conv
(M, C, kh, kw) axis 1 (input channel, group 1) or, depthwise (C/group = 1), axis 0 with the
input channel of each output channel. A weight with several consumers, or another layout,
gets no scales (nor do Gather tables: their "inputs" are one-hot rows; a data-free weighting of
BERT's word embeddings by the LayerNorm after them would save ~0.05 bits per weight, less
than the 4 bytes per row its float32 multipliers cost). The input has the weight's float type
(the operators' type constraint). Moments are the mean of ``x_k^2`` over every sample and
position, one float64 vector per input, from calibration's runs of the model (``collect.activations``).

With ``feedback``, the weights of ``feedback_sites`` (matrices: 2-D MatMul/Gemm weights, 1x1
convolutions) also get the whole matrix ``E[x^T x]`` (``Scale.moment``, K^2 float64 per input,
summed batch by batch as ``calibration.moments`` does), and their levels are then chosen with
error feedback (``packing.feedback``) instead of rounded one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxopt.calibration.collect import activations
from onnxopt.calibration.moments import Moment
from onnxopt.config import CalibrationConfig
from onnxopt.packing import feedback
from onnxopt.packing.policy import FLOAT_TYPES

logger = logging.getLogger(__name__)

ALPHA = 0.5
FLOOR = 1e-4
MAX_FEEDBACK_FEATURES = 4096  # a (K, K) float64 moment per input: 128 MB at this K


@dataclass(frozen=True)
class Site:
    """Where a weight's input features lie: ``tensor``'s axis ``input_axis`` feeds the weight's ``axis``."""

    weight: str
    tensor: str
    input_axis: int
    axis: int
    repeat: int = 0  # depthwise (channel multiplier): output channel m reads input channel m // repeat


@dataclass(frozen=True)
class Scale:
    """float32 multipliers ``r`` along ``axis`` of a weight: the weight is shared as ``w / r``."""

    axis: int
    multipliers: np.ndarray
    moment: np.ndarray | None = None  # (K, K) E[x^T x] of the inputs along ``axis``: levels with error feedback


def find_sites(model: onnx.ModelProto) -> dict[str, Site]:
    """The weights whose only consumer is a MatMul, Gemm or Conv reading a float input (module docstring)."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    sites = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in ranks or uses.get(w) != 1 or x in ranks or ranks[w] < 2:
            continue
        site = _site(node, x, w, dims[w])
        if site is not None:
            sites[w] = site
    return sites


def _site(node: onnx.NodeProto, x: str, w: str, dims: tuple[int, ...]) -> Site | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return Site(w, x, -1, len(dims) - 2)
    if node.op_type == "Gemm" and len(dims) == 2 and not attrs.get("transA", 0):
        return Site(w, x, -1, 1 if attrs.get("transB", 0) else 0)
    if node.op_type == "Conv" and len(dims) >= 3:
        group = attrs.get("group", 1)
        if group == 1:
            return Site(w, x, 1, 1)
        if dims[1] == 1 and dims[0] % group == 0:
            return Site(w, x, 1, 0, dims[0] // group)
    return None


def input_moments(model: onnx.ModelProto, feeds: Sequence[dict], tensors: Sequence[tuple[str, int]],
                  full: Collection[tuple[str, int]] = ()) -> dict[str, np.ndarray]:
    """``E[x_k^2]`` along each (tensor, axis), over every sample and position of ``feeds``, keyed
    ``tensor@axis``; for the pairs in ``full``, the whole matrix ``E[x^T x]`` instead. The
    activations come from calibration's runs (batched, the tensors exposed without a model copy)."""
    names = list(dict.fromkeys(t for t, _ in tensors))
    sums: dict[tuple[str, int], np.ndarray] = {}
    rows: dict[tuple[str, int], int] = {}
    grams = {key: Moment(key[0], key[1]) for key in full}
    for values, _ in activations(model, feeds, names, CalibrationConfig()):
        for name, axis in tensors:
            key = (name, axis)
            if key in grams:
                grams[key].update(np.asarray(values[name]), 1)
                continue
            x = np.moveaxis(np.asarray(values[name], np.float64), axis, -1)
            sums[key] = sums.get(key, 0.0) + np.square(x).reshape(-1, x.shape[-1]).sum(axis=0)
            rows[key] = rows.get(key, 0) + x.size // max(x.shape[-1], 1)
    out = {f"{n}@{a}": sums[n, a] / max(rows[n, a], 1) for n, a in sums}
    return out | {f"{n}@{a}": m.matrix for (n, a), m in grams.items() if m.total is not None}


def feedback_sites(model: onnx.ModelProto, names: Collection[str] | None = None) -> dict[str, Site]:
    """The sites whose weights get levels with error feedback (``packing.feedback``): 2-D MatMul and
    Gemm weights and 1x1 convolutions (not depthwise) of at most ``MAX_FEEDBACK_FEATURES`` inputs."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n: s for n, s in find_sites(model).items() if (names is None or n in names) and not s.repeat
            and feedback.applies(dims[n]) and dims[n][s.axis] <= MAX_FEEDBACK_FEATURES}


def scales(model: onnx.ModelProto, feeds: Sequence[dict], names: Sequence[str] | None = None,
           *, feedback: bool = False) -> dict[str, Scale]:
    """A ``Scale`` for each weight of ``find_sites`` (those in ``names``, if given) from ``feeds``; with
    ``feedback``, those of ``feedback_sites`` also hold their input's second-moment matrix."""
    sites = find_sites(model)
    if names is not None:
        sites = {n: s for n, s in sites.items() if n in set(names)}
    if not sites or not feeds:
        return {}
    full = {(s.tensor, s.input_axis) for s in feedback_sites(model, sites).values()} if feedback else set()
    moments = input_moments(model, feeds, [(s.tensor, s.input_axis) for s in sites.values()], full)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for name, s in sites.items():
        m = moments[f"{s.tensor}@{s.input_axis}"]
        a = np.diag(m) if m.ndim == 2 else m
        if s.repeat:  # depthwise: output channel m reads input channel m // repeat
            a = a[np.arange(dims[name][0]) // s.repeat] if len(a) * s.repeat == dims[name][0] else None
        if a is None or len(a) != dims[name][s.axis] or not np.isfinite(a).all() or a.max() <= 0:
            continue
        moment = m if m.ndim == 2 and np.isfinite(m).all() else None
        out[name] = Scale(s.axis, multipliers(a), moment)
    logger.info("input scales for %d of %d weights (%d with error feedback)", len(out), len(sites),
                sum(s.moment is not None for s in out.values()))
    return out


def multipliers(moments: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """float32 ``r_k = (a_k / geomean a)^(-alpha / 2)``, ``a`` floored at ``FLOOR`` times its mean."""
    a = np.maximum(np.asarray(moments, np.float64), FLOOR * float(np.mean(moments)))
    log_a = np.log(a)
    return np.exp(-alpha / 2 * (log_a - log_a.mean())).astype(np.float32)

