"""`dspark-build profile --backend tensorrt-llm`: the SPS curve of a TensorRT-LLM deployment, through its LLM API.

What runs (on a GPU host, in `measure_cells`, the only part that needs TensorRT-LLM and a GPU): for every
draft length l (default 0..γ) one `LLM` is built with the arguments `repo --backend tensorrt-llm`
writes to model.yaml (builder/trtllm.model_yaml, so the DSpark keys are never written twice), with
`max_draft_len = block_size = l` as TensorRT-LLM's own DSpark profiler does (its DSparkWorker wants
the two equal; tensorrt_llm/_torch/speculative/dspark_sps_profiler.py on the confidence-scheduling
branch), and l = 0 runs without speculation. For every batch size R, R requests with random prompts
decode together; `LLM.get_stats()` then returns one dict per engine iteration
(IterationStats.to_json_str plus the executor's extra keys: tensorrt_llm/executor/base_worker.py
`_stats_serializer`, cpp/tensorrt_llm/executor/jsonSerialization.cpp).

Everything else is pure and tested on CPU:

- `generation_steps` keeps only the iterations that have exactly the cell's shape: no context
  (prefill) request, R generation requests, and, when the iteration reports speculative-decoding
  stats, R·l draft tokens over R requests. The step time is `hostStepTimeMS` (one executor loop;
  `iterLatencyMS` spans about two loops under the overlap scheduler, so it is used only where the row
  says the scheduler did not overlap).
- `cell_time`: the median of the steps after `warmup` (a decode step has a long right tail).
- `table_from_stats` fits our CostTable over B = R·(1 + l) with builder/profile_table.fit_cost_table,
  `verify_batching = "packed"` (TensorRT-LLM packs requests of different lengths).
- `trtllm_sps_table` converts it to the JSON that `confidence_sps_table_path` reads on TensorRT-LLM's
  confidence-scheduling branch (PR #17056: `SpsCostTable` in tensorrt_llm/_torch/speculative/
  dspark_planner.py, read by dspark.py `_build_verify_planner`): the same decomposition
  fixed + α(R) + θ(M), M the total verified tokens with the bonus token, both axes interpolated
  linearly and clamped at the ends, θ > 0, plus `_meta` with the engine facts its
  `check_table_fingerprint` compares (tp, ep, attention_dp, block, max_batch_size).

Not written: the schema-v2 "exact T(G, V)" table of PR #18392 (dspark_planner.py
`load_runtime_sps_cost_table`), which is accepted only together with a separately generated live
fingerprint of the running engine (source head and diff hashes, GPU and runtime snapshots); those are
produced by TensorRT-LLM's runtime, not by a profile taken through the public LLM API.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..plugins.deps import TENSORRT_LLM_PYTORCH_INSTALL, MissingDependencyError, has_module
from ..runtime.atomic import write_text_atomic
from ..runtime.errors import CheckpointError
from ..runtime.scheduler import CostTable
from .profile_table import fit_cost_table

STATS = "TensorRT-LLM iteration stats"  # where a stats problem is, in error messages
HOST_STEP_TIME = "hostStepTimeMS"
# SpsCostTable rejects a step_time_ms that is not positive; the smallest value moved into θ when our
# θ starts at zero (the sum fixed + α + θ is unchanged).
MIN_THETA_MS = 1e-4
TRTLLM_TABLE_SOURCE = "dspark-trt profile --backend tensorrt-llm"
REQUIRES = (f"`profile --backend tensorrt-llm` runs on a GPU host with TensorRT-LLM (DSpark in its PyTorch "
            f"backend) installed: {TENSORRT_LLM_PYTORCH_INSTALL}")


# --------------------------------------------------------------------------- iteration stats -> step times


def parse_stats(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """`LLM.get_stats()` rows as dicts: releases return dicts, older ones JSON strings."""
    parsed = []
    for row in rows:
        if isinstance(row, (str, bytes)):
            row = json.loads(row)
        if not isinstance(row, dict):
            raise CheckpointError(STATS, "an iteration record is not a JSON object", found=type(row).__name__,
                                  expected="a dict per iteration, as LLM.get_stats() returns")
        parsed.append(row)
    return parsed


def step_time_ms(row: Mapping[str, Any]) -> float | None:
    """One executor loop's time in ms, or None when the row does not carry a clean one."""
    value = row.get(HOST_STEP_TIME)
    if value is None and row.get("schedulerMode") == "non_overlap":
        value = row.get("iterLatencyMS")  # without overlap, the iteration latency is one loop
    if value is None or not math.isfinite(float(value)) or float(value) <= 0:
        return None
    return float(value)


