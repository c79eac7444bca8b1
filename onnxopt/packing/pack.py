"""Pack and unpack a model: prune, share, sparse-index and Huffman-code its weights (Deep Compression).

``settings`` maps initializer names to a ``TensorSetting``; ``policy.default_settings`` is the
default policy and ``search.search`` meets an accuracy budget. Initializers with no setting
stay in the skeleton untouched (biases, small and non-float tensors). A setting's tensor goes
through, in ``quantize_model`` and ``pack`` alike:

    prune (sparsity > 0)  ->  k-means share to 2**bits centroids per tensor or per channel
        ->  [pack only] symbols, relative-index gaps with fillers, Huffman blobs, container record

Per-channel codebooks split along the weight's output-channel axis, decided by its consumer
(``policy.find_weights``). A ``scaled`` setting shares ``w / r`` instead on a grid through zero
(``sharing.zero_grid``), ``r`` the weight's input-channel multipliers (``packing.scales``, the
``scales`` argument), and rebuilds ``centroid * r`` in float32: encodings SHARED_SCALED and
SPARSE_SHARED_SCALED, with a ``scales`` stream and ``scale_axis``. Dense indices may be coded
in row groups (``packing.groups``); the skeleton is xz-compressed when that is smaller
(format 1.1, ``container``).

Bit-exactness: ``quantize_model`` and ``unpack`` both rebuild weights with ``_rebuild`` from
(codebook rows, indices, mask), so ``unpack(pack(m, s))`` equals ``quantize_model(m, s)``
bit for bit, and every rebuilt tensor is written the same way (``_filled``: the tensor's
other fields, ``raw_data`` little-endian, float16 tensors rounded from float32).
Sparsity 0 prunes nothing, not even exact zeros (they are clustered like any value:
sparse storage of a few zeros would cost ~1 bit per weight); a tensor with pruned weights
is SPARSE_SHARED, otherwise SHARED. Streams (see docs/onnxz-format.md, Encodings):

    codebook        float32 LE, each row's distinct sorted centroids, rows in order (1 row, or dims[axis])
    codebook_sizes  Huffman(centroids per row - 1), alphabet 2**bits
    indices         SHARED: Huffman(centroid index per weight, C order), alphabet 2**bits
                    SPARSE_SHARED: Huffman(index per stored entry, the filler 2**bits), alphabet 2**bits + 1
    gaps            SPARSE_SHARED: Huffman(relative index per stored entry), alphabet 2**index_bits
    raw             RAW: the tensor's raw_data
    meta            bits, axis (absent: per tensor); SPARSE_SHARED: index_bits, entries, kept

A codebook row holds only its distinct centroids (``sharing`` pads rows to ``2**bits``), so a
per-channel codebook for a depthwise 3x3 channel costs at most 9 floats, not 256.
SPARSE_SHARED also stores trailing fillers up to the tensor's end (``packing.sparse`` stores
none), so a tensor can never be more than ``(entries + 1) << index_bits`` weights: ``unpack``
checks that before it allocates. ``index_bits`` is the width in ``INDEX_BITS`` whose two
Huffman blobs are smallest (exact sizes from ``huffman.estimate_size``).

``native.codebook_gather`` and ``native.sparse_initializers`` give plain ONNX forms needing no decoder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.packing import container, feedback, groups, huffman, sharing, sparse
from onnxopt.packing.container import Encoding, Record
from onnxopt.packing.policy import FLOAT_TYPES, TensorSetting, find_weights
from onnxopt.packing.scales import Scale

logger = logging.getLogger(__name__)

INDEX_BITS = range(1, 13)  # relative-index widths tried for each sparse tensor
_SCALED = {Encoding.SHARED: Encoding.SHARED_SCALED, Encoding.SPARSE_SHARED: Encoding.SPARSE_SHARED_SCALED}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                "external_data", "data_location")
_NOT_RAW = {TensorProto.STRING, *(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                                  if hasattr(TensorProto, n))}  # no fixed whole-byte size per element
_HIST = 1 << 16  # gaps below this are histogrammed once when choosing the index width


@dataclass(frozen=True)
class TensorStats:
    encoding: Encoding
    numel: int
    kept: int  # weights not pruned
    bits: int | None
    axis: int | None
    centroids: int  # codebook entries stored, all rows together
    rel_error: float  # ||w' - w|| / ||w||


@dataclass(frozen=True)
class Quantized:
    """One tensor pruned and shared, before any coding."""

    codebook: np.ndarray  # float32: each row's distinct centroids, the rows one after another
    sizes: np.ndarray  # int64 centroids per row
    indices: np.ndarray  # row-local centroid index per weight, 0 where pruned
    mask: np.ndarray | None  # True = kept; None: nothing pruned
    axis: int | None
    bits: int
    values: np.ndarray  # float32 rebuilt weights
    scale: Scale | None = None  # input-channel multipliers the centroids are multiplied by


def quantize_model(
    model: onnx.ModelProto, settings: Mapping[str, TensorSetting], scales: Mapping[str, Scale] | None = None
) -> tuple[onnx.ModelProto, dict[str, TensorStats]]:
    """``model`` with each set weight pruned and shared: the exact values ``unpack(pack(model, settings))`` gives."""
    out, stats, _ = quantize_all(model, settings, scales)
    return out, stats


def quantize_all(model: onnx.ModelProto, settings: Mapping[str, TensorSetting],
                 scales: Mapping[str, Scale] | None = None
                 ) -> tuple[onnx.ModelProto, dict[str, TensorStats], dict[str, Quantized]]:
    """``quantize_model``, and each shared tensor's ``Quantized`` by name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stats, done = {}, {}
    for i, t, setting, axis in _plan(model, settings, scales):
        if setting.bits is None:
            out.graph.initializer[i].CopyFrom(_filled(t, _raw(t)))
            n = math.prod(t.dims)
            stats[t.name] = TensorStats(Encoding.RAW, n, n, None, None, 0, 0.0)
            continue
        w = numpy_helper.to_array(t).astype(np.float32)
        q = done[t.name] = quantize_tensor(w, setting, axis, t.name, (scales or {}).get(t.name))
        values = q.values.astype(FLOAT_TYPES[t.data_type])
        out.graph.initializer[i].CopyFrom(_filled(t, _le_bytes(values)))
        norm = float(np.linalg.norm(w.ravel()))
        err = float(np.linalg.norm((values.astype(np.float32) - w).ravel()))
        kept = w.size if q.mask is None else int(np.count_nonzero(q.mask))
        encoding = Encoding.SHARED if q.mask is None else Encoding.SPARSE_SHARED
        stats[t.name] = TensorStats(_SCALED[encoding] if q.scale else encoding, w.size, kept,
                                    q.bits, axis, int(q.sizes.sum()), err / norm if norm else float(err > 0))
    return out, stats, done


