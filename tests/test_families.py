"""The family registry is the one place dispatch reads: a family is one module plus one FAMILIES line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from dspark_trt.builder import families
from dspark_trt.builder.families import FAMILIES, deepseek_v4, open_pair, qwen3

ROOT = Path(__file__).resolve().parent.parent


class RecordingTarget:
    opened: list[Path] = []
    config = SimpleNamespace(vocab_size=7)

    def __init__(self, path: Path, *, rank: int, **kwargs: object) -> None:
        RecordingTarget.opened.append(Path(path))


class RecordingDrafter:
    opened: list[Path] = []

    def __init__(self, draft_dir: Path, **kwargs: object) -> None:
        RecordingDrafter.opened.append(Path(draft_dir))


def test_runners_come_from_the_registry(qwen3_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader, tensor parallelism and the Triton handlers open whatever runners the registry names."""
    from dspark_trt.runtime.loader import open_checkpoint
    from dspark_trt.runtime.model_handlers import DraftHandler, VerifyHandler

    here = f"{__name__}:"
    monkeypatch.setitem(FAMILIES, "qwen3", dataclasses.replace(
        qwen3.FAMILY, target_runner=here + "RecordingTarget", drafter_runner=here + "RecordingDrafter"))
    RecordingTarget.opened.clear()
    RecordingDrafter.opened.clear()
    target, drafter, manifest = open_checkpoint(qwen3_ckpt)
    assert isinstance(target, RecordingTarget) and isinstance(drafter, RecordingDrafter)
    assert RecordingTarget.opened == [qwen3_ckpt / "target"] and RecordingDrafter.opened == [qwen3_ckpt / "draft"]
    assert isinstance(DraftHandler(qwen3_ckpt, num_slots=1, max_len=8).drafter, RecordingDrafter)
    assert isinstance(VerifyHandler(qwen3_ckpt, num_slots=1, max_len=8).target, RecordingTarget)


def test_detection_asks_each_registered_family(qwen3_pair: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new family registered with one line is detected, named in the pair and used for its tensor names."""
    toy = dataclasses.replace(qwen3.FAMILY, name="toy", detect=lambda config, path: ("target", config))
    monkeypatch.setattr(families, "FAMILIES", {"toy": toy, **FAMILIES})
    pair = open_pair([qwen3_pair / "target"])
    assert pair.family == "toy" and pair.model_family is toy


def test_v4_runtime_reads_the_converters_shard_dims(v4_pair: Path) -> None:
    """The runtime reassembles V4 ranks along the dimension each tensor was split on by convert."""
    from dspark_trt.runtime import deepseek_v4 as runtime_v4

    assert runtime_v4.shard_dim is deepseek_v4.shard_dim
    pair = open_pair([v4_pair / "target"])
    plan = deepseek_v4.target_plan(pair.target, 2)
    split = {}
    for item in plan.items:
        for target in item.targets:
            for piece in target.pieces:
                if piece.stop is not None:
                    split[target.name] = piece.dim
    weights = [item.targets[0].name for item in plan.items if not item.targets[0].name.endswith("_scale_inv")]
    assert split, "the fixture has tensors split over 2 ranks"
    for name in weights:
        assert deepseek_v4.shard_dim(name) == split.get(name), name


def test_no_dispatch_on_family_names_outside_the_registry() -> None:
    """Builder, runtime, client and Triton code ask the Family; a test like `family == "qwen3"` is a second
    registry that a new family would have to find."""
    names = "|".join(re.escape(name) for name in FAMILIES)
    test = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = []
    for folder in ("builder", "runtime", "client", "model_repository"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent.name == "families":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if test.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_v4_runners_read_only_the_paths_the_loader_gives(v4_pair: Path, tmp_path: Path) -> None:
    """The V4 drafter reads the target it is given, the V4 target no manifest beside its directory; the
    loader passes both from the checkpoint's manifest."""
    import json
    import shutil

    import torch

    from dspark_trt.builder.convert import convert
    from dspark_trt.runtime.deepseek_v4 import DeepseekV4Target
    from dspark_trt.runtime.dspark.deepseek_v4 import DeepseekV4DSparkDrafter
    from dspark_trt.runtime.loader import open_checkpoint

    ckpt = tmp_path / "ckpt"
    convert(v4_pair / "target", None, ckpt, tp=1, show_progress=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ckpt / "draft", elsewhere / "draft")
    shutil.copytree(ckpt / "target", tmp_path / "moved-target")
    moved = DeepseekV4DSparkDrafter(elsewhere / "draft", num_slots=1, max_len=32, target_dir=tmp_path / "moved-target")
    plain = DeepseekV4DSparkDrafter(ckpt / "draft", num_slots=1, max_len=32)
    assert torch.equal(moved.embed, plain.embed) and torch.equal(moved.head, plain.head)

    (tmp_path / "manifest.json").write_text(json.dumps({"dspark": {"target_feature": "not-a-feature"}}))
    assert DeepseekV4Target(tmp_path / "moved-target", num_slots=1, max_len=32).target_feature == \
        "layer_output_hc_mean"

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["dspark"]["target_feature"] = "layer_input_hc_mean"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    target, _, _ = open_checkpoint(ckpt, num_slots=1, max_len=32)
    assert target.target_feature == "layer_input_hc_mean"
