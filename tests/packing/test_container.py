"""The .onnxz container: exact bytes, round trips, and every way a file can be bad.

``_seal`` below frames raw section bodies independently of the module (from the layout in
docs/onnxz-format.md), so hand-made hostile files have valid checksums and reach the parser.
"""

import gzip
import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.errors import UnsupportedModelError, UserError
from onnxopt.packing import container
from onnxopt.packing.container import Encoding, Record, read, read_file, write, write_file

MAGIC = b"\x89ONNXZ\r\n\x1a\n"


def _section(body: bytes) -> bytes:
    length = struct.pack("<Q", len(body))
    return length + body + struct.pack("<I", zlib.crc32(length + body))


def _seal(skeleton: bytes, bodies: list[bytes], *, major=1, minor=0, flags=0, count=None) -> bytes:
    sections = _section(skeleton) + b"".join(_section(b) for b in bodies)
    total = 32 + len(sections) + 32
    head = MAGIC + struct.pack("<BBIQI", major, minor, flags, total, len(bodies) if count is None else count)
    data = head + struct.pack("<I", zlib.crc32(head)) + sections
    return data + hashlib.sha256(data).digest()


def _text(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<I", len(b)) + b


def _body(name="w", data_type=1, encoding=0, dims=(2,), meta=b"{}", streams=(("raw", b"ab"),), extra=b"") -> bytes:
    out = _text(name) + struct.pack(f"<III{len(dims)}q", data_type, encoding, len(dims), *dims) + _text(meta)
    out += struct.pack("<I", len(streams))
    for key, value in streams:
        out += _text(key) + struct.pack("<Q", len(value)) + value
    return out + extra


def _rejects(data: bytes, match: str) -> str:
    with pytest.raises(UnsupportedModelError, match=match) as info:
        read(data)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


@pytest.fixture
def records() -> list[Record]:
    rng = np.random.default_rng(0)
    return [
        Record("conv1.weight", TensorProto.FLOAT, (8, 3, 3, 3), Encoding.SHARED,
               {"bits": 5, "axis": 0, "scale": 0.125, "kind": "per-channel", "signed": True, "shape": [8, 1]},
               {"codebook": rng.standard_normal(32).astype(np.float32).tobytes(), "indices": rng.bytes(131)}),
        Record("scalar", TensorProto.INT64, (), Encoding.RAW, {}, {"raw": struct.pack("<q", -7)}),
        Record("empty", TensorProto.FLOAT, (0, 4), Encoding.RAW, {}, {"raw": b""}),
        Record("no streams", TensorProto.FLOAT16, (1,), Encoding.SPARSE_SHARED, {"note": "ünï"}, {}),
        Record("層/重み_ü🙂", TensorProto.FLOAT, (300, 70), Encoding.SPARSE_SHARED, {"index_bits": 4},
               {"codebook": b"", "indices": rng.bytes(5000), "relative": bytearray(rng.bytes(1000))}),
    ]


# --- exact bytes ---------------------------------------------------------------------------------------------------


def test_header_bytes_of_an_empty_container():
    data = write(b"", [])
    head = MAGIC + b"\x01\x00" + b"\x00" * 4 + struct.pack("<Q", 76) + b"\x00" * 4
    skeleton = b"\x00" * 8 + struct.pack("<I", zlib.crc32(b"\x00" * 8))
    expected = head + struct.pack("<I", zlib.crc32(head)) + skeleton
    assert data == expected + hashlib.sha256(expected).digest()
    assert data[:12] == b"\x89ONNXZ\r\n\x1a\n\x01\x00" and len(data) == 76 == container.HEADER_SIZE + 12 + 32
    assert read(data) == (b"", [])


def test_record_layout_matches_the_documented_bytes():
    record = Record("w", TensorProto.FLOAT, [2, 3], Encoding.SHARED, {"z": 1, "a": [0.5, "x"]},
                    {"idx": b"\x07", "cb": b"\x00\x00\x80\x3f"})
    body = (b"\x01\x00\x00\x00w" + struct.pack("<IIIqq", 1, 1, 2, 2, 3)
            + _text(b'{"a":[0.5,"x"],"z":1}') + struct.pack("<I", 2)
            + _text("cb") + struct.pack("<Q", 4) + b"\x00\x00\x80\x3f"
            + _text("idx") + struct.pack("<Q", 1) + b"\x07")
    assert write(b"SK", [record]) == _seal(b"SK", [body])


def test_round_trip(records):
    skeleton = helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()
    got_skeleton, got = read(write(skeleton, records))
    assert got_skeleton == skeleton and got == records
    assert [r.name for r in got] == [r.name for r in records]
    assert all(type(v) is bytes for r in got for v in r.streams.values())
    assert got[1].dims == () and got[2].dims == (0, 4) and got[0].meta["shape"] == [8, 1]


def test_same_input_same_bytes_whatever_the_dict_order(records):
    first = write(b"skeleton", records)
    assert write(b"skeleton", records) == first
    shuffled = [Record(r.name, r.data_type, r.dims, r.encoding, dict(reversed(r.meta.items())),
                       dict(reversed(r.streams.items()))) for r in records]
    assert write(b"skeleton", shuffled) == first


def test_tuples_in_meta_come_back_equal():
    record = Record("w", 1, (1,), Encoding.RAW, {"shape": (2, 3)})
    assert record.meta == {"shape": [2, 3]} and read(write(b"", [record]))[1] == [record]


# --- the writer refuses what it cannot write back -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"name": ""}, {"name": "\ud800"}, {"dims": (2, -1)}, {"dims": (2.0,)}, {"dims": (1 << 31, 1 << 31)},
    {"data_type": 0}, {"encoding": 99}, {"meta": {"x": float("nan")}}, {"meta": {"x": {"nested": 1}}},
    {"meta": {1: 2}}, {"meta": {"x": np.float32(1)}}, {"streams": {"": b""}}, {"streams": {"a": "text"}},
    {"streams": {"a": np.zeros(2)}},
])
def test_record_rejects_invalid_fields(kwargs):
    fields = {"name": "w", "data_type": 1, "dims": (2,), "encoding": Encoding.RAW, "meta": {}, "streams": {}}
    with pytest.raises((ValueError, TypeError)):
        Record(**{**fields, **kwargs})


