"""What one decoding round is made of on this machine, piece by piece, in one process (no serving).

    python bench/round_costs.py [--ckpt build/ckpt-tiny-qwen3-dspark-tp2] [--context 150] [--repeats 200]

For a converted checkpoint (`make serve` builds the trained pair at tp 2): the drafter's context
update (3 tokens) plus its round for one slot (γ = 5), timed back to back ("hot") and with a target
forward between consecutive rounds ("interleaved", which is what serving does to the caches); the
target's forward of 1 and of 1 + γ tokens at the checkpoint's tensor parallelism; and one gloo
all-reduce of a hidden vector between two processes (a tp 2 forward makes 2 per layer, plus the
vocabulary gather and the call's broadcast). Medians. Prints a table, writes bench/results/round_costs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.tp import free_port

ROOT = Path(__file__).resolve().parent.parent


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples) * 1000)


def _all_reduce_worker(rank: int, port: int, width: int, repeats: int, out: dict) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(width)
    samples = []
    for _ in range(repeats + 20):
        start = time.perf_counter()
        dist.all_reduce(x)
        samples.append(time.perf_counter() - start)
    if rank == 0:
        out["ms"] = median_ms(samples[20:])
    dist.destroy_process_group()


def all_reduce_ms(width: int, repeats: int) -> float:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_all_reduce_worker, args=(free_port(), width, repeats, out), nprocs=2)
        return out["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=ROOT / "build" / "ckpt-tiny-qwen3-dspark-tp2")
    parser.add_argument("--context", type=int, default=150, help="tokens of context before the timed rounds")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not (args.ckpt / "manifest.json").is_file():
        raise SystemExit(f"{args.ckpt}: no converted checkpoint (run `make serve` first, or pass --ckpt)")

    torch.set_num_threads(1)
    target, drafter, _ = open_checkpoint(args.ckpt, num_slots=1, max_len=args.context + 8 * args.repeats + 64)
    gamma = drafter.block_size
    prompt = torch.randint(0, 1000, (args.context,)).tolist()
    _, features = target.forward([0], [prompt], capture=drafter.target_layer_ids, start=[0], logits=False)
    drafter.add_context_batch([0], features)
    new_context = features[0][-3:]
    cached = args.context

    def draft_round() -> float:
        start = time.perf_counter()
        drafter.add_context_batch([0], [new_context])
        drafter.draft([0], [5], [0.0], [None], gamma)
        return time.perf_counter() - start

    def forward(tokens: int) -> float:
        start = time.perf_counter()
        target.forward([0], [list(range(tokens))], capture=drafter.target_layer_ids, start=[cached], logits=False)
        return time.perf_counter() - start

    try:
        hot = [draft_round() for _ in range(args.repeats)]
        interleaved = []
        for _ in range(args.repeats):
            forward(1)
            interleaved.append(draft_round())
        one = [forward(1) for _ in range(args.repeats)]
        block = [forward(1 + gamma) for _ in range(args.repeats)]
    finally:
        target.close()
    hidden = json.loads((args.ckpt / "target" / "config.json").read_text())["hidden_size"]
    figures = {
        "draft_context_and_round_hot_ms": median_ms(hot),
        "draft_context_and_round_interleaved_ms": median_ms(interleaved),
        "target_forward_1_token_ms": median_ms(one),
        f"target_forward_{1 + gamma}_tokens_ms": median_ms(block),
        "gloo_all_reduce_ms": all_reduce_ms(hidden, args.repeats),
    }
    table = Table("piece", "median ms", title=f"round costs ({args.ckpt.name}, context {args.context})")
    for name, value in figures.items():
        table.add_row(name, f"{value:.2f}")
    Console().print(table)
    out = ROOT / "bench" / "results" / "round_costs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ckpt": str(args.ckpt), "context": args.context, "repeats": args.repeats,
                               **figures}, indent=2) + "\n")
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
