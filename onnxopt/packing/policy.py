"""Which weights to pack and how: ``TensorSetting`` per initializer, the default policy, and candidate costs.

``find_weights`` names the float initializers of the main graph that are layer weights:
Conv/ConvTranspose/Gemm/MatMul weights and Gather tables, with the axis along which a
per-channel codebook splits them, decided by the consumer: Conv 0 (M, C/g, kh, kw);
ConvTranspose 1 (C, M/g, kh, kw), or 0 when grouped (axis 1 would then mix the groups'
channels); Gemm B 1, or 0 with transB; MatMul B (..., K, N) the last axis, a constant A the
rows (-2); a Gather table the features (the last axis, or 0 when gathering along the last),
not the rows: one codebook per token would cost more than the token. Consumers that
disagree, or a rank < 2, give per-tensor sharing.

``default_settings`` is Deep Compression's rule (``Policy``): bits by layer kind, one
sparsity for all, and per-channel codebooks only where the codebook stays a small part of
the indices (``per_channel_pays``).

``candidates`` lists the settings ``search`` chooses from, each with its error and bytes
estimated without packing: uniform grids (k-means' linear initialisation, no Lloyd step)
per tensor and per channel, at every width and sparsity asked. A grid comes from all the
kept weights (their range), the error and the symbol counts from every ``stride``-th one
(``_Sample``; exact up to ``estimate_values`` weights, unbiased above), the pruning error
from the whole tensor, the relative indices from their histogram at the best width, the
Huffman sizes from ``huffman.estimate_size``, the codebook from the levels used. A channel
(or tensor) with at most ``2**bits`` distinct values is shared exactly, as ``sharing`` does:
no error, its ranks as symbols.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt.errors import UserError
from onnxopt.packing import huffman, sharing, sparse

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}  # what weight sharing takes


class Kind(enum.Enum):
    CONV = "conv"
    FC = "fc"
    EMBEDDING = "embedding"


_WEIGHT_SLOTS = {("Conv", 1): Kind.CONV, ("ConvTranspose", 1): Kind.CONV, ("Gemm", 1): Kind.FC,
                 ("MatMul", 0): Kind.FC, ("MatMul", 1): Kind.FC, ("Gather", 0): Kind.EMBEDDING}


@dataclass(frozen=True)
class TensorSetting:
    """How one initializer is stored: ``bits`` None keeps it float (RAW record, no pruning).

    ``iters`` is the number of Lloyd steps of the k-means; 0 keeps its linear initialisation,
    a uniform grid from the smallest to the largest weight, which Huffman coding favours: the
    outer levels are rare, so they cost few bits (``search`` uses it).

    ``scaled`` shares ``w / r`` instead, ``r`` the weight's input-channel multipliers
    (``packing.scales``, given to ``pack`` beside the settings), on a uniform grid through
    zero with ``2**bits`` levels over the range (``iters`` unused), per tensor or per channel.
    """

    bits: int | None
    sparsity: float = 0.0
    per_channel: bool = True
    iters: int = sharing.DEFAULT_ITERS
    scaled: bool = False

    def __post_init__(self) -> None:
        if self.bits is not None and not 1 <= self.bits <= sharing.MAX_BITS:
            raise UserError(f"bits must be between 1 and {sharing.MAX_BITS} (or None for float), got {self.bits}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise UserError(f"sparsity must be between 0 and 1, got {self.sparsity}")
        if self.bits is None and self.sparsity:
            raise UserError("pruning needs weight sharing: give bits with a sparsity")
        if self.iters < 0:
            raise UserError(f"k-means iterations must be at least 0, got {self.iters}")
        if self.scaled and self.bits is None:
            raise UserError("input-channel scales need weight sharing: give bits")


@dataclass(frozen=True)
class Weight:
    kind: Kind
    axis: int | None  # output-channel axis for per-channel codebooks; None: no such axis


@dataclass(frozen=True)
class Policy:
    """``default_settings``: Deep Compression's 8 bits for conv and 5 for fully connected layers.

    Embedding tables get 4: a looked-up row is used as it is, not summed into thousands of
    products, and a LayerNorm follows. On all-MiniLM-L6-v2 (held-out mean-pooled cosine),
    sharing only the embeddings, per channel, keeps 0.9983 at 4 bits and 0.993 at 3; only the
    fully connected weights, per channel too, 0.953 at 4 bits and 0.986 at 5.
    Per-channel codebooks only where they cost at most ``max_codebook_overhead`` of the
    fixed-width indices (a 256-entry float codebook per 288-weight channel is 3.5x its 8-bit indices).
    """

    min_elements: int = 1024
    conv_bits: int = 8
    fc_bits: int = 5
    embedding_bits: int = 4
    sparsity: float = 0.0
    max_codebook_overhead: float = 0.25

    def bits(self, kind: Kind) -> int:
        return {Kind.CONV: self.conv_bits, Kind.FC: self.fc_bits, Kind.EMBEDDING: self.embedding_bits}[kind]


def find_weights(model: onnx.ModelProto) -> dict[str, Weight]:
    """Float initializers of the main graph that are Conv/ConvTranspose/Gemm/MatMul weights or Gather tables."""
    floats = {t.name: len(t.dims) for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    found: dict[str, Weight] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            kind = _WEIGHT_SLOTS.get((node.op_type, slot)) if node.domain in ("", "ai.onnx") else None
            if kind is not None and name in floats:
                w = Weight(kind, _channel_axis(node, slot, floats[name]))
                if found.setdefault(name, w).axis != w.axis:
                    found[name] = Weight(found[name].kind, None)
    return found


def _channel_axis(node: onnx.NodeProto, slot: int, rank: int) -> int | None:
    if rank < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attrs.get("group", 1) == 1 else 0
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1 if slot == 1 else rank - 2
    return 0 if attrs.get("axis", 0) % rank == rank - 1 else rank - 1


def per_channel_pays(dims: tuple[int, ...], axis: int | None, bits: int, max_overhead: float) -> bool:
    """Whether one float codebook per channel costs at most ``max_overhead`` of the ``bits``-wide indices."""
    numel = math.prod(dims)
    if axis is None or not numel:
        return False
    rows = dims[axis]
    codebook_bits = 32 * rows * min(1 << bits, -(-numel // max(rows, 1)))
    return codebook_bits <= max_overhead * numel * bits


def packable(model: onnx.ModelProto, min_elements: int) -> dict[str, tuple[Weight, tuple[int, ...]]]:
    """The weights of ``find_weights`` with at least ``min_elements`` elements, with their dims."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {name: (w, dims[name]) for name, w in find_weights(model).items() if math.prod(dims[name]) >= min_elements}