def _plan(model: onnx.ModelProto, settings: Mapping[str, TensorSetting],
          scales: Mapping[str, Scale] | None = None) -> list[tuple]:
    """(index, tensor, setting, channel axis or None) of each set initializer, in initializer order."""
    unknown = sorted(set(settings) - {t.name for t in model.graph.initializer})
    if unknown:
        raise UserError(f"no initializer named {unknown[0]!r} in the main graph ({len(unknown)} unknown names)")
    unscaled = sorted(n for n, s in settings.items() if s.scaled and n not in (scales or {}))
    if unscaled:
        raise UserError(f"{unscaled[0]!r}: a scaled setting needs the weight's input scales")
    weights = find_weights(model)
    plan = []
    for i, t in enumerate(model.graph.initializer):
        setting = settings.get(t.name)
        if setting is None or math.prod(t.dims) == 0:
            continue
        if t.data_location == TensorProto.EXTERNAL:
            raise UserError(f"{t.name!r}: external data not loaded (load the model with onnxopt.io.load_model)")
        if setting.bits is not None and t.data_type not in FLOAT_TYPES:
            raise UserError(f"{t.name!r}: weight sharing needs float32 or float16, not "
                            f"{TensorProto.DataType.Name(t.data_type)}")
        if t.data_type in _NOT_RAW:
            raise UserError(f"{t.name!r}: {TensorProto.DataType.Name(t.data_type)} tensors stay in the skeleton")
        axis = weights[t.name].axis if setting.per_channel and t.name in weights else None
        plan.append((i, t, setting, axis))
    return plan


