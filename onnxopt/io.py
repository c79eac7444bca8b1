"""Loading and saving models: the only module that touches model files.

Loading turns every way a file can be wrong (missing, a folder, not protobuf, not a
model, truncated, rejected by the checker, external data missing) into an
``UnsupportedModelError`` with a one-line message.

Saving is atomic: the model (and its external data file, for models over 2 GB) is
written into a temporary folder beside the destination and renamed into place, so
a crash or a full disk never leaves a half-written output, and the input is never
overwritten unless the caller says so.

onnx-graphsurgeon drops some model-level fields on a round trip (model doc string,
model version, domain, metadata props); ``to_model`` copies them from the original.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from onnxopt.errors import UnsupportedModelError, UserError

logger = logging.getLogger(__name__)

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)
# In such a model, tensors from this size up go to the data file; small ones stay inline.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model (with its external data) or raise ``UnsupportedModelError``."""
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file")
    if path.is_dir():
        raise UnsupportedModelError(f"{path}: is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise UnsupportedModelError(f"{path}: is empty")
    try:
        # format="protobuf": onnx would otherwise pick a parser from the file extension (.json, .txt).
        model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{path}: not an ONNX model or truncated ({_first_line(e)})") from e
    if not model.graph.node and not model.graph.output or not model.opset_import:
        raise UnsupportedModelError(f"{path}: not an ONNX model (no graph or no opset)")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path}: cannot read its external data ({_first_line(e)})") from e
    if check:
        try:  # by path: the checker reads the file itself, no second serialization in Python
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise UnsupportedModelError(f"{path}: invalid ONNX model: {_first_line(e)}") from e
    return model


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it must be saved with external data (too large)."""
    return None if _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD else model.SerializeToString()


def check_model(model: onnx.ModelProto, name: str | os.PathLike = "model", *, data: bytes | None = None) -> None:
    """Run the onnx checker; ``data`` is ``model`` already serialized, to avoid doing it twice."""
    try:
        if data is not None:
            onnx.checker.check_model(data)
        elif _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            # The checker needs a serialized proto, impossible past 2 GB: check the graph only.
            onnx.checker.check_graph(model.graph, _checker_context(model))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise UnsupportedModelError(f"{name}: invalid ONNX model: {_first_line(e)}") from e


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: str | os.PathLike | None = None,
    force: bool = False,
    data: bytes | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path written.

    ``data`` is ``model`` already serialized (``serialize``), written as it is.

    ``protect`` is the input file: writing over it needs ``force``. Models whose
    tensors add up to nearly 2 GB are saved with one external data file beside them,
    named ``<file name>.data``.
    """
    path = Path(path)
    check_output_path(path, protect=protect, force=force)
    external = _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = tmpdir / path.name
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving as external data empties the tensors it moves out
            onnx.save_model(
                copy,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
            )
            if (tmpdir / (path.name + ".data")).exists():
                os.replace(tmpdir / (path.name + ".data"), path.parent / (path.name + ".data"))
        else:
            with open(staged, "wb") as f:
                f.write(data if data is not None else model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a small file (report, cache, container) atomically: a temporary file beside
    ``path``, fsync, rename. Its mode follows the umask like ``open`` (mkstemp alone gives 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, protect=None, force: bool = False) -> None:
    """Raise ``UserError`` if ``path`` cannot be written, before any work is done."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: output folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    if protect is not None and path.exists() and Path(protect).exists() and path.samefile(protect):
        if not force:
            raise UserError(f"{path}: refusing to overwrite the input model (use --force)")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph``, keeping the model-level fields of ``like`` that gs does not carry."""
    model = gs.export_onnx(graph, do_type_check=False)
    # IR < 4 required initializers to be graph inputs too; gs no longer lists them there.
    model.ir_version = max(like.ir_version, 4)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    # Opsets the original imported must stay imported even if no node uses them now.
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in like.opset_import if o.domain not in have)
    return model


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model, including an external data file beside it."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else 4 * max(
            len(t.float_data), len(t.int32_data), len(t.int64_data) * 2, len(t.double_data) * 2
        )
    return total


def _checker_context(model: onnx.ModelProto):
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    return ctx


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        if line.strip() and not line.startswith("==>"):
            return line.strip()[:300]
    return text.splitlines()[0][:300]
