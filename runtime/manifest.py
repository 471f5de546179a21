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


SAMPLES, SAMPLE_BYTES = 256, 64 << 10


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size, its first 1 MiB (the safetensors header) and 256 evenly spaced 64 KiB blocks.

    Hashing every byte of a large checkpoint costs more than converting it (sha256 runs at about
    1 GB/s per core), so by default the manifest identifies sources by this sample: any re-trained
    or fine-tuned weights change it. `--full-hash` records the sha256 of every byte instead.
    """
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        step = max(size // SAMPLES, 1)
        for offset in range(0, size, step):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
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
