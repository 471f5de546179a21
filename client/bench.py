"""`dspark-client bench`: concurrency sweeps of a running dspark deployment.

Modes: `off`, `auto`, `fixed` (the drafter's full block verified every round), `fixed:G` (G drafts
verified every round) and `mtp1`, the production baseline DSpark is measured against: one draft a
round, always verified. `mtp1` is an alias of `fixed:1`: the drafter drafts its block and the first
position alone is verified, which is exactly MTP-1 with the DSpark drafter's first position (the
drafter still computes the whole block, so its draft call costs what `fixed`'s does).

For every mode and concurrency c, c workers each send requests back to back
(one event loop, one gRPC stream per request) until the cell's request count is reached. The cells
of one concurrency run interleaved, in slices of at least c requests whose order of modes changes
from slice to slice (`slice_order`): a shared machine drifts by tens of per cent over minutes, and
interleaving puts that drift on every mode alike instead of on whichever ran last.
Each slice of each mode runs the same requests (prompts and seeds), so two modes are compared on the
same work; the finer the slices, the less of the drift survives in a ratio (docs/measurements.md:
two identical modes 5 % apart with 8 slices, within 1 % with 32). A cell of N requests at concurrency
c has at most N / c slices; `min_slices` raises N where c is high. Before each concurrency's cells, one
uncounted slice of every mode warms the server up for it (new batch shapes, cache rows not yet used).
Per cell, over its slices: time to first token, inter-token latency percentiles (a chunk of k tokens
arriving g seconds after the previous one counts as k gaps of g / k), tokens/s per user and for the
system, mean τ from the responses, and — from the server's metrics, scraped before and after — the
verified-length histogram, the acceptance rate of each block position, and how many calls the draft
and verify models served and how long one took on average (Triton's own per-model request counters):
the cost side of speculation, next to its gain (τ).

The throughput-interactivity frontier of a mode is its (tokens/s per user, tokens/s for the system)
points across concurrencies; at a per-user SLA, a mode's throughput is the highest system throughput
on its frontier (linearly interpolated between neighbouring concurrencies) where per-user speed still
meets the SLA (`sla_table`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
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
    slices: int = 32  # per cell, interleaved across modes (fewer if a slice would hold < c requests)
    min_slices: int = 1  # at every concurrency: a cell then runs at least min_slices · c requests
    warmup: bool = True  # one uncounted slice of every mode before each concurrency's cells
    slas: list[float] = field(default_factory=lambda: [40.0, 60.0, 80.0])  # tokens/s per user


MODEL_CALLS = ("dspark_draft", "dspark_verify")
MODE_ALIASES = {"mtp1": ("fixed", 1)}


def mode_request(mode: str) -> tuple[str, int | None]:
    """(speculation, gamma) a bench mode sends: `fixed:G` -> ("fixed", G), `mtp1` -> ("fixed", 1)."""
    if mode in MODE_ALIASES:
        return MODE_ALIASES[mode]
    speculation, _, gamma = mode.partition(":")
    if speculation not in ("off", "fixed", "auto") or (gamma and (speculation != "fixed" or not gamma.isdigit()
                                                               or int(gamma) < 1)):
        raise ValueError(f"unknown bench mode {mode!r}: expected off, auto, fixed, fixed:G (G >= 1) or mtp1")
    return speculation, int(gamma) if gamma else None


def expand_modes(modes: list[str], gammas: list[int] | None) -> list[str]:
    """The modes to run: `fixed` becomes one `fixed:G` per G of `gammas` when given; each is checked."""
    if gammas and "fixed" not in modes:
        raise ValueError(f"--gammas expands the mode `fixed`, which is not among the modes {','.join(modes)}")
    out: list[str] = []
    for mode in modes:
        out += [f"fixed:{g}" for g in gammas] if mode == "fixed" and gammas else [mode]
    for mode in out:
        mode_request(mode)
    return list(dict.fromkeys(out))
_SERIES = re.compile(r'^(dspark_\S+) (\S+)$', re.M)


def scrape(metrics_url: str) -> dict[str, float]:
    """The dspark_* series of the server's metrics, keyed by name and labels."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in _SERIES.finditer(text)}


