"""The reader must reject damaged files with a precise message, and never unpickle anything."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.safetensors_io import (
    PlannedTensor,
    SafetensorsCheckpoint,
    StreamingWriter,
    dtype_tag,
    load_tensor,
    read_header,
)


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)},
              str(path))
    return path


def test_reads_tensors_by_memory_map(small_file: Path) -> None:
    infos = read_header(small_file)
    assert set(infos) == {"a", "b"}
    assert torch.equal(load_tensor(infos["a"]), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert load_tensor(infos["b"]).dtype == torch.bfloat16


def test_truncated_file_is_reported(small_file: Path) -> None:
    data = small_file.read_bytes()
    small_file.write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_header(small_file)
    assert str(small_file) in str(e.value)


def test_file_shorter_than_header_length(small_file: Path) -> None:
    small_file.write_bytes(small_file.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="header length"):
        read_header(small_file)


def test_corrupt_header_json(small_file: Path) -> None:
    data = bytearray(small_file.read_bytes())
    data[8] = ord("#")
    small_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(small_file)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_shape_that_disagrees_with_byte_range(small_file: Path) -> None:
    _rewrite_header(small_file, lambda h: h["a"].update(shape=[4, 4]))
    with pytest.raises(CheckpointError, match=r"\[a\].*byte size"):
        read_header(small_file)


def test_unknown_dtype(small_file: Path) -> None:
    _rewrite_header(small_file, lambda h: h["b"].update(dtype="F7"))
    with pytest.raises(CheckpointError, match=r"\[b\].*unsupported tensor dtype"):
        read_header(small_file)


def test_overlapping_offsets(small_file: Path) -> None:
    def overlap(h):
        first = min(("a", "b"), key=lambda k: h[k]["data_offsets"][0])
        other = "b" if first == "a" else "a"
        size = h[other]["data_offsets"][1] - h[other]["data_offsets"][0]
        h[other]["data_offsets"] = [0, size]

    _rewrite_header(small_file, overlap)
    with pytest.raises(CheckpointError, match="overlaps or leaves a gap"):
        read_header(small_file)


class _Bomb:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickles_are_refused_never_opened(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps(_Bomb(marker)))
    with pytest.raises(CheckpointError, match="pickle") as e:
        SafetensorsCheckpoint(tmp_path)
    assert name in str(e.value)
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsCheckpoint(tmp_path / name)
    assert not marker.exists()


def test_index_pointing_at_pickle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.bin"}}))
    (tmp_path / "model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsCheckpoint(tmp_path)


def test_index_listing_a_missing_tensor(tmp_path: Path, small_file: Path) -> None:
    index = {"weight_map": {"a": "model.safetensors", "b": "model.safetensors", "c": "model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"\[c\].*index lists a tensor"):
        SafetensorsCheckpoint(tmp_path)


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(3, 5), "y": torch.randint(0, 9, (7,)), "z": torch.randn(2, 2).to(torch.float8_e4m3fn)}
    path = tmp_path / "out.safetensors"
    writer = StreamingWriter(path, [PlannedTensor(k, dtype_tag(v.dtype), tuple(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    with safe_open(str(path), "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), v.view(torch.uint8))


def test_streaming_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    writer = StreamingWriter(tmp_path / "o.safetensors", [PlannedTensor("x", "F32", (2,))])
    with pytest.raises(RuntimeError, match="out of plan"):
        writer.write("x", torch.zeros(3))
