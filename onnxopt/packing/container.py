"""The .onnxz container: an ONNX model whose large weights are stored encoded.

The byte layout is documented for users and other implementers in
``docs/onnxz-format.md``; this docstring summarises it. Integers are little-endian.

    header    32 bytes  magic b"\\x89ONNXZ\\r\\n\\x1a\\n", version major/minor (u8 each),
                        flags (u32), file length (u64), record count (u32), CRC32 of the 28 bytes before it
    skeleton  section   the serialized ModelProto, packed initializers left as placeholders
    records   sections  one per packed tensor: name, data type, dims, encoding, metadata (JSON), named streams
    trailer   32 bytes  SHA-256 of every byte before it

A section is ``u64 length | body | u32 CRC32(length field + body)``.

The container knows nothing of the encodings: a record carries an ``Encoding`` id, a
small JSON metadata dict and named byte streams, and the code that packs and unpacks
tensors gives them meaning. Invariants:

- ``read`` verifies every byte (header CRC, the file length, each section's CRC, the
  SHA-256 trailer) before it returns, so decoders only ever see intact data. Every
  length is checked against the bytes left before anything is sliced, so a corrupt
  or hostile file can cause neither an exception other than ``UnsupportedModelError``
  (one line) nor an allocation larger than the file.
- ``write`` is deterministic: metadata keys and stream names are written sorted, so the
  same skeleton and records give the same bytes.
- The magic and the two version bytes keep their offsets in every version; a reader
  refuses another major version and reads any minor version of its own.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import lzma
import math
import operator
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxopt.errors import UnsupportedModelError
from onnxopt.io import check_output_path, write_atomic

logger = logging.getLogger(__name__)

MAGIC = b"\x89ONNXZ\r\n\x1a\n"
VERSION = (1, 1)  # the newest this module writes and reads; a file is written as the oldest it needs
XZ_SKELETON = 1  # flag (1.1): the skeleton section holds u64 size | an xz stream of the skeleton
ROW_GROUPS = 2  # flag (1.1): some records code their indices in row groups (``packing.groups``)
KNOWN_FLAGS = XZ_SKELETON | ROW_GROUPS  # a set bit names a feature the reader must understand
NEW_IN_1_1 = frozenset({3, 4})  # encoding ids a 1.0 reader does not know

_HEAD = struct.Struct("<10sBBIQI")  # magic, major, minor, flags, file length, record count
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _U32.size
DIGEST_SIZE = hashlib.sha256().digest_size
_SECTION_OVERHEAD = _U64.size + _U32.size
_MAX_NAME_IN_MESSAGE = 120
_MAX_SKELETON = 1 << 31  # protobuf's limit for one message
_XZ_MEMLIMIT = 1 << 28  # the decoder of preset 9 needs 65 MB; a hostile dictionary size is refused
_MAX_NUMEL = 1 << 62  # dims whose product passes this are corrupt (and would overflow int64)

# Magic numbers of files people hand us by mistake, for a more useful message.
_FOREIGN = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


class Encoding(enum.IntEnum):
    """How a record's streams hold the tensor. New ids are a minor-version addition."""

    RAW = 0  # stored as it is: one stream "raw", the tensor's little-endian raw_data
    SHARED = 1  # k-means codebook + Huffman-coded centroid indices
    SPARSE_SHARED = 2  # SHARED for the non-zeros + Huffman-coded relative indices
    SHARED_SCALED = 3  # SHARED times float32 input-channel multipliers (format 1.1)
    SPARSE_SHARED_SCALED = 4  # SPARSE_SHARED times the same (format 1.1)


_ENCODING_IDS = frozenset(int(e) for e in Encoding)
MetaValue = bool | int | float | str | list


