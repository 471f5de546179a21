"""Open a converted checkpoint (the output of `dspark-build convert`) as runnable target + drafter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .manifest import read_manifest

# family -> (target runner kind for runtime.tp, drafter class path)
FAMILIES = {"qwen3": ("qwen3", "dspark_trt.runtime.drafter:Qwen3DSparkDrafter"),
            "deepseek-v4": ("deepseek-v4", "dspark_trt.runtime.deepseek_v4_drafter:DeepseekV4DSparkDrafter"),
            "gemma4": ("gemma4", "dspark_trt.runtime.gemma4_drafter:Gemma4DSparkDrafter")}


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


def open_checkpoint(ckpt_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                    dtype: torch.dtype = torch.float32) -> tuple[Any, Any, dict[str, Any]]:
    """(target runner, drafter, manifest). A target sharded for tp > 1 runs as tp gloo processes."""
    from importlib import import_module

    from .tp import open_target

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    manifest = read_manifest(ckpt_dir, "checkpoint")
    family = manifest["family"]
    if family not in FAMILIES:
        raise CheckpointError(ckpt_dir / "manifest.json", "no reference runner for this family yet", subject="family",
                              found=family, expected=" | ".join(FAMILIES))
    if manifest.get("dspark") is None:
        raise CheckpointError(ckpt_dir / "manifest.json", "checkpoint has no drafter", subject="dspark",
                              expected="convert with --drafter")
    kind, drafter_path = FAMILIES[family]
    module, name = drafter_path.split(":")
    drafter = getattr(import_module(module), name)(ckpt_dir / "draft", num_slots=num_slots, max_len=max_len,
                                                   dtype=dtype)
    target = open_target(kind, ckpt_dir / "target", num_slots=num_slots, max_len=max_len, dtype=dtype)
    return target, drafter, manifest
