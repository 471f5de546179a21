"""In-process decoding speed of the reference backend: off vs fixed vs auto.

    python bench/generate.py [--ckpt DIR] [--max-new-tokens 48] [--batches 1,16]

Prints, per mode and batch size: tokens/s per request, system tokens/s, mean τ and mean verified
drafts per round, and the Markov head's share of a draft round's time (the sequential part of
DSpark). Without --ckpt it builds and converts the Qwen3 fixture under build/bench-generate/.
All figures of one table come from one run; writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dspark_trt.builder.calibrate import builtin_prompts, encode
from dspark_trt.builder.profile import profile_checkpoint
from dspark_trt.runtime.dspark import base as drafter_module
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.scheduler import CostTable

ROOT = Path(__file__).resolve().parent.parent
console = Console()


def default_checkpoint() -> Path:
    from dspark_trt.builder.convert import convert
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    work = ROOT / "build" / "bench-generate"
    if not (work / "ckpt" / "manifest.json").is_file():
        write_qwen3_fixture(work / "pair")
        convert(work / "pair" / "target", work / "pair" / "drafter", work / "ckpt", force=True, show_progress=False)
    return work / "ckpt"


class HeadTimer:
    """Times the sequential heads inside the drafter's rounds and the rounds themselves."""

    def __init__(self) -> None:
        self.heads = self.rounds = 0.0

    def install(self, drafter) -> None:
        heads, draft = drafter_module.sequential_heads, drafter.draft

        def timed_heads(*args, **kwargs):
            start = time.perf_counter()
            out = heads(*args, **kwargs)
            self.heads += time.perf_counter() - start
            return out

        def timed_draft(*args, **kwargs):
            start = time.perf_counter()
            out = draft(*args, **kwargs)
            self.rounds += time.perf_counter() - start
            return out

        drafter_module.sequential_heads = timed_heads
        drafter.draft = timed_draft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--sps-table", type=Path, help="cost table for auto mode (default: profile one now)")
    args = parser.parse_args()
    ckpt = args.ckpt or default_checkpoint()
    batches = [int(b) for b in args.batches.split(",")]
    if args.sps_table:
        cost_table = CostTable.load(args.sps_table)
    else:
        console.print("profiling the SPS table for auto mode ...")
        cost_table = profile_checkpoint(ckpt, batch_sizes=sorted({1, *batches}), warmup=1, steps=3)
    prompts = encode(ckpt, builtin_prompts(max(batches)))
    target, drafter, manifest = open_checkpoint(ckpt, num_slots=max(batches),
                                                max_len=max(map(len, prompts)) + args.max_new_tokens + 16)
    timer = HeadTimer()
    timer.install(drafter)
    rows = []
    for batch in batches:
        for mode in ("off", "fixed", "auto"):
            requests = [Request(p, max_new_tokens=args.max_new_tokens, speculation=mode) for p in prompts[:batch]]
            generate(target, drafter, requests[:1], num_slots=batch, cost_table=cost_table)  # warm-up
            timer.heads = timer.rounds = 0.0
            start = time.perf_counter()
            results = generate(target, drafter, requests, num_slots=batch, cost_table=cost_table)
            elapsed = time.perf_counter() - start
            tokens = sum(len(r.tokens) for r in results)
            taus = [t for r in results for t in r.taus]
            verified = [v for r in results for v in r.verified]
            rows.append({"mode": mode, "batch": batch, "seconds": elapsed, "tokens": tokens,
                         "tokens_per_s_per_request": tokens / elapsed / batch, "tokens_per_s": tokens / elapsed,
                         "mean_tau": sum(taus) / len(taus), "mean_verified": sum(verified) / len(verified),
                         "markov_heads_share_of_draft": timer.heads / timer.rounds if timer.rounds else None})
    target.close()
    table = Table(title=f"reference backend, {manifest['family']} fixture, {args.max_new_tokens} new tokens, "
                  f"{torch.get_num_threads()} threads")
    for column in ("batch", "mode", "tok/s per request", "tok/s system", "mean τ", "verified/round",
                   "heads share of draft"):
        table.add_column(column, justify="right")
    for r in rows:
        share = r["markov_heads_share_of_draft"]
        table.add_row(str(r["batch"]), r["mode"], f"{r['tokens_per_s_per_request']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['mean_tau']:.2f}", f"{r['mean_verified']:.2f}", "-" if share is None else f"{share:.1%}")
    console.print(table)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "generate.json").write_text(json.dumps({"checkpoint": str(ckpt), "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {results_dir / 'generate.json'}")


if __name__ == "__main__":
    main()
