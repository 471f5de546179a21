"""`dspark-build profile --backend tensorrt-llm`: everything but the GPU run, on TensorRT-LLM-shaped stats.

The iteration records below have exactly the keys TensorRT-LLM's `LLM.get_stats()` returns on the
PyTorch backend: IterationStats serialised by cpp/tensorrt_llm/executor/jsonSerialization.cpp
(NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(IterationStats, ...), InflightBatchingStats, SpecDecodingStats), filled
by tensorrt_llm/_torch/pyexecutor/py_executor.py `_update_iter_stats`, plus what
tensorrt_llm/executor/base_worker.py `_stats_serializer` adds (attentionDpRank, hostStepTimeMS,
prevDeviceStepTimeMS, gpuForwardTimeMS, schedulerMode). TensorRT-LLM's side of the table is checked
against the semantics of `SpsCostTable` in tensorrt_llm/_torch/speculative/dspark_planner.py on its
confidence-scheduling branch (PR #17056): np.interp on both axes, clamped at the ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dspark_trt.builder.cli import main
from dspark_trt.builder.profile_trtllm import (
    MIN_THETA_MS,
    check_trtllm_sps_table,
    generation_steps,
    llm_kwargs,
    parse_stats,
    samples_from_stats,
    table_from_stats,
    trtllm_output_path,
    trtllm_sps_table,
)
from dspark_trt.builder.trtllm import FIELDS_PR15808
from dspark_trt.plugins.deps import has_module
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.manifest import read_manifest
from dspark_trt.runtime.scheduler import CostTable


def iteration(it: int, *, ctx: int = 0, gen: int = 0, drafts: int = 0, with_drafts: int | None = None,
              host_ms: float | None = 10.0, mode: str = "overlap", rank: int = 0) -> dict:
    """One `LLM.get_stats()` record, every key TensorRT-LLM writes (values of a plausible decode step)."""
    with_drafts = gen if drafts and with_drafts is None else (with_drafts or 0)
    row = {
        "timestamp": "", "iter": it, "iterLatencyMS": 2 * (host_ms or 10.0), "newActiveRequestsQueueLatencyMS": 0.0,
        "numNewActiveRequests": ctx, "numActiveRequests": ctx + gen, "numQueuedRequests": 0,
        "numCompletedRequests": 0, "maxNumActiveRequests": 64, "maxBatchSizeStatic": 0,
        "maxBatchSizeTunerRecommended": 0, "maxBatchSizeRuntime": 0, "maxNumTokensStatic": 0,
        "maxNumTokensTunerRecommended": 0, "maxNumTokensRuntime": 0, "gpuMemUsage": 1 << 30, "cpuMemUsage": 0,
        "pinnedMemUsage": 0,
        "kvCacheStats": {"maxNumBlocks": 1000, "freeNumBlocks": 900, "usedNumBlocks": 100, "tokensPerBlock": 32,
                         "allocTotalBlocks": 100, "allocNewBlocks": 0, "reusedBlocks": 0, "missedBlocks": 0,
                         "cacheHitRate": 0.0},
        "staticBatchingStats": None,
        "inflightBatchingStats": {"numScheduledRequests": ctx + gen, "numContextRequests": ctx, "numGenRequests": gen,
                                  "numPausedRequests": 0, "numCtxTokens": 64 * ctx, "microBatchId": 0,
                                  "avgNumDecodedTokensPerIter": 0.0},
        "specDecodingStats": {"numDraftTokens": drafts, "numAcceptedTokens": 0,
                              "numRequestsWithDraftTokens": with_drafts,
                              "acceptanceLength": 1.0 if with_drafts else 0.0, "iterLatencyMS": 0.0,
                              "draftOverhead": 0.0},
        "attentionDpRank": rank,
        "prevDeviceStepTimeMS": host_ms, "gpuForwardTimeMS": host_ms, "schedulerMode": mode,
    }
    if host_ms is not None:
        row["hostStepTimeMS"] = host_ms
    return row


def cell(batch: int, draft_len: int, ms: float, steps: int = 12) -> list[dict]:
    """A cell's run: a prefill iteration, `steps` decode steps of the cell's shape, a drain step."""
    rows = [iteration(0, ctx=batch, host_ms=50.0 * ms)]  # prefill: costly, must never count
    rows += [iteration(i, gen=batch, drafts=batch * draft_len, host_ms=ms) for i in range(1, steps + 1)]
    rows.append(iteration(steps + 1, gen=batch - 1, drafts=(batch - 1) * draft_len, host_ms=0.5 * ms))
    return rows


def true_ms(batch: int, draft_len: int) -> float:
    """A separable cost: 3 ms fixed + 0.4 ms per request + 0.05 ms per verified token."""
    return 3.0 + 0.4 * batch + 0.05 * batch * (1 + draft_len)


def test_only_generation_iterations_of_the_cells_shape_count() -> None:
    rows = [
        iteration(0, ctx=4, host_ms=90.0),  # prefill
        iteration(1, ctx=1, gen=3, drafts=9, host_ms=40.0),  # mixed: a prefill rides along
        iteration(2, gen=4, drafts=12, host_ms=11.0),
        iteration(3, gen=4, drafts=12, host_ms=12.0, rank=1),  # attention-DP rank 1 repeats rank 0's time
        iteration(4, gen=4, drafts=8, host_ms=9.0),  # two drafts each: not this cell's step
        iteration(5, gen=4, drafts=12, with_drafts=3, host_ms=9.5),  # one request verified none
        iteration(6, gen=4, drafts=12, host_ms=None),  # overlap scheduler, no hostStepTimeMS: no clean time
        iteration(7, gen=4, drafts=12, host_ms=13.0),
        iteration(8, gen=3, drafts=9, host_ms=8.0),  # draining
    ]
    assert generation_steps(rows, batch_size=4, draft_len=3) == [11.0, 13.0]
    # The same records hold nothing for another cell.
    assert generation_steps(rows, batch_size=4, draft_len=0) == []


def test_without_overlap_the_iteration_latency_is_the_step() -> None:
    row = iteration(1, gen=2, host_ms=None, mode="non_overlap")
    assert generation_steps([row], batch_size=2, draft_len=0) == [row["iterLatencyMS"]]


def test_older_releases_return_json_strings() -> None:
    rows = parse_stats([json.dumps(iteration(1, gen=2, host_ms=7.0))])
    assert generation_steps(rows, batch_size=2, draft_len=0) == [7.0]
    with pytest.raises(CheckpointError, match="not a JSON object"):
        parse_stats([[1, 2]])


def test_the_table_recovers_a_separable_cost_and_ignores_prefill() -> None:
    batches, lengths = [1, 2, 4, 8], [0, 1, 2, 3, 4, 5]
    stats = {(r, ell): cell(r, ell, true_ms(r, ell)) for r in batches for ell in lengths}
    table = table_from_stats(stats, {"backend": "tensorrt-llm"}, warmup=2, min_steps=5)
    assert table.verify_batching == "packed" and table.meta["backend"] == "tensorrt-llm"
    assert table.batch_sizes == batches
    assert table.token_counts == sorted({r * (1 + ell) for r in batches for ell in lengths})
    for r in batches:
        for ell in lengths:
            assert table.step_ms(r, r * (1 + ell)) == pytest.approx(true_ms(r, ell), rel=0.02)
    # Round trip through our own loader.
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))).token_counts == table.token_counts


def test_the_median_drops_a_stalled_step() -> None:
    rows = cell(2, 1, 5.0)
    rows[5]["hostStepTimeMS"] = 500.0  # one stall
    assert samples_from_stats({(2, 1): rows}, warmup=2, min_steps=5) == {(2, 4): pytest.approx(0.005)}


def test_a_batch_size_that_never_reached_generation_is_a_clear_error() -> None:
    stats = {(2, 1): cell(2, 1, 5.0), (8, 1): [iteration(0, ctx=8)] + [iteration(i, gen=6, drafts=6, host_ms=5.0)
                                                                       for i in range(1, 20)]}
    with pytest.raises(CheckpointError) as error:
        samples_from_stats(stats, warmup=2, min_steps=5)
    message = str(error.value)
    assert "batch size 8 with 1 drafts" in message and "[6] generation requests (needed 8)" in message
    with pytest.raises(CheckpointError, match="0 steady steps"):
        samples_from_stats({(4, 2): cell(4, 2, 5.0, steps=2)}, warmup=2, min_steps=5)


def trtllm_step_ms(doc: dict, batch: int, tokens: int) -> float:
    """TensorRT-LLM's SpsCostTable.step_time (dspark_planner.py): fixed + interp(α) + interp(θ), clamped."""
    alpha = float(np.interp(batch, doc["batch_sizes"], doc["batch_overhead_ms"]))
    return doc["fixed_overhead_ms"] + alpha + float(np.interp(tokens, doc["token_counts"], doc["step_time_ms"]))


