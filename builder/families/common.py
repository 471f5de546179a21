"""What every model family provides: expected tensors, config checks and a conversion plan.

A family module (qwen3.py, deepseek_v4.py) describes its checkpoints declaratively with these
types; inspect.py and convert.py do the work for all families alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...runtime.errors import CheckpointError
from ...runtime.fp8 import dequantize_fp8_block
from ...runtime.safetensors_io import SafetensorsCheckpoint, TensorInfo


@dataclass(frozen=True)
class Expect:
    """One tensor a checkpoint must hold: canonical name, shape and the dtypes it may have."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def load_config(root: Path) -> dict[str, Any]:
    path = Path(root) / "config.json"
    if not path.is_file():
        raise CheckpointError(path, "config.json not found", expected="a Hugging Face style checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "config.json must hold a JSON object", found=type(config).__name__)
    return config


@dataclass
class Source:
    """One checkpoint directory: its config, its tensors, and stored names mapped to canonical ones."""

    path: Path
    config: dict[str, Any]
    ckpt: SafetensorsCheckpoint
    canonical: Callable[[str], str] = lambda name: name
    by_name: dict[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {}
        for stored, info in self.ckpt.tensors.items():
            self.by_name[self.canonical(stored)] = info

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def field(self, name: str, kind: type | tuple[type, ...] = int, default: Any = ...) -> Any:
        """A config field of the right type, or a CheckpointError naming it."""
        if name not in self.config:
            if default is not ...:
                return default
            raise CheckpointError(self.config_path, "missing config field", subject=name,
                                  expected=_kind_name(kind))
        value = self.config[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise CheckpointError(self.config_path, "config field has the wrong type", subject=name,
                                  found=repr(value), expected=_kind_name(kind))
        return value

    def tensor(self, canonical_name: str) -> torch.Tensor:
        from ...runtime.safetensors_io import load_tensor

        return load_tensor(self.by_name[canonical_name])


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def check_tensors(source: Source, expected: Sequence[Expect]) -> tuple[list[CheckpointError], list[str]]:
    """Compare a checkpoint's tensors with the expected list. Returns (problems, unexpected names)."""
    problems: list[CheckpointError] = []
    wanted = {e.name: e for e in expected}
    for e in expected:
        info = source.by_name.get(e.name)
        if info is None:
            problems.append(CheckpointError(source.path, "missing tensor", subject=e.name,
                                            expected=f"{list(e.shape)} {'|'.join(e.dtypes)}"))
            continue
        if info.shape != e.shape:
            problems.append(CheckpointError(info.path, "tensor has the wrong shape", subject=info.name,
                                            found=list(info.shape), expected=list(e.shape)))
        if info.dtype not in e.dtypes:
            problems.append(CheckpointError(info.path, "tensor has the wrong dtype", subject=info.name,
                                            found=info.dtype, expected=" or ".join(e.dtypes)))
    unexpected = sorted(name for name in source.by_name if name not in wanted)
    return problems, unexpected


def dtype_tag(source: Source) -> str:
    """The safetensors tag of the checkpoint's declared floating dtype (config `dtype`/`torch_dtype`)."""
    declared = source.config.get("dtype") or source.config.get("torch_dtype") or "bfloat16"
    tags = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    if declared not in tags:
        raise CheckpointError(source.config_path, "unsupported dtype", subject="dtype", found=declared,
                              expected=" | ".join(tags))
    return tags[declared]


# ---------------------------------------------------------------------------------------------
# Conversion plans: each output tensor is a function of a few source tensors and a rank.


@dataclass(frozen=True)
class Target:
    """One output tensor on one rank, computed from the item's loaded source tensors."""

    rank: int
    name: str
    make: Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Item:
    """A group of source tensors loaded together and the outputs they produce on every rank.

    `prepare`, when given, runs once on the loaded sources before any target is made (for work
    shared by all ranks, such as FP8 dequantisation).
    """

    sources: tuple[str, ...]  # canonical names
    targets: tuple[Target, ...]
    prepare: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None


def require_divisible(path: Path, what: str, value: int, tp: int) -> None:
    if value % tp:
        raise CheckpointError(path, f"--tp {tp} does not divide {what}", subject=what, found=value,
                              expected=f"a multiple of {tp}")


def replicated(name: str, out: str, tp: int) -> Item:
    return Item((name,), tuple(Target(r, out, lambda ts: ts[0]) for r in range(tp)))


def split(name: str, out: str, tp: int, dim: int) -> Item:
    return Item((name,), tuple(Target(r, out, _chunk(dim, tp, r)) for r in range(tp)))


def _chunk(dim: int, tp: int, rank: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda ts: ts[0].chunk(tp, dim)[rank]


SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128


def linear(src: Source, name: str, out: str, tp: int, dim: int | None, *, dequantize: bool = False,
           dtype: torch.dtype = torch.bfloat16) -> list[Item]:
    """Items for one linear weight, split along `dim` (None: replicated) over `tp` ranks.

    An FP8 weight with block scales (`<name>_scale_inv`) either stays FP8, its scales split so that
    each rank's local block index is still `row // 128` (possible when the shard size and the block
    divide one another), or is dequantised to `dtype` first with `dequantize=True`.
    """
    scale = name + SCALE_SUFFIX
    if scale not in src.by_name:
        return [replicated(name, out, tp) if dim is None else split(name, out, tp, dim)]
    if dequantize:
        def dequant(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [dequantize_fp8_block(ts[0], ts[1], FP8_BLOCK, dtype)]
        targets = tuple(Target(r, out, (lambda ts: ts[0]) if dim is None else _chunk(dim, tp, r))
                        for r in range(tp))
        return [Item((name, scale), targets, prepare=dequant)]
    if dim is None:
        return [replicated(name, out, tp), replicated(scale, out + SCALE_SUFFIX, tp)]
    full = src.by_name[name].shape[dim]
    shard = full // tp
    if shard % FP8_BLOCK and FP8_BLOCK % shard:
        raise CheckpointError(src.by_name[name].path, f"--tp {tp} splits FP8 128x128 scale blocks unevenly",
                              subject=name, found=f"shard of {shard} along dim {dim}",
                              expected="a shard size that is a multiple or a divisor of 128 (or use --dequantize)")
    scale_targets = tuple(Target(r, out + SCALE_SUFFIX, _scale_rows(dim, shard, r)) for r in range(tp))
    return [split(name, out, tp, dim), Item((scale,), scale_targets)]


def _scale_rows(dim: int, shard: int, rank: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    first = rank * shard // FP8_BLOCK
    count = max(1, shard // FP8_BLOCK)
    return lambda ts: ts[0].narrow(dim, first, count)


@dataclass
class Plan:
    """Everything `convert` writes for one artefact (target or draft): a config and tensors per rank."""

    config: dict[str, Any]
    items: list[Item]
    tp: int
    extra_files: dict[str, Path] = field(default_factory=dict)  # name in output dir -> file to copy
