"""Orchestration overhead and in-flight batching of the served path (real tritonserver, CPU).

    python bench/serve.py [--ckpt DIR] [--tokens 48] [--requests 8] [--concurrency 16] [--mode fixed]

1. concurrency 1: per-user tokens/s through the ensemble versus in-process `generate()` on the
   same prompts (target: the served path costs at most 15 %);
2. concurrency N: system tokens/s versus concurrency 1 (target: at least 4x, i.e. requests batch).
Greedy outputs are checked equal on the way. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import ROOT, fixture_checkpoint, serve
from rich.console import Console
from rich.table import Table

from dspark_trt.client.stream import complete
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=lambda p: __import__("pathlib").Path(p))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", default="fixed", choices=["off", "fixed", "auto"])
    args = parser.parse_args()
    ckpt = fixture_checkpoint(ckpt=args.ckpt)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, size=int(rng.integers(8, 40))).tolist() for _ in range(args.concurrency * 2)]

    target, drafter, _ = open_checkpoint(ckpt, num_slots=1, max_len=256)
    local = []
    for p in prompts[: args.requests]:
        start = time.perf_counter()
        [r] = generate(target, drafter, [Request(p, max_new_tokens=args.tokens, speculation=args.mode)])
        local.append((r.tokens, time.perf_counter() - start))
    target.close()

    server = serve(ckpt, slots=args.concurrency, name="bench", max_prompt_tokens=64, max_new_tokens=args.tokens)
    try:
        url = server.endpoints["grpc"]
        complete(url, prompts[0], max_tokens=4)  # warm-up
        served = []
        for p in prompts[: args.requests]:
            c = complete(url, p, max_tokens=args.tokens, speculation=args.mode)
            served.append((c.ids, time.perf_counter() - c.start))
        assert [s[0] for s in served] == [x[0] for x in local], "served output differs from generate()"
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            many = list(pool.map(lambda p: complete(url, p, max_tokens=args.tokens, speculation=args.mode),
                                 prompts[: args.concurrency * 2]))
        wall = time.perf_counter() - start
    finally:
        server.stop()
    per_user_local = np.mean([len(t) / s for t, s in local])
    per_user_served = np.mean([len(t) / s for t, s in served])
    system_1 = sum(len(t) for t, _ in served) / sum(s for _, s in served)
    system_n = sum(len(c.ids) for c in many) / wall
    result = {"mode": args.mode, "tokens": args.tokens, "requests": args.requests, "concurrency": args.concurrency,
              "in_process_tokens_per_s": per_user_local, "served_tokens_per_s_c1": per_user_served,
              "served_overhead": 1 - per_user_served / per_user_local, "system_tokens_per_s_c1": system_1,
              f"system_tokens_per_s_c{args.concurrency}": system_n, "batching_speedup": system_n / system_1}
    table = Table(title=f"served path, mode {args.mode}, {args.tokens} tokens per request")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("in-process generate(), tok/s per user", f"{per_user_local:.1f}")
    table.add_row("served, concurrency 1, tok/s per user", f"{per_user_served:.1f}")
    table.add_row("orchestration overhead (target <= 15 %)", f"{result['served_overhead']:.1%}")
    table.add_row(f"served, concurrency {args.concurrency}, system tok/s", f"{system_n:.1f}")
    speedup = f"{result['batching_speedup']:.2f}x"
    table.add_row(f"concurrency {args.concurrency} / concurrency 1 (target >= 4x)", speedup)
    console.print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out / 'serve.json'}")


if __name__ == "__main__":
    main()
