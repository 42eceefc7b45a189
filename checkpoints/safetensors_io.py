"""Memory-mapped, tensor-by-tensor reading of safetensors checkpoints (single file or sharded with an index).

Why not `safetensors.safe_open(..., "numpy")`: its numpy path cannot return float8 tensors (DeepSeek's release is
float8_e4m3 with block scales), and we want errors that name the tensor *and* the file. The format is a u64
header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw little-endian bytes; we validate the
header against the file size and map each tensor lazily with numpy + ml_dtypes. Nothing is ever unpickled.
Writing uses the `safetensors` library (see `write`).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and/or file."""


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} does not exist") from None
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no safetensors header)")
        (hlen,) = struct.unpack("<Q", self._f.read(8))
        if hlen > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {hlen} exceeds the file ({size} bytes): truncated or "
                                  f"not a safetensors file")
        try:
            header = json.loads(self._f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + hlen
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                code, shape, (start, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {e!r}") from None
            if code not in DTYPES:
                raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {code!r} "
                                      f"(supported: {sorted(DTYPES)})")
            dt = DTYPES[code]
            if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or start < 0:
                raise CheckpointError(f"tensor {name!r} in {path}: byte range {start}..{end} does not match "
                                      f"shape {list(shape)} of {code}")
            if self._data_start + end > size:
                raise CheckpointError(f"tensor {name!r} in {path}: data ends at byte {self._data_start + end} "
                                      f"but the file has {size} bytes (truncated file)")
            self._entries[name] = (dt, shape, start, end)
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the memory map (no copy)."""
        dt, shape, start, end = self._entries[name]
        arr = np.frombuffer(self._mm, dtype=dt, count=(end - start) // dt.itemsize,
                            offset=self._data_start + start)
        return arr.reshape(shape)

    def get_rows(self, name: str, stop: int) -> np.ndarray:
        """The first `stop` rows of a tensor (reads only those bytes)."""
        dt, shape, start, end = self._entries[name]
        n = int(np.prod(shape[1:], dtype=np.int64)) * min(stop, shape[0])
        arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=self._data_start + start)
        return arr.reshape((min(stop, shape[0]),) + shape[1:])


class Checkpoint:
    """All tensors of an HF checkpoint directory, by name, across one or many shard files."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self.files = {f: SafetensorsFile(os.path.join(path, f)) for f in files}
        self._where: dict[str, str] = {}
        for fname, sf in self.files.items():
            for k in sf.keys():
                if k in self._where:
                    raise CheckpointError(f"tensor {k!r} appears in both {self._where[k]} and {fname}")
                self._where[k] = fname
        if weight_map is not None:
            for k, fname in weight_map.items():
                if self._where.get(k) != fname:
                    raise CheckpointError(f"index says tensor {k!r} is in {fname}, but it is "
                                          f"{'in ' + self._where[k] if k in self._where else 'in no file'}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return self._where[name]

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self.files[self._where[name]]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {self.path}") from None

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def get_rows(self, name: str, stop: int) -> np.ndarray:
        return self._file(name).get_rows(name, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file (numpy arrays; bfloat16/float8 via ml_dtypes)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def dtype_name(dt: np.dtype) -> str:
    return _NAMES.get(np.dtype(dt), str(dt))
