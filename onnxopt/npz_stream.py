"""Read one .npz lazily: every member's .npy header up front, its rows on demand.

``np.load`` reads a whole array when an .npz is indexed, so one file of N samples costs
N samples of memory. Here each member is opened once and read front to back, a batch of
rows at a time, straight into a new array: the bytes ``np.load`` would give, in memory
that stays near one batch whatever the file's size. Stored (``np.savez``) and deflated
(``np.savez_compressed``) members read the same way, through ``zipfile``. Rows of a
Fortran-order array are not contiguous, so such an array is read whole (as ``np.load`` does).
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from onnxopt.errors import DataError

CHUNK = 1 << 18  # bytes read per call: a batch is filled without a second batch-sized buffer
_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile)


class NpyMember:
    """One array of an .npz: ``shape``, ``dtype`` and ``ndim`` from its header; rows come
    in file order from ``take``."""

    def __init__(self, stream, name: str, shape: tuple[int, ...], dtype: np.dtype, path: Path):
        self._stream, self.name, self.shape, self.dtype, self._path = stream, name, shape, dtype, path
        self.ndim = len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, count: int, *, squeeze: bool = False) -> np.ndarray:
        """The next ``count`` rows as a new array; with ``squeeze``, the next row without its first axis."""
        out = np.empty(self.shape[1:] if squeeze else (count, *self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        while filled < len(view):
            try:
                chunk = self._stream.read(min(CHUNK, len(view) - filled))
            except _READ_ERRORS as e:
                raise _unreadable(self._path, self.name, e) from e
            if not chunk:
                raise _unreadable(self._path, self.name, "data ends early")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return out

    def close(self) -> None:
        self._stream.close()


class LazyNpz:
    """An open .npz; ``with`` gives {name: NpyMember} (names as ``np.load`` gives them) and closes the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except _READ_ERRORS as e:
            raise DataError(f"{self.path}: not a readable .npz file ({e})") from e
        self.arrays: dict[str, NpyMember] = {}
        try:
            for info in self._zip.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                self.arrays[name] = self._member(info, name)
        except BaseException:
            self.close()
            raise

    def _member(self, info: zipfile.ZipInfo, name: str) -> NpyMember:
        stream = None
        try:
            stream = self._zip.open(info)
            version = npy.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not read")
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
            if dtype.hasobject:
                raise ValueError("it holds Python objects")
            if info.file_size - stream.tell() < math.prod(shape) * dtype.itemsize:
                raise ValueError(f"it holds {info.file_size - stream.tell()} bytes of data, its header "
                                 f"promises {math.prod(shape) * dtype.itemsize}")
        except _READ_ERRORS as e:
            if stream is not None:
                stream.close()
            raise _unreadable(self.path, info.filename, e) from e
        if fortran and len(shape) > 1:  # rows are not contiguous: read it whole, as np.load would
            try:
                data = stream.read(math.prod(shape) * dtype.itemsize)
            except _READ_ERRORS as e:
                raise _unreadable(self.path, info.filename, e) from e
            finally:
                stream.close()
            whole = np.frombuffer(data, dtype).reshape(shape[::-1]).T
            stream = io.BytesIO(np.ascontiguousarray(whole).tobytes())
        return NpyMember(stream, info.filename, shape, dtype, self.path)

    def close(self) -> None:
        for member in self.arrays.values():
            member.close()
        self._zip.close()

    def __enter__(self) -> dict[str, NpyMember]:
        return self.arrays

    def __exit__(self, *exc) -> None:
        self.close()


def _unreadable(path: Path, member: str, why) -> DataError:
    why = " ".join(str(why).split())  # one line, whatever the library's message
    return DataError(f"{path}: not a readable .npz file (member {member!r}: {why})")