def test_tensorrt_llms_table_predicts_what_ours_does() -> None:
    stats = {(r, ell): cell(r, ell, true_ms(r, ell)) for r in (1, 2, 4, 8) for ell in range(6)}
    table = table_from_stats(stats, {"backend": "tensorrt-llm"}, warmup=2, min_steps=5)
    engine = {"tp": 1, "ep": 1, "attention_dp": False, "block": 5, "max_batch_size": 16}
    doc = json.loads(json.dumps(trtllm_sps_table(table, engine=engine, max_tokens=16 * 6)))
    check_trtllm_sps_table(doc)
    assert min(doc["step_time_ms"]) > 0  # SpsCostTable rejects a zero θ
    assert doc["token_counts"][-1] == 96 and doc["_meta"]["engine"] == engine and doc["_meta"]["lookup"] == "interp"
    for r in (1, 2, 3, 4, 8, 16):
        for tokens in range(r, r * 6 + 1):
            assert trtllm_step_ms(doc, r, tokens) == pytest.approx(table.step_ms(r, tokens), abs=1e-4)


def test_a_zero_theta_borrows_from_the_fixed_part() -> None:
    table = CostTable(token_counts=[1, 4], step_time_ms=[0.0, 3.0], fixed_overhead_ms=2.0, verify_batching="packed")
    doc = trtllm_sps_table(table, engine={})
    assert doc["step_time_ms"][0] == pytest.approx(MIN_THETA_MS) and doc["fixed_overhead_ms"] < 2.0
    for tokens in (1, 2, 4):
        assert trtllm_step_ms(doc, 1, tokens) == pytest.approx(table.step_ms(1, tokens), abs=1e-6)