def generation_steps(rows: Iterable[Mapping[str, Any]], *, batch_size: int, draft_len: int) -> list[float]:
    """Step times (ms, iteration order) of the iterations shaped exactly like the cell (R, l).

    Kept: no context request (a prefill iteration costs its prompt tokens, not the verify step),
    exactly R generation requests (not the ramp-up or the drain at the end), and, when the iteration
    reports speculative-decoding stats, every request verifying l drafts (R·l draft tokens). Only
    attention-DP rank 0's rows count (ranks repeat rank 0's step time).
    """
    kept: list[tuple[int, float]] = []
    for row in rows:
        if int(row.get("attentionDpRank", 0) or 0) != 0:
            continue
        batching = row.get("inflightBatchingStats") or {}
        if int(batching.get("numContextRequests", 0) or 0) or int(batching.get("numGenRequests", 0) or 0) != batch_size:
            continue
        spec = row.get("specDecodingStats")
        if spec is not None and draft_len > 0:
            if (int(spec.get("numRequestsWithDraftTokens", 0) or 0) != batch_size
                    or int(spec.get("numDraftTokens", 0) or 0) != batch_size * draft_len):
                continue
        elif spec is not None and int(spec.get("numDraftTokens", 0) or 0):
            continue  # a run without speculation must verify no drafts
        seconds = step_time_ms(row)
        if seconds is not None:
            kept.append((int(row.get("iter", len(kept))), seconds))
    return [ms for _, ms in sorted(kept)]


def explain(rows: list[Mapping[str, Any]], *, batch_size: int, draft_len: int) -> str:
    """Why `generation_steps` kept nothing, for the error message."""
    if not rows:
        return "no iteration stats at all (is enable_iter_perf_stats on?)"
    batching = [r.get("inflightBatchingStats") or {} for r in rows]
    generation = sorted({int(b.get("numGenRequests", 0) or 0) for b in batching if not b.get("numContextRequests")})
    timed = sum(step_time_ms(r) is not None for r in rows)
    return (f"{len(rows)} iterations; generation-only iterations had {generation or 'none'} generation requests "
            f"(needed {batch_size}); {timed} carried {HOST_STEP_TIME}")


def cell_time(steps: list[float], *, warmup: int, min_steps: int) -> float:
    """Median step time (ms) after the first `warmup` steps; a ValueError if fewer than `min_steps` remain."""
    steady = steps[warmup:]
    if len(steady) < max(min_steps, 1):
        raise ValueError(f"{len(steady)} steady steps after {warmup} warm-up steps, need {max(min_steps, 1)}")
    return statistics.median(steady)


def samples_from_stats(stats: Mapping[tuple[int, int], list[Mapping[str, Any]]], *, warmup: int,
                       min_steps: int) -> dict[tuple[int, int], float]:
    """{(R, B = R·(1 + l)): median seconds} from the iteration stats of each cell (R, l)."""
    samples = {}
    for (batch_size, draft_len), rows in sorted(stats.items()):
        steps = generation_steps(rows, batch_size=batch_size, draft_len=draft_len)
        try:
            ms = cell_time(steps, warmup=warmup, min_steps=min_steps)
        except ValueError as e:
            raise CheckpointError(STATS, f"batch size {batch_size} with {draft_len} drafts never ran enough "
                                  f"generation-only steps: {e}", subject=f"R={batch_size} l={draft_len}",
                                  found=explain(list(rows), batch_size=batch_size, draft_len=draft_len),
                                  expected=f"{batch_size} requests decoding together (max_batch_size and the CUDA "
                                  "graph batch sizes must admit them; longer --steps give more iterations)") from None
        samples[(batch_size, batch_size * (1 + draft_len))] = ms / 1000.0
    return samples


