"""The training corpus of the tiny trained pair: the Python standard library's own source.

Every Python installation has it, so nothing is downloaded. Files are split into train and held-out
parts by a hash of their path (not by the seed), so every seed and every run evaluates on the same
held-out files, and adding or removing one file never moves the others between parts.

Token streams are the files' tokens joined by `<|endoftext|>`; the trainers sample fixed-length
windows from them.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

HELD_OUT_PERCENT = 8
# Character tables and generated documentation are not code: they would teach the model escapes.
_EXCLUDED_PARTS = {"site-packages", "test", "tests", "encodings", "pydoc_data", "__pycache__"}
SEPARATOR = "<|endoftext|>"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: str) -> bool:
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


def corpus_files(split: str) -> list[Path]:
    """Sorted stdlib `.py` files of `split` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _EXCLUDED_PARTS.intersection(relative.parts[:-1]):
            continue
        if _is_held_out(relative.as_posix()) == (split == "heldout"):
            files.append(path)
    return files


def corpus_texts(split: str) -> list[str]:
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in corpus_files(split))
    return [t for t in texts if t.strip()]


def token_stream(tokenizer: Tokenizer, split: str) -> torch.Tensor:
    """All files of `split` as one int32 stream of token ids, each file followed by `<|endoftext|>`."""
    separator = tokenizer.token_to_id(SEPARATOR)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(corpus_texts(split)):
        ids.extend(encoding.ids)
        ids.append(separator)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class WindowSampler:
    """Random windows of `length` tokens from a stream, reproducible from `seed`."""

    stream: torch.Tensor
    length: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.stream) <= self.length:
            raise ValueError(f"stream of {len(self.stream)} tokens is shorter than a window of {self.length}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def batch(self, size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.stream) - self.length, (size,), generator=self.generator)
        return torch.stack([self.stream[s: s + self.length] for s in starts.tolist()]).long()


def eval_windows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` evenly spaced, non-overlapping windows: the fixed held-out evaluation set."""
    usable = len(stream) // length
    if usable < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than a window of {length}")
    picks = torch.linspace(0, usable - 1, min(count, usable)).long()
    return torch.stack([stream[i * length: (i + 1) * length] for i in picks.tolist()]).long()


def heldout_prompts(count: int, chars: int = 400, *, part: int = 0, parts: int = 2, per_file: int = 2,
                    seed: int = 0) -> list[str]:
    """Code prompts from held-out files, each starting at a line boundary, up to `per_file` per file.

    Held-out files are dealt into `parts` disjoint groups (file i goes to group i % parts), so that,
    e.g., calibration (part 0) and the τ benchmark (part 1) never prompt from the same file. A file's
    prompts come from disjoint stretches of its body (the license/docstring header is skipped).
    """
    files = [f for i, f in enumerate(corpus_files("heldout")) if i % parts == part]
    rng = random.Random(seed)
    prompts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        body = len(text) - len(text) // 4
        n = min(per_file, body // (2 * chars))
        stretch = body // max(n, 1)
        for j in range(n):
            low = len(text) // 4 + j * stretch
            start = text.find("\n", rng.randrange(low, low + stretch - chars)) + 1
            prompt = text[start: start + chars]
            if prompt.strip():
                prompts.append(prompt)
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} held-out prompts available in part {part}, asked for {count}")
    return prompts[:count]