def quantize_tensor(w: np.ndarray, setting: TensorSetting, axis: int | None, name: str = "weights",
                    scale: Scale | None = None) -> Quantized:
    """``w`` (float32) pruned and shared per ``setting``, per channel along ``axis`` (None: per tensor)."""
    if setting.scaled:
        return _quantize_scaled(w, setting, axis, scale, name)
    try:
        mask = sharing.prune(w, setting.sparsity) if setting.sparsity > 0 else None
        mask = None if mask is not None and mask.all() else mask
        shared = sharing.share(w, setting.bits, axis=axis, mask=mask, iters=setting.iters)
    except UnsupportedModelError as e:  # NaN or infinity
        raise UnsupportedModelError(f"{name!r}: {e}") from e
    padded = shared.codebook.reshape(-1, 1 << setting.bits)  # rows padded by repeating their last centroid
    sizes = 1 + np.count_nonzero(np.diff(padded, axis=1), axis=1).astype(np.int64)
    codebook = padded[np.arange(padded.shape[1]) < sizes[:, None]]
    values = _rebuild(codebook, sizes, shared.indices, mask, axis)
    return Quantized(codebook, sizes, shared.indices, mask, axis, setting.bits, values)


def _quantize_scaled(w: np.ndarray, setting: TensorSetting, axis: int | None, scale: Scale | None,
                     name: str) -> Quantized:
    """``w / r`` pruned (by that magnitude) and put on ``sharing.zero_grid``; rebuilt times ``r``."""
    if scale is None:
        raise UserError(f"{name!r}: a scaled setting needs the weight's input scales")
    r = np.asarray(scale.multipliers)
    if not (0 <= scale.axis < w.ndim and r.dtype == np.float32 and r.shape == (w.shape[scale.axis],)
            and np.isfinite(r).all() and (r > 0).all()):
        raise UserError(f"{name!r}: input scales must be {w.shape[scale.axis] if 0 <= scale.axis < w.ndim else '?'} "
                        "positive finite float32 values along an axis of the weight")
    v = (w.astype(np.float32) / _along(r, scale.axis, w.ndim)).astype(np.float32)
    try:
        mask = sharing.prune(v, setting.sparsity) if setting.sparsity > 0 else None
        mask = None if mask is not None and mask.all() else mask
        choose = None
        if scale.moment is not None and feedback.applies(w.shape):  # rows weighted by r: the inputs of v are x r
            choose = feedback.rounder(v, scale.axis, scale.moment * np.outer(r, r), mask)
        codebook, sizes, indices = sharing.zero_grid(v, setting.bits, axis=axis, mask=mask, rounder=choose)
    except UnsupportedModelError as e:  # NaN or infinity
        raise UnsupportedModelError(f"{name!r}: {e}") from e
    values = _rebuild(codebook, sizes, indices, mask, axis, scale)
    return Quantized(codebook, sizes, indices, mask, axis, setting.bits, values, scale)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _rebuild(codebook: np.ndarray, sizes: np.ndarray, indices: np.ndarray, mask: np.ndarray | None,
             axis: int | None, scale: Scale | None = None) -> np.ndarray:
    """float32 weights: a kept weight is its row's centroid (as ``sharing.reconstruct``) times its input
    channel's multiplier, if any; a pruned one +0.0."""
    if axis is None:
        if indices.size and int(indices.max()) >= sizes[0]:
            raise _corrupt(f"centroid index {int(indices.max())} past a codebook of {sizes[0]}")
        out = codebook.take(indices)
    else:
        shape = [1] * indices.ndim
        shape[axis] = -1
        if np.any(indices >= sizes.reshape(shape)):
            raise _corrupt("a centroid index past its channel's codebook")
        out = codebook.take(indices + (np.cumsum(sizes) - sizes).reshape(shape))
    if mask is not None:
        out[~mask] = 0.0
    if scale is not None:
        out *= _along(scale.multipliers, scale.axis, out.ndim)  # float32 products: the same on both sides
    return out