@dataclass(frozen=True)
class Record:
    """One packed tensor. ``dims`` is normalised to a tuple and ``encoding`` to an ``Encoding``.

    ``meta`` maps str to bool/int/float/str or a list of those (JSON-encoded: tuples come
    back as lists, floats must be finite); ``streams`` maps non-empty names to bytes.
    Invalid values raise ValueError here, at construction, not half-way through ``write``.
    """

    name: str
    data_type: int
    dims: tuple[int, ...]
    encoding: Encoding
    meta: dict[str, MetaValue] = field(default_factory=dict)
    streams: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name(self.name, "record name")
        dims = tuple(operator.index(d) for d in self.dims)
        if any(d < 0 for d in dims) or math.prod(dims) >= _MAX_NUMEL:
            raise ValueError(f"invalid dims {list(dims)}")
        data_type = operator.index(self.data_type)
        if not 0 < data_type < 1 << 31:
            raise ValueError(f"invalid ONNX data type {data_type}")
        for key, value in self.streams.items():
            _check_name(key, "stream name")
            if not isinstance(value, (bytes, bytearray)):
                raise ValueError(f"stream {key!r} is {type(value).__name__}, not bytes")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "data_type", data_type)
        object.__setattr__(self, "encoding", Encoding(self.encoding))
        # A copy, with tuples as lists: what read() gives back must compare equal to what was written.
        object.__setattr__(self, "meta", {k: list(v) if isinstance(v, tuple) else v for k, v in self.meta.items()})
        _check_meta(self.meta)


def write(skeleton: bytes, records: Sequence[Record], *, compress: bool = False, flags: int = 0) -> bytes:
    """The .onnxz bytes for ``skeleton`` (a serialized ModelProto) and ``records``; with ``compress``,
    the skeleton xz-compressed (flag ``XZ_SKELETON``) when that is smaller. ``flags`` adds the flags
    of features the records use (``ROW_GROUPS``).

    The version written is the oldest that has every feature used: 1.0 without the flag and
    without encodings 3 and 4, so that such files stay byte-identical to 1.0 writers' files.
    """
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate record names: {sorted({n for n in names if names.count(n) > 1})}")
    if flags & ~KNOWN_FLAGS or flags & XZ_SKELETON:
        raise ValueError(f"flags {flags:#x}: only the records' features are given (XZ_SKELETON is compress)")
    body = skeleton
    if compress:
        packed = _U64.pack(len(skeleton)) + lzma.compress(skeleton, check=lzma.CHECK_NONE,
                                                            preset=9 | lzma.PRESET_EXTREME)
        if len(packed) < len(skeleton):
            flags, body = flags | XZ_SKELETON, packed
    minor = 1 if flags or any(int(r.encoding) in NEW_IN_1_1 for r in records) else 0
    sections = [_section([body])] + [_section(_record_parts(r)) for r in records]
    total = HEADER_SIZE + sum(len(p) for s in sections for p in s) + DIGEST_SIZE
    head = _HEAD.pack(MAGIC, VERSION[0], minor, flags, total, len(records))
    parts = [head, _U32.pack(zlib.crc32(head))] + [p for s in sections for p in s]
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    return b"".join([*parts, digest.digest()])


def read(data: bytes | bytearray | memoryview) -> tuple[bytes, list[Record]]:
    """The skeleton and records of an .onnxz file, every byte verified first.

    Raises ``UnsupportedModelError`` with a one-line message for anything that is not an
    intact .onnxz file of a version this reader knows.
    """
    buf = memoryview(data).cast("B")
    count, total = _read_header(buf)
    cur = _Cursor(buf, HEADER_SIZE, total - DIGEST_SIZE, "the file")
    skeleton = _read_section(cur, "the skeleton model", None)
    records = [_parse_record(_read_section(cur, f"record #{i}", i), i) for i in range(count)]
    if cur.pos != cur.end:
        raise _corrupt(f"{cur.end - cur.pos} unexpected bytes after the last record")
    if hashlib.sha256(buf[: total - DIGEST_SIZE]).digest() != buf[total - DIGEST_SIZE : total]:
        raise _corrupt("file checksum (SHA-256) mismatch")
    seen: set[str] = set()
    for r in records:
        if r.name in seen:
            raise _corrupt(f"two records named {_quote(r.name)}")
        seen.add(r.name)
    flags = _HEAD.unpack(buf[: _HEAD.size])[3]
    return (_decompress(skeleton) if flags & XZ_SKELETON else bytes(skeleton)), records