def table_from_stats(stats: Mapping[tuple[int, int], list[Mapping[str, Any]]], meta: dict[str, Any], *,
                     warmup: int, min_steps: int) -> CostTable:
    """Our cost table from the iteration stats of each cell (R, l); TensorRT-LLM packs requests."""
    samples = samples_from_stats(stats, warmup=warmup, min_steps=min_steps)
    meta = {**meta, "statistic": f"median of generation-only iterations after {warmup} warm-up steps",
            "cells": {f"{r},{b}": round(s * 1000.0, 6) for (r, b), s in sorted(samples.items())}}
    return replace(fit_cost_table(samples, meta), verify_batching="packed")


# --------------------------------------------------------------------------- TensorRT-LLM's table


def trtllm_sps_table(table: CostTable, *, engine: Mapping[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
    """`table` as the JSON `confidence_sps_table_path` reads on TensorRT-LLM's confidence-scheduling branch.

    Both models are fixed + α(R) + θ(M) with α linear between batch sizes and flat outside. θ differs
    only outside the profiled token counts: ours continues along its last slope, TensorRT-LLM's is
    clamped, so the table gets one more point at `max_tokens` (max batch size · (γ + 1)) when that
    lies beyond. θ must be positive there: a θ starting at 0 borrows MIN_THETA_MS from the fixed part
    (then from α), which leaves every predicted step time unchanged.
    """
    if table.padded:
        raise CheckpointError("<cost table>", "a padded table describes the reference backend, not TensorRT-LLM",
                              subject="verify_batching", found=table.verify_batching, expected="packed")
    counts, theta = list(table.token_counts), list(table.step_time_ms)
    if max_tokens is not None and max_tokens > counts[-1]:
        theta.append(table.step_ms(table.batch_sizes[0], max_tokens) - table.fixed_overhead_ms
                     - table.alpha_ms(table.batch_sizes[0]))
        counts.append(int(max_tokens))
    fixed, alpha = table.fixed_overhead_ms, list(table.batch_overhead_ms)
    need = max(MIN_THETA_MS - theta[0], 0.0)
    from_fixed = min(need, fixed)
    from_alpha = min(need - from_fixed, min(alpha))
    theta = [t + from_fixed + from_alpha for t in theta]
    doc = {
        "token_counts": counts,
        "step_time_ms": [round(t, 6) for t in theta],
        "fixed_overhead_ms": round(fixed - from_fixed, 6),
        "batch_sizes": list(table.batch_sizes),
        "batch_overhead_ms": [round(a - from_alpha, 6) for a in alpha],
        "_meta": {
            "lookup": "interp",  # dspark.py warns about tables without this marker (written for a floor lookup)
            "encoding": "decomposed",  # step_time_ms is θ only; fixed and α are added on top
            "token_unit": "total verified tokens R*(l+1), bonus token included",
            "engine": dict(engine),  # compared by check_table_fingerprint where the engine knows the key
            "source": TRTLLM_TABLE_SOURCE,
            "profile": dict(table.meta),
        },
    }
    check_trtllm_sps_table(doc)
    return doc


def check_trtllm_sps_table(doc: Mapping[str, Any], path: str | Path = "<TensorRT-LLM SPS table>") -> None:
    """The checks TensorRT-LLM's SpsCostTable.__post_init__ makes (dspark_planner.py), as CheckpointErrors."""
    def fail(problem: str, subject: str, found: object) -> None:
        raise CheckpointError(path, problem, subject=subject, found=found, expected="what SpsCostTable accepts")

    for key in ("token_counts", "step_time_ms", "fixed_overhead_ms", "batch_sizes", "batch_overhead_ms"):
        if key not in doc:
            fail("missing field", key, sorted(doc))
    counts, times = doc["token_counts"], doc["step_time_ms"]
    sizes, overheads = doc["batch_sizes"], doc["batch_overhead_ms"]
    if not counts or len(counts) != len(times):
        fail("token_counts and step_time_ms must be non-empty and of one length", "token_counts", (counts, times))
    if len(sizes) != len(overheads):
        fail("batch_sizes and batch_overhead_ms must be of one length", "batch_sizes", (sizes, overheads))
    for name, values in (("token_counts", counts), ("batch_sizes", sizes)):
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values) or any(
                b <= a for a, b in zip(values, values[1:], strict=False)):
            fail("must be strictly increasing integers", name, values)
    if any(not math.isfinite(t) or t <= 0 for t in times):
        fail("entries must be positive and finite", "step_time_ms", times)
    if not math.isfinite(doc["fixed_overhead_ms"]) or doc["fixed_overhead_ms"] < 0:
        fail("must be >= 0 and finite", "fixed_overhead_ms", doc["fixed_overhead_ms"])
    if any(not math.isfinite(t) or t < 0 for t in overheads):
        fail("entries must be >= 0 and finite", "batch_overhead_ms", overheads)


def trtllm_output_path(out: Path) -> Path:
    """Where TensorRT-LLM's table goes by default: beside ours, `NAME.trtllm.json`."""
    return out.with_name(f"{out.stem}.trtllm.json")


def is_trtllm_table(path: Path) -> bool:
    """Whether `path` holds a table this command wrote (the only kind it may replace)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and (doc.get("_meta") or {}).get("source") == TRTLLM_TABLE_SOURCE


def write_trtllm_table(doc: Mapping[str, Any], path: Path) -> None:
    write_text_atomic(Path(path), json.dumps(doc, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- the run on a GPU host


def llm_kwargs(manifest: dict[str, Any], ckpt: Path, fields: frozenset[str], *, gpus: int, draft_len: int,
               batch_sizes: list[int], max_batch_size: int, max_seq_len: int,
               kv_cache_fraction: float = 0.5) -> dict[str, Any]:
    """The LLM(...) arguments of one profile engine: model.yaml's (builder/trtllm.model_yaml) with the DSpark
    block cut to `draft_len` (0: no speculation), iteration stats on, a CUDA graph per profiled batch size."""
    from .trtllm import model_yaml

    config = model_yaml(manifest, ckpt, gpus=gpus, fields=fields, max_batch_size=max_batch_size,
                        max_seq_len=max_seq_len)
    config.pop("triton_config")
    spec = config.pop("speculative_config")
    if draft_len > 0:
        config["speculative_config"] = {**spec, "max_draft_len": draft_len, "block_size": draft_len}
    config.update({
        "enable_iter_perf_stats": True,
        "iter_stats_max_iterations": 100_000,  # drained after every cell; none may be evicted before
        # Any batch size without a graph runs eager, at a cost far from the served one.
        "cuda_graph_config": {"batch_sizes": sorted(set(batch_sizes)), "enable_padding": True},
        # Block reuse would let a later cell skip prefill work an earlier one paid for.
        "kv_cache_config": {"enable_block_reuse": False, "free_gpu_memory_fraction": kv_cache_fraction},
    })
    return config


def check_tensorrt_llm() -> None:
    """MissingDependencyError (exit 4) unless TensorRT-LLM is importable here."""
    if not has_module("tensorrt_llm"):
        raise MissingDependencyError(f"TensorRT-LLM is not installed here. {REQUIRES}")


def measure_cells(ckpt: Path, manifest: dict[str, Any], *, gpus: int, batch_sizes: list[int], draft_lengths: list[int],
                  max_batch_size: int, prompt_tokens: int, warmup: int, steps: int,
                  stats_timeout: float = 5.0) -> tuple[dict[tuple[int, int], list[dict[str, Any]]], dict[str, Any]]:
    """Run every cell (R, l) through TensorRT-LLM's LLM API; returns its iteration stats and what ran it.

    The only function here that needs TensorRT-LLM and a GPU.
    """
    check_tensorrt_llm()
    import tensorrt_llm
    import torch
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig
    from tensorrt_llm.llmapi.llm_args import DSparkDecodingConfig

    if not torch.cuda.is_available():
        raise MissingDependencyError(f"no CUDA GPU is visible. {REQUIRES}")
    fields = frozenset(DSparkDecodingConfig.model_fields)
    vocab = json.loads((Path(ckpt) / "target" / "config.json").read_text())["vocab_size"]
    gamma = max(draft_lengths)
    # Each step commits 1..l+1 tokens, so this many new tokens always last warmup + steps iterations.
    budget = (warmup + steps + 8) * (gamma + 1)
    rng = random.Random(0)
    stats: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for draft_len in sorted(draft_lengths):
        kwargs = llm_kwargs(manifest, ckpt, fields, gpus=gpus, draft_len=draft_len, batch_sizes=batch_sizes,
                            max_batch_size=max_batch_size, max_seq_len=prompt_tokens + budget + gamma + 1)
        if "speculative_config" in kwargs:
            kwargs["speculative_config"] = DSparkDecodingConfig(**kwargs["speculative_config"])
        kwargs["cuda_graph_config"] = CudaGraphConfig(**kwargs["cuda_graph_config"])
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        llm = LLM(**kwargs)
        try:
            for batch_size in sorted(batch_sizes):
                params = SamplingParams(max_tokens=budget, ignore_eos=True, detokenize=False, temperature=0.0)
                prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(prompt_tokens)]}
                           for _ in range(batch_size)]
                for future in [llm.generate_async(prompt, params) for prompt in prompts]:
                    future.result()
                # Drained once per cell, after it finished (TensorRT-LLM's own profiler does the same).
                stats[(batch_size, draft_len)] = parse_stats(llm.get_stats(timeout=stats_timeout) or [])
        finally:
            llm.shutdown()
    meta = {"tensorrt_llm_version": tensorrt_llm.__version__, "gpu": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count()}
    return stats, meta


def profile_trtllm(engine_dir: Path, *, batch_sizes: list[int], draft_lengths: list[int] | None = None,
                   gpus: int = 1, max_batch_size: int | None = None, prompt_tokens: int = 64, warmup: int = 2,
                   steps: int = 15) -> tuple[CostTable, dict[str, Any]]:
    """Profile ENGINE_DIR's deployment on TensorRT-LLM: (our table, TensorRT-LLM's table)."""
    from ..runtime.loader import resolve_checkpoint
    from ..runtime.manifest import read_manifest
    from .families import family

    check_tensorrt_llm()
    ckpt = resolve_checkpoint(Path(engine_dir).absolute())
    manifest = read_manifest(ckpt, "checkpoint")
    gamma = (manifest.get("dspark") or {}).get("block_size")
    if not gamma:
        raise CheckpointError(ckpt / "manifest.json", "the checkpoint has no drafter", subject="dspark",
                              expected="a checkpoint converted with its drafter")
    draft_lengths = list(range(gamma + 1)) if draft_lengths is None else sorted(set(draft_lengths))
    if any(not 0 <= ell <= gamma for ell in draft_lengths) or any(r < 1 for r in batch_sizes):
        raise CheckpointError(ckpt / "manifest.json", "draft lengths must lie in 0..γ and batch sizes be >= 1",
                              subject="dspark.block_size", found=(draft_lengths, batch_sizes), expected=f"γ = {gamma}")
    max_batch_size = max_batch_size or max(batch_sizes)
    stats, ran = measure_cells(ckpt, manifest, gpus=gpus, batch_sizes=batch_sizes, draft_lengths=draft_lengths,
                               max_batch_size=max_batch_size, prompt_tokens=prompt_tokens, warmup=warmup, steps=steps)
    expert_parallel = family(manifest["family"], ckpt / "manifest.json").expert_parallel
    meta = {"backend": "tensorrt-llm", **ran, "family": manifest["family"], "tensor_parallel": gpus,
            "prompt_tokens": prompt_tokens, "draft_lengths": draft_lengths, "max_batch_size": max_batch_size,
            "timing": f"{HOST_STEP_TIME} (one executor loop, overlap scheduler on)",
            "draft_pass": "inside every step with l >= 1 (one-model DSpark, block cut to l); l = 0 ran without "
                          "speculation", "host": platform.node(), "checkpoint": str(ckpt),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "warmup_steps": warmup,
            "measured_steps": steps}
    table = table_from_stats(stats, meta, warmup=warmup, min_steps=max(steps // 2, 1))
    engine = {"tp": gpus, "ep": gpus if expert_parallel else 1, "attention_dp": False, "block": gamma,
              "max_batch_size": max_batch_size}
    return table, trtllm_sps_table(table, engine=engine, max_tokens=max_batch_size * (gamma + 1))
