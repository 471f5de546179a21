"""What every model family provides: expected tensors, config checks and a conversion plan.

A family module (qwen3.py, deepseek_v4.py) describes its checkpoints declaratively with these
types; inspect.py and convert.py do the work for all families alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...runtime.errors import CheckpointError
from ...runtime.safetensors_io import SafetensorsCheckpoint, TensorInfo, load_tensor

if TYPE_CHECKING:
    import torch


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

    def size(self, name: str, default: Any = ..., *, per_tensor: bool = False) -> int:
        """A dimension or count from the config: a positive int, or a CheckpointError naming it
        (a zero would otherwise surface later as a division by zero or an empty model).

        `per_tensor`: a count of parts that each own tensors (layers, experts), so it cannot exceed
        the number of tensors present; a larger one is refused before a list that long is built.
        """
        value = self.field(name, int, default)
        if value < 1:
            raise CheckpointError(self.config_path, "config size must be a positive integer", subject=name,
                                  found=value, expected="an integer >= 1")
        if per_tensor and value > len(self.by_name):
            raise CheckpointError(self.config_path, "config count exceeds what the checkpoint holds", subject=name,
                                  found=value, expected=f"at most {len(self.by_name)} (the tensors present)")
        return value

    def per_layer(self, name: str, layers: int, allowed: Sequence[str]) -> list[str]:
        """A config list with one entry per layer, each one of `allowed`, or a CheckpointError naming it."""
        values = self.field(name, list)
        if len(values) != layers or any(v not in allowed for v in values):
            raise CheckpointError(self.config_path, "per-layer list does not fit the model", subject=name,
                                  found=values, expected=f"{layers} entries, each one of {list(allowed)}")
        return values

    def tensor(self, canonical_name: str) -> torch.Tensor:
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


# Largest drafter block (γ) accepted. The DSparkSchedule kernel holds 256 rows x γ survival values in one
# 8192-element tile (plugins/launch.py: GPU_TILE // SCHEDULE_MAX_ROWS), every verify step carries 1 + γ
# tokens per request, and acceptance decays geometrically along the block, so positions past a few dozen
# are never accepted: published drafters use 5 and 7. A larger value is a corrupt or mistyped config.
MAX_BLOCK_SIZE = 32

TOKENIZER_FILE = "tokenizer.json"


def check_block_size(src: Source, name: str) -> list[CheckpointError]:
    """γ from config field `name`: at least 2 (one anchor and one drafted token), at most MAX_BLOCK_SIZE."""
    gamma = src.field(name)
    if not 2 <= gamma <= MAX_BLOCK_SIZE:
        return [CheckpointError(src.config_path, "block size out of range", subject=name, found=gamma,
                                expected=f"2 <= {name} <= {MAX_BLOCK_SIZE}")]
    return []


def check_tokenizer(directory: Path, vocab_size: int | None = None) -> CheckpointError | None:
    """The problem with DIR/tokenizer.json, or None: it must exist and load the way the server loads it
    (`tokenizers.Tokenizer.from_file`), and never produce an id the embedding does not have."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return CheckpointError(path, "file not found",
                               expected="the target's Hugging Face fast tokenizer here (the server loads it)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for any parse error
        return CheckpointError(path, f"not a tokenizer the server can load: {e}",
                               expected="a Hugging Face fast tokenizer (tokenizers.Tokenizer.from_file)")
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if vocab_size is not None and largest >= vocab_size:
        return CheckpointError(path, "tokenizer ids exceed the model's vocabulary", subject="vocab_size",
                               found=f"token id {largest}", expected=f"ids < {vocab_size} (config vocab_size)")
    return None


def dtype_tag(source: Source) -> str:
    """The safetensors tag of the checkpoint's declared floating dtype (config `dtype`/`torch_dtype`)."""
    name = "dtype" if source.config.get("dtype") is not None else "torch_dtype"
    declared = source.config.get(name)
    declared = "bfloat16" if declared is None else declared
    tags = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    if not isinstance(declared, str) or declared not in tags:
        raise CheckpointError(source.config_path, "unsupported dtype", subject=name, found=repr(declared),
                              expected=" | ".join(tags))
    return tags[declared]


