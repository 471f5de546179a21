"""`dspark-build convert`: validated, tensor-parallel-sharded weights.

    OUT/
      manifest.json            family, DSpark fields, tp, source hashes, tool versions
      target/config.json       TensorRT-LLM checkpoint config (architecture, dtype, mapping, quantization)
      target/rank{N}.safetensors
      draft/config.json        drafter config + mapping; `dspark` block with the family-neutral fields
      draft/rank{N}.safetensors
      draft/sts.json           STS calibration, when the drafter ships one
      tokenizer/               tokenizer files copied from the target

Tensors stream one at a time from memory-mapped sources into files whose headers are laid out in
advance, so peak memory is about one source tensor whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..runtime.atomic import atomic_directory, check_output
from ..runtime.calibration import CALIBRATION_FILE
from ..runtime.errors import CheckpointError
from ..runtime.manifest import sampled_sha256, sha256_file, write_manifest
from ..runtime.safetensors_io import PlannedTensor, StreamingWriter, TensorInfo
from .families import Pair, open_pair, validate
from .families import check_values as scan_values
from .families.common import Item, Piece, Plan, Source, Target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


_COLUMNS = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn())


class ValidationError(Exception):
    """The inputs failed validation; `problems` lists every one found."""

    def __init__(self, problems: list[CheckpointError]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.describe() for p in problems))


def _piece_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    shape = shape or (1,)
    stop = shape[piece.dim] if piece.stop is None else piece.stop
    return shape[: piece.dim] + (stop - piece.start,) + shape[piece.dim + 1:]


def planned_tensor(source: Source, item: Item, target: Target) -> PlannedTensor:
    """Name, dtype and shape of one output, by arithmetic on the plan (no data is read)."""
    infos = [source.by_name[n] for n in item.sources]
    shapes = [_piece_shape(infos[p.source].shape, p) for p in target.pieces]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise RuntimeError(f"{target.name}: pieces {shapes} cannot be concatenated along dim 0")
    shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
    if len(target.pieces) == 1 and target.pieces[0] == Piece():
        shape = infos[0].shape  # whole tensors keep their rank, 0-d included
    first = target.pieces[0].source
    dtype = item.dtype if item.dequantize and first == 0 else infos[first].dtype
    return PlannedTensor(target.name, dtype, shape)


class _Reader:
    """Source bytes for one item: file ranges where possible, memory where a gather or math is needed."""

    def __init__(self, source: Source, item: Item, fds: dict[Path, int]) -> None:
        self.infos = [source.by_name[n] for n in item.sources]
        self.fds = fds
        self.memory: dict[int, np.ndarray] = {}
        if item.dequantize:
            self.memory[0] = _dequantized(self.infos[0], self.infos[1], item.dtype)

    def emit(self, writer: StreamingWriter, planned: PlannedTensor, pieces: tuple[Piece, ...]) -> None:
        writer.begin(planned.name, planned.dtype, planned.shape)
        for piece in pieces:
            info = self.infos[piece.source]
            rows = info.shape[0] if info.shape else 1
            stop = piece.stop if piece.stop is not None else (info.shape or (1,))[piece.dim]
            if piece.dim == 0 and piece.source not in self.memory:
                row_bytes = info.nbytes // max(rows, 1)
                writer.copy_range(self._fd(info), info.start + piece.start * row_bytes,
                                  (stop - piece.start) * row_bytes)
                continue
            table = self._in_memory(piece.source)  # [rows, row bytes]
            if piece.dim == 0:
                part = table[piece.start:stop]
            else:
                col_bytes = table.shape[1] // info.shape[1]
                part = table[:, piece.start * col_bytes: stop * col_bytes]
            writer.write_bytes(np.ascontiguousarray(part).data)

    def _fd(self, info: TensorInfo) -> int:
        if info.path not in self.fds:
            self.fds[info.path] = os.open(info.path, os.O_RDONLY)
        return self.fds[info.path]

    def _in_memory(self, index: int) -> np.ndarray:
        if index not in self.memory:
            info = self.infos[index]
            data = np.empty(info.nbytes, dtype=np.uint8)
            view, done = memoryview(data), 0
            while done < info.nbytes:
                done += os.preadv(self._fd(info), [view[done:]], info.start + done)
            self.memory[index] = data.reshape(info.shape[0] if info.shape else 1, -1)
        return self.memory[index]


def _dequantized(weight: TensorInfo, scale: TensorInfo, dtype: str) -> np.ndarray:
    """FP8 block-scaled weight as `dtype` bytes, [rows, row bytes]. The only step that needs torch."""
    import torch

    from ..runtime.fp8 import dequantize_fp8_block
    from ..runtime.safetensors_io import load_tensor, torch_dtype

    w = dequantize_fp8_block(load_tensor(weight), load_tensor(scale), 128, torch_dtype(dtype))
    return w.contiguous().view(torch.uint8).numpy().reshape(w.shape[0], -1)


def write_plan(source: Source, plan: Plan, out_dir: Path, progress: Progress, task: Any) -> None:
    out_dir.mkdir(parents=True)
    layout: list[list[PlannedTensor]] = [[] for _ in range(plan.tp)]
    planned = [[planned_tensor(source, item, t) for t in item.targets] for item in plan.items]
    for item, outputs in zip(plan.items, planned, strict=True):
        for target, tensor in zip(item.targets, outputs, strict=True):
            layout[target.rank].append(tensor)
    writers = [StreamingWriter(out_dir / f"rank{r}.safetensors", layout[r]) for r in range(plan.tp)]
    fds: dict[Path, int] = {}
    try:
        for item, outputs in zip(plan.items, planned, strict=True):
            reader = _Reader(source, item, fds)
            for target, tensor in zip(item.targets, outputs, strict=True):
                reader.emit(writers[target.rank], tensor, target.pieces)
            progress.advance(task, sum(i.nbytes for i in reader.infos))
    finally:
        for fd in fds.values():
            os.close(fd)
        for w in writers:
            w.close()
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")


def _source_bytes(source: Source, plan: Plan) -> int:
    return sum(source.by_name[n].nbytes for item in plan.items for n in item.sources)


def convert(target: Path, drafter: Path | None, out: Path, *, tp: int = 1, draft_tp: int | None = None,
            dequantize: bool = False, force: bool = False, show_progress: bool = True,
            full_hash: bool = False, check_values: bool = True) -> dict[str, Any]:
    """Validate, plan and write a converted checkpoint; returns the manifest.

    `check_values`: read every weight first and refuse NaN/Inf (a full read of the sources; the
    conversion then reads them again from the page cache where memory allows).
    """
    check_output(out, inputs=[target, drafter], force=force)  # fail fast, before reading any weights
    pair = open_pair([target] + ([drafter] if drafter else []))
    if pair.target is None:
        raise CheckpointError(target, "no target checkpoint given", found="only a drafter",
                              expected="--target pointing at the target model")
    report = validate(pair, values=False)  # structure first: it takes no time and explains most failures
    if report.ok and check_values:
        total = sum(i.nbytes for src in _sources(pair).values() for i in src.ckpt.tensors.values())
        with Progress(*_COLUMNS, disable=not show_progress, transient=False) as progress:
            task = progress.add_task("value check", total=total)
            report.problems += scan_values(pair, lambda n: progress.advance(task, n))
    if not report.ok:
        raise ValidationError(report.problems)
    fam = pair.model_family
    draft_tp = draft_tp if draft_tp is not None else (tp if pair.drafter_inside_target else 1)
    kwargs = {name: value for name, value in {"dequantize": dequantize}.items() if name in fam.plan_options}
    plans: dict[str, tuple[Source, Plan]] = {"target": (pair.target, fam.target_plan(pair.target, tp, **kwargs))}
    dspark: dict[str, Any] | None = None
    if pair.drafter is not None:
        dspark = fam.dspark_fields(pair.drafter)
        draft = fam.drafter_plan(pair.drafter, draft_tp, **kwargs)
        draft.config["dspark"] = {"family": pair.family, **dspark}
        plans["draft"] = (pair.drafter, draft)
    total = sum(_source_bytes(s, p) for s, p in plans.values())

    # Every file read, too: a shard index may name weights outside the directory given.
    inputs = [target, drafter, pair.calibration, *(f for src in _sources(pair).values() for f in src.ckpt.files)]
    with atomic_directory(out, force=force, inputs=inputs) as tmp, ThreadPoolExecutor(1) as hasher:
        hash_file = sha256_file if full_hash else sampled_sha256
        hashes = {role: {f.name: hasher.submit(hash_file, f) for f in src.ckpt.files}
                  for role, src in _sources(pair).items()}
        with Progress(*_COLUMNS, disable=not show_progress, transient=False) as progress:
            task = progress.add_task(f"convert tp={tp}", total=total)
            for role, (source, plan) in plans.items():
                progress.update(task, description=f"{role} tp={plan.tp}")
                write_plan(source, plan, tmp / role, progress, task)
        _copy_side_files(pair, tmp)
        manifest = write_manifest(
            tmp, "checkpoint",
            family=pair.family, tp=tp, draft_tp=draft_tp if pair.drafter else None,
            dequantized=dequantize, dspark=dspark,
            sources={role: {"path": str(src.path.absolute()),
                            "hash": "sha256" if full_hash else "sampled-sha256",
                            "files": {name: fut.result() for name, fut in hashes[role].items()}}
                     for role, src in _sources(pair).items()},
        )
    return manifest


def _sources(pair: Pair) -> dict[str, Source]:
    sources = {"target": pair.target}
    if pair.drafter is not None and not pair.drafter_inside_target:
        sources["drafter"] = pair.drafter
    return sources


def _copy_side_files(pair: Pair, tmp: Path) -> None:
    tokenizer = tmp / "tokenizer"
    tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        if (pair.target.path / name).is_file():
            shutil.copy2(pair.target.path / name, tokenizer / name)
    if pair.calibration is not None:
        shutil.copy2(pair.calibration, tmp / "draft" / CALIBRATION_FILE)
