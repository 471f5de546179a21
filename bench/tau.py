"""Held-out acceptance length τ of the shipped tiny pair (and its no-Markov ablation), γ = 5.

    python bench/tau.py [--pair examples/tiny-qwen3-dspark] [--ablation build/tiny-qwen3-dspark-no-markov]
                        [--prompts 32] [--max-new-tokens 64] [--temperatures 0,1]

Each drafter is converted with the target (tp 1) under build/bench-tau/, then decodes held-out
prompts (part 1 of the held-out files; STS calibration used part 0) with `runtime.generate` in
fixed mode (every round verifies the full block) and, as the baseline, with speculation off.
τ = accepted drafts + 1 per round, pooled over all rounds; "P(k accepted)" is the share of rounds
that accepted at least k drafts. Prints the table and writes bench/results/tau.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dspark_trt.builder.calibrate import encode
from dspark_trt.builder.convert import convert
from dspark_trt.builder.corpus import heldout_prompts
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
console = Console(width=120)


def decode(ckpt: Path, prompts: list[list[int]], temperature: float, mode: str, max_new_tokens: int,
           slots: int) -> tuple[list, float]:
    target, drafter, _ = open_checkpoint(ckpt, num_slots=slots, max_len=max(map(len, prompts)) + max_new_tokens + 8)
    requests = [Request(p, max_new_tokens=max_new_tokens, temperature=temperature, seed=i, speculation=mode)
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    try:
        results = generate(target, drafter, requests, num_slots=slots)
    finally:
        target.close()
    return results, time.perf_counter() - start


def summarise(results: list, seconds: float, gamma: int) -> dict:
    taus = [t for r in results for t in r.taus]
    full = [t for r in results for t, v in zip(r.taus, r.verified, strict=True) if v == gamma]
    tokens = sum(len(r.tokens) for r in results)
    return {"mean_tau": round(sum(taus) / len(taus), 3), "rounds": len(taus), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "p_accepted": [round(sum(t > k for t in full) / len(full), 3) for k in range(1, gamma + 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=Path, default=ROOT / "examples" / "tiny-qwen3-dspark")
    parser.add_argument("--ablation", type=Path, default=ROOT / "build" / "tiny-qwen3-dspark-no-markov",
                        help="the markov_rank 0 drafter (skipped if missing)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tau.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    drafters = {"DSpark (Markov head)": args.pair / "drafter"}
    if args.ablation.is_dir():
        drafters["no Markov head (ablation)"] = args.ablation
    else:
        console.print(f"[yellow]no ablation drafter at {args.ablation}: skipped[/]")
    work = ROOT / "build" / "bench-tau"
    ckpts = {}
    for i, (name, drafter_dir) in enumerate(drafters.items()):
        ckpts[name] = work / f"ckpt{i}"
        convert(args.pair / "target", drafter_dir, ckpts[name], force=True, show_progress=False)
    first = next(iter(ckpts.values()))
    gamma = json.loads((first / "manifest.json").read_text())["dspark"]["block_size"]
    prompts = encode(first, heldout_prompts(args.prompts, part=1))

    rows: dict = {"gamma": gamma, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                  "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1), "results": {}}
    table = Table("drafter", "T", "mean τ", "P(k accepted), k = 1..γ", "rounds", "tok/s", "speed-up vs off",
                  title=f"held-out τ, γ = {gamma}, fixed mode, {len(prompts)} prompts × {args.max_new_tokens} tokens")
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        off, off_s = decode(first, prompts, temperature, "off", args.max_new_tokens, args.slots)
        baseline = sum(len(r.tokens) for r in off) / off_s
        rows["results"][f"off T={temperature:g}"] = {"tokens_per_s": round(baseline, 1)}
        for name, ckpt in ckpts.items():
            results, seconds = decode(ckpt, prompts, temperature, "fixed", args.max_new_tokens, args.slots)
            s = summarise(results, seconds, gamma)
            s["speedup_vs_off"] = round(s["tokens_per_s"] / baseline, 2)
            if temperature == 0:  # greedy speculation must reproduce greedy decoding exactly
                s["greedy_identical_to_off"] = all(a.tokens == b.tokens for a, b in zip(results, off, strict=True))
            rows["results"][f"{name} T={temperature:g}"] = s
            accepted = " ".join(f"{p:.2f}" for p in s["p_accepted"])
            table.add_row(name, f"{temperature:g}", f"{s['mean_tau']:.2f}", accepted, str(s["rounds"]),
                          f"{s['tokens_per_s']:.0f}", f"{s['speedup_vs_off']:.2f}×")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
