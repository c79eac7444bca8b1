import os

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import io
from onnxopt.errors import UnsupportedModelError, UserError
from tests import graphs, numerics


def test_round_trip_keeps_model_fields(conv_model, tmp_path):
    out = io.save_model(io.to_model(io.to_graph(conv_model), like=conv_model), tmp_path / "out.onnx")
    back = io.load_model(out)
    assert back.doc_string == "model doc" and back.model_version == 3
    assert [(p.key, p.value) for p in back.metadata_props] == [("author", "tests")]
    assert back.producer_name == conv_model.producer_name and back.ir_version == conv_model.ir_version
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 17)]
    assert [i.name for i in back.graph.input] == ["x"] and [o.name for o in back.graph.output] == ["y"]
    numerics.assert_same_outputs(conv_model, back, rtol=0, atol=0)


def test_save_refuses_input_without_force(conv_path, conv_model):
    before = conv_path.read_bytes()
    with pytest.raises(UserError, match="overwrite the input"):
        io.save_model(conv_model, conv_path, protect=conv_path)
    assert conv_path.read_bytes() == before
    io.save_model(conv_model, conv_path, protect=conv_path, force=True)


def test_save_leaves_no_temporary_files(conv_model, tmp_path):
    io.save_model(conv_model, tmp_path / "a.onnx")
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]


def test_failed_save_leaves_nothing(conv_model, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        io.save_model(conv_model, tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []


def test_large_models_use_external_data(conv_model, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(io, "EXTERNAL_TENSOR_MIN_BYTES", 0)
    path = io.save_model(conv_model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert all(not t.raw_data for t in onnx.load(path, load_external_data=False).graph.initializer
               if t.name == "w"), "weights should live in the data file"
    assert conv_model.graph.initializer[0].raw_data, "the caller's model must not be emptied"
    numerics.assert_same_outputs(conv_model, io.load_model(path), rtol=0, atol=0)
    assert io.file_size(path) == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"hello, I am a text file\n" * 20, "not an ONNX model"),
    ],
)
def test_load_rejects_non_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnsupportedModelError, match=message):
        io.load_model(path)


@pytest.mark.parametrize("suffix", [".json", ".txt", ".onnx"])
def test_any_extension_is_read_as_binary_protobuf(tmp_path, suffix, conv_model):
    junk = tmp_path / f"junk{suffix}"
    junk.write_text('{"not": "a model"}\n')
    with pytest.raises(UnsupportedModelError):
        io.load_model(junk)
    good = tmp_path / f"model{suffix}"
    good.write_bytes(conv_model.SerializeToString())
    assert io.load_model(good).graph.node[0].op_type == "Conv"


def test_load_rejects_truncated_model(conv_path):
    data = conv_path.read_bytes()
    conv_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedModelError):
        io.load_model(conv_path)


def test_load_rejects_invalid_model(tmp_path):
    node = helper.make_node("Relu", ["nowhere"], ["y"])
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "invalid.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedModelError, match="invalid ONNX model"):
        io.load_model(path)


def test_load_rejects_folder(tmp_path):
    with pytest.raises(UnsupportedModelError, match="folder"):
        io.load_model(tmp_path)


def test_missing_output_folder(conv_model, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        io.save_model(conv_model, tmp_path / "nope" / "out.onnx")


def test_graphs_helper_builds_valid_models():
    m = graphs.model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [2])], [("y", np.float32, [2])])
    out = numerics.run(m, {"x": np.array([-1, 2], np.float32)})
    np.testing.assert_array_equal(out["y"], [0, 2])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_atomic_follows_the_umask_like_model_files(conv_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        small = io.write_atomic(tmp_path / "r.json", "{}\n")
        model = io.save_model(conv_model, tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert small.read_text() == "{}\n"
    assert small.stat().st_mode & 0o777 == 0o666 & ~umask == model.stat().st_mode & 0o777


def test_write_atomic_leaves_the_old_file_and_no_temp_on_failure(tmp_path):
    path = io.write_atomic(tmp_path / "r.bin", b"old")
    with pytest.raises(TypeError):
        io.write_atomic(path, object())
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.bin"]
