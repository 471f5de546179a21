"""`dspark-build engine`: what the serving side loads, per backend.

reference   ENGINE/manifest.json (format dspark-trt/engine) + ENGINE/checkpoint/ (the converted
            checkpoint, hard-linked where possible): the PyTorch reference backend runs it on any machine.
tensorrt    Qwen3: ENGINE/onnx/ (export_onnx), ENGINE/draft.plan, context.plan, schedule.plan (TensorRT,
            dspark plugins with their AOT kernels), ENGINE/checkpoint/ (tokenizer, sts.json, the source):
            the drafter of our own orchestrator on a GPU. Its verifier is not a TensorRT-LLM engine:
            `trtllm-build` and TensorRT-LLM's engine backend were removed from TensorRT-LLM main, and an
            external-draft-token engine never returned the hidden states the drafter reads.

Target and drafter on TensorRT-LLM: its PyTorch backend runs both (`DSparkDecodingConfig`), served
through tensorrtllm_backend's llmapi model by `dspark-build repo ENGINE_DIR --backend tensorrt-llm`
(builder/trtllm.py); no engine build step.

Anything that creates TensorRT objects runs in a child process; without TensorRT the build stops
before writing anything, with MissingDependencyError naming the install command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..plugins.deps import MissingDependencyError, require_tensorrt
from ..runtime.atomic import atomic_directory, check_output
from ..runtime.errors import CheckpointError
from ..runtime.manifest import read_manifest, write_manifest
from .families import FAMILIES, family
from .families.common import check_tokenizer

BACKENDS = ("reference", "tensorrt")
__all__ = ["BACKENDS", "MissingDependencyError", "build_engine"]


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
    if problem := check_tokenizer(Path(ckpt) / "tokenizer"):  # the server cannot start without it
        raise problem
    if backend == "reference":
        with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
            _link_tree(Path(ckpt), tmp / "checkpoint")
            return write_manifest(tmp, "engine", **_engine_fields(manifest, backend, ckpt))
    if family(manifest["family"], Path(ckpt) / "manifest.json").tensorrt_draft_plans:
        return _build_qwen3_tensorrt(Path(ckpt), Path(out), manifest, force=force, max_batch_size=max_batch_size,
                                     max_input_len=max_input_len, max_seq_len=max_seq_len)
    raise CheckpointError(Path(ckpt) / "manifest.json", "no TensorRT draft plan for this family (its drafter runs "
                          "on TensorRT-LLM: dspark-build repo ENGINE_DIR --backend tensorrt-llm)", subject="family",
                          found=manifest["family"],
                          expected=" | ".join(name for name, fam in FAMILIES.items() if fam.tensorrt_draft_plans))


# -- Qwen3: draft plans with the dspark plugins ----------------------------------------------------------

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
    from .export_onnx import export_onnx

    draft_config = json.loads((ckpt / "draft" / "config.json").read_text())
    with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
        onnx_manifest = export_onnx(ckpt, tmp / "onnx")
        profiles = plan_profiles(onnx_manifest, draft_config, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        for graph, shapes in profiles.items():
            request = {"onnx": str(tmp / "onnx" / f"{graph}.onnx"), "plan": str(tmp / f"{graph}.plan"),
                       "shapes": shapes}
            _run([sys.executable, "-m", "dspark_trt.builder.engine"], stdin=json.dumps(request),
                 what=f"TensorRT build of {graph}.plan")
        _link_tree(ckpt, tmp / "checkpoint")
        return write_manifest(tmp, "engine", **_engine_fields(manifest, "tensorrt", ckpt),
                              plans=[f"{g}.plan" for g in profiles],
                              limits={"max_batch_size": max_batch_size, "max_input_len": max_input_len,
                                      "max_seq_len": max_seq_len})


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


if __name__ == "__main__":  # child process of _build_qwen3_tensorrt
    _request = json.loads(sys.stdin.read())
    _build_plan(_request["onnx"], _request["plan"], _request["shapes"])