@dataclass(frozen=True)
class Candidates:
    """Settings of one weight with their estimated relative error ||w' - w|| / ||w|| and packed bytes."""

    settings: list[TensorSetting]
    errors: np.ndarray
    sizes: np.ndarray


def candidates(values: np.ndarray, weight: Weight, bits: Sequence[int], sparsities: Sequence[float],
               estimate_values: int = 1 << 18, multipliers: np.ndarray | None = None) -> Candidates:
    """Every uniform-grid setting of one float32 weight with its estimated error and bytes (module docstring);
    with ``multipliers`` (``values`` divided by them, as ``pack`` shares a scaled setting), the scaled
    settings too, per tensor, their error relative in the divided values."""
    found = _unscaled(values, weight, bits, sparsities, estimate_values)
    if multipliers is None:
        return found
    scaled = _scaled(values / multipliers, bits, sparsities, estimate_values, 4.0 * multipliers.size)
    return Candidates(found.settings + scaled.settings, np.concatenate([found.errors, scaled.errors]),
                      np.concatenate([found.sizes, scaled.sizes]))


def _scaled(v: np.ndarray, bits: Sequence[int], sparsities: Sequence[float], estimate_values: int,
            extra_bytes: float) -> Candidates:
    """Scaled per-tensor settings of the divided weights ``v``: ``sharing.zero_grid`` on a sample."""
    flat = v.ravel().astype(np.float64)
    norm2 = float(np.dot(flat, flat)) or 1.0
    stride = -(-flat.size // estimate_values)
    settings, errors, sizes = [], [], []
    for sparsity in sparsities:
        mask = sharing.prune(v, sparsity) if sparsity > 0 else np.ones(v.shape, bool)
        kept = flat[mask.ravel()]
        pruned2 = norm2 - float(np.dot(kept, kept)) if sparsity > 0 else 0.0
        gap_bytes, fillers = _gap_cost(mask)
        lo, hi = (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)
        sample, scale = kept[::stride], kept.size / max(len(kept[::stride]), 1)
        for b in bits:
            span = hi - lo
            step = span / max((1 << b) - 2, 1) if span > 0 else (abs(hi) or 1.0)
            level = np.rint(sample / step)
            err2 = float(np.sum((sample - level * step) ** 2)) * scale
            counts = np.rint(np.bincount((level - round(lo / step)).astype(np.int64).clip(0)) * scale)
            counts = counts.astype(np.int64)
            used = int(np.count_nonzero(counts)) if stride == 1 else min(kept.size, 1 << b)
            index = huffman.estimate_size(np.append(counts, fillers) if fillers else counts)
            settings.append(TensorSetting(b, sparsity, False, iters=0, scaled=True))
            errors.append(math.sqrt((pruned2 + err2) / norm2))
            sizes.append(index + gap_bytes + 4.0 * used + extra_bytes + 2)
    return Candidates(settings, np.array(errors), np.array(sizes, dtype=np.float64))


def _unscaled(values: np.ndarray, weight: Weight, bits: Sequence[int], sparsities: Sequence[float],
              estimate_values: int) -> Candidates:
    rows = _rows(values, weight.axis)
    stride = -(-rows.size // estimate_values)  # every stride-th weight: each row's columns evenly
    norm2 = float(np.dot(values.ravel().astype(np.float64), values.ravel())) or 1.0
    distinct = _distinct(rows, 1 << max(bits))  # pruning can only lower these
    settings, errors, sizes = [], [], []
    for sparsity in sparsities:
        mask = sharing.prune(values, sparsity) if sparsity > 0 else np.ones(values.shape, bool)
        pruned = values[~mask].astype(np.float64)
        keep = _rows(mask, weight.axis)
        gap_bytes, fillers = _gap_cost(mask)
        sample = _Sample(rows, keep, stride, distinct)
        for b, per_channel in itertools.product(bits, (False, True)[: 1 + (weight.axis is not None)]):
            setting = TensorSetting(b, sparsity, per_channel, iters=0)
            err2, index_bytes, codebook_bytes = sample.estimate(b, per_channel, fillers)
            settings.append(setting)
            errors.append(math.sqrt((float(np.dot(pruned, pruned)) + err2) / norm2))
            sizes.append(index_bytes + gap_bytes + codebook_bytes)
    return Candidates(settings, np.array(errors), np.array(sizes, dtype=np.float64))


def _rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    """(channels, weights per channel) with the channel axis first; (1, size) without one."""
    if axis is None:
        return a.reshape(1, -1)
    moved = np.moveaxis(a, axis, 0)
    return moved.reshape(len(moved), -1)


class _Sample:
    """Every ``stride``-th kept weight, to estimate a uniform grid's error and symbol counts.

    The grids are exact: each spans the kept weights' whole range (per row, or the tensor's),
    taken from all of them. Only the statistics come from the sample, so they are unbiased.
    A row (or tensor) with at most ``2**bits`` distinct values is shared exactly (``sharing``
    keeps those values as its centroids): no error, one centroid per value.
    """

    def __init__(self, rows: np.ndarray, keep: np.ndarray, stride: int, distinct: tuple[np.ndarray, int]):
        self.whole = stride == 1
        self.lo = np.min(rows, axis=1, where=keep, initial=np.inf)
        self.hi = np.max(rows, axis=1, where=keep, initial=-np.inf)
        flat = np.arange(0, rows.size, stride)
        flat = flat[keep.ravel()[flat]]
        self.values, self.row = rows.ravel()[flat].astype(np.float64), flat // max(rows.shape[1], 1)
        self.kept_rows = np.count_nonzero(keep, axis=1)
        self.scale = int(self.kept_rows.sum()) / max(len(flat), 1)
        self.distinct_rows = np.minimum(distinct[0], self.kept_rows)  # at most: the pruned values may repeat less
        self.distinct_all = min(distinct[1], int(self.kept_rows.sum()))

    def estimate(self, bits: int, per_channel: bool, fillers: int) -> tuple[float, float, float]:
        """(squared error of all kept weights, index bytes, codebook bytes) of a ``bits``-wide uniform grid."""
        k = 1 << bits
        if per_channel:
            lo, span, row = self.lo[self.row], (self.hi - self.lo)[self.row], self.row
            kept, distinct = self.kept_rows, self.distinct_rows
        else:
            lo, span = self.lo.min(), self.hi.max() - self.lo.min()  # +-inf only when nothing is kept
            row = np.zeros(len(self.values), np.int64)
            kept, distinct = np.array([self.kept_rows.sum()]), np.array([self.distinct_all])
        exact = distinct <= k
        step = np.where(span > 0, span, 1.0) / (k - 1)
        t = (self.values - lo) / step
        level = np.clip(np.rint(t), 0, k - 1)
        err2 = float(np.sum(((t - level) * step)[~exact[row]] ** 2)) * self.scale
        level = level.astype(np.int64)
        exact_at = exact[row]
        if exact_at.any():  # an exact row's symbols are the ranks of its distinct values
            level[exact_at] = _ranks(self.values[exact_at], row[exact_at])
        counts = np.rint(np.bincount(level, minlength=k) * self.scale).astype(np.int64)
        if self.whole:
            grid = np.bincount(row * k + level, minlength=len(kept) * k).reshape(len(kept), k)
            used = np.where(exact, distinct, np.count_nonzero(grid, axis=1))
        else:  # an upper bound: rare levels can be missing from the sample
            used = np.where(exact, distinct, np.minimum(kept, k))
        sizes = huffman.estimate_size(np.bincount(np.maximum(used - 1, 0), minlength=k))
        index = huffman.estimate_size(np.append(counts, fillers) if fillers else counts)
        return err2, index, 4.0 * float(used.sum()) + sizes


def _ranks(values: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The rank of each value among the distinct values of its row."""
    order = np.lexsort((values, row))
    v, r = values[order], row[order]
    new = np.ones(len(v), bool)
    new[1:] = (v[1:] != v[:-1]) | (r[1:] != r[:-1])
    distinct = np.cumsum(new) - 1
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # where each row starts in the sorted order
    ranks = np.empty(len(v), np.int64)
    ranks[order] = distinct - distinct[first][np.cumsum(np.r_[True, r[1:] != r[:-1]]) - 1]
    return ranks


def _distinct(rows: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    """Distinct values of each row and of the whole tensor; the latter ``limit + 1`` when above ``limit``."""
    if not rows.size:
        return np.zeros(len(rows), np.int64), 0
    per_row = 1 + np.count_nonzero(np.diff(np.sort(rows, axis=1), axis=1), axis=1)
    return per_row, limit + 1 if per_row.max() > limit else min(len(np.unique(rows)), limit + 1)


def _gap_cost(mask: np.ndarray) -> tuple[float, int]:
    """(bytes of the Huffman-coded relative indices, filler entries) at the best index width; (0, 0) if dense."""
    if mask.all():
        return 0.0, 0
    width = sparse.best_index_bits(mask, value_bits=4.0, candidates=range(1, 13))
    rel = sparse.to_relative(mask, width)
    return huffman.estimate_size(np.bincount(rel.gaps, minlength=1 << width)), int(np.count_nonzero(rel.is_filler))


def default_settings(model: onnx.ModelProto, policy: Policy = Policy()) -> dict[str, TensorSetting]:
    """A setting for every weight of ``find_weights`` with at least ``policy.min_elements`` elements."""
    settings = {}
    for name, (w, dims) in packable(model, policy.min_elements).items():
        b = policy.bits(w.kind)
        settings[name] = TensorSetting(b, policy.sparsity,
                                       per_channel_pays(dims, w.axis, b, policy.max_codebook_overhead))
    return settings
