"""The served path, against a real tritonserver (started once for this module, tp 2 on CPU)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner

from dspark_trt.builder.convert import convert
from dspark_trt.builder.repo import build_repo
from dspark_trt.builder.serve import start_server
from dspark_trt.client.cli import main as client
from dspark_trt.client.stream import RequestError, complete, complete_http, request_inputs
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.tp import free_port

SLOTS = 8


@pytest.fixture(scope="module")
def served(qwen3_pair: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    convert(qwen3_pair / "target", qwen3_pair / "drafter", root / "ckpt", tp=2, show_progress=False)
    build_repo(root / "ckpt", root / "repo", num_slots=SLOTS, max_prompt_tokens=64, max_new_tokens=200)
    ports = [free_port() for _ in range(3)]
    server = start_server(root / "repo", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                          cache=root / "cache", timeout=300)
    yield server, root / "ckpt"
    server.stop()


def url(server) -> str:
    return server.endpoints["grpc"]


def prompts(count: int, seed: int = 3) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 1000, size=2 + (5 * i) % 23).tolist() for i in range(count)]


def reference(ckpt: Path, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    target, drafter, _ = open_checkpoint(ckpt, num_slots=len(batch), max_len=128)
    try:
        results = generate(target, drafter, [Request(p, max_new_tokens=max_tokens, speculation="off") for p in batch])
    finally:
        target.close()
    return [r.tokens for r in results]


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.endpoints["metrics"], timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M))


def test_streamed_greedy_output_equals_generate_and_target_only(served) -> None:
    server, ckpt = served
    batch = prompts(3)
    expected = reference(ckpt, batch, 24)
    for mode in ("auto", "fixed", "off"):
        for prompt, want in zip(batch, expected, strict=True):
            got = complete(url(server), prompt, max_tokens=24, speculation=mode)
            assert got.ids == want, mode
            assert got.finish_reason == "length" and got.stats["tokens"] == 24
            assert got.stats["rounds"] == 23 and got.stats["mean_tau"] >= 1
            if mode == "off":
                assert got.stats["verified_tokens"] == 0


def test_text_prompt_is_tokenised_and_text_streams(served) -> None:
    server, _ = served
    got = complete(url(server), "def quicksort(arr):", max_tokens=12, speculation="fixed")
    assert len(got.ids) == 12 and got.text and len(got.chunk_times) >= 2
    over_http = complete_http(server.endpoints["http"], "def quicksort(arr):", max_tokens=12, speculation="fixed")
    assert (over_http.ids, over_http.text, over_http.stats["tokens"]) == (got.ids, got.text, 12)
    with pytest.raises(RequestError, match="max_tokens must be in"):
        complete_http(server.endpoints["http"], [1, 2], max_tokens=0)


def test_concurrent_requests_of_mixed_lengths_all_complete(served) -> None:
    server, ckpt = served
    batch = prompts(SLOTS, seed=7)
    lengths = [8 + 3 * i for i in range(SLOTS)]
    # Greedy output does not depend on batch mates, and a shorter budget yields a prefix of a longer one.
    expected = [ids[:n] for ids, n in zip(reference(ckpt, batch, max(lengths)), lengths, strict=True)]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = complete(url(server), batch[i], max_tokens=lengths[i], speculation="auto").ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(SLOTS)] == expected


def test_stop_ids_end_the_stream(served) -> None:
    server, ckpt = served
    [full] = reference(ckpt, prompts(1), 24)
    stop = full[5]
    got = complete(url(server), prompts(1)[0], max_tokens=24, stop_ids=[stop])
    assert got.ids == full[: full.index(stop) + 1] and got.finish_reason == "stop"


def test_stop_strings_end_the_stream_as_in_process_generate(served) -> None:
    """Served and in-process decoding share one stop rule (the decoder's), stop strings included."""
    from tokenizers import Tokenizer

    server, ckpt = served
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer" / "tokenizer.json"))

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    [full] = reference(ckpt, prompts(1), 24)
    text = decode(full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    target, drafter, _ = open_checkpoint(ckpt, num_slots=1, max_len=128)
    try:
        [expected] = generate(target, drafter, [Request(prompts(1)[0], max_new_tokens=24, stop_strings=(stop,))],
                              decode=decode)
    finally:
        target.close()
    got = complete(url(server), prompts(1)[0], max_tokens=24, stop=[stop])
    assert got.ids == expected.tokens and got.finish_reason == expected.finish_reason == "stop"
    assert len(got.ids) < len(full) and stop in decode(got.ids) and stop not in decode(got.ids[:-1])


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 0}, "max_tokens must be in [1, 200]"),
    ({"temperature": -1.0}, "temperature must be in [0, 100]"),
    ({"speculation": "sometimes"}, "speculation must be one of auto, off, fixed"),
    ({"gamma": 99}, "gamma must be in [1, 7]"),
    ({"extra": {"top_k": np.asarray([5], dtype=np.int32)}}, "unexpected inference input 'top_k'"),
])
def test_bad_requests_get_clear_errors(served, params, message) -> None:
    server, _ = served
    with pytest.raises(RequestError, match=re.escape(message)):
        complete(url(server), [1, 2, 3], **params)


