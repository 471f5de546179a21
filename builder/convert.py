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
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..runtime.atomic import atomic_directory
from ..runtime.errors import CheckpointError
from ..runtime.manifest import sha256_file, write_manifest
from ..runtime.safetensors_io import PlannedTensor, StreamingWriter
from .families import Pair, open_pair, validate
from .families.common import Plan, Source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


class ValidationError(Exception):
    """The inputs failed validation; `problems` lists every one found."""

    def __init__(self, problems: list[CheckpointError]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.describe() for p in problems))


def plan_shapes(source: Source, plan: Plan) -> list[list[PlannedTensor]]:
    """Every rank's output tensors, in write order, from the plan run on meta tensors (no data read)."""
    per_rank: list[list[PlannedTensor]] = [[] for _ in range(plan.tp)]
    for item in plan.items:
        metas = [torch.empty(source.by_name[n].shape, dtype=source.by_name[n].torch_dtype, device="meta")
                 for n in item.sources]
        if item.prepare is not None:
            metas = item.prepare(metas)
        for target in item.targets:
            out = target.make(metas)
            per_rank[target.rank].append(PlannedTensor(target.name, out.dtype, tuple(out.shape)))
    return per_rank


def write_plan(source: Source, plan: Plan, out_dir: Path, progress: Progress, task: Any) -> None:
    out_dir.mkdir(parents=True)
    layout = plan_shapes(source, plan)
    writers = [StreamingWriter(out_dir / f"rank{r}.safetensors", layout[r]) for r in range(plan.tp)]
    try:
        for item in plan.items:
            tensors = [source.tensor(n) for n in item.sources]
            if item.prepare is not None:
                tensors = item.prepare(tensors)
            for target in item.targets:
                writers[target.rank].write(target.name, target.make(tensors))
            progress.advance(task, sum(source.by_name[n].nbytes for n in item.sources))
            del tensors  # drop the memory maps before the next item
    finally:
        for w in writers:
            w.close()
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")


def _source_bytes(source: Source, plan: Plan) -> int:
    return sum(source.by_name[n].nbytes for item in plan.items for n in item.sources)


def convert(target: Path, drafter: Path | None, out: Path, *, tp: int = 1, draft_tp: int | None = None,
            dequantize: bool = False, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Validate, plan and write a converted checkpoint; returns the manifest."""
    pair = open_pair([target] + ([drafter] if drafter else []))
    if pair.target is None:
        raise CheckpointError(target, "no target checkpoint given", found="only a drafter",
                              expected="--target pointing at the target model")
    report = validate(pair)
    if not report.ok:
        raise ValidationError(report.problems)
    fam = pair.module
    draft_tp = draft_tp if draft_tp is not None else (tp if pair.drafter_inside_target else 1)
    kwargs = {"dequantize": dequantize} if pair.family == "deepseek-v4" else {}
    plans: dict[str, tuple[Source, Plan]] = {"target": (pair.target, fam.target_plan(pair.target, tp, **kwargs))}
    dspark: dict[str, Any] | None = None
    if pair.drafter is not None:
        dspark = fam.dspark_fields(pair.drafter)
        draft = fam.drafter_plan(pair.drafter, draft_tp, **kwargs)
        draft.config["dspark"] = {"family": pair.family, **dspark}
        plans["draft"] = (pair.drafter, draft)
    total = sum(_source_bytes(s, p) for s, p in plans.values())

    with atomic_directory(out, force=force) as tmp, ThreadPoolExecutor(1) as hasher:
        hashes = {role: {f.name: hasher.submit(sha256_file, f) for f in src.ckpt.files}
                  for role, src in _sources(pair).items()}
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, disable=not show_progress, transient=False) as progress:
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
                            "sha256": {name: fut.result() for name, fut in hashes[role].items()}}
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
        shutil.copy2(pair.calibration, tmp / "draft" / "sts.json")
