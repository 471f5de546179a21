"""`dspark-client bench`: concurrency sweeps of a running dspark deployment.

For every mode (off / fixed / auto) and concurrency c, c workers each send requests back to back
(one event loop, one gRPC stream per request) until the cell's request count is reached. The cells
of one concurrency run interleaved, in slices of at least c requests whose order of modes rotates
(off fixed auto, fixed auto off, auto off fixed, ...): a shared machine drifts by tens of per cent
over minutes, and interleaving puts that drift on every mode alike instead of on whichever ran last.
Per cell, over its slices: time to first token, inter-token latency percentiles (a chunk of k tokens
arriving g seconds after the previous one counts as k gaps of g / k), tokens/s per user and for the
system, mean τ from the responses, and — from the server's metrics, scraped before and after — the
verified-length histogram, the acceptance rate of each block position, and how many calls the draft
and verify models served and how long one took on average (Triton's own per-model request counters):
the cost side of speculation, next to its gain (τ).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio
from rich.progress import Progress

from .aio import acomplete
from .stream import Completion


@dataclass
class BenchConfig:
    url: str
    metrics_url: str
    modes: list[str]
    concurrencies: list[int]
    prompts: list[str]
    requests: int  # per cell; at least the concurrency
    max_tokens: int = 64
    temperature: float = 0.0
    duration: float | None = None  # per cell: stop starting requests after this many seconds
    slices: int = 4  # per cell, interleaved across modes (fewer if a slice would hold < c requests)


MODEL_CALLS = ("dspark_draft", "dspark_verify")
_SERIES = re.compile(r'^((?:dspark_|nv_inference_request_(?:success|duration_us)\{model="dspark_)\S+) (\S+)$', re.M)


def scrape(metrics_url: str) -> dict[str, float]:
    """The dspark_* series of the server's metrics and Triton's request counters of the dspark models,
    keyed by name and labels."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in _SERIES.finditer(text)}


