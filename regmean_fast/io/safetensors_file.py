"""Reading and writing the safetensors format without holding whole files in memory.

Reading: the header is parsed and validated (sizes, offsets, dtypes) when the file is opened; each
tensor is read with pread straight into its destination. Nothing is mapped, so no file pages count
in the resident set (a memory map released with madvise still kept the pages that the kernel's
fault-around had mapped next to each tensor: ~60 KB per tensor read, growing with depth).

Writing: the layout of a shard (names, dtypes, shapes, hence every offset) is known before any
tensor is computed, so the header is written first and each tensor is written at its place as it
is produced; a shard never lives in memory as a whole. The bytes are hashed while written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: missing, truncated or with a bad header."""


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple
    begin: int  # absolute file offsets
    end: int


class SafetensorsReader:
    """One open safetensors file: validated header, lazy per-tensor reads (pread into the tensor)."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self):
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size < 8:
            raise SafetensorsError(f"{self.path}: not a safetensors file (only {self.size} bytes)")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > MAX_HEADER or 8 + n > self.size:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (header length {n}, file {self.size} bytes)")
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header")
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + n
        tensors = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt safetensors header entry for {name!r}") from None
            if b < 0 or e < b or e - b != numel(shape) * element_size(dtype):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has inconsistent offsets")
            tensors[name] = TensorInfo(dtype, shape, start + b, start + e)
            spans.append((b, e))
        spans.sort()
        pos = 0
        for b, e in spans:
            if b != pos:
                raise SafetensorsError(f"{self.path}: corrupt safetensors file (tensor data not contiguous)")
            pos = e
        if start + pos != self.size:
            raise SafetensorsError(
                f"{self.path}: truncated or corrupt safetensors file ({self.size} bytes, header says {start + pos})")
        return tensors, metadata

    def keys(self):
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of `name` in a fresh tensor, or in `out` (a contiguous CPU tensor of its dtype and
        shape, e.g. a view of a reused buffer)."""
        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise ValueError(f"{self.path}: {name} is {info.dtype} {list(info.shape)}; cannot read it into a "
                             f"{'' if out.is_contiguous() else 'non-contiguous '}{out.device.type} {out.dtype} "
                             f"{list(out.shape)} tensor")
        nbytes = info.end - info.begin
        if nbytes:
            dst = memoryview(out.view(-1).view(torch.uint8).numpy())
            fd, pos = self._file.fileno(), 0
            while pos < nbytes:  # one call reads at most ~2 GiB
                n = os.preadv(fd, [dst[pos:]], info.begin + pos)
                if n <= 0:
                    raise SafetensorsError(f"{self.path}: file ended inside tensor {name!r} (modified while open?)")
                pos += n
        return out

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def header_bytes(entries, metadata: dict | None = None) -> tuple[bytes, int]:
    """entries: list of (name, dtype, shape) in data order -> (8-byte length + padded JSON header, data size)."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        nb = numel(shape) * element_size(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, pos


class StreamingShardWriter:
    """Writes one safetensors file whose layout is fixed up front, tensor by tensor, in order.

    Each tensor is written (and hashed) by a background thread while the caller computes the next one: the
    page-cache copy and the sha256 of an output were a third of a linear merge's time. One write is in flight
    at a time (write() first waits for the previous one, so its errors surface there or in finish()); a
    tensor passed to write() must not change afterwards."""

    def __init__(self, path: str, entries, metadata: dict | None = None):
        self.path = str(path)
        self.entries = list(entries)
        self._next = 0
        head, self.data_size = header_bytes(self.entries, metadata)
        self.total_size = len(head) + self.data_size
        self._hash = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._in_flight = None  # the background write of the previous tensor (a Future)
        self._pool = None
        self._write(head)

    def _write(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)  # (hashlib and file writes release the GIL)

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    @property
    def done(self) -> bool:
        return self._next == len(self.entries)

    def expected(self) -> str | None:
        return self.entries[self._next][0] if not self.done else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.entries[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"shard writer expected {exp_name} {dtype} {tuple(shape)}, got {name} "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        self._wait()
        if t.numel():
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
            self._in_flight = self._pool.submit(self._write, memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _stop_thread(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def finish(self) -> str:
        """Flush and fsync; returns the sha256 of the file's bytes."""
        if not self.done:
            raise RuntimeError(f"{self.path}: finished before all tensors were written")
        try:
            self._wait()
        finally:
            self._stop_thread()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:  # the error that stopped the run is already on its way
            pass
        self._stop_thread()
        try:
            self._file.close()
        except OSError:
            pass


def file_sha256(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
