"""Factorize MatMul / Gemm layers with a constant 2-D weight into two thinner MatMuls.

``y = x W (+ b)`` with W (K, N) becomes ``y = (x A) B (+ b)`` with A (K, r), B (r, N)
from ``onnxopt.lowrank.spectrum`` (the SVD, weighted by the input's second moment when
one is given): MatMul(x, A) then MatMul(., B) for a MatMul, which works for any
activation rank (transformer projections read (batch, tokens, K)); MatMul(x, A) then
Gemm(., B, C) for a Gemm, keeping its bias and beta on the second layer. Gemm's alpha
is folded into W and transB is undone first; transA=1 is refused.

The rank comes from ``ranks`` (node label -> rank) when given, else from the
``RankPolicy``. A layer is factorized only when r (K + N) is at most (1 - min_saving)
K N; a layer left alone because of that is listed in ``skipped`` with its numbers.
Factor nodes are named ``<layer>_lowrank_a`` / ``_lowrank_b`` and never factorized again,
so the pass is idempotent and a factorized model run through onnxopt again keeps them.

Also refused: a weight shared with other nodes (the other readers keep the full weight,
so nothing is saved), a constant first input, non-float weights. Lossy: the pass
manager never runs it as part of a lossless preset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import Names, const_value, finish, is_standard, optional_input
from onnxopt.lowrank import LayerFactorization, RankPolicy, Spectrum, spectrum
from onnxopt.pass_base import GraphPass, PassResult, Skip

logger = logging.getLogger(__name__)

MARK = "_lowrank_"  # in the names of factor nodes


def label(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


@dataclass(frozen=True)
class MatMulSite:
    """A layer ``y = x W (+ C)`` with W (K, N) constant, as the pass sees it."""

    node: gs.Node
    weight: np.ndarray  # (K, N) float64: x @ weight, Gemm's alpha and transB applied

    @property
    def label(self) -> str:
        return label(self.node)

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def full_macs(self) -> int:
        k, n = self.weight.shape
        return k * n

    def macs(self, rank: int) -> int:
        k, n = self.weight.shape
        return rank * (k + n)


def find_sites(graph: gs.Graph) -> tuple[list[MatMulSite], list[Skip]]:
    """Every MatMul/Gemm the pass could factorize, and those refused for a stated reason."""
    sites, skipped = [], []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or not is_standard(node) or MARK in node.name or len(node.inputs) < 2:
            continue
        w = const_value(node.inputs[1])
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            continue
        if const_value(node.inputs[0]) is not None:
            continue
        reason = _refusal(node)
        if reason:
            skipped.append(Skip(label(node), node.op, reason))
            continue
        w = w.astype(np.float64)
        if node.op == "Gemm":
            w = (w.T if node.attrs.get("transB", 0) else w) * float(node.attrs.get("alpha", 1.0))
        sites.append(MatMulSite(node, w))
    return sites, skipped


def _refusal(node: gs.Node) -> str | None:
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    if len(node.inputs[1].outputs) > 1:
        return f"weight shared with {len(node.inputs[1].outputs) - 1} other nodes: factorizing saves nothing"
    return None


class FactorizeMatMulPass(GraphPass):
    name = "factorize_matmul"
    lossless = False

    def __init__(self, policy: RankPolicy = RankPolicy(energy=0.99), ranks: Mapping[str, int] | None = None,
                 moments: Mapping[str, np.ndarray] | None = None, spectra: Mapping[str, Spectrum] | None = None):
        self.policy = policy
        self.ranks = dict(ranks or {})
        self.moments = dict(moments or {})  # input tensor name -> E[x^T x]
        self.spectra = dict(spectra or {})  # node label -> precomputed spectrum
        self.layers: list[LayerFactorization] = []  # every decision of the last call

    def spectrum(self, site: MatMulSite) -> Spectrum:
        if site.label not in self.spectra:
            self.spectra[site.label] = spectrum(site.weight, self.moments.get(site.input.name))
        return self.spectra[site.label]

    def call(self, graph: gs.Graph) -> PassResult:
        sites, skipped = find_sites(graph)
        self.layers = []
        names = Names(graph)
        for site in sites:
            if self.ranks and site.label not in self.ranks:
                continue
            spec = self.spectrum(site)
            rank = self.ranks.get(site.label) or self.policy.rank(spec, site.macs, site.full_macs)
            layer = self._decision(site, spec, rank)
            self.layers.append(layer)
            if layer.applied:
                _rewrite(graph, site, *spec.factors(rank), names)
            else:
                skipped.append(Skip(site.label, site.node.op, layer.reason))
        done = sum(layer.applied for layer in self.layers)
        if done:
            finish(graph)
        return PassResult(graph, bool(done), {"factorize_matmul": done} if done else {}, tuple(skipped))

    def _decision(self, site: MatMulSite, spec: Spectrum, rank: int) -> LayerFactorization:
        k, n = site.weight.shape
        rank = min(rank, spec.full_rank)
        layer = LayerFactorization(
            node=site.label, op=site.node.op, form="svd", shape=(k, n), rank=rank, full_rank=spec.full_rank,
            macs_before=site.full_macs, macs_after=site.macs(rank), params_before=k * n,
            params_after=rank * (k + n), error=float(spec.errors()[rank]), weighted=spec.weighted,
        )
        if not self.policy.saves(layer.macs_after, layer.macs_before):
            layer.applied = False
            layer.macs_after, layer.params_after = layer.macs_before, layer.params_before
            layer.reason = (f"rank {rank} of {spec.full_rank} keeps {site.macs(rank) / site.full_macs:.0%} of the MACs;"
                            f" factorizing needs at most {1 - self.policy.min_saving:.0%}")
        return layer


def _rewrite(graph: gs.Graph, site: MatMulSite, a: np.ndarray, b: np.ndarray, names: Names) -> None:
    node, base = site.node, label(site.node)
    dtype = node.inputs[1].values.dtype if isinstance(node.inputs[1], gs.Constant) else np.float32
    ca = gs.Constant(names(f"{base}{MARK}a_weight"), a.astype(dtype))
    cb = gs.Constant(names(f"{base}{MARK}b_weight"), b.astype(dtype))
    mid = gs.Variable(names(f"{base}{MARK}mid"), dtype=node.outputs[0].dtype)
    first = gs.Node("MatMul", names(f"{base}{MARK}a"), inputs=[node.inputs[0], ca], outputs=[mid])
    if node.op == "Gemm":
        bias = optional_input(node, 2)
        attrs = {"beta": float(node.attrs.get("beta", 1.0))} if bias is not None else {}
        second = gs.Node("Gemm", names(f"{base}{MARK}b"), attrs=attrs,
                         inputs=[mid, cb, *([bias] if bias is not None else [])], outputs=list(node.outputs))
    else:
        second = gs.Node("MatMul", names(f"{base}{MARK}b"), inputs=[mid, cb], outputs=list(node.outputs))
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend([first, second])
