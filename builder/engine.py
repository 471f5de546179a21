"""`dspark-build engine`: what the serving side loads, per backend.

reference   ENGINE/manifest.json (format dspark-trt/engine) + ENGINE/checkpoint/ (the converted
            checkpoint, hard-linked where possible): the PyTorch reference backend runs it on any machine.
tensorrt    Qwen3: ENGINE/onnx/ (export_onnx), ENGINE/draft.plan, context.plan, schedule.plan (TensorRT,
            dspark plugins with their AOT kernels), ENGINE/target/ (TensorRT-LLM `trtllm-build` with
            external-draft-token speculation), ENGINE/checkpoint/ (tokenizer, sts.json, the source).
            DeepSeek-V4: TensorRT-LLM has no TensorRT-engine path for it; its PyTorch backend serves the
            built-in drafter through `DSparkDecodingConfig` (DSPARK_SPEC §6), so ENGINE/trtllm_serve.yaml
            holds that configuration for `trtllm-serve` / the LLM API.

Anything that creates TensorRT objects runs in a child process; without TensorRT / TensorRT-LLM the
build stops before writing anything, with MissingDependencyError naming the install command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..plugins.deps import (
    TENSORRT_LLM_PYTORCH_INSTALL,
    MissingDependencyError,
    has_module,
    require_tensorrt,
    require_trtllm_build,
)
from ..runtime.atomic import atomic_directory, check_output
from ..runtime.errors import CheckpointError
from ..runtime.manifest import read_manifest, write_manifest
from ..runtime.scheduler import DEFAULT_MIN_GAIN

BACKENDS = ("reference", "tensorrt")
__all__ = ["BACKENDS", "MissingDependencyError", "build_engine", "trtllm_build_command", "trtllm_serve_config"]


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree as hard links (same filesystem), falling back to copies."""
    for root, _dirs, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(root) / name, target / name)
            except OSError:
                shutil.copy2(Path(root) / name, target / name)


