"""Open a converted checkpoint (the output of `dspark-build convert`) as runnable target + drafter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..builder.families import Family, family
from .errors import CheckpointError
from .manifest import read_manifest


def resolve_checkpoint(path: Path) -> Path:
    """A converted checkpoint, given either it or a reference engine directory that holds one.

    `dspark-build engine --backend reference` writes ENGINE_DIR/manifest.json with format
    `dspark-trt/engine` and the checkpoint under ENGINE_DIR/checkpoint/.
    """
    import json

    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("format") == "dspark-trt/engine":
        return path / "checkpoint"
    return path


def checkpoint_family(ckpt_dir: Path) -> tuple[Path, dict[str, Any], Family]:
    """(checkpoint directory, manifest, family) of a converted checkpoint or reference engine directory
    whose manifest has a drafter."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    manifest = read_manifest(ckpt_dir, "checkpoint")
    fam = family(manifest["family"], ckpt_dir / "manifest.json")
    if manifest.get("dspark") is None:
        raise CheckpointError(ckpt_dir / "manifest.json", "checkpoint has no drafter", subject="dspark",
                              expected="convert with --drafter")
    return ckpt_dir, manifest, fam


def open_target(ckpt_dir: Path, **kwargs: Any) -> Any:
    """The target runner of a converted checkpoint (`runtime.tp.open_target`'s keyword arguments: num_slots,
    max_len, dtype, gpus, ...). A target sharded for tp > 1 runs as tp processes."""
    from .tp import open_target as open_ranks

    ckpt_dir, manifest, fam = checkpoint_family(ckpt_dir)
    options = fam.target_options(ckpt_dir, manifest) if fam.target_options else {}
    return open_ranks(fam.name, ckpt_dir / "target", **{**options, **kwargs})


def open_drafter(ckpt_dir: Path, **kwargs: Any) -> Any:
    """The drafter runner of a converted checkpoint (its class's keyword arguments: num_slots, max_len, ...)."""
    ckpt_dir, manifest, fam = checkpoint_family(ckpt_dir)
    options = fam.drafter_options(ckpt_dir, manifest) if fam.drafter_options else {}
    return fam.drafter_class()(ckpt_dir / "draft", **{**options, **kwargs})


def open_checkpoint(ckpt_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                    dtype: torch.dtype = torch.float32) -> tuple[Any, Any, dict[str, Any]]:
    """(target runner, drafter, manifest). A target sharded for tp > 1 runs as tp gloo processes."""
    ckpt_dir, manifest, _ = checkpoint_family(ckpt_dir)
    drafter = open_drafter(ckpt_dir, num_slots=num_slots, max_len=max_len, dtype=dtype)
    target = open_target(ckpt_dir, num_slots=num_slots, max_len=max_len, dtype=dtype)
    return target, drafter, manifest
