"""`dspark-build calibrate`: fit Sequential Temperature Scaling on held-out prompts, target in the loop.

Decodes the prompts with full blocks verified (fixed mode), records each round's raw confidence
logits and which draft positions were accepted, fits one temperature per position on two thirds of
the rounds and reports the calibration error (ECE of the cumulative product) on the other third,
before and after.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import torch

from ..runtime.calibration import cumulative_ece, fit_sts, write_calibration
from ..runtime.generate import Request, SpeculativeDecoder, run
from ..runtime.loader import open_checkpoint


def builtin_prompts(count: int = 24, chars: int = 400) -> list[str]:
    """Held-out code: the standard library's package sources (the fixture tokenizer saw only top-level files)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages = ("json", "email", "http", "importlib", "logging", "xml")
    files = sorted(p for package in packages for p in (stdlib / package).glob("*.py"))
    texts = [f.read_text(errors="replace")[:chars] for f in files]
    return [t for t in texts if t.strip()][:count]


def read_prompts(path: Path) -> list[str]:
    """A JSON list of strings, or a text file with one prompt per non-empty line."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        prompts = json.loads(text)
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def encode(ckpt: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(ckpt) / "tokenizer" / "tokenizer.json"))
    return [ids for ids in (tokenizer.encode(t).ids for t in texts) if ids]


def calibrate(ckpt: Path, prompts: list[list[int]], out: Path, *, max_new_tokens: int = 48,
              temperature: float = 0.0, slots: int = 8) -> dict[str, Any]:
    target, drafter, manifest = open_checkpoint(ckpt, num_slots=slots,
                                                max_len=max(map(len, prompts)) + max_new_tokens + 64)
    try:
        decoder = SpeculativeDecoder(target, drafter, num_slots=slots, record_calibration=True)
        requests = [Request(p, max_new_tokens=max_new_tokens, temperature=temperature, seed=i, speculation="fixed")
                    for i, p in enumerate(prompts)]
        run(decoder, requests)
    finally:
        target.close()
    rows = decoder.calibration_rows
    if len(rows) < 30:
        raise ValueError(f"only {len(rows)} full-block rounds recorded: give more or longer prompts")
    logits = torch.stack([r[0] for r in rows])
    accepted = torch.stack([r[1] for r in rows])
    held_out = torch.arange(len(rows)) % 3 == 2
    temperatures = fit_sts(logits[~held_out], accepted[~held_out])
    before = cumulative_ece(logits[held_out], accepted[held_out])
    after = cumulative_ece(logits[held_out], accepted[held_out], temperatures)
    write_calibration(out, temperatures, before, after, samples=len(rows),
                      meta={"checkpoint": str(Path(ckpt).absolute()), "prompts": len(prompts),
                            "fit_rounds": int((~held_out).sum()), "held_out_rounds": int(held_out.sum()),
                            "temperature": temperature, "family": manifest["family"]})
    return {"temperatures": temperatures, "ece_before": before, "ece_after": after, "rounds": len(rows),
            "acceptance": accepted.float().mean(0).tolist()}