def _checkpoint(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(ckpt, "not a directory", expected="a converted checkpoint (dspark-build convert)")
    return read_manifest(ckpt, "checkpoint")


def _engine_fields(manifest: dict[str, Any], backend: str, ckpt: Path) -> dict[str, Any]:
    return {"backend": backend, "family": manifest["family"], "dspark": manifest.get("dspark"), "tp": manifest["tp"],
            "draft_tp": manifest.get("draft_tp"), "checkpoint": "checkpoint",
            "source_checkpoint": str(Path(ckpt).absolute())}


def build_engine(ckpt: Path, out: Path, *, backend: str = "reference", force: bool = False, max_batch_size: int = 64,
                 max_input_len: int = 4096, max_seq_len: int = 8192) -> dict[str, Any]:
    """Build ENGINE_DIR `out` from converted checkpoint `ckpt`; returns the engine manifest."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_output(out, inputs=[ckpt], force=force)
    manifest = _checkpoint(ckpt)
    if backend == "reference":
        with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
            _link_tree(Path(ckpt), tmp / "checkpoint")
            return write_manifest(tmp, "engine", **_engine_fields(manifest, backend, ckpt))
    if manifest["family"] == "qwen3":
        return _build_qwen3_tensorrt(Path(ckpt), Path(out), manifest, force=force, max_batch_size=max_batch_size,
                                     max_input_len=max_input_len, max_seq_len=max_seq_len)
    if manifest["family"] == "deepseek-v4":
        return _write_deepseek_v4_config(Path(ckpt), Path(out), manifest, force=force)
    raise CheckpointError(Path(ckpt) / "manifest.json", "no TensorRT route for this family", subject="family",
                          found=manifest["family"], expected="qwen3 | deepseek-v4")


# -- Qwen3: draft plans with the dspark plugins + trtllm-build target ------------------------------------

def trtllm_build_command(target_ckpt: Path, out: Path, *, gamma: int, max_batch_size: int, max_input_len: int,
                         max_seq_len: int, executable: str = "trtllm-build") -> list[str]:
    """`trtllm-build` for a target that verifies externally drafted tokens.

    draft_tokens_external + max_draft_len: the engine takes up to γ draft tokens per request;
    paged context FMHA with the (default) paged KV cache: the KV cache can be reused and rolled back;
    gather_generation_logits: per-position target logits, which rejection sampling needs.
    """
    return [executable, "--checkpoint_dir", str(target_ckpt), "--output_dir", str(out),
            "--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len", str(gamma),
            "--use_paged_context_fmha", "enable", "--paged_kv_cache", "enable", "--gather_generation_logits",
            "--gemm_plugin", "auto", "--max_batch_size", str(max_batch_size), "--max_input_len", str(max_input_len),
            "--max_seq_len", str(max_seq_len)]


def plan_profiles(onnx_manifest: dict[str, Any], draft_config: dict[str, Any], *, max_batch_size: int,
                  max_seq_len: int) -> dict[str, dict[str, list[list[int]]]]:
    """Optimisation profiles (min, opt, max shapes) for each exported graph's dynamic inputs."""
    gamma = onnx_manifest["dspark"]["block_size"]
    layers, kv = draft_config["num_hidden_layers"], draft_config["num_key_value_heads"]
    head_dim = draft_config.get("head_dim") or draft_config["hidden_size"] // draft_config["num_attention_heads"]
    features = len(onnx_manifest["dspark"]["target_layer_ids"]) * draft_config["hidden_size"]
    b = [1, min(8, max_batch_size), max_batch_size]
    ctx = [1, min(512, max_seq_len), max_seq_len]

    def per_batch(*tail: list[int]) -> list[list[int]]:
        return [[b[i], *(t[i] for t in tail)] for i in range(3)]

    cache = [[layers, b[i], kv, ctx[i], head_dim] for i in range(3)]
    rows = min(max_batch_size, 256)
    return {
        "draft": {"anchors": per_batch(), "ctx_lens": per_batch(), "temperatures": per_batch(), "seeds": per_batch(),
                  "past_keys": cache, "past_values": cache},
        "context": {"features": per_batch([1, 16, max_seq_len], [features] * 3), "start": per_batch()},
        "schedule": {"survival": [[1, gamma], [min(8, rows), gamma], [rows, gamma]],
                     "token_counts": [[2], [16], [1024]], "step_time_ms": [[2], [16], [1024]],
                     "batch_sizes": [[1], [8], [256]], "batch_overhead_ms": [[1], [8], [256]],
                     "scalars": [[2], [2], [2]]},
    }


def _build_qwen3_tensorrt(ckpt: Path, out: Path, manifest: dict[str, Any], *, force: bool, max_batch_size: int,
                          max_input_len: int, max_seq_len: int) -> dict[str, Any]:
    require_tensorrt()
    trtllm_build = require_trtllm_build()
    from .export_onnx import export_onnx

    gamma = manifest["dspark"]["block_size"]
    draft_config = json.loads((ckpt / "draft" / "config.json").read_text())
    with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
        onnx_manifest = export_onnx(ckpt, tmp / "onnx")
        profiles = plan_profiles(onnx_manifest, draft_config, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        for graph, shapes in profiles.items():
            request = {"onnx": str(tmp / "onnx" / f"{graph}.onnx"), "plan": str(tmp / f"{graph}.plan"),
                       "shapes": shapes}
            _run([sys.executable, "-m", "dspark_trt.builder.engine"], stdin=json.dumps(request),
                 what=f"TensorRT build of {graph}.plan")
        command = trtllm_build_command(ckpt / "target", tmp / "target", gamma=gamma, max_batch_size=max_batch_size,
                                       max_input_len=max_input_len, max_seq_len=max_seq_len, executable=trtllm_build)
        _run(command, what="trtllm-build of the target")
        _link_tree(ckpt, tmp / "checkpoint")
        return write_manifest(tmp, "engine", **_engine_fields(manifest, "tensorrt", ckpt),
                              plans=[f"{g}.plan" for g in profiles], target_engine="target",
                              trtllm_build=command, limits={"max_batch_size": max_batch_size,
                                                            "max_input_len": max_input_len, "max_seq_len": max_seq_len})


def _run(command: list[str], *, what: str, stdin: str | None = None) -> None:
    done = subprocess.run(command, input=stdin, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def _build_plan(onnx_path: str, plan_path: str, shapes: dict[str, list[list[int]]]) -> None:
    """Parse one exported graph with TensorRT's ONNX parser and serialise its plan (child process only)."""
    import tensorrt as trt

    from ..plugins import trt as dspark_plugins

    dspark_plugins.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path}")
    Path(plan_path).write_bytes(bytes(plan))


# -- DeepSeek-V4: TensorRT-LLM's PyTorch backend with DSparkDecodingConfig ------------------------------

def trtllm_serve_config(manifest: dict[str, Any], *, cost_table: str | None = None,
                        calibration: str | None = None) -> dict[str, Any]:
    """`extra_llm_api_options` for `trtllm-serve` (LLM API): the target on the PyTorch backend with the
    checkpoint's built-in drafter run by DSparkDecodingConfig and its confidence scheduler."""
    dspark = manifest.get("dspark") or {}
    tp = int(manifest["tp"])
    spec = {
        "decoding_type": "DSpark",
        "max_draft_len": dspark.get("block_size"),
        "block_size": dspark.get("block_size"),
        "markov_rank": dspark.get("markov_rank"),
        "markov_head_type": dspark.get("markov_head_type", "vanilla"),
        "mask_token_id": dspark.get("mask_token_id"),
        "target_layer_ids": dspark.get("target_layer_ids"),
        "enable_confidence_scheduling": cost_table is not None,
        "confidence_cost_table_path": cost_table,
        "confidence_calibration_path": calibration,
        "confidence_min_predicted_gain": DEFAULT_MIN_GAIN,
    }
    return {"backend": "pytorch", "tensor_parallel_size": tp, "moe_expert_parallel_size": tp,
            "speculative_config": {k: v for k, v in spec.items() if v is not None}}


def _write_deepseek_v4_config(ckpt: Path, out: Path, manifest: dict[str, Any], *, force: bool) -> dict[str, Any]:
    if not has_module("tensorrt_llm"):
        raise MissingDependencyError("TensorRT-LLM is not installed (DeepSeek-V4 runs on its PyTorch backend with "
                                     f"DSparkDecodingConfig): {TENSORRT_LLM_PYTORCH_INSTALL}")
    import yaml

    model = (manifest.get("sources") or {}).get("target", {}).get("path")
    with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
        _link_tree(ckpt, tmp / "checkpoint")
        sts = tmp / "checkpoint" / "draft" / "sts.json"
        config = trtllm_serve_config(manifest, calibration=str(Path(out).absolute() / "checkpoint/draft/sts.json")
                                     if sts.is_file() else None)
        (tmp / "trtllm_serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return write_manifest(tmp, "engine", **_engine_fields(manifest, "tensorrt", ckpt),
                              route="tensorrt_llm pytorch backend (DSparkDecodingConfig)", model=model,
                              serve=["trtllm-serve", model or "<hf checkpoint>", "--extra_llm_api_options",
                                     "trtllm_serve.yaml"])


if __name__ == "__main__":  # child process of _build_qwen3_tensorrt
    _request = json.loads(sys.stdin.read())
    _build_plan(_request["onnx"], _request["plan"], _request["shapes"])
