"""Reading and writing safetensors files one tensor at a time.

Checkpoints here can be hundreds of gigabytes, so nothing holds a whole model: headers are parsed
and validated up front (a truncated or corrupt file is reported before any work starts), each tensor
is memory-mapped only while it is used, and writers lay out a file's header from the planned shapes
so that tensors can be streamed into it in order.

Pickle-based weight files (``.bin``, ``.pt``, ...) are refused, never opened: unpickling runs code.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

# safetensors dtype tag -> (torch dtype name, bytes per element). Names, not torch objects: the
# converter moves bytes and never needs to import torch.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


def torch_dtype(tag: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[tag][0])


def dtype_tag(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(tag for tag, (torch_name, _) in DTYPES.items() if torch_name == name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype tag, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            path,
            "refusing a pickle-based weight file: loading it could run arbitrary code",
            found=path.suffix,
            expected=".safetensors (convert it with the safetensors library in a trusted environment)",
        )


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header; raise CheckpointError naming what is wrong."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "truncated safetensors file: no header length",
                                  found=f"{size} bytes", expected="at least 8 bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, "corrupt or truncated safetensors header length",
                                  found=f"{header_len} bytes", expected=f"at most {min(_MAX_HEADER_BYTES, size - 8)}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header", found=type(header).__name__,
                              expected="a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _parse_entry(path, name, entry, data_start)
    # Tensors must tile the data region exactly: a gap or a short file means corruption.
    covered = 0
    for info in sorted(infos.values(), key=lambda i: i.start):
        if info.start - data_start != covered:
            raise CheckpointError(path, "corrupt safetensors header: tensor data overlaps or leaves a gap",
                                  subject=info.name, found=f"offset {info.start - data_start}",
                                  expected=f"offset {covered}")
        covered = info.end - data_start
    if covered > data_size:
        raise CheckpointError(path, "truncated safetensors file: tensor data is cut short",
                              found=f"{data_size} data bytes", expected=f"{covered} data bytes")
    return infos


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(path, "corrupt safetensors header entry", subject=name, found=entry,
                              expected="{dtype, shape, data_offsets}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(path, "unsupported tensor dtype", subject=name, found=dtype,
                              expected=" | ".join(DTYPES))
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(path, "corrupt tensor shape", subject=name, found=shape,
                              expected="a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(path, "corrupt data offsets", subject=name, found=offsets,
                              expected="[begin, end] with 0 <= begin <= end")
    info = TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.nbytes != info.numel * DTYPES[dtype][1]:
        raise CheckpointError(path, "tensor byte size does not match its shape and dtype", subject=name,
                              found=f"{info.nbytes} bytes", expected=f"{info.numel * DTYPES[dtype][1]} bytes")
    return info


# Per floating dtype: the unsigned integer view and the bits that are all ones exactly for Inf and NaN
# (the exponent field; float8 e4m3fn has no Inf, and its one NaN has exponent and mantissa all ones).
_NONFINITE_BITS: dict[str, tuple[str, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7F80_0000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
}
_SCAN_CHUNK_BYTES = 16 << 20


def count_nonfinite(info: TensorInfo) -> tuple[int, int | None]:
    """NaN and Inf values in one tensor: (how many, flat index of the first or None).

    Reads the tensor in fixed-size chunks into one buffer and tests the bit patterns with numpy, so
    memory stays at a few chunks whatever the tensor's size and torch is not needed. Integer and
    bool tensors have no such values: (0, None).
    """
    import numpy as np

    if info.dtype not in _NONFINITE_BITS or info.nbytes == 0:
        return 0, None
    view, bits = _NONFINITE_BITS[info.dtype]
    chunk = _SCAN_CHUNK_BYTES // info.itemsize * info.itemsize
    buffer = np.empty(min(chunk, info.nbytes), dtype=np.uint8)
    count, first = 0, None
    with open(info.path, "rb", buffering=0) as f:
        for offset in range(0, info.nbytes, chunk):
            size = min(chunk, info.nbytes - offset)
            part, done = memoryview(buffer)[:size], 0
            while done < size:
                read = os.preadv(f.fileno(), [part[done:]], info.start + offset + done)
                if read == 0:
                    raise CheckpointError(info.path, "file ends inside a tensor", subject=info.name)
                done += read
            values = np.frombuffer(buffer, dtype=view, count=size // info.itemsize)
            bad = (values & bits) == bits
            found = int(np.count_nonzero(bad))
            if found and first is None:
                first = offset // info.itemsize + int(np.argmax(bad))
            count += found
    return count, first


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Memory-map one tensor. The mapping lives exactly as long as the returned tensor."""
    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    aligned = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with open(info.path, "rb") as f:
        # ACCESS_COPY: a private mapping, writable for torch.frombuffer, never written back.
        mapped = mmap.mmap(f.fileno(), info.end - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start - aligned)
    return flat.view(info.torch_dtype).reshape(info.shape)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory (sharded with an index, or plain files), by name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(path, "tensor stored twice", subject=name,
                                          found=f"also in {self.tensors[name].path.name}", expected="one file")
                self.tensors[name] = info
        self._check_index()

    def _weight_files(self) -> list[Path]:
        if self.root.is_file():
            refuse_pickle(self.root)
            return [self.root]
        if not self.root.is_dir():
            raise CheckpointError(self.root, "checkpoint directory not found")
        index = self.root / INDEX_NAME
        if index.is_file():
            weight_map = self._index_map(index)
            files = sorted({self.root / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(index, "index names a weight file that does not exist",
                                          found=f.name, expected="an existing .safetensors file")
            return files
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            pickles = sorted(p for p in self.root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                refuse_pickle(pickles[0])
            raise CheckpointError(self.root, "no weights found", found="no *.safetensors",
                                  expected="model.safetensors or a sharded set with " + INDEX_NAME)
        return files

    def _index_map(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"unreadable shard index ({e})",
                                  expected='{"weight_map": {tensor: file}}') from None
        for f in weight_map.values():
            refuse_pickle(self.root / f)
        return weight_map

    def _check_index(self) -> None:
        index = self.root / INDEX_NAME if self.root.is_dir() else None
        if index is None or not index.is_file():
            return
        weight_map = self._index_map(index)
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.path.name != file:
                raise CheckpointError(index, "index lists a tensor its file does not hold", subject=name,
                                      found="missing" if info is None else info.path.name, expected=file)
        for name, info in self.tensors.items():
            if name not in weight_map:
                raise CheckpointError(info.path, "tensor missing from the shard index", subject=name,
                                      expected=f"an entry in {INDEX_NAME}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return load_tensor(self.tensors[name])

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor that will be written: its name, dtype tag and shape are known before its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


class StreamingWriter:
    """Writes a safetensors file whose header is fixed up front; tensor bytes then arrive in order.

    Bytes come either from memory (`write_bytes`) or straight from another file (`copy_range`,
    which the kernel does without passing the data through this process).
    """

    def __init__(self, path: Path, planned: Iterable[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.planned: list[PlannedTensor] = list(planned)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for t in self.planned:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._file = open(self.path, "wb", buffering=0)
        self._fd = self._file.fileno()
        self._write_all(memoryview(struct.pack("<Q", len(raw)) + raw))
        self._index = -1  # the tensor being written
        self._left = 0  # its bytes still to come

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start the next tensor; it must be the one the header planned at this position."""
        if self._left:
            raise RuntimeError(f"{self.path}: {self.planned[self._index].name} is {self._left} bytes short")
        self._index += 1
        expected = self.planned[self._index] if self._index < len(self.planned) else None
        if expected is None or (name, dtype, tuple(shape)) != (expected.name, expected.dtype, expected.shape):
            raise RuntimeError(f"{self.path}: wrote {name} {dtype} {tuple(shape)} out of plan; expected {expected}")
        self._left = expected.nbytes

    def write_bytes(self, data: memoryview) -> None:
        data = memoryview(data).cast("B")
        self._consume(len(data))
        self._write_all(data)

    def copy_range(self, src_fd: int, offset: int, count: int) -> None:
        self._consume(count)
        while count:
            try:
                done = os.copy_file_range(src_fd, self._fd, count, offset)
            except OSError:  # e.g. across file systems on old kernels: copy through user space
                done = os.write(self._fd, os.pread(src_fd, min(count, 64 << 20), offset))
            if done == 0:
                raise RuntimeError(f"{self.path}: source ended early while copying")
            offset += done
            count -= done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole torch tensor (convenience for in-memory data)."""
        self.begin(name, dtype_tag(tensor.dtype), tuple(tensor.shape))
        self.write_bytes(tensor.contiguous().reshape(-1).view(torch_dtype("U8")).numpy().data)

    def _consume(self, count: int) -> None:
        if count > self._left:
            raise RuntimeError(f"{self.path}: more bytes than planned for {self.planned[self._index].name}")
        self._left -= count

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        self._file.close()
        if self._index + 1 != len(self.planned) or self._left:
            raise RuntimeError(f"{self.path}: closed after {self._index + 1} of {len(self.planned)} tensors")
