"""`dspark-build engine`: the reference engine directory, and the TensorRT route's boundaries here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark_trt.builder.cli_engine import engine
from dspark_trt.builder.engine import plan_profiles
from dspark_trt.plugins.deps import has_module
from dspark_trt.runtime.loader import resolve_checkpoint
from dspark_trt.runtime.manifest import read_manifest

no_tensorrt = pytest.mark.skipif(has_module("tensorrt"), reason="TensorRT is installed here")


def run(*args: str):
    return CliRunner().invoke(engine, [str(a) for a in args])


def test_reference_engine_directory(qwen3_ckpt: Path, tmp_path: Path):
    out = tmp_path / "engines"
    result = run(qwen3_ckpt, "--backend", "reference", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, "engine")
    source = read_manifest(qwen3_ckpt, "checkpoint")
    assert manifest["format"] == "dspark-trt/engine" and manifest["format_version"] == 1
    assert manifest["backend"] == "reference"
    for key in ("family", "dspark", "tp"):
        assert manifest[key] == source[key]
    # The checkpoint itself, hard-linked (same inode) where the filesystem allows.
    assert resolve_checkpoint(out) == out / "checkpoint"
    assert read_manifest(out / "checkpoint", "checkpoint")["sources"] == source["sources"]
    shard = qwen3_ckpt / "draft" / "rank0.safetensors"
    assert os.stat(out / "checkpoint" / "draft" / "rank0.safetensors").st_ino == os.stat(shard).st_ino
    assert not list(tmp_path.glob(".engines.partial-*"))


def test_refuses_to_overwrite_without_force(qwen3_ckpt: Path, tmp_path: Path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "keep").write_text("x")
    result = run(qwen3_ckpt, "-o", out)
    assert result.exit_code == 3 and "--force" in result.output
    assert (out / "keep").exists()
    assert run(qwen3_ckpt, "-o", out, "--force").exit_code == 0
    assert not (out / "keep").exists() and (out / "manifest.json").is_file()


def test_bad_input_is_exit_code_1(tmp_path: Path, qwen3_ckpt: Path):
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "manifest not found" in result.output
    result = run(qwen3_ckpt, "-o", qwen3_ckpt / "engine")
    assert result.exit_code == 1 and "lies inside the input" in result.output


@no_tensorrt
def test_tensorrt_backend_without_tensorrt_is_one_line_and_exit_4(qwen3_ckpt: Path, tmp_path: Path):
    result = run(qwen3_ckpt, "--backend", "tensorrt", "-o", tmp_path / "trt")
    assert result.exit_code == 4
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in lines[0]
    assert not (tmp_path / "trt").exists()


def test_deepseek_v4_has_no_tensorrt_engine_route(v4_pair: Path, tmp_path: Path):
    """TensorRT-LLM runs V4 with its drafter on its PyTorch backend; there is no engine to build for it."""
    from dspark_trt.builder.convert import convert

    convert(v4_pair / "target", None, tmp_path / "v4", tp=1, show_progress=False)
    result = run(tmp_path / "v4", "--backend", "tensorrt", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "repo ENGINE_DIR --backend tensorrt-llm" in result.output
    assert not (tmp_path / "out").exists()


def test_plan_profiles_cover_every_dynamic_input(qwen3_ckpt: Path):
    draft_config = json.loads((qwen3_ckpt / "draft" / "config.json").read_text())
    manifest = {"dspark": read_manifest(qwen3_ckpt, "checkpoint")["dspark"]}
    profiles = plan_profiles(manifest, draft_config, max_batch_size=32, max_seq_len=512)
    from dspark_trt.builder.export_onnx import CONTEXT_INPUTS, DRAFT_INPUTS, SCHEDULE_INPUTS

    assert set(profiles["draft"]) == set(DRAFT_INPUTS)
    assert set(profiles["context"]) == set(CONTEXT_INPUTS)
    assert set(profiles["schedule"]) == set(SCHEDULE_INPUTS)
    low, opt, high = profiles["draft"]["past_keys"]
    assert high[1] == 32 and high[3] == 512 and low[1] == 1
