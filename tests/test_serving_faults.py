"""Faults against a real tritonserver: internal models closed to clients, bad seeds beside good
requests, a killed model process (stub, tensor-parallel worker) detected, reported and reloaded, and
nothing left behind after `stop`, also when tritonserver itself was killed."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from dspark_trt.builder.cli import main as build
from dspark_trt.builder.convert import convert
from dspark_trt.builder.repo import build_repo
from dspark_trt.builder.serve import SHM_DIR, group_pids, start_server
from dspark_trt.client.cli import main as client
from dspark_trt.client.stream import RequestError, complete, complete_http
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.tp import free_port
from dspark_trt.runtime.watch import model_processes

SLOTS = 4
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def served(qwen3_pair: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    convert(qwen3_pair / "target", qwen3_pair / "drafter", root / "ckpt", tp=2, show_progress=False)
    # The drafter as its own model (the gpu layout's way), so that its process can be killed too; the cpu
    # layout's drafter lives in the orchestrator, whose death test_a_killed_orchestrator_is_reloaded covers.
    build_repo(root / "ckpt", root / "repo", num_slots=SLOTS, max_prompt_tokens=64, max_new_tokens=200,
               drafter="model")
    saved = os.environ.get("DSPARK_STATE_DIR")
    os.environ["DSPARK_STATE_DIR"] = str(root / "state")  # this server's state file, away from the user's
    ports = [free_port() for _ in range(3)]
    server = start_server(root / "repo", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                          cache=root / "cache", timeout=300)
    target, drafter, _ = open_checkpoint(root / "ckpt", num_slots=len(PROMPTS), max_len=128)
    try:
        expected = [r.tokens for r in generate(target, drafter, [Request(p, max_new_tokens=24, speculation="off")
                                                                 for p in PROMPTS])]
    finally:
        target.close()
    yield server, expected, root
    server.stop()
    if saved is None:
        os.environ.pop("DSPARK_STATE_DIR", None)
    else:
        os.environ["DSPARK_STATE_DIR"] = saved


def _grpc(server) -> str:
    return server.endpoints["grpc"]


def _verify_inputs(module) -> list:
    arrays = {"SLOTS": np.array([0], np.int32), "START": np.zeros(1, np.int32), "TOKENS": np.array([[5, 6]], np.int32),
              "COUNTS": np.array([2], np.int32), "WANT_LOGITS": np.array([False])}
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def test_internal_models_refuse_clients_and_a_live_stream_is_unaffected(served) -> None:
    """Before, a direct call reset another user's slot (and a bad one killed a TP worker)."""
    server, expected, _ = served
    result: dict = {}
    stream = threading.Thread(target=lambda: result.update(out=complete(_grpc(server), PROMPTS[0], max_tokens=24,
                                                                        speculation="fixed")))
    stream.start()
    grpc_client = grpcclient.InferenceServerClient(_grpc(server))
    http_client = httpclient.InferenceServerClient(server.endpoints["http"])
    for _ in range(3):  # while the stream runs
        for api, module in ((grpc_client, grpcclient), (http_client, httpclient)):
            with pytest.raises(InferenceServerException, match="dspark_verify is internal to the dspark orchestrator"):
                api.infer("dspark_verify", _verify_inputs(module))
            with pytest.raises(InferenceServerException, match="dspark_verify is internal"):
                api.infer("dspark_verify", _verify_inputs(module), parameters={"dspark_internal_key": "guess"})
    stream.join(120)
    assert result["out"].ids == expected[0]
    # The repository API (which could unload the models) is closed without the server's key too.
    with pytest.raises(InferenceServerException, match="restricted"):
        http_client.unload_model("dspark_verify")


def test_unknown_fields_are_refused_over_http_as_over_grpc(served) -> None:
    server, _, _ = served
    with pytest.raises(RequestError, match=re.escape("unexpected inference input 'top_p'")):
        complete_http(server.endpoints["http"], [1, 2, 3], max_tokens=4, top_p=0.5)
    with pytest.raises(RequestError, match=re.escape("unexpected inference input 'top_p'")):
        complete(_grpc(server), [1, 2, 3], max_tokens=4, extra={"top_p": np.asarray([0.5], dtype=np.float32)})
    # and the message reaches the caller whole, brackets included
    with pytest.raises(RequestError, match=re.escape("max_tokens must be in [1, 200], got 0")):
        complete_http(server.endpoints["http"], [1, 2, 3], max_tokens=0)


def test_negative_seeds_beside_greedy_requests(served) -> None:
    """A negative seed used to fail the decoding round of every request in it (OverflowError)."""
    server, expected, _ = served
    results: dict[int, object] = {}

    def run(i: int) -> None:
        sampled = i % 2 == 0
        try:
            results[i] = complete(_grpc(server), PROMPTS[i], max_tokens=24, speculation="fixed",
                                  temperature=0.8 if sampled else 0.0, seed=-(10**i) if sampled else None)
        except RequestError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not isinstance(r, Exception) and len(r.ids) == 24 for r in results.values()), results
    assert [results[1].ids, results[3].ids] == [expected[1], expected[3]]


