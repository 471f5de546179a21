"""Soak test: 64 concurrent streams for a bounded time against a real tritonserver.

    python bench/soak.py [--seconds 60] [--streams 64] [--slots 16]

Each stream loops: a random prompt (text or ids), random length, mode and temperature; one request
in eight is cancelled after its first chunk and one in sixteen is deliberately invalid (it must get
an error, nothing else may). Reports completed / cancelled / expected and unexpected errors, and
whether the server's memory and the orchestrator's slots return to baseline afterwards. Exit
code 1 if anything unexpected happened. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter

import tritonclient.grpc as grpcclient
from common import ROOT, fixture_checkpoint, group_rss_mb, metric, serve
from rich.console import Console

from dspark_trt.client.stream import RequestError, complete, request_inputs

console = Console()


def one_stream(url: str, deadline: float, seed: int, counts: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.random()
        params = {"max_tokens": rng.randint(1, 40), "speculation": rng.choice(["auto", "fixed", "off"]),
                  "temperature": rng.choice([0.0, 0.0, 0.7, 1.0]), "seed": rng.randint(0, 10**6)}
        prompt = rng.choice([[rng.randrange(1000) for _ in range(rng.randint(1, 60))], "def f(x):\n    return"])
        try:
            if kind < 1 / 16:
                try:
                    complete(url, prompt, max_tokens=10_000)
                    outcome = "unexpected: invalid request accepted"
                except RequestError:
                    outcome = "rejected as expected"
            elif kind < 1 / 16 + 1 / 8:
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
        except Exception as e:  # noqa: BLE001 - counted and reported
            outcome = f"unexpected: {type(e).__name__}: {str(e)[:120]}"
        with lock:
            counts[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args()
    server = serve(fixture_checkpoint(), slots=args.slots, name="soak", max_prompt_tokens=64, max_new_tokens=40)
    try:
        url = server.endpoints["grpc"]
        complete(url, [1, 2, 3], max_tokens=4)
        baseline = group_rss_mb(server.process.pid)
        counts: Counter = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=one_stream, args=(url, deadline, i, counts, lock))
                   for i in range(args.streams)]
        with console.status(f"{args.streams} streams for {args.seconds:.0f} s ..."):
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.seconds + 300)
        time.sleep(2)
        after = group_rss_mb(server.process.pid)
        active, queued = metric(server, "dspark_active_requests"), metric(server, "dspark_queued_requests")
        healthy = complete(url, [1, 2, 3], max_tokens=4).finish_reason == "length"
    finally:
        server.stop()
    unexpected = {k: v for k, v in counts.items() if k.startswith("unexpected")}
    result = {"seconds": args.seconds, "streams": args.streams, "slots": args.slots, "outcomes": dict(counts),
              "unexpected": sum(unexpected.values()), "rss_mb_before": baseline, "rss_mb_after": after,
              "rss_growth": after / baseline - 1, "active_after": active, "queued_after": queued,
              "healthy_after": healthy}
    for outcome, n in sorted(counts.items()):
        console.print(f"  {n:6d}  {outcome}")
    console.print(f"server RSS {baseline:.0f} MB -> {after:.0f} MB ({result['rss_growth']:+.1%}); "
                  f"slots after: active {active:.0f}, queued {queued:.0f}; healthy after: {healthy}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out / 'soak.json'}")
    sys.exit(1 if unexpected or active or queued or not healthy else 0)


if __name__ == "__main__":
    main()