def _model_calls(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Draft and verify calls and the mean time the orchestrator waited for one, in ms, process crossings
    included, wherever the drafter runs (from the counters' changes over a cell)."""
    calls = {}
    for model in MODEL_CALLS:
        count = sum(v for k, v in counters.items()
                    if k.startswith("dspark_model_calls_total") and f'call="{model}"' in k)
        micros = sum(v for k, v in counters.items()
                     if k.startswith("dspark_model_call_duration_us") and f'call="{model}"' in k)
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
            speculation, gamma = mode_request(mode)
            done.append(await acomplete(client, prompt, max_tokens=config.max_tokens, speculation=speculation,
                                        gamma=gamma, temperature=config.temperature, seed=i))
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
        "model_calls": _model_calls(_delta(after, before, "dspark_model_call")),
    }


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n modes (a Williams design) in which every mode takes every place equally often and
    directly follows every other mode equally often: n orders for even n, 2n for odd n."""
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    orders = [[(m + k) % n for m in first] for k in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def slice_order(modes: list[str], slices: int) -> list[tuple[int, str]]:
    """(slice, mode) in the order they run: every slice runs each mode once, in the orders of
    `balanced_orders` taken in turn, so that neither the machine's drift nor whatever a mode leaves
    behind for the next one (caches, a busier server) favours one mode. (A plain rotation, off fixed
    auto, fixed auto off, ..., gives every mode the same predecessor in every slice.)"""
    orders = balanced_orders(len(modes))
    return [(k, modes[m]) for k in range(slices) for m in orders[k % len(orders)]]


def cell_requests(config: BenchConfig, concurrency: int) -> int:
    """Requests each cell of this concurrency runs: --requests, or enough for --min-slices slices."""
    return max(config.requests, concurrency * config.min_slices)


def settled_scrape(metrics_url: str, timeout: float = 5.0) -> dict[str, float]:
    """The server's counters once it has published every finished round: the orchestrator buffers its
    round metrics and flushes them before it reports zero active requests (model_repository/dspark)."""
    deadline = time.monotonic() + timeout
    while True:
        series = scrape(metrics_url)
        if series.get('dspark_active_requests{model="dspark"}', 0.0) == 0.0 or time.monotonic() > deadline:
            return series
        time.sleep(0.02)


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    cells = []
    warmup = [concurrency if config.warmup else 0 for concurrency in config.concurrencies]
    total = sum(cell_requests(config, c) + w for c, w in zip(config.concurrencies, warmup, strict=True))
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("bench", total=total * len(config.modes))
        for concurrency, warm in zip(config.concurrencies, warmup, strict=True):
            # A concurrency's first calls meet shapes and cache rows the server has not used yet (slower);
            # one uncounted slice of every mode takes that cost off the measured ones.
            for mode in config.modes if warm else ():
                bar.update(task, description=f"c={concurrency} warm-up {mode:5s}")
                asyncio.run(_slice(config, mode, concurrency, range(warm), None, lambda: bar.advance(task)))
            requests = cell_requests(config, concurrency)
            slices = max(1, min(config.slices, requests // concurrency))
            bounds = [requests * k // slices for k in range(slices + 1)]
            done: dict[str, list[Completion]] = {mode: [] for mode in config.modes}
            wall = dict.fromkeys(config.modes, 0.0)
            counters: dict[str, dict[str, float]] = {mode: {} for mode in config.modes}
            before = settled_scrape(config.metrics_url)  # then each slice's `after` is the next one's `before`
            for k, mode in slice_order(config.modes, slices):
                bar.update(task, description=f"c={concurrency} slice {k + 1}/{slices} {mode:5s}")
                duration = config.duration / slices if config.duration else None
                got, seconds = asyncio.run(_slice(config, mode, concurrency, range(bounds[k], bounds[k + 1]),
                                                  duration, lambda: bar.advance(task)))
                after = settled_scrape(config.metrics_url)
                done[mode] += got
                wall[mode] += seconds
                for key in after:
                    counters[mode][key] = counters[mode].get(key, 0.0) + after[key] - before.get(key, 0.0)
                before = after
            for mode in config.modes:
                cell = summarise(done[mode], wall[mode], {}, counters[mode])
                cells.append({"mode": mode, "concurrency": concurrency, "slices": slices, **cell})
    cells.sort(key=lambda c: (config.modes.index(c["mode"]), c["concurrency"]))
    return {"config": {k: v for k, v in config.__dict__.items() if k != "prompts"} | {"prompts": len(config.prompts)},
            "cells": cells, "sla": sla_table(cells, config.slas), "comparison": comparison(cells)}


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


def frontier(cells: list[dict[str, Any]], mode: str) -> list[tuple[int, float, float]]:
    """A mode's (concurrency, tokens/s per user, system tokens/s), by concurrency."""
    return sorted((c["concurrency"], c["per_user_tokens_per_s"], c["system_tokens_per_s"])
                  for c in cells if c["mode"] == mode)


def throughput_at_sla(points: list[tuple[int, float, float]], sla: float) -> float | None:
    """The highest system throughput along a frontier while per-user speed is at least `sla`.

    Measured points that meet the SLA count as they are; between two neighbouring concurrencies
    where per-user speed crosses the SLA, the system throughput is interpolated linearly in per-user
    speed at the crossing. None when no point or crossing meets it.
    """
    best = [system for _, user, system in points if user >= sla]
    for (_, u0, s0), (_, u1, s1) in zip(points, points[1:], strict=False):
        if min(u0, u1) < sla <= max(u0, u1):
            best.append(s0 + (s1 - s0) * (sla - u0) / (u1 - u0))
    return max(best) if best else None


def sla_table(cells: list[dict[str, Any]], slas: list[float], *, ours: str = "auto", baseline: str = "mtp1"
              ) -> list[dict[str, Any]]:
    """Per SLA: each mode's system throughput at it (None: not reached) and `ours`' gain over `baseline`
    (None unless both reach it)."""
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    rows = []
    for sla in slas:
        reached = {mode: throughput_at_sla(frontier(cells, mode), sla) for mode in modes}
        a, b = reached.get(ours), reached.get(baseline)
        rows.append({"sla_tokens_per_s_per_user": sla, "system_tokens_per_s": reached,
                     f"{ours}_over_{baseline}": a / b - 1 if a is not None and b else None})
    return rows


def comparison(cells: list[dict[str, Any]], *, ours: str = "auto") -> list[dict[str, Any]]:
    """Per concurrency where `ours` ran: its system throughput over each other mode's, over the best of
    the fixed modes (`fixed`, `fixed:G`, `mtp1`) measured at that concurrency, and its per-user speed over
    `off`'s (None where the other mode did not run)."""
    by_cell = {(c["mode"], c["concurrency"]): c for c in cells}
    rows = []
    for concurrency in sorted({c["concurrency"] for c in cells if c["mode"] == ours}):
        mine = by_cell[(ours, concurrency)]
        others = {m: c["system_tokens_per_s"] for (m, k), c in by_cell.items() if k == concurrency and m != ours}
        fixed = [v for m, v in others.items() if mode_request(m)[0] == "fixed"]  # mtp1 is fixed:1
        off = by_cell.get(("off", concurrency))
        rows.append({
            "concurrency": concurrency,
            "system_over": {m: mine["system_tokens_per_s"] / v for m, v in others.items() if v},
            "system_over_best_fixed": mine["system_tokens_per_s"] / max(fixed) if fixed else None,
            "per_user_over_off": mine["per_user_tokens_per_s"] / off["per_user_tokens_per_s"] if off else None,
        })
    return rows


def plot_frontier(result: dict[str, Any], path: Path) -> Path:
    """System tokens/s against tokens/s per user, one line per mode, points labelled by concurrency;
    the SLAs as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for mode in dict.fromkeys(c["mode"] for c in cells):
        points = frontier(cells, mode)
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=mode)
        for concurrency, user, system in points:
            ax.annotate(str(concurrency), (user, system), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for row in result.get("sla", []):
        ax.axvline(row["sla_tokens_per_s_per_user"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel("tokens/s, system (throughput)")
    ax.set_title("throughput-interactivity frontier (points: concurrency; dotted: SLAs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir / "bench.json", plot(result, out_dir / "bench.png"), plot_frontier(result, out_dir / "frontier.png")