def test_tensorrt_llms_checks_and_a_padded_table_are_refused() -> None:
    good = {"token_counts": [0, 128], "step_time_ms": [2.0, 4.0], "fixed_overhead_ms": 0.0, "batch_sizes": [1, 16],
            "batch_overhead_ms": [3.0, 5.0]}
    check_trtllm_sps_table(good)  # the example of TensorRT-LLM's confidence-scheduling design note
    for field, value in (("step_time_ms", [0.0, 4.0]), ("token_counts", [128, 0]), ("batch_overhead_ms", [3.0]),
                         ("fixed_overhead_ms", -1.0), ("token_counts", [0.5, 128])):
        with pytest.raises(CheckpointError, match=field):
            check_trtllm_sps_table({**good, field: value})
    padded = CostTable(token_counts=[1, 2], step_time_ms=[1.0, 2.0], verify_batching="padded")
    with pytest.raises(CheckpointError, match="padded"):
        trtllm_sps_table(padded, engine={})


def test_the_profile_engines_use_model_yamls_dspark_keys(qwen3_ckpt: Path) -> None:
    manifest = read_manifest(qwen3_ckpt, "checkpoint")
    common = {"gpus": 2, "batch_sizes": [4, 1, 4], "max_batch_size": 8, "max_seq_len": 256}
    spec = llm_kwargs(manifest, qwen3_ckpt, FIELDS_PR15808, draft_len=3, **common)
    assert set(spec["speculative_config"]) <= FIELDS_PR15808
    assert spec["speculative_config"]["max_draft_len"] == spec["speculative_config"]["block_size"] == 3
    assert spec["speculative_config"]["speculative_model"] == manifest["sources"]["drafter"]["path"]
    assert spec["enable_iter_perf_stats"] and spec["cuda_graph_config"]["batch_sizes"] == [1, 4]
    assert spec["tensor_parallel_size"] == 2 and spec["max_batch_size"] == 8 and "triton_config" not in spec
    plain = llm_kwargs(manifest, qwen3_ckpt, FIELDS_PR15808, draft_len=0, **common)
    assert "speculative_config" not in plain and plain["model"] == spec["model"]


@pytest.mark.skipif(has_module("tensorrt_llm"), reason="TensorRT-LLM is installed here")
def test_without_tensorrt_llm_the_cli_says_what_to_install(qwen3_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "sps.json"
    result = CliRunner().invoke(main, ["profile", str(qwen3_ckpt), "-o", str(out), "--backend", "tensorrt-llm"])
    assert result.exit_code == 4, result.output
    assert "pip install" in result.output and "tensorrt_llm" in result.output and "GPU host" in result.output
    assert not out.exists() and not trtllm_output_path(out).exists()


def _tensorrt_llm_gpu() -> bool:
    if not has_module("tensorrt_llm"):
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_llm_gpu(), reason="needs an NVIDIA GPU and TensorRT-LLM (not on this machine)")
def test_profile_on_tensorrt_llm_writes_both_tables(qwen3_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "sps.json"
    result = CliRunner().invoke(main, ["profile", str(qwen3_ckpt), "-o", str(out), "--backend", "tensorrt-llm",
                                       "--batch-sizes", "1,2,4", "--verify-lengths", "0,1,3", "--steps", "16"])
    assert result.exit_code == 0, result.output
    table = CostTable.load(out)
    assert table.verify_batching == "packed" and table.meta["backend"] == "tensorrt-llm" and table.meta["gpu"]
    doc = json.loads(trtllm_output_path(out).read_text())
    check_trtllm_sps_table(doc)
    assert trtllm_step_ms(doc, 4, 16) == pytest.approx(table.step_ms(4, 16), abs=1e-3)