def _model_calls(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Calls each model served and their mean duration in ms (from the counters' changes over a cell)."""
    calls = {}
    for model in MODEL_CALLS:
        count = sum(v for k, v in counters.items() if k.startswith(f'nv_inference_request_success{{model="{model}"'))
        micros = sum(v for k, v in counters.items()
                     if k.startswith(f'nv_inference_request_duration_us{{model="{model}"'))
        calls[model] = {"calls": count, "mean_ms": micros / count / 1000 if count else 0.0}
    return calls


def _delta(after: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}


def _position(key: str) -> int:
    return int(re.search(r'position="(\d+)"', key).group(1))


async def _slice(config: BenchConfig, mode: str, concurrency: int, ids: range, duration: float | None,
                 advance) -> tuple[list[Completion], float]:
    client = grpcaio.InferenceServerClient(config.url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in ids:
        queue.put_nowait(i)
    done: list[Completion] = []

    deadline = time.perf_counter() + duration if duration else float("inf")

    async def worker() -> None:
        while not queue.empty() and time.perf_counter() < deadline:
            i = queue.get_nowait()
            prompt = config.prompts[i % len(config.prompts)]
            done.append(await acomplete(client, prompt, max_tokens=config.max_tokens, speculation=mode,
                                        temperature=config.temperature, seed=i))
            advance()

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return done, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarise(done: list[Completion], wall: float, before: dict, after: dict) -> dict[str, Any]:
    """One cell's figures; `before` / `after` are the server's counters around it (or {} and their change)."""
    ttft = [(c.chunk_times[0] - c.start) * 1000 for c in done if c.chunk_times]
    itl = []
    for c in done:
        for prev, now, size in zip(c.chunk_times, c.chunk_times[1:], c.chunk_sizes[1:], strict=False):
            itl += [(now - prev) * 1000 / size] * size
    verified = _delta(after, before, "dspark_position_verified_total")
    accepted = _delta(after, before, "dspark_position_accepted_total")
    positions = sorted({_position(k) for k, v in verified.items() if v > 0})  # none for `off`
    acceptance = [sum(v for k, v in accepted.items() if _position(k) == p)
                  / max(1.0, sum(v for k, v in verified.items() if _position(k) == p)) for p in positions]
    buckets = _delta(after, before, "dspark_verified_length_bucket")
    cumulative = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v) for k, v in buckets.items())
    histogram, previous = {}, 0.0
    for edge, count in cumulative:
        if edge != float("inf"):  # the server's buckets have one value each, le = k + 0.5
            histogram[str(round(edge - 0.5))] = count - previous
            previous = count
    tokens = sum(len(c.ids) for c in done)
    return {
        "requests": len(done), "tokens": tokens, "wall_s": wall,
        "rounds": sum(c.stats.get("rounds", 0) for c in done),
        "verified_tokens": sum(c.stats.get("verified_tokens", 0) for c in done),
        "per_user_tokens_per_s": float(np.mean([len(c.ids) / (c.chunk_times[-1] - c.start)
                                                for c in done if c.chunk_times])),
        "system_tokens_per_s": tokens / wall,
        "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl),
        "mean_tau": float(np.mean([c.stats.get("mean_tau", 0.0) for c in done])),
        "verified_length_histogram": histogram, "position_acceptance": acceptance,
        "model_calls": _model_calls(_delta(after, before, "nv_inference_request_")),
    }


def slice_order(modes: list[str], slices: int) -> list[tuple[int, str]]:
    """(slice, mode) in the order they run: every slice runs each mode once, and the order rotates
    from slice to slice (off fixed auto, fixed auto off, ...), so that neither the machine's drift
    nor whatever a mode leaves behind for the next one (caches, a busier server) favours one mode."""
    return [(k, modes[(k + i) % len(modes)]) for k in range(slices) for i in range(len(modes))]


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    cells = []
    total = sum(max(config.requests, c) for c in config.concurrencies) * len(config.modes)
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("bench", total=total)
        for concurrency in config.concurrencies:
            requests = max(config.requests, concurrency)
            slices = max(1, min(config.slices, requests // concurrency))
            bounds = [requests * k // slices for k in range(slices + 1)]
            done: dict[str, list[Completion]] = {mode: [] for mode in config.modes}
            wall = dict.fromkeys(config.modes, 0.0)
            counters: dict[str, dict[str, float]] = {mode: {} for mode in config.modes}
            for k, mode in slice_order(config.modes, slices):
                bar.update(task, description=f"c={concurrency} slice {k + 1}/{slices} {mode:5s}")
                before = scrape(config.metrics_url)
                duration = config.duration / slices if config.duration else None
                got, seconds = asyncio.run(_slice(config, mode, concurrency, range(bounds[k], bounds[k + 1]),
                                                  duration, lambda: bar.advance(task)))
                time.sleep(0.5)  # the server buffers metric updates for up to 0.25 s
                after = scrape(config.metrics_url)
                done[mode] += got
                wall[mode] += seconds
                for key in after:
                    counters[mode][key] = counters[mode].get(key, 0.0) + after[key] - before.get(key, 0.0)
            for mode in config.modes:
                cell = summarise(done[mode], wall[mode], {}, counters[mode])
                cells.append({"mode": mode, "concurrency": concurrency, "slices": slices, **cell})
    cells.sort(key=lambda c: (config.modes.index(c["mode"]), c["concurrency"]))
    return {"config": {k: v for k, v in config.__dict__.items() if k != "prompts"} | {"prompts": len(config.prompts)},
            "cells": cells}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Tokens/s per user and per system versus concurrency for each mode; acceptance per block position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in modes:
        rows = [c for c in cells if c["mode"] == mode]
        xs = [c["concurrency"] for c in rows]
        axes[0].plot(xs, [c["per_user_tokens_per_s"] for c in rows], marker="o", label=mode)
        axes[1].plot(xs, [c["system_tokens_per_s"] for c in rows], marker="o", label=mode)
        first = rows[0]
        if first["position_acceptance"]:
            k = range(1, len(first["position_acceptance"]) + 1)
            axes[2].plot(k, first["position_acceptance"], marker="o", label=f"{mode}, c={first['concurrency']}")
    for ax, title, ylabel in ((axes[0], "per user", "tokens/s per user"), (axes[1], "system", "tokens/s"),
                              (axes[2], "acceptance by block position", "accepted / verified")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
    axes[2].set_xlabel("block position k")
    axes[2].set_ylim(0, 1.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir / "bench.json", plot(result, out_dir / "bench.png")