def test_prompt_longer_than_the_limit_is_refused(served) -> None:
    server, _ = served
    with pytest.raises(RequestError, match="the prompt has 65 tokens; this deployment accepts at most 64"):
        complete(url(server), list(range(65)), max_tokens=4)
    assert complete(url(server), [1, 2, 3], max_tokens=4).finish_reason == "length"  # still healthy


def test_cancelled_stream_frees_its_slot(served) -> None:
    server, _ = served
    rounds_before = metric(server, "dspark_accepted_tokens_per_round_count")
    client = grpcclient.InferenceServerClient(url(server))
    arrived = threading.Event()
    client.start_stream(callback=lambda result, error: arrived.set())
    for i in range(3):
        client.async_stream_infer("ensemble", request_inputs([5, 6, 7 + i], max_tokens=200, speculation="fixed"),
                                  request_id=f"cancel-{i}")
    assert arrived.wait(60)
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while metric(server, "dspark_active_requests") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "dspark_active_requests") == 0
    # Freed by the cancellation, not by running to the end (that would take 3 x 199 rounds).
    assert metric(server, "dspark_accepted_tokens_per_round_count") - rounds_before < 300
    assert complete(url(server), [1, 2, 3], max_tokens=6).finish_reason == "length"


def test_metrics_agree_with_the_responses(served) -> None:
    server, _ = served
    names = ("dspark_accepted_tokens_per_round_count", "dspark_accepted_tokens_per_round_sum",
             "dspark_verified_length_sum", "dspark_position_verified_total")
    time.sleep(1)  # metric updates are buffered for up to 0.25 s: let earlier tests' settle
    before = {name: metric(server, name) for name in names}
    stats = [complete(url(server), p, max_tokens=16, speculation="fixed").stats for p in prompts(4, seed=11)]
    rounds = sum(s["rounds"] for s in stats)
    verified = sum(s["verified_tokens"] for s in stats)
    expected = {names[0]: rounds, names[1]: sum(s["accepted_tokens"] for s in stats) + rounds,
                names[2]: verified, names[3]: verified}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        delta = {name: metric(server, name) - before[name] for name in names}
        if delta == expected:
            break
        time.sleep(0.2)
    assert delta == expected
    assert metric(server, "dspark_queued_requests") == 0


