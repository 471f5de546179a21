"""Soak test with faults: 64 concurrent streams against a real tritonserver (tp 2) while model
processes are killed.

    python bench/soak.py [--seconds 120] [--streams 64] [--slots 16] [--no-faults] [--drafter model|orchestrator]

Each stream loops over a mix of requests: valid ones (text or ids, random length, mode, temperature,
and seeds anywhere in int64, negative included), one in eight cancelled after its first chunk, one in
sixteen invalid (must be refused), one in sixteen a direct call to an internal model (must be
refused). Meanwhile the fault schedule kills, one after the other, the dspark_verify backend stub, its
tensor-parallel worker and the dspark_draft stub (kill -9), each once the server is ready again. The
repository serves the drafter as the dspark_draft model (`--drafter model`, the default here) so
that its process can be killed too; with `--drafter orchestrator` (the cpu layout's default) it runs
inside the orchestrator, and only the verify faults remain.

Expected outcomes: completed, cancelled, rejected; during a fault, failed with the clear error that
names the dead process (or says the server is recovering). Anything else is unexpected. Reports the
counts, for each fault the time until the server was ready again and whether greedy output then
equals what it was before, the server's memory and its shared-memory regions before and after, and
whether `stop` left any process or region behind. Exit code 1 if anything unexpected happened.
Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter

import numpy as np
import tritonclient.grpc as grpcclient
from common import ROOT, fixture_checkpoint, group_rss_mb, metric, serve
from rich.console import Console
from tritonclient.utils import InferenceServerException

from dspark_trt.builder.serve import SHM_DIR, _group_alive
from dspark_trt.client.stream import RequestError, complete, request_inputs
from dspark_trt.runtime.watch import model_processes

console = Console()
FAULTS = [("dspark_verify", "backend stub"), ("dspark_verify", "tensor-parallel worker"),
          ("dspark_draft", "backend stub")]
CLEAR_FAULT_ERRORS = ("died", "the server is recovering", "reloads the model by itself")
GREEDY_PROMPT = [5, 6, 7, 8, 9]


class Faults:
    """Whether a fault is being recovered from (requests may then fail, with a clear error)."""

    def __init__(self) -> None:
        self.window = threading.Event()


def _direct_internal_call(url: str, faults: Faults) -> str:
    client = grpcclient.InferenceServerClient(url)
    arrays = {"SLOTS": np.array([-1], np.int32), "START": np.zeros(1, np.int32),
              "TOKENS": np.array([[10**6, 5]], np.int32), "COUNTS": np.array([2], np.int32),
              "WANT_LOGITS": np.array([False])}
    inputs = []
    for name, value in arrays.items():
        tensor = grpcclient.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    try:
        client.infer("dspark_verify", inputs)
        return "unexpected: a direct call to dspark_verify was served"
    except InferenceServerException as e:
        if "is internal" in str(e):
            return "internal call refused"
        # While dspark_verify is dead or reloading, Triton itself answers the call with an error.
        down = ("is not healthy", "has no available versions", "is not ready", "not found")
        if faults.window.is_set() and any(text in str(e) for text in down):
            return "internal call refused (the model was being reloaded)"
        return f"unexpected: {str(e)[:120]}"
    finally:
        client.close()


def one_stream(url: str, deadline: float, seed: int, counts: Counter, lock: threading.Lock, faults: Faults) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.random()
        params = {"max_tokens": rng.randint(1, 40), "speculation": rng.choice(["auto", "fixed", "off"]),
                  "temperature": rng.choice([0.0, 0.0, 0.7, 1.0]),
                  "seed": rng.choice([rng.randint(0, 10**6), -rng.randint(1, 2**63), 2**63 - 1, -(2**63)])}
        prompt = rng.choice([[rng.randrange(1000) for _ in range(rng.randint(1, 60))], "def f(x):\n    return"])
        in_fault = faults.window.is_set()
        try:
            if kind < 1 / 16:
                try:
                    complete(url, prompt, max_tokens=10_000)
                    outcome = "unexpected: invalid request accepted"
                except RequestError:
                    outcome = "rejected as expected"
            elif kind < 2 / 16:
                outcome = _direct_internal_call(url, faults)
            elif kind < 2 / 16 + 1 / 8:
                client = grpcclient.InferenceServerClient(url)
                first = threading.Event()
                client.start_stream(callback=lambda result, error, first=first: first.set())
                client.async_stream_infer("ensemble", request_inputs(prompt, **params), request_id=f"s{seed}-{kind}")
                first.wait(60)
                client.stop_stream(cancel_requests=True)
                client.close()
                outcome = "cancelled"
            else:
                result = complete(url, prompt, **params)
                ok = result.finish_reason in ("length", "stop") and len(result.ids) <= params["max_tokens"]
                outcome = "completed" if ok else f"unexpected: {result.finish_reason} {len(result.ids)} tokens"
        except RequestError as e:
            clear = any(text in str(e) for text in CLEAR_FAULT_ERRORS)
            fault = in_fault or faults.window.is_set()
            outcome = "failed with a clear error (fault)" if clear and fault else f"unexpected: {str(e)[:160]}"
        except Exception as e:  # noqa: BLE001 - counted and reported
            outcome = f"unexpected: {type(e).__name__}: {str(e)[:120]}"
        with lock:
            counts[outcome] += 1


def _ready(server) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.endpoints['http']}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run_faults(server, url: str, faults: Faults, start_at: float, gap: float, greedy: list[int],
               schedule: list[tuple[str, str]]) -> list[dict]:
    """Kill each process of `schedule` in turn; return per fault: time until ready again, greedy output ok."""
    report = []
    for model, role in schedule:
        time.sleep(max(0.0, start_at - time.monotonic()))
        victim = next((p for p in model_processes(server.process.pid, model) if p.role == role), None)
        if victim is None:
            exited = server.process.poll()
            report.append({"model": model, "process": role, "error": f"no {role} of {model} to kill" + (
                f": tritonserver exited with code {exited}" if exited is not None else "")})
            console.print(f"  [red]{report[-1]['error']}[/]")
            break
        faults.window.set()
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        seen_not_ready = False
        while time.monotonic() - killed < 300:
            ready = _ready(server)
            seen_not_ready |= not ready
            if ready and seen_not_ready:
                break
            time.sleep(0.2)
        recovered_s = time.monotonic() - killed
        try:
            same = complete(url, GREEDY_PROMPT, max_tokens=24, speculation="fixed").ids == greedy
        except RequestError as e:
            same = f"failed: {e}"
        time.sleep(2)  # requests that started before the server was ready again may still fail clearly
        faults.window.clear()
        report.append({"model": model, "process": role, "pid": victim.pid, "not_ready_seen": seen_not_ready,
                       "recovered_after_s": round(recovered_s, 2), "greedy_output_unchanged": same})
        console.print(f"  killed {model} {role} (pid {victim.pid}): ready again after {recovered_s:.1f} s, "
                      f"greedy output unchanged: {same}")
        start_at = time.monotonic() + gap
    return report


def _shm(prefix: str) -> dict:
    regions = list(SHM_DIR.glob(f"{prefix}*"))
    return {"regions": len(regions), "mb": round(sum(r.stat().st_size for r in regions) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--no-faults", action="store_true", help="Only the request mix, no killed processes.")
    parser.add_argument("--drafter", choices=["model", "orchestrator"], default="model",
                        help="Where the drafter runs (dspark-build repo --drafter).")
    args = parser.parse_args()
    schedule = [] if args.no_faults else [f for f in FAULTS if f[0] != "dspark_draft" or args.drafter == "model"]
    server = serve(fixture_checkpoint(tp=2), slots=args.slots, name="soak", max_prompt_tokens=64, max_new_tokens=40,
                   drafter=args.drafter)
    fault_report: list[dict] = []
    try:
        url = server.endpoints["grpc"]
        greedy = complete(url, GREEDY_PROMPT, max_tokens=24, speculation="fixed").ids
        baseline, shm_before = group_rss_mb(server.process.pid), _shm(server.shm_prefix)
        counts: Counter = Counter()
        lock, faults = threading.Lock(), Faults()
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [threading.Thread(target=one_stream, args=(url, deadline, i, counts, lock, faults))
                   for i in range(args.streams)]
        with console.status(f"{args.streams} streams for {args.seconds:.0f} s ..."):
            for t in threads:
                t.start()
            if schedule:
                fault_report = run_faults(server, url, faults, start + args.seconds * 0.15, args.seconds * 0.1, greedy,
                                          schedule)
            for t in threads:
                t.join(args.seconds + 600)
        time.sleep(2)
        after, shm_after = group_rss_mb(server.process.pid), _shm(server.shm_prefix)
        try:
            active, queued = metric(server, "dspark_active_requests"), metric(server, "dspark_queued_requests")
            healthy = complete(url, GREEDY_PROMPT, max_tokens=24, speculation="fixed").ids == greedy
        except Exception as e:  # noqa: BLE001 - e.g. tritonserver exited: reported, exit code 1
            console.print(f"[red]server not serving after the run: {type(e).__name__}: {e}[/]")
            active, queued, healthy = -1, -1, False
    finally:
        server.stop()
    left_processes = _group_alive(server.process.pid)
    left_shm = _shm(server.shm_prefix)
    unexpected = {k: v for k, v in counts.items() if k.startswith("unexpected")}
    faults_ok = len(fault_report) == len(schedule) and all(
        f.get("not_ready_seen") and f.get("greedy_output_unchanged") is True for f in fault_report)
    result = {"seconds": args.seconds, "streams": args.streams, "slots": args.slots, "outcomes": dict(counts),
              "completed": counts["completed"], "failed_with_clear_error": counts["failed with a clear error (fault)"],
              "unexpected": sum(unexpected.values()), "faults": fault_report,
              "rss_mb_before": round(baseline, 1), "rss_mb_after": round(after, 1),
              "rss_growth": round(after / baseline - 1, 4), "shm_before": shm_before, "shm_after": shm_after,
              "active_after": active, "queued_after": queued, "greedy_output_unchanged_after": healthy,
              "after_stop": {"processes_left": left_processes, "shm": left_shm}}
    for outcome, n in sorted(counts.items()):
        console.print(f"  {n:6d}  {outcome}")
    console.print(f"server RSS {baseline:.0f} MB -> {after:.0f} MB ({result['rss_growth']:+.1%}); shm "
                  f"{shm_before['regions']} regions {shm_before['mb']} MB -> {shm_after['regions']} regions "
                  f"{shm_after['mb']} MB; slots after: active {active:.0f}, queued {queued:.0f}; greedy output "
                  f"unchanged after: {healthy}; after stop: processes left {left_processes}, shm regions "
                  f"{left_shm['regions']}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out / 'soak.json'}")
    bad = unexpected or active or queued or not healthy or not faults_ok or left_processes or left_shm["regions"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