def test_write_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicate record names: \\['w'\\]"):
        write(b"", [Record("w", 1, (), 0), Record("v", 1, (), 0), Record("w", 1, (), 0)])


# --- foreign, damaged and future files ------------------------------------------------------------------------------


def test_foreign_files_are_not_onnxz(records):
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    _rejects(b"", r"^not an onnxz file \(empty\)$")
    _rejects(model.SerializeToString(), r"^not an onnxz file \(bad magic\)$")
    _rejects(np.random.default_rng(1).bytes(4096), r"^not an onnxz file \(bad magic\)$")
    _rejects(gzip.compress(write(b"", records), mtime=0), r"^not an onnxz file \(bad magic; it is a gzip file\)$")
    _rejects(b"ONNXZ", r"^not an onnxz file \(bad magic\)$")


def test_text_mode_damage_is_named(records):
    data = write(b"", records)
    _rejects(data.replace(b"\r\n", b"\n", 1), "^corrupt onnxz file: damaged magic bytes")
    _rejects(bytes([data[0] & 0x7F]) + data[1:], "^corrupt onnxz file: damaged magic bytes")


def test_other_major_versions_are_refused_by_name():
    _rejects(_seal(b"", [], major=3), r"^onnxz version 3\.0 is newer than this onnxopt reads \(1\.x\)$")
    _rejects(_seal(b"", [], major=0, minor=9), r"^onnxz version 0\.9 is older than any version this onnxopt reads")
    _rejects(MAGIC + b"\x02\x05", r"^onnxz version 2\.5 is newer")  # decided before the rest of the header is read


def test_a_newer_minor_version_is_read_and_appended_record_fields_ignored():
    assert read(_seal(b"sk", [_body(extra=b"field added in 1.7")], minor=7))[1] == [
        Record("w", 1, (2,), Encoding.RAW, {}, {"raw": b"ab"})]


def test_unknown_flags_and_encodings_are_refused():
    _rejects(_seal(b"", [], flags=4), r"uses features this onnxopt does not know \(flags 0x4\)")
    _rejects(_seal(b"", [_body(name="w3", encoding=9)]), r"^onnxz record 'w3' uses encoding 9, unknown")


def test_truncation_at_every_offset_is_refused(records):
    data = write(b"skeleton", records[:4])
    assert len(data) > 300
    for n in range(1, len(data)):
        message = _rejects(data[:n], "^truncated onnxz file: ")
        assert f"{n} of {len(data)} bytes" in message or n < 32


def test_every_single_bit_flip_is_caught(records):
    data = write(b"skeleton", records[1:4])
    for offset in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            with pytest.raises(UnsupportedModelError):
                read(bytes(damaged))


def test_checksum_messages_name_the_part(records):
    data = write(b"skeleton", records)
    start = data.index("層/重み_ü🙂".encode())
    _rejects(_flip(data, start + 40), r"^corrupt onnxz file: checksum mismatch in record '層/重み_ü🙂'$")
    _rejects(_flip(data, 32 + 8 + 2), r"^corrupt onnxz file: checksum mismatch in the skeleton model$")
    _rejects(_flip(data, 24), r"^corrupt onnxz file: header checksum mismatch$")
    _rejects(_flip(data, len(data) - 1), r"^corrupt onnxz file: file checksum \(SHA-256\) mismatch$")
    _rejects(data + b"\x00", r"^corrupt onnxz file: 1 unexpected bytes after the end of the file$")
    newline = write(b"", [Record("a\nb", 1, (), 0)])
    _rejects(_flip(newline, len(newline) - 40), r"checksum mismatch in record 'a\\nb'$")


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


# --- hostile files with valid checksums: lengths are checked before anything is sliced -------------------------------


