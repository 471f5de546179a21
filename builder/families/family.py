"""`Family`: everything dspark-trt asks of one model family, in one object.

Each family module (qwen3.py, deepseek_v4.py, gemma4.py) ends with one `FAMILY = Family(...)`; the
registry in `__init__.py` lists them. Builder, runtime and serving code never test a family's name:
they ask its `Family` (detection, tensors, checks, conversion plans, runner classes, GPU routes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from .common import Expect, Plan, Source


def resolve(path: str) -> Any:
    """The object a "package.module:name" string names, imported on first use (runners need torch;
    inspect and convert do not)."""
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One model family. The callables take `Source`s (builder/families/common.py)."""

    name: str  # manifest "family", `--family` values, DistributedTarget kind
    # Detection: (role, config) of a checkpoint directory's config.json, role "target" or "drafter";
    # None when the config is another family's. `accepts` names what it recognises, for the error.
    detect: Callable[[dict[str, Any], Path], tuple[str, dict[str, Any]] | None]
    accepts: str
    # Stored tensor name -> the name every check and plan uses.
    canonical: Callable[[str], str]
    # Expected tensors and config checks.
    target_tensors: Callable[[Source], list[Expect]]
    drafter_tensors: Callable[[Source], list[Expect]]
    check_drafter_fields: Callable[[Source], list]
    check_pair: Callable[[Source, Source], list]
    dspark_fields: Callable[[Source], dict[str, Any]]  # the family-neutral drafter description
    summary: Callable[[Source], dict[str, Any]]
    # Conversion plan: (source, tp, **options) -> Plan; `plan_options` names the convert options
    # the plans take (e.g. "dequantize").
    target_plan: Callable[..., Plan]
    drafter_plan: Callable[..., Plan]
    # Reference runners, "module:Class": target(path, rank=, num_slots=, max_len=, ...) and
    # drafter(draft_dir, num_slots=, max_len=, ...).
    target_runner: str
    drafter_runner: str
    # `dspark-build fixture NAME OUT`: "module:function" writing a tiny random pair to OUT, given
    # `seed` and the `fixture_options` it takes ("markov_head_type", "scale").
    fixture: str
    fixture_options: tuple[str, ...] = ()
    plan_options: tuple[str, ...] = ()
    # Keyword arguments the runners take from the converted checkpoint, given (checkpoint directory,
    # manifest): the loader passes them, so no runner reads files beside its own directory.
    target_options: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
    drafter_options: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
    # The drafter ships inside the target checkpoint (DeepSeek-V4's mtp.* stages): given the
    # target's Source, whether it holds one. None: the drafter is its own checkpoint.
    drafter_in_target: Callable[[Source], Any] | None = None
    # GPU routes. `tensorrt_draft_plans`: `engine --backend tensorrt` / `export-onnx` build TensorRT
    # draft plans with the dspark plugins (else the drafter runs on TensorRT-LLM only); the ONNX
    # graphs of builder/export_onnx.py exist for the Qwen3 drafter only, so only qwen3 sets it.
    # `expert_parallel`: TensorRT-LLM spreads MoE experts over the tensor-parallel GPUs.
    # `cuda_graphs`: the reference target replays its verify steps from CUDA graphs on a GPU.
    tensorrt_draft_plans: bool = False
    expert_parallel: bool = False
    cuda_graphs: bool = False

    @property
    def embedded_drafter(self) -> bool:
        """TensorRT-LLM loads the drafter from the target checkpoint (its `speculative_model`)."""
        return self.drafter_in_target is not None

    def target_class(self) -> type:
        return resolve(self.target_runner)

    def drafter_class(self) -> type:
        return resolve(self.drafter_runner)
