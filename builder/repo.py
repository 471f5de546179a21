"""`dspark-build repo`: fill the Triton model templates for a deployment layout.

    cpu  every model on the CPU (reference backend; verify runs --tp gloo ranks); the orchestrator
         runs the drafter in its own process (no dspark_draft model) unless --drafter model
    gpu  ONE verify instance owns all N tensor-parallel ranks, rank r on GPU r; the drafter sits on
         verify's rank-0 GPU (a separate DSpark drafter, tp 1) or on GPUs 0..N-1 (DeepSeek-V4's mtp
         drafter, sharded like the target), as the dspark_draft model

Where the drafter runs (`drafter`): `model` serves it as dspark_draft, its own process, which the
orchestrator calls over BLS each round; `orchestrator` runs the same handler (runtime/model_handlers.py,
the same messages and checks) inside the orchestrator's process. A BLS call crosses three processes
and back, and on the CPU that crossing cost a concurrency-1 round about as much as a third of the
drafting itself (docs/measurements.md), so the cpu layout drafts in the orchestrator.

In Triton an instance group's `count` is per listed GPU, so `kind: KIND_GPU gpus: [0..7]` starts
eight instances, each with its own caches, and calls land on whichever is free. The gpu layout
therefore asks for one `KIND_MODEL` instance (the model places its own work) and hands it the GPU of
each rank in the `gpus` parameter, which the Python models read.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from ..runtime.atomic import atomic_directory
from ..runtime.errors import CheckpointError
from ..runtime.loader import resolve_checkpoint
from ..runtime.manifest import read_manifest
from ..runtime.protocol import DRAFT, VERIFY
from ..runtime.scheduler import DEFAULT_MIN_GAIN
from .families.common import check_tokenizer

MODELS = ("preprocessing", "dspark", "dspark_draft", "dspark_verify", "postprocessing", "ensemble")
DRAFTERS = ("orchestrator", "model")  # where the drafter runs (see above)


def template_dir() -> Path:
    return Path(str(resources.files("dspark_trt.model_repository")))


def gpu_lists(layout: str, tp: int, draft_tp: int) -> tuple[str, str]:
    """The `gpus` parameters of dspark_verify (GPU of each rank) and dspark_draft ("" on the CPU)."""
    if layout != "gpu":
        return "", ""
    return ",".join(str(g) for g in range(tp)), ",".join(str(g) for g in range(draft_tp))


def build_repo(engine_dir: Path, out: Path, *, layout: str = "cpu", gpus: int = 1, tp: int | None = None,
               num_slots: int = 16, max_prompt_tokens: int = 1024, max_new_tokens: int = 512,
               scheduler: str = "production", min_gain: float = DEFAULT_MIN_GAIN, sps_table: Path | None = None,
               live_costs: bool = True, draft_threads: int = 1, drafter: str | None = None,
               force: bool = False) -> dict[str, Any]:
    """Write the repository `out` for `engine_dir`; returns the values the templates were filled with.
    `drafter`: "orchestrator" or "model" (default: orchestrator in the cpu layout, model in the gpu one)."""
    engine_dir = Path(engine_dir).absolute()
    drafter = drafter or ("model" if layout == "gpu" else "orchestrator")
    if drafter not in DRAFTERS:
        raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
    if layout == "gpu" and drafter != "model":
        raise ValueError("--drafter orchestrator: the gpu layout places the drafter on verify's rank-0 GPU, as the "
                         "dspark_draft model (--drafter model); the orchestrator runs on the CPU")
    ckpt = resolve_checkpoint(engine_dir)
    manifest = read_manifest(ckpt, "checkpoint")
    if problem := check_tokenizer(ckpt / "tokenizer"):  # preprocessing and the orchestrator load it
        raise problem
    if manifest.get("dspark") is None:
        raise CheckpointError(ckpt / "manifest.json", "the checkpoint has no drafter", subject="dspark",
                              expected="a checkpoint converted with its drafter")
    ckpt_tp = manifest["tp"]
    tp = tp or ckpt_tp
    if tp != ckpt_tp:
        raise CheckpointError(ckpt / "manifest.json", f"--tp {tp} differs from the checkpoint's tensor parallelism",
                              subject="tp", found=ckpt_tp, expected=f"{tp} (convert again with --tp {tp})")
    if layout == "gpu" and gpus != tp:
        raise CheckpointError(ckpt / "manifest.json", f"--gpus {gpus}: the one verify instance places its {tp} "
                              "tensor-parallel ranks on one GPU each", subject="tp", found=tp,
                              expected=f"--gpus {tp}, or convert again with --tp {gpus}")
    draft_tp = manifest.get("draft_tp") or 1
    verify_gpus, draft_gpus = gpu_lists(layout, tp, draft_tp)
    engine_manifest = engine_dir / "manifest.json"
    backend = "reference"
    if engine_manifest.is_file() and engine_dir != ckpt:
        backend = read_manifest(engine_dir, "engine").get("backend", "reference")
    gamma = manifest["dspark"]["block_size"]
    values = {
        "engine_dir": str(engine_dir), "tokenizer_dir": str(ckpt / "tokenizer"), "backend": backend, "tp": tp,
        "num_slots": num_slots, "max_len": max_prompt_tokens + max_new_tokens + gamma + 2,
        "max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens, "scheduler": scheduler,
        "min_gain": min_gain, "live_costs": str(live_costs).lower(), "draft_threads": draft_threads,
        "drafter": drafter,
        "preprocessing_instances": 1, "postprocessing_instances": 1,
        "instance_kind": "KIND_MODEL" if layout == "gpu" else "KIND_CPU",
        "verify_gpus": verify_gpus, "draft_gpus": draft_gpus,
        # the internal models' input / output sections, from the one definition of their messages
        "verify_io": VERIFY.config_io(), "draft_io": DRAFT.config_io(),
        "layout_comment_verify": (f"Layout gpu: one instance owning {tp} tensor-parallel rank(s), rank r on GPU r "
                                  f"of `gpus` ({verify_gpus})." if layout == "gpu"
                                  else f"Layout cpu: one instance, {tp} gloo rank(s)."),
        "layout_comment_draft": (f"Layout gpu: one instance on GPU(s) {draft_gpus}, beside verify's rank(s) there."
                                 if layout == "gpu" else "Layout cpu: one instance."),
    }
    with atomic_directory(out, force=force, inputs=[engine_dir, ckpt, sps_table]) as tmp:
        values["sps_table"] = ""
        if sps_table is not None:
            shutil.copyfile(sps_table, tmp / "sps_table.json")
            values["sps_table"] = str(Path(out).absolute() / "sps_table.json")
        for model in MODELS:
            if model == "dspark_draft" and drafter != "model":
                continue
            (tmp / model / "1").mkdir(parents=True)
            fill_template(model, tmp / model, values)
    return values


def fill_template(model: str, dest: Path, values: dict[str, Any], flavour: str | None = None) -> None:
    """Write `model`'s config.pbtxt (its template filled with `values`) and its 1/*.py into `dest`.
    A flavour's own template (model_repository/<flavour>/<model>/) replaces the common one."""
    templates = template_dir()
    source = templates / flavour / model if flavour and (templates / flavour / model).is_dir() else templates / model
    text = (source / "config.pbtxt.template").read_text()
    (dest / "config.pbtxt").write_text(Template(text).substitute(values))
    for script in (source / "1").glob("*.py"):
        shutil.copyfile(script, dest / "1" / script.name)