@pytest.mark.parametrize(("body", "match"), [
    (struct.pack("<I", 0xFFFFFFFF) + b"w", r"name \(4294967295 bytes\) runs past the end of record #0 \(1 left\)$"),
    (_text("w") + struct.pack("<III", 1, 0, 0x7FFFFFFF), r"dims \(17179869176 bytes\) runs past the end of record 'w'"),
    (_body(streams=(("raw", b""),))[:-8] + struct.pack("<Q", 1 << 62),
     r"stream 'raw' \(4611686018427387904 bytes\) runs past"),
    (_body(streams=())[:-4] + struct.pack("<I", 0xFFFFFFFF),
     r"length of stream name \(4 bytes\) runs past the end of record 'w' \(0 left\)$"),
    (_body(name=b"\xff\xfe"), "name in record #0 is not UTF-8"),
    (_body(dims=(2, -3)), r"record 'w': invalid dims \[2, -3\]$"),
    (_body(data_type=0), "record 'w': invalid ONNX data type 0$"),
    (_body(meta=b"[1, 2]"), "record 'w': metadata is not a JSON object$"),
    (_body(meta=b'{"x": NaN}'), "record 'w': meta 'x': floats must be finite, not nan$"),
    (_body(meta=b'{"x": {"y": 1}}'), "record 'w': meta 'x': keys are str, values"),
    (_body(meta=b"{" * 100), "record 'w': Expecting property name"),
    (_body(meta=b'{"x":' + b"[" * 100000), "record 'w': maximum recursion depth"),
    (_body(meta=b'{"x": ' + b"9" * 5000 + b"}"), "record 'w': Exceeds the limit"),
    (_body(meta=b"\xff"), "metadata in record 'w' is not UTF-8"),
    (_body(streams=(("a", b""), ("a", b""))), "record 'w' has two streams named 'a'"),
])
def test_hostile_lengths_and_fields_are_refused(body, match):
    _rejects(_seal(b"", [body]), "^corrupt onnxz file: " + match)


def test_hostile_counts_and_names_are_refused():
    _rejects(_seal(b"", [_body()], count=0xFFFFFFFF), r"^corrupt onnxz file: length of record #1 \(8 bytes\) runs")
    _rejects(_seal(b"", [_body()], count=0), r"^corrupt onnxz file: \d+ unexpected bytes after the last record$")
    _rejects(_seal(b"", [_body(), _body()]), r"^corrupt onnxz file: two records named 'w'$")
    head = MAGIC + struct.pack("<BBIQI", 1, 0, 0, 40, 0)
    _rejects(head + struct.pack("<I", zlib.crc32(head)) + b"\x00" * 8, r"impossible file length \(40 bytes\)")


# --- files ----------------------------------------------------------------------------------------------------------


def test_write_file_and_read_file(tmp_path, records):
    path = write_file(tmp_path / "m.onnxz", write(b"sk", records))
    assert read_file(path) == (b"sk", records)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnxz"]  # no temp file left behind
    write_file(path, b"again")
    assert path.read_bytes() == b"again"


def test_write_file_refuses_the_input_and_missing_folders(tmp_path):
    src = tmp_path / "in.onnxz"
    src.write_bytes(b"input")
    with pytest.raises(UserError, match="refusing to overwrite the input"):
        write_file(src, b"x", protect=src)
    assert src.read_bytes() == b"input"
    write_file(src, b"x", protect=src, force=True)
    assert src.read_bytes() == b"x"
    with pytest.raises(UserError, match="does not exist"):
        write_file(tmp_path / "nope" / "m.onnxz", b"x")


def test_read_file_errors_are_one_line_and_name_the_path(tmp_path, records):
    with pytest.raises(UnsupportedModelError, match=r"missing\.onnxz: no such file$"):
        read_file(tmp_path / "missing.onnxz")
    with pytest.raises(UnsupportedModelError, match="is a folder, not an onnxz file$"):
        read_file(tmp_path)
    bad = tmp_path / "bad.onnxz"
    bad.write_bytes(write(b"", records)[:100])
    with pytest.raises(UnsupportedModelError, match=rf"^{bad}: truncated onnxz file: 100 of \d+ bytes$"):
        read_file(bad)
    onnx_path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), onnx_path)
    with pytest.raises(UnsupportedModelError, match=r"m\.onnx: not an onnxz file \(bad magic\)$"):
        read_file(onnx_path)


def test_meta_is_compact_sorted_json():
    record = Record("w", 1, (), 0, {"b": 1, "a": "é"})
    data = write(b"", [record])
    assert b'{"a":"\xc3\xa9","b":1}' in data and json.loads('{"a":"é","b":1}') == record.meta


def test_the_documented_example_bytes_are_what_write_gives():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "onnxz-format.md").read_text()
    dump = doc.split("### The empty container", 1)[1].split("```", 2)[1]
    documented = bytes.fromhex("".join(line[6:] for line in dump.strip().splitlines()))
    assert documented == write(b"", [])
