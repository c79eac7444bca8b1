"""Shared helpers for the models/build_*.py scripts.

Only the build scripts import this module (they run with models/ as sys.path[0]);
the onnxopt package never does, and nothing here is needed to *use* the
committed .onnx / .npz files. torch is imported lazily so that the file-writing
and checking helpers work without it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Fixed timestamp for the members of .npz files, so that a rebuild writes
# byte-identical files (numpy.savez stamps members with the current time).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def setup_determinism(seed: int) -> None:
    """Seed every RNG, use one thread and deterministic kernels."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.use_deterministic_algorithms(True)


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file ordinary permissions (mkstemp makes it 0600) and move it in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed equivalent with fixed member timestamps (byte-reproducible)."""

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    _atomic_write(path, write)


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    _atomic_write(path, write)


def export_onnx(model, args, path: Path, **kwargs) -> None:
    """torch.onnx.export with the TorchScript exporter, written atomically."""
    import torch

    path = Path(path)

    def write(tmp: str) -> None:
        torch.onnx.export(model, args, tmp, dynamo=False, **kwargs)

    # The exporter picks the file type from the suffix; keep ".onnx" on the temp file.
    _atomic_write(path, write, suffix=".tmp.onnx")


def op_counts(model) -> dict[str, int]:
    """Node count by op type (domain-qualified when not ai.onnx), subgraphs included."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph) -> None:
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _value_sig(vi) -> str:
    import onnx

    t = vi.type.tensor_type
    dims = [d.dim_param if d.dim_param else str(d.dim_value) for d in t.shape.dim]
    return f"{vi.name}: {onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)} [{', '.join(dims)}]"


def check_model(path: Path, *feeds: dict[str, np.ndarray], require_ops=()) -> list:
    """Full ONNX check, load in onnxruntime, run each feed dict; print a summary.

    Returns one list of onnxruntime outputs per feed dict.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    counts = op_counts(model)
    missing = [op for op in require_ops if op not in counts]
    if missing:
        raise AssertionError(f"{path.name}: expected ops missing from the export: {missing}")

    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    size = path.stat().st_size
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(f"== {path.name}: {size / 1024:.1f} KiB, sha256 {sha}..., opset {opset}, "
          f"{len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers")
    for vi in model.graph.input:
        print("   input  " + _value_sig(vi))
    for vi in model.graph.output:
        print("   output " + _value_sig(vi))
    print("   ops: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    results = []
    for feed in feeds:
        outs = sess.run(None, feed)
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        for meta, out in zip(sess.get_outputs(), outs, strict=True):
            if not np.all(np.isfinite(out)):
                raise AssertionError(f"{path.name}: non-finite values in output {meta.name}")
            print(f"   onnxruntime ran {shapes}: {meta.name} {tuple(out.shape)} {out.dtype}")
        results.append(outs)
    return results


def randomize_batchnorm(model, generator, eps_every: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    With eps_every=k > 0, every k-th BatchNorm (1-based) gets eps=1e-3 (the
    TensorFlow/Keras default) instead of PyTorch's 1e-5.
    """
    import torch

    i = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                i += 1
                c = m.num_features
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                m.running_var.copy_(torch.empty(c).uniform_(0.3, 2.5, generator=generator))
                if eps_every and i % eps_every == 0:
                    m.eps = 1e-3
