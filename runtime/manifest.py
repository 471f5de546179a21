"""`manifest.json`: what every artefact directory says about itself.

Later steps read it to refuse mismatched inputs (wrong family, γ, TP size, format version) with a
clear message instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("dspark-trt", "torch", "safetensors", "transformers", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, kind: str, **fields: Any) -> dict[str, Any]:
    manifest = {
        "format": f"dspark-trt/{kind}",
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "tools": tool_versions(),
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(path, "manifest not found", expected=f"a directory written by dspark-build ({kind})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"manifest is not valid JSON ({e})") from None
    if manifest.get("format") != f"dspark-trt/{kind}":
        raise CheckpointError(path, "wrong kind of artefact", subject="format", found=manifest.get("format"),
                              expected=f"dspark-trt/{kind}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, "unsupported format version", subject="format_version",
                              found=manifest.get("format_version"), expected=FORMAT_VERSION)
    return manifest
