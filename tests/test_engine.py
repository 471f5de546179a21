"""`dspark-build engine`: the reference engine directory, and the TensorRT route's boundaries here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark_trt.builder.cli_engine import engine
from dspark_trt.builder.engine import plan_profiles, trtllm_build_command, trtllm_serve_config
from dspark_trt.plugins.deps import has_module
from dspark_trt.runtime.loader import resolve_checkpoint
from dspark_trt.runtime.manifest import read_manifest, write_manifest

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


@pytest.mark.skipif(has_module("tensorrt_llm"), reason="TensorRT-LLM is installed here")
def test_deepseek_v4_route_needs_tensorrt_llm(tmp_path: Path):
    ckpt = tmp_path / "v4"
    ckpt.mkdir()
    write_manifest(ckpt, "checkpoint", family="deepseek-v4", tp=8, dspark={"block_size": 5})
    result = run(ckpt, "--backend", "tensorrt", "-o", tmp_path / "out")
    assert result.exit_code == 4 and "tensorrt_llm>=1.3.0rc27" in result.output


def test_trtllm_build_command_for_external_draft_tokens(tmp_path: Path):
    command = trtllm_build_command(tmp_path / "target", tmp_path / "out", gamma=7, max_batch_size=16,
                                   max_input_len=1024, max_seq_len=2048)
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "trtllm-build"
    assert flags["--speculative_decoding_mode"] == "draft_tokens_external" and flags["--max_draft_len"] == "7"
    assert flags["--use_paged_context_fmha"] == "enable" and "--gather_generation_logits" in command
    assert flags["--checkpoint_dir"] == str(tmp_path / "target")


def test_trtllm_serve_config_for_deepseek_v4():
    manifest = {"family": "deepseek-v4", "tp": 8, "dspark": {
        "block_size": 5, "mask_token_id": 128799, "target_layer_ids": [40, 41, 42], "markov_rank": 256,
        "markov_head_type": "vanilla"}}
    config = trtllm_serve_config(manifest, cost_table="/e/sps_table.json", calibration="/e/sts.json")
    spec = config["speculative_config"]
    assert config["backend"] == "pytorch" and config["tensor_parallel_size"] == 8
    assert spec["decoding_type"] == "DSpark" and spec["max_draft_len"] == 5 and spec["mask_token_id"] == 128799
    assert spec["enable_confidence_scheduling"] and spec["confidence_min_predicted_gain"] == 0.04
    assert spec["confidence_calibration_path"] == "/e/sts.json"


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
