"""A safetensors checkpoint read tensor by tensor: headers first, then only the bytes asked for.

Every shard's header (an 8-byte length and a JSON table of name -> dtype, shape, byte range) is
read up front, so what a rank loads is decided from names and shapes before any weight byte is
read. `read` then fetches one tensor's exact byte range with `os.pread` (thread-safe, no shared
file position) into a fresh buffer, and counts the bytes, which is how a rank proves it read
only its share.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from services.models.config import ModelConfigError

INDEX_FILE = "model.safetensors.index.json"
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20
"""A larger header is a corrupt file, not a checkpoint."""
MMAP_FROM_BYTES = 1 << 20
"""Tensors from this size are read into their own anonymous mapping, unmapped when freed: a
reader thread's malloc arena would keep them resident after the copy."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, checked to exist."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelConfigError(f"{index} is not a valid safetensors index (needs 'weight_map')") from e
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelConfigError(f"{index} lists shard(s) missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"model directory {model_dir} has no *.safetensors weights")
    return files


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one shard, from its header alone."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelConfigError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ModelConfigError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{path} has a corrupt safetensors header: {e}") from None
    base = 8 + length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelConfigError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name, path, dtype, tuple(info["shape"]), base + begin, base + end))
    return entries


class Checkpoint:
    """All tensors of a checkpoint directory by name; reads count their bytes."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.files = shard_files(self.dir)
        self.entries: dict[str, TensorEntry] = {}
        for path in self.files:
            for e in read_header(path):
                if e.name in self.entries:
                    raise ModelConfigError(
                        f"tensor {e.name} is in both {self.entries[e.name].file.name} and {path.name}"
                    )
                self.entries[e.name] = e
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype (only its own bytes are read)."""
        e = self.entries[name]
        buf: bytearray | mmap.mmap = (
            mmap.mmap(-1, e.nbytes) if e.nbytes >= MMAP_FROM_BYTES else bytearray(e.nbytes)
        )
        with memoryview(buf) as view:
            self._pread(e, view)
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(e.dtype).reshape(e.shape)

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Read tensor `name` straight into `dst`: CPU, contiguous, of its stored dtype and shape."""
        e = self.entries[name]
        if (
            dst.device.type != "cpu"
            or not dst.is_contiguous()
            or dst.dtype != e.dtype
            or tuple(dst.shape) != e.shape
        ):
            raise ValueError(
                f"cannot read {name} ({e.dtype}, {list(e.shape)}) into {dst.dtype} {list(dst.shape)}"
            )
        if e.nbytes:
            with memoryview((ctypes.c_char * e.nbytes).from_address(dst.data_ptr())).cast("B") as view:
                self._pread(e, view)

    def _pread(self, e: TensorEntry, view: memoryview) -> None:
        fd = self._fd(e.file)
        done = 0
        while done < e.nbytes:
            n = os.preadv(fd, [view[done:]], e.start + done)
            if n <= 0:
                raise ModelConfigError(f"{e.file} ends inside tensor {e.name} (truncated shard?)")
            done += n
        with self._lock:
            self.bytes_read += e.nbytes

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                self._fds[path] = fd
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
