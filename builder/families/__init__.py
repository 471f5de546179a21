"""Model families: the registry, detection, and validation of a target with its DSpark drafter.

Every question about a family goes to its `Family` (family.py), found here by name (`family(name)`)
or by detecting a checkpoint (`detect`). Builder, runtime, client and Triton-model code never compare
a family's name (tests/test_families.py checks).

Adding a family `foo`:
  1. builder/families/foo.py: detection (`detect(config, path) -> (role, config) | None`), `canonical`
     tensor names, expected tensors (`target_tensors`, `drafter_tensors`), config checks
     (`check_drafter_fields`, `check_pair`), `dspark_fields`, `summary`, and the conversion plans
     (`target_plan`, `drafter_plan`); qwen3.py is the model to copy. The module ends with
     `FAMILY = Family(...)` naming those, its runner classes, its fixture writer and its GPU routes.
  2. The runners named there: runtime/foo.py (target: `FooTarget(path, rank=, num_slots=, max_len=,
     dtype=, device=)`) and runtime/dspark/foo.py (`FooDSparkDrafter(draft_dir, num_slots=, max_len=,
     dtype=, device=)`, a `dspark.base.SlotContext` that writes `_write_context` and `backbone`; its
     backbone one function that training and export call too, as runtime/dspark/qwen3.py's
     `forward_backbone` is), reading only the directory they are given (anything else they need from the
     converted checkpoint comes through `target_options` / `drafter_options`), and
     builder/fixture_foo.py (`write_foo_fixture(out, seed=, ...)`) for the tests.
  3. One line in `FAMILIES` below. `dspark-build fixture|inspect|convert|engine|repo`, the loader,
     tensor parallelism and the Triton models then take it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime.calibration import CALIBRATION_FILE
from ...runtime.errors import CheckpointError
from ...runtime.safetensors_io import SafetensorsCheckpoint, TensorInfo, count_nonfinite
from . import deepseek_v4, gemma4, qwen3
from .common import Source, check_tensors, check_tokenizer, load_config
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen3.FAMILY, deepseek_v4.FAMILY, gemma4.FAMILY)}


def family(name: str, where: str | Path = "manifest.json") -> Family:
    """The registered family called `name`; an unknown one is a CheckpointError naming `where`."""
    if name not in FAMILIES:
        raise CheckpointError(where, "unknown model family", subject="family", found=name,
                              expected=" | ".join(FAMILIES))
    return FAMILIES[name]


@dataclass
class Pair:
    """A target and its drafter (for DeepSeek-V4 both are the same checkpoint directory)."""

    family: str
    target: Source | None = None
    drafter: Source | None = None
    calibration: Path | None = None

    @property
    def model_family(self) -> Family:
        return FAMILIES[self.family]

    @property
    def drafter_inside_target(self) -> bool:
        return self.drafter is not None and self.drafter is self.target


def detect(path: Path) -> tuple[str, str, dict[str, Any]]:
    """(family, role, config) of a checkpoint directory; role is 'target' or 'drafter'."""
    config = load_config(path)
    for fam in FAMILIES.values():
        if found := fam.detect(config, Path(path)):
            role, config = found
            return fam.name, role, config
    raise CheckpointError(Path(path) / "config.json", "unsupported model", subject="architectures/model_type",
                          found=f"{config.get('architectures') or None} / {config.get('model_type')}",
                          expected=" | ".join(f.accepts for f in FAMILIES.values()))


def open_pair(paths: list[Path]) -> Pair:
    """Open one or two checkpoint directories (any order) as a target/drafter pair."""
    pair: Pair | None = None
    for path in map(Path, paths):
        family, role, config = detect(path)
        source = Source(path, config, SafetensorsCheckpoint(path), FAMILIES[family].canonical)
        if pair is None:
            pair = Pair(family)
        elif pair.family != family:
            raise CheckpointError(path, "target and drafter belong to different model families",
                                  found=family, expected=pair.family)
        if getattr(pair, role) is not None:
            raise CheckpointError(path, f"two {role} checkpoints given", found=str(getattr(pair, role).path),
                                  expected=f"one {role}")
        setattr(pair, role, source)
        inside = FAMILIES[family].drafter_in_target
        if inside is not None and inside(source):
            pair.drafter = source
        if role == "drafter" or pair.drafter_inside_target:
            calibration = path / CALIBRATION_FILE
            pair.calibration = calibration if calibration.is_file() else None
    if pair is None:
        raise CheckpointError(".", "no checkpoint given")
    return pair


@dataclass
class Report:
    problems: list[CheckpointError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(pair: Pair, *, values: bool = True, progress: Callable[[int], None] | None = None) -> Report:
    """Every check `inspect` and `convert` rely on; collects all problems instead of stopping at one.

    `values`: also read every weight and report NaN/Inf (`check_values`; `progress` gets bytes read).
    """
    report = Report()
    fam = pair.model_family
    expected_by_source: dict[int, tuple[Source, list]] = {}
    incomplete: set[int] = set()  # sources whose expected list a config problem cut short

    def expect(source: Source, make) -> None:
        try:
            entry = expected_by_source.setdefault(id(source), (source, []))
            entry[1].extend(make(source))
        except CheckpointError as e:
            report.problems.append(e)
            incomplete.add(id(source))

    if pair.target is not None:
        expect(pair.target, fam.target_tensors)
    if pair.drafter is not None:
        try:
            report.problems += fam.check_drafter_fields(pair.drafter)
        except CheckpointError as e:
            report.problems.append(e)
        expect(pair.drafter, fam.drafter_tensors)
    for source, expected in expected_by_source.values():
        problems, unexpected = check_tensors(source, expected)
        report.problems += problems
        if unexpected and id(source) not in incomplete:
            report.warnings.append(f"{source.path}: {len(unexpected)} tensors not used by dspark-trt "
                                   f"(e.g. {', '.join(unexpected[:3])})")
    if pair.target is not None and pair.drafter is not None and not pair.drafter_inside_target:
        try:
            report.problems += fam.check_pair(pair.target, pair.drafter)
        except CheckpointError as e:
            report.problems.append(e)
    if pair.calibration is not None and pair.drafter is not None:
        report.problems += check_calibration(pair.calibration, pair)
    if pair.target is not None:
        vocab = pair.target.config.get("vocab_size")
        if problem := check_tokenizer(pair.target.path, vocab if isinstance(vocab, int) and vocab > 0 else None):
            report.problems.append(problem)
    if values:
        report.problems += check_values(pair, progress)
    # A bad field is met by every check that reads it: report it once.
    report.problems = list({problem.describe(): problem for problem in report.problems}.values())
    return report


def check_values(pair: Pair, progress: Callable[[int], None] | None = None) -> list[CheckpointError]:
    """NaN or Inf anywhere in the weights (FP8 scales included): one problem per tensor that has any.

    Every floating tensor is read once, chunk by chunk (memory stays flat), several tensors at a time.
    """
    sources = {id(s): s for s in (pair.target, pair.drafter) if s is not None}
    infos = [info for source in sources.values() for info in source.ckpt.tensors.values()]

    def scan(info: TensorInfo) -> tuple[TensorInfo, int, int | None]:
        count, first = count_nonfinite(info)
        if progress is not None:
            progress(info.nbytes)
        return info, count, first

    problems = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for info, count, first in pool.map(scan, infos):
            if count:
                where = [int(i) for i in np.unravel_index(first, info.shape)] if info.shape else []
                problems.append(CheckpointError(info.path, "non-finite values (NaN or Inf)", subject=info.name,
                                                found=f"{count} of {info.numel} values, the first at index {where}",
                                                expected="finite numbers"))
    return problems


def check_calibration(path: Path, pair: Pair) -> list[CheckpointError]:
    """STS calibration: one positive temperature per block position under `sts_temperatures`."""
    try:
        temps = json.loads(path.read_text()).get("sts_temperatures")
    except (json.JSONDecodeError, AttributeError) as e:
        return [CheckpointError(path, f"unreadable calibration file ({e})")]
    gamma = pair.model_family.dspark_fields(pair.drafter)["block_size"]
    if not (isinstance(temps, list) and len(temps) == gamma
            and all(isinstance(t, (int, float)) and t > 0 for t in temps)):
        return [CheckpointError(path, "bad STS temperatures", subject="sts_temperatures", found=temps,
                                expected=f"{gamma} positive numbers (one per block position)")]
    return []