# ---------------------------------------------------------------------------------------------
# Conversion plans. Every output tensor is a concatenation (along dim 0) of slices of source
# tensors, so a plan is plain data: shapes follow by arithmetic, and the converter can move the
# bytes of dim-0 slices file to file without them ever passing through Python.


@dataclass(frozen=True)
class Piece:
    """Indices [start, stop) of the item's source `source` along `dim`; stop None means to the end."""

    source: int = 0
    dim: int = 0
    start: int = 0
    stop: int | None = None


WHOLE = (Piece(),)


@dataclass(frozen=True)
class Target:
    """One output tensor on one rank: its pieces, concatenated along dim 0."""

    rank: int
    name: str
    pieces: tuple[Piece, ...] = WHOLE


@dataclass(frozen=True)
class Item:
    """A group of source tensors read together and the outputs they produce on every rank.

    With `dequantize`, sources are (FP8 weight, its block scales) and source 0 is replaced by the
    dequantised weight in `dtype` before the pieces are cut.
    """

    sources: tuple[str, ...]  # canonical names
    targets: tuple[Target, ...]
    dequantize: bool = False
    dtype: str = "BF16"


def require_divisible(path: Path, what: str, value: int, tp: int) -> None:
    if value % tp:
        raise CheckpointError(path, f"--tp {tp} does not divide {what}", subject=what, found=value,
                              expected=f"a multiple of {tp}")


def replicated(name: str, out: str, tp: int) -> Item:
    return Item((name,), tuple(Target(r, out) for r in range(tp)))


def split(src: Source, name: str, out: str, tp: int, dim: int) -> Item:
    """Even split along `dim` (the caller has checked divisibility)."""
    size = src.by_name[name].shape[dim] // tp
    return Item((name,), tuple(Target(r, out, (Piece(0, dim, r * size, (r + 1) * size),)) for r in range(tp)))


def on_rank(item: Item, rank: int) -> Item:
    """Move a single-rank item to `rank` (how a whole expert lands on its expert-parallel rank)."""
    return Item(item.sources, tuple(Target(rank, t.name, t.pieces) for t in item.targets), item.dequantize,
                item.dtype)


SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128


def linear(src: Source, name: str, out: str, tp: int, dim: int | None, *, dequantize: bool = False) -> list[Item]:
    """Items for one linear weight, split along `dim` (None: replicated) over `tp` ranks.

    An FP8 weight with block scales (`<name>_scale_inv`) either stays FP8, its scales split so that
    each rank's local block index is still `row // 128` (possible when the shard size and the block
    divide one another), or is dequantised to bf16 first with `dequantize=True`.
    """
    scale = name + SCALE_SUFFIX
    if scale not in src.by_name:
        return [replicated(name, out, tp) if dim is None else split(src, name, out, tp, dim)]
    if dequantize:
        weight = replicated(name, out, tp) if dim is None else split(src, name, out, tp, dim)
        return [Item((name, scale), weight.targets, dequantize=True)]
    if dim is None:
        return [replicated(name, out, tp), replicated(scale, out + SCALE_SUFFIX, tp)]
    shard = src.by_name[name].shape[dim] // tp
    if shard % FP8_BLOCK and FP8_BLOCK % shard:
        raise CheckpointError(src.by_name[name].path, f"--tp {tp} splits FP8 128x128 scale blocks unevenly",
                              subject=name, found=f"shard of {shard} along dim {dim}",
                              expected="a shard size that is a multiple or a divisor of 128 (or use --dequantize)")
    blocks = max(1, shard // FP8_BLOCK)
    scale_targets = tuple(
        Target(r, out + SCALE_SUFFIX, (Piece(0, dim, r * shard // FP8_BLOCK, r * shard // FP8_BLOCK + blocks),))
        for r in range(tp))
    return [split(src, name, out, tp, dim), Item((scale,), scale_targets)]


@dataclass
class Plan:
    """Everything `convert` writes for one artefact (target or draft): a config and tensors per rank."""

    config: dict[str, Any]
    items: list[Item]
    tp: int