def _health(server) -> int:
    return CliRunner().invoke(client, ["health", "--url", server.endpoints["http"], "--timeout", "2"]).exit_code


def _kill_during_a_stream(server, expected, model: str, role: str) -> None:
    victim = next(p for p in model_processes(server.process.pid, model) if p.role == role)
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = complete(_grpc(server), PROMPTS[1], max_tokens=190, speculation="auto")
        except RequestError as e:
            result["error"] = str(e)

    stream = threading.Thread(target=run)
    stream.start()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    stream.join(60)
    assert f"the {model} model's {role} (pid {victim.pid}) died" in result["error"], result
    assert "reloads the model by itself" in result["error"]
    health_codes = [_health(server)]
    while time.monotonic() - killed < 240 and (health_codes[-1] != 0 or 1 not in health_codes):
        time.sleep(0.3)
        health_codes.append(_health(server))
    # not ready while reloading (from at most a second after the kill), then ready again
    assert health_codes.index(1) <= 3 and health_codes[-1] == 0, health_codes
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert complete(_grpc(server), prompt, max_tokens=24, speculation="fixed").ids == want
    fresh = model_processes(server.process.pid, model)
    assert victim.pid not in {p.pid for p in fresh} and {p.role for p in fresh} >= {role}
    # one shared-memory region per live stub: the killed stub's went with it
    stubs = [p for m in ("preprocessing", "dspark", "dspark_draft", "dspark_verify", "postprocessing")
             for p in model_processes(server.process.pid, m) if p.role == "backend stub"]
    assert sorted(r.name for r in SHM_DIR.glob(f"{server.shm_prefix}*")) == sorted(p.shm_region for p in stubs)


def test_a_killed_verify_stub_is_reported_and_reloaded(served) -> None:
    server, expected, _ = served
    _kill_during_a_stream(server, expected, "dspark_verify", "backend stub")


def test_a_killed_tensor_parallel_worker_is_reported_and_reloaded(served) -> None:
    server, expected, _ = served
    _kill_during_a_stream(server, expected, "dspark_verify", "tensor-parallel worker")


def test_a_killed_draft_stub_is_reported_and_reloaded(served) -> None:
    server, expected, _ = served
    _kill_during_a_stream(server, expected, "dspark_draft", "backend stub")


def test_a_killed_orchestrator_is_reloaded(served) -> None:
    """The orchestrator watches every other model; `preprocessing` watches it. Before, a killed `dspark`
    stub left the server reporting ready while every request failed, until a human restarted it.
    (A stream that was live in it is left waiting by Triton: the README says so.)"""
    server, expected, _ = served
    victim = next(p for p in model_processes(server.process.pid, "dspark") if p.role == "backend stub")
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    health_codes = [_health(server)]
    while time.monotonic() - killed < 120 and (health_codes[-1] != 0 or 1 not in health_codes):
        time.sleep(0.1)
        health_codes.append(_health(server))
    assert 1 in health_codes and health_codes[-1] == 0, health_codes  # not ready while reloading, then ready
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert complete(_grpc(server), prompt, max_tokens=24, speculation="fixed").ids == want
    fresh = model_processes(server.process.pid, "dspark")
    assert fresh and victim.pid not in {p.pid for p in fresh}


def test_client_health_takes_either_port_and_errors_keep_their_brackets(served) -> None:
    server, _, _ = served
    for url in (server.endpoints["http"], server.endpoints["grpc"]):
        result = CliRunner().invoke(client, ["health", "--url", url])
        assert result.exit_code == 0, result.output
        assert "dspark_verify   READY" in result.output
    result = CliRunner().invoke(client, ["generate", "def f(", "--url", _grpc(server), "--max-tokens", "100000"])
    assert result.exit_code == 1
    assert "max_tokens must be in [1, 200], got 100000" in result.output



def test_stop_after_tritonserver_was_killed_leaves_nothing_from_any_directory(served, tmp_path, monkeypatch) -> None:
    """kill -9 of tritonserver orphans its model processes and their shared memory; `stop`, run from
    another directory, finds the server by its state file and removes all of it."""
    server, _, root = served
    state = json.loads((root / "state" / f"tritonserver-{server.http_port}.json").read_text())
    assert state["pid"] == server.process.pid and state["shm_prefix"] == server.shm_prefix
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    assert len(group_pids(server.process.pid)) >= 5  # the orphaned stubs (and the TP worker)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build, ["stop", "--http-port", str(server.http_port)])
    assert result.exit_code == 0, result.output
    assert f"tritonserver (pid {server.process.pid}) was not running; removed what it left behind" in result.output
    assert group_pids(server.process.pid) == []
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")) == []
    assert not (root / "state" / f"tritonserver-{server.http_port}.json").exists()
    assert "no server running" in CliRunner().invoke(build, ["stop", "--http-port", str(server.http_port)]).output