def pack(model: onnx.ModelProto, settings: Mapping[str, TensorSetting],
         scales: Mapping[str, Scale] | None = None) -> tuple[bytes, dict]:
    """The .onnxz bytes of ``model`` with ``settings`` (and the ``scales`` scaled settings use), and the
    report (``_report``)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    records, rows = [], {}
    for i, t, setting, axis in _plan(model, settings, scales):
        records.append(_encode(t, setting, axis, (scales or {}).get(t.name)))
        rows[t.name] = _stages(t, records[-1])
        logger.debug("%s: %s, %d bytes", t.name, records[-1].encoding.name, rows[t.name]["huffman_bytes"])
        skeleton.graph.initializer[i].CopyFrom(_placeholder(t))
    grouped = container.ROW_GROUPS if any("groups" in r.meta for r in records) else 0
    data = container.write(skeleton.SerializeToString(), records, compress=True, flags=grouped)
    return data, _report(rows, len(data), model.ByteSize())


def _encode(t: TensorProto, setting: TensorSetting, axis: int | None, scale: Scale | None = None) -> Record:
    dims = tuple(t.dims)
    if setting.bits is None:
        return Record(t.name, t.data_type, dims, Encoding.RAW, {}, {"raw": _raw(t)})
    q = quantize_tensor(numpy_helper.to_array(t).astype(np.float32), setting, axis, t.name, scale)
    alphabet = 1 << q.bits
    meta = {"bits": q.bits, **({} if axis is None else {"axis": axis})}
    streams = {"codebook": _le_bytes(q.codebook), "codebook_sizes": huffman.encode(q.sizes - 1, alphabet)}
    if q.scale is not None:
        meta["scale_axis"] = q.scale.axis
        streams["scales"] = _le_bytes(q.scale.multipliers)
    if q.mask is None:
        grouped, count = groups.encode(q.indices, alphabet)
        streams |= grouped
        meta |= {"groups": count} if count > 1 else {}
        return Record(t.name, t.data_type, dims, _SCALED[Encoding.SHARED] if q.scale else Encoding.SHARED,
                      meta, streams)
    index_bits = _choose_index_bits(q)
    gaps, values = sparse.to_streams(q.indices, q.mask, index_bits, alphabet)
    tail = (q.mask.size - 1 - _last_kept(q.mask)) >> index_bits
    gaps = np.concatenate([gaps, np.full(tail, (1 << index_bits) - 1, gaps.dtype)])
    values = np.concatenate([values, np.full(tail, alphabet, values.dtype)])
    streams["gaps"] = huffman.encode(gaps, 1 << index_bits)
    streams["indices"] = huffman.encode(values, alphabet + 1)
    meta |= {"index_bits": index_bits, "entries": len(gaps), "kept": int(np.count_nonzero(q.mask))}
    encoding = _SCALED[Encoding.SPARSE_SHARED] if q.scale else Encoding.SPARSE_SHARED
    return Record(t.name, t.data_type, dims, encoding, meta, streams)


def _last_kept(mask: np.ndarray) -> int:
    flat = mask.ravel()
    return int(flat.size - 1 - np.argmax(flat[::-1])) if flat.any() else -1


def _choose_index_bits(q: Quantized) -> int:
    """The width in INDEX_BITS whose gap and index blobs (fillers included) are smallest, the narrowest on a tie."""
    positions = np.flatnonzero(q.mask.ravel())
    skipped = np.diff(positions, prepend=-1) - 1
    tail = q.mask.size - 1 - (int(positions[-1]) if positions.size else -1)
    small, big = skipped[skipped < _HIST], skipped[skipped >= _HIST]
    hist, gap = np.bincount(small, minlength=_HIST), np.arange(_HIST)
    symbols = np.bincount(q.indices.ravel()[positions], minlength=1 << q.bits)
    costs = []
    for bits in INDEX_BITS:
        top = (1 << bits) - 1
        fillers = int(np.dot(gap >> bits, hist)) + int((big >> bits).sum()) + (tail >> bits)
        counts = np.bincount(gap & top, weights=hist, minlength=top + 1).astype(np.int64)
        counts += np.bincount(big & top, minlength=top + 1)
        counts[top] += fillers
        costs.append(huffman.estimate_size(counts) + huffman.estimate_size(np.append(symbols, fillers)))
    return INDEX_BITS[int(np.argmin(costs))]


def _stages(t: TensorProto, r: Record) -> dict:
    """Bytes after each stage: pruning (CSR, float values, fixed-width gaps), sharing (fixed-width), Huffman."""
    numel, size = math.prod(r.dims), sum(len(s) for s in r.streams.values())
    row = {"encoding": r.encoding.name, "shape": list(r.dims), "numel": numel, "kept": numel, **r.meta}
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    row |= {"original_bytes": numel * itemsize, "pruned_bytes": numel * itemsize, "shared_bytes": size}
    if r.encoding is not Encoding.RAW:
        entries, index_bits = r.meta.get("entries", numel), r.meta.get("index_bits", 0)
        width = r.meta["bits"] + (index_bits > 0)  # the filler widens a fixed-width index by a bit
        row["pruned_bytes"] = -(-entries * (8 * itemsize + index_bits) // 8)
        row["shared_bytes"] = -(-entries * (width + index_bits) // 8) + len(r.streams["codebook"]) + len(
            r.streams.get("scales", b""))
    return row | {"huffman_bytes": size, "bits_per_weight": 8 * size / numel, "ratio": row["original_bytes"] / size}


def _report(rows: dict[str, dict], file_bytes: int, original_file_bytes: int) -> dict:
    """{"tensors": {name: row}, "total": sums, "file_bytes", "original_file_bytes", "file_ratio"}."""
    keys = ("numel", "kept", "original_bytes", "pruned_bytes", "shared_bytes", "huffman_bytes")
    total = {k: sum(r[k] for r in rows.values()) for k in keys}
    total["bits_per_weight"] = 8 * total["huffman_bytes"] / max(total["numel"], 1)
    total["ratio"] = total["original_bytes"] / max(total["huffman_bytes"], 1)
    return {"tensors": rows, "total": total, "file_bytes": file_bytes, "original_file_bytes": original_file_bytes,
            "file_ratio": original_file_bytes / file_bytes}


def unpack(data: bytes) -> onnx.ModelProto:
    """The model of an .onnxz file: ``UnsupportedModelError`` (one line) for anything corrupt or foreign."""
    skeleton, records = container.read(data)
    try:
        model = onnx.ModelProto.FromString(skeleton)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise _corrupt("the skeleton is not an ONNX model") from e
    slots = {t.name: t for t in model.graph.initializer}
    for r in records:
        slot = slots.get(r.name)
        if slot is None or slot.data_type != r.data_type or tuple(slot.dims) != r.dims or _has_data(slot):
            raise _corrupt(f"record {r.name!r} does not match an empty placeholder in the skeleton")
        slot.raw_data = _decode(r)
    for t in model.graph.initializer:
        if math.prod(t.dims) and not _has_data(t):
            raise _corrupt(f"no record for the placeholder {t.name!r}")
    return model


def _decode(r: Record) -> bytes:
    numel = math.prod(r.dims)
    if r.encoding is Encoding.RAW:
        return _decode_raw(r, numel)
    if r.data_type not in FLOAT_TYPES:
        raise _corrupt(f"record {r.name!r}: a shared tensor of data type {r.data_type}")
    bits = _meta_int(r, "bits", 1, sharing.MAX_BITS)
    axis = _meta_int(r, "axis", 0, len(r.dims) - 1) if "axis" in r.meta else None
    scale = _decode_scales(r) if r.encoding in _SCALED.values() else None
    codebook, sizes = _decode_codebook(r, bits, 1 if axis is None else r.dims[axis])
    if r.encoding in (Encoding.SHARED, Encoding.SHARED_SCALED) and "groups" in r.meta:
        count = _meta_int(r, "groups", 2, groups.MAX_GROUPS)
        indices, mask = groups.decode(r.streams, r.dims, count, lambda s, n: _decode_blob(r, s, n)), None
    elif r.encoding in (Encoding.SHARED, Encoding.SHARED_SCALED):
        indices, mask = _decode_blob(r, "indices", numel).reshape(r.dims), None
    else:
        indices, mask = _decode_sparse(r, numel, bits)
    values = _rebuild(codebook, sizes, indices, mask, axis, scale).astype(FLOAT_TYPES[r.data_type])
    return _le_bytes(values)


def _decode_raw(r: Record, numel: int) -> bytes:
    if r.data_type in _NOT_RAW or r.data_type not in helper.get_all_tensor_dtypes():
        raise _corrupt(f"record {r.name!r}: RAW data type {r.data_type}")
    raw = _stream(r, "raw")
    if len(raw) != numel * np.dtype(helper.tensor_dtype_to_np_dtype(r.data_type)).itemsize:
        raise _corrupt(f"record {r.name!r}: {len(raw)} raw bytes for {numel} elements")
    return raw


def _decode_scales(r: Record) -> Scale:
    axis = _meta_int(r, "scale_axis", 0, len(r.dims) - 1) if r.dims else -1
    raw = _stream(r, "scales")
    if axis < 0 or len(raw) != 4 * r.dims[axis]:
        raise _corrupt(f"record {r.name!r}: {len(raw)} bytes of scales for {r.dims[axis] if axis >= 0 else 0} "
                       "channels")
    multipliers = np.frombuffer(raw, "<f4").astype(np.float32)
    if not (np.isfinite(multipliers).all() and (multipliers > 0).all()):
        raise _corrupt(f"record {r.name!r}: the scales must be positive and finite")
    return Scale(axis, multipliers)


def _decode_codebook(r: Record, bits: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    sizes = _decode_blob(r, "codebook_sizes", rows).astype(np.int64) + 1
    raw = _stream(r, "codebook")
    if sizes.max(initial=0) > 1 << bits or len(raw) != 4 * int(sizes.sum()):
        raise _corrupt(f"record {r.name!r}: the codebook does not match its row sizes")
    codebook = np.frombuffer(raw, "<f4").astype(np.float32)
    if not np.isfinite(codebook).all():
        raise _corrupt(f"record {r.name!r}: the codebook holds NaN or infinity")
    return codebook, sizes


def _decode_sparse(r: Record, numel: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    index_bits = _meta_int(r, "index_bits", 1, sparse.MAX_INDEX_BITS)
    gaps, values = _decode_blob(r, "gaps"), _decode_blob(r, "indices")
    entries = _meta_int(r, "entries", 0, 1 << 62)
    if not entries == gaps.size == values.size or numel > (entries + 1) << index_bits:
        raise _corrupt(f"record {r.name!r}: {gaps.size} gaps and {values.size} indices for {entries} entries "
                       f"of a {numel}-weight tensor")
    if entries and int(gaps.sum(dtype=np.int64)) + entries > numel:
        raise _corrupt(f"record {r.name!r}: sparse entries run past the tensor's end")
    real = np.flatnonzero(values != 1 << bits)
    end = int(real[-1]) + 1 if real.size else 0  # trailing fillers only reach the end: drop them
    if np.any(gaps[end:] != (1 << index_bits) - 1):
        raise _corrupt(f"record {r.name!r}: a trailing filler with less than the largest gap")
    indices, mask = sparse.from_streams(gaps[:end], values[:end], index_bits, 1 << bits, r.dims)
    if int(np.count_nonzero(mask)) != _meta_int(r, "kept", 0, numel):
        raise _corrupt(f"record {r.name!r}: kept count differs from its metadata")
    return indices, mask


def _decode_blob(r: Record, name: str, count: int | None = None) -> np.ndarray:
    blob = _stream(r, name)
    if count is not None and count > 8 * len(blob):  # every symbol costs at least a bit
        raise _corrupt(f"record {r.name!r}: {count} symbols cannot fit the {len(blob)}-byte stream {name!r}")
    symbols = huffman.decode(blob)
    if count is not None and symbols.size != count:
        raise _corrupt(f"record {r.name!r}: stream {name!r} holds {symbols.size} symbols, expected {count}")
    return symbols


def _stream(r: Record, name: str) -> bytes:
    if name not in r.streams:
        raise _corrupt(f"record {r.name!r} ({r.encoding.name}) has no stream {name!r}")
    return r.streams[name]


def _meta_int(r: Record, key: str, low: int, high: int) -> int:
    value = r.meta.get(key)
    if type(value) is not int or not low <= value <= high:
        raise _corrupt(f"record {r.name!r}: metadata {key!r} is {value!r}, not an integer in [{low}, {high}]")
    return value


def _corrupt(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"corrupt onnxz file: {what}")


def _has_data(t: TensorProto) -> bool:
    fields = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "external_data")
    return t.HasField("raw_data") or t.data_location == TensorProto.EXTERNAL or any(len(getattr(t, f)) for f in fields)


def _placeholder(t: TensorProto) -> TensorProto:
    """``t`` without its data (container convention): name, data type, dims and every other field."""
    p = TensorProto()
    p.CopyFrom(t)
    for f in _DATA_FIELDS:
        p.ClearField(f)
    return p


def _filled(t: TensorProto, raw: bytes) -> TensorProto:
    p = _placeholder(t)
    p.raw_data = raw
    return p


def _raw(t: TensorProto) -> bytes:
    return t.raw_data if t.HasField("raw_data") else _le_bytes(numpy_helper.to_array(t))


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