def test_the_cpu_layout_drafts_in_the_orchestrator(served) -> None:
    """No dspark_draft model: the orchestrator drafts in its own process, and health checks the models
    the service has (it reads the orchestrator's `drafter` parameter)."""
    server, ckpt = served
    assert (ckpt.parent / "repo" / "dspark_verify").is_dir() and not (ckpt.parent / "repo" / "dspark_draft").exists()
    result = CliRunner().invoke(client, ["health", "--url", server.endpoints["http"], "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert "dspark_verify" in result.output and "dspark_draft" not in result.output
    assert complete(url(server), [1, 2, 3], max_tokens=12, speculation="fixed").stats["verified_tokens"] > 0


def test_bench_measures_and_plots(served, tmp_path: Path) -> None:
    from dspark_trt.client.bench import BenchConfig, run_bench, write

    server, _ = served
    config = BenchConfig(url(server), server.endpoints["metrics"], ["off", "fixed", "mtp1"], [1, 2],
                         ["def f(x):", "import os"], requests=2, max_tokens=16, min_slices=2, slas=[1.0, 1e6])
    result = run_bench(config, progress=False)
    cells = {(c["mode"], c["concurrency"]): c for c in result["cells"]}
    assert set(cells) == {(m, c) for m in ("off", "fixed", "mtp1") for c in (1, 2)}
    for (_, concurrency), cell in cells.items():
        # --min-slices 2: concurrency 2 runs 4 requests, so that it too is interleaved in 2 slices. The
        # warm-up slices are not counted here (nor, below, in the server's histograms).
        assert cell["requests"] == 2 * concurrency and cell["tokens"] == 16 * cell["requests"]
        assert cell["slices"] == 2 and cell["system_tokens_per_s"] > 0
        assert cell["ttft_ms"]["p50"] > 0 and cell["itl_ms"]["p99"] >= cell["itl_ms"]["p50"]
    assert cells[("off", 1)]["position_acceptance"] == []
    assert len(cells[("fixed", 1)]["position_acceptance"]) == 7  # γ positions verified in fixed mode
    # One count per round, under the number of drafts it verified (fixed: full blocks of 7, fewer near the end).
    assert cells[("off", 1)]["verified_length_histogram"] == {"0": cells[("off", 1)]["rounds"]} | {
        str(k): 0 for k in range(1, 8)}
    for cell in (cells[("fixed", 1)], cells[("fixed", 2)]):
        histogram = cell["verified_length_histogram"]
        assert list(histogram) == [str(k) for k in range(8)] and histogram["7"] >= 2
        assert sum(histogram.values()) == cell["rounds"]
        assert sum(int(k) * n for k, n in histogram.items()) == cell["verified_tokens"]
    # The orchestrator's call counters: `off` never drafts; at concurrency 1 a request is one prefill, then
    # one verify call a round, and a fixed round drafts unless the budget leaves no room for a draft.
    assert cells[("off", 1)]["model_calls"]["dspark_draft"]["calls"] == 0
    for mode in ("off", "fixed"):
        cell = cells[(mode, 1)]
        assert cell["model_calls"]["dspark_verify"]["calls"] == cell["rounds"] + cell["requests"]
    fixed_calls = cells[("fixed", 1)]["model_calls"]
    assert cells[("fixed", 1)]["rounds"] >= fixed_calls["dspark_draft"]["calls"] >= 2
    assert fixed_calls["dspark_draft"]["mean_ms"] > 0
    # mtp1: one draft verified a round (none where the budget has no room left), from the full block's first position.
    for cell in (cells[("mtp1", 1)], cells[("mtp1", 2)]):
        histogram = cell["verified_length_histogram"]
        assert histogram["1"] >= 2 and histogram["0"] + histogram["1"] == cell["rounds"]
        assert len(cell["position_acceptance"]) == 1
    # Every mode meets a 1 tok/s/user SLA (its best system throughput); none meets 1e6.
    low, high = result["sla"]
    assert low["system_tokens_per_s"]["mtp1"] == max(cells[("mtp1", c)]["system_tokens_per_s"] for c in (1, 2))
    assert set(high["system_tokens_per_s"].values()) == {None} and high["auto_over_mtp1"] is None
    json_path, png_path, frontier_path = write(result, tmp_path)
    assert json.loads(json_path.read_text())["cells"] and png_path.read_bytes()[:4] == b"\x89PNG"
    assert frontier_path.read_bytes()[:4] == b"\x89PNG"