def _decompress(body: memoryview) -> bytes:
    """The skeleton of an ``XZ_SKELETON`` file: u64 size, then one xz stream of exactly that many bytes.
    The output is capped at the stated size, so a hostile stream cannot make it larger."""
    if len(body) < _U64.size:
        raise _corrupt("the compressed skeleton has no size field")
    size = _U64.unpack(body[: _U64.size])[0]
    if size > _MAX_SKELETON:
        raise _corrupt(f"the compressed skeleton states {size} bytes, more than a serialized ONNX model holds")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
    try:
        out = decoder.decompress(bytes(body[_U64.size :]), max_length=size + 1)
    except lzma.LZMAError as e:
        raise _corrupt(f"the compressed skeleton does not decompress ({_first_line(e)})") from e
    if len(out) != size or not decoder.eof or decoder.unused_data:
        raise _corrupt(f"the compressed skeleton holds {len(out)} bytes{'' if decoder.eof else ' or more'}, "
                       f"not the {size} its size field gives")
    return out


def read_file(path: str | os.PathLike) -> tuple[bytes, list[Record]]:
    """``read`` a file; every error is an ``UnsupportedModelError`` naming the path."""
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file")
    if path.is_dir():
        raise UnsupportedModelError(f"{path}: is a folder, not an onnxz file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnsupportedModelError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from e
    try:
        return read(data)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e


def write_file(path: str | os.PathLike, data: bytes, *, protect: str | os.PathLike | None = None,
               force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file beside it, fsync, rename); return the path.

    ``protect`` and ``force`` are as in ``onnxopt.io.save_model``: never overwrite the input unasked.
    """
    path = Path(path)
    check_output_path(path, protect=protect, force=force)
    return write_atomic(path, data)


# --- writing -----------------------------------------------------------------------------------------------------


def _section(body: list[bytes]) -> list[bytes]:
    length = _U64.pack(sum(map(len, body)))
    crc = zlib.crc32(length)
    for part in body:
        crc = zlib.crc32(part, crc)
    return [length, *body, _U32.pack(crc)]


def _record_parts(r: Record) -> list[bytes]:
    meta = _meta_json(r.meta)
    parts = [_text(r.name), struct.pack(f"<III{len(r.dims)}q", r.data_type, r.encoding, len(r.dims), *r.dims),
             _U32.pack(len(meta)), meta, _U32.pack(len(r.streams))]
    for key in sorted(r.streams):
        parts += [_text(key), _U64.pack(len(r.streams[key])), r.streams[key]]
    return parts


def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    return _U32.pack(len(b)) + b


def _meta_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check_meta(meta: dict) -> None:
    scalar = (bool, int, float, str)
    for key, value in meta.items():
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(isinstance(v, scalar) for v in items):
            raise ValueError(f"meta {key!r}: keys are str, values bool/int/float/str or lists of them, not {value!r}")
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ValueError(f"meta {key!r}: floats must be finite, not {value!r}")
    _meta_json(meta)  # raises for strings that are not valid Unicode (lone surrogates)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, not {name!r}")
    name.encode("utf-8")  # lone surrogates cannot be written


# --- reading -----------------------------------------------------------------------------------------------------


class _Cursor:
    """Reads fields from ``buf[pos:end]``, checking each length against what is left before slicing."""

    def __init__(self, buf: memoryview, pos: int, end: int, where: str) -> None:
        self.buf, self.pos, self.end, self.where = buf, pos, end, where

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise _corrupt(f"{what} ({n} bytes) runs past the end of {self.where} ({self.end - self.pos} left)")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def u32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]

    def text(self, what: str) -> str:
        raw = self.take(self.u32(f"length of {what}"), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise _corrupt(f"{what} in {self.where} is not UTF-8") from e


def _read_header(buf: memoryview) -> tuple[int, int]:
    """Check magic, version, header CRC, flags and file length; return (record count, file length)."""
    n = len(buf)
    if n == 0:
        raise UnsupportedModelError("not an onnxz file (empty)")
    head = bytes(buf[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        if head[1:6] == MAGIC[1:6]:
            raise _corrupt("damaged magic bytes (copied in text mode?)")
        kind = next((k for sig, k in _FOREIGN.items() if head.startswith(sig)), None)
        raise UnsupportedModelError(f"not an onnxz file (bad magic{'; it is a ' + kind + ' file' if kind else ''})")
    if n < len(MAGIC) + 2:
        raise _truncated(f"{n} bytes, shorter than the {HEADER_SIZE}-byte header")
    major, minor = buf[len(MAGIC)], buf[len(MAGIC) + 1]
    if major != VERSION[0]:
        relation = "newer than" if major > VERSION[0] else "older than any version"
        raise UnsupportedModelError(f"onnxz version {major}.{minor} is {relation} this onnxopt reads ({VERSION[0]}.x)")
    if n < HEADER_SIZE:
        raise _truncated(f"{n} bytes, shorter than the {HEADER_SIZE}-byte header")
    _, _, _, flags, total, count = _HEAD.unpack(buf[: _HEAD.size])
    if _U32.unpack(buf[_HEAD.size : HEADER_SIZE])[0] != zlib.crc32(buf[: _HEAD.size]):
        raise _corrupt("header checksum mismatch")
    if flags & ~KNOWN_FLAGS:
        raise UnsupportedModelError(f"onnxz file {major}.{minor} uses features this onnxopt does not know "
                                    f"(flags {flags:#x}); a newer onnxopt wrote it")
    if total < HEADER_SIZE + _SECTION_OVERHEAD + DIGEST_SIZE:
        raise _corrupt(f"header gives an impossible file length ({total} bytes)")
    if n < total:
        raise _truncated(f"{n} of {total} bytes")
    if n > total:
        raise _corrupt(f"{n - total} unexpected bytes after the end of the file")
    return count, total


def _read_section(cur: _Cursor, label: str, index: int | None) -> memoryview:
    start = cur.pos
    body = cur.take(cur.u64(f"length of {label}"), label)
    crc = cur.u32(f"checksum of {label}")
    if crc != zlib.crc32(body, zlib.crc32(cur.buf[start : start + _U64.size])):
        name = _peek_name(body) if index is not None else None
        raise _corrupt(f"checksum mismatch in {f'record {_quote(name)}' if name else label}")
    return body


def _parse_record(body: memoryview, index: int) -> Record:
    cur = _Cursor(body, 0, len(body), f"record #{index}")
    name = cur.text("name")
    cur.where = f"record {_quote(name)}"
    data_type, code, rank = struct.unpack("<III", cur.take(12, "data type, encoding and rank"))
    dims = struct.unpack(f"<{rank}q", cur.take(8 * rank, "dims"))
    meta_text = cur.text("metadata")
    streams: dict[str, bytes] = {}
    for _ in range(cur.u32("stream count")):
        key = cur.text("stream name")
        if key in streams:
            raise _corrupt(f"{cur.where} has two streams named {key!r}")
        streams[key] = bytes(cur.take(cur.u64(f"length of stream {key!r}"), f"stream {key!r}"))
    # Bytes left over in a body are fields a later minor version appended: ignored by design.
    if code not in _ENCODING_IDS:
        raise UnsupportedModelError(f"onnxz {cur.where} uses encoding {code}, unknown to this onnxopt "
                                    f"(it knows {min(Encoding)}-{max(Encoding)}); a newer onnxopt wrote it")
    try:
        meta = json.loads(meta_text)
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
        return Record(name, data_type, dims, Encoding(code), meta, streams)
    except (ValueError, TypeError, RecursionError) as e:
        raise _corrupt(f"{cur.where}: {_first_line(e)}") from e


def _peek_name(body: memoryview) -> str | None:
    """Best-effort name of a record whose checksum failed, for the message only."""
    if len(body) < 4:
        return None
    n = _U32.unpack(body[:4])[0]
    if n == 0 or n > len(body) - 4:
        return None
    return str(body[4 : 4 + min(n, _MAX_NAME_IN_MESSAGE)], "utf-8", errors="replace")


def _quote(name: str) -> str:
    # repr() escapes newlines and control characters, keeping the message on one line.
    return repr(name if len(name) <= _MAX_NAME_IN_MESSAGE else name[:_MAX_NAME_IN_MESSAGE] + "...")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _corrupt(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"corrupt onnxz file: {what}")


def _truncated(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"truncated onnxz file: {what}")
