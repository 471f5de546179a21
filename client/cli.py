"""`dspark-client`: talk to a dspark-trt Triton deployment.

Exit codes: 0 success · 1 the server answered with an error or is not ready · 2 bad usage ·
4 the server could not be reached.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 4

stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dspark-trt")
def main() -> None:
    """Client for a DSpark speculative-decoding service on Triton Inference Server.

    \b
    dspark-client health                      # is the server up, which models are ready?
    dspark-client generate "def quicksort(" --stream
    """


MODELS = ("ensemble", "preprocessing", "dspark", "dspark_draft", "dspark_verify", "postprocessing")


@main.command()
@click.option("--url", default="127.0.0.1:8000", show_default=True,
              help="Triton endpoint host:port: the HTTP port (8000), or the gRPC one (8001) that generate and "
                   "bench take; both work.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
def health(url: str, timeout: float) -> None:
    """Check that the server is live and ready, and that each model of the service is ready.

    Exit code 0 only if all are; 1 if the server answers but is not ready (e.g. while it reloads a
    model whose process died); 4 if nothing answers at URL.
    """
    try:
        protocol, live, ready, models = _health("http", url, timeout)
    except Exception as http_error:  # noqa: BLE001 - maybe the gRPC port: try that before giving up
        try:
            protocol, live, ready, models = _health("grpc", url, timeout)
        except Exception:  # noqa: BLE001 - report the HTTP error: HTTP is what this port was asked first
            err.print(f"[red]error:[/] no Triton server reachable at {escape(url)} over HTTP or gRPC "
                      f"({escape(str(http_error))})")
            sys.exit(EXIT_UNREACHABLE)
    stdout.print(f"server {escape(url)} ({protocol}): live={live} ready={ready}")
    for name, state in models.items():
        stdout.print(f"  {name:15s} {'READY' if state else 'NOT READY'}")
    if not (live and ready and all(models.values())):
        sys.exit(EXIT_NOT_READY)


def _health(protocol: str, url: str, timeout: float) -> tuple[str, bool, bool, dict[str, bool]]:
    if protocol == "http":
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    else:
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(url)
    kwargs = {} if protocol == "http" else {"client_timeout": timeout}
    live = client.is_server_live(**kwargs)
    models = _service_models(client, {} if protocol == "http" else {"as_json": True, **kwargs})
    return protocol, live, client.is_server_ready(**kwargs), {m: client.is_model_ready(m, **kwargs) for m in models}


def _service_models(client: Any, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The models of the service: dspark_draft only where the orchestrator calls it (its `drafter`
    parameter; in the cpu layout the orchestrator drafts itself)."""
    try:
        config = client.get_model_config("dspark", **kwargs)
    except Exception:  # noqa: BLE001 - dspark not loaded (yet): report every model, dspark among the unready
        return MODELS
    config = config.get("config", config)  # gRPC's JSON wraps it
    drafter = config.get("parameters", {}).get("drafter", {}).get("string_value", "model")
    return MODELS if drafter == "model" else tuple(m for m in MODELS if m != "dspark_draft")


@main.command()
@click.argument("prompt")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC endpoint (host:port).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it arrives.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(-(2**63), 2**63 - 1),
              help="Sampling seed, any int64.")
@click.option("--speculation", type=click.Choice(["auto", "off", "fixed"]), default="auto", show_default=True)
@click.option("--gamma", type=click.IntRange(min=1), help="Drafts per round with --speculation fixed.")
@click.option("--stop", "stops", multiple=True, help="Stop string (repeatable).")
def generate(prompt: str, url: str, stream: bool, max_tokens: int, temperature: float, seed: int, speculation: str,
             gamma: int | None, stops: tuple[str, ...]) -> None:
    """Generate a completion of PROMPT and print a one-line summary (tokens, tok/s, τ)."""
    import time

    from tritonclient.utils import InferenceServerException

    from .stream import RequestError
    from .stream import stream as stream_chunks

    start, text, ids, final = time.perf_counter(), "", [], None
    try:
        for chunk in stream_chunks(url, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   speculation=speculation, gamma=gamma, stop=list(stops) or None):
            text, ids = text + chunk.text, ids + chunk.ids
            if stream and chunk.text:
                click.echo(chunk.text, nl=False)
            final = chunk if chunk.finish_reason else final
    except RequestError as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(EXIT_NOT_READY)
    except (InferenceServerException, OSError) as e:
        err.print(f"[red]error:[/] no Triton server reachable at {escape(url)} over gRPC ({escape(str(e))}); "
                  "generate takes the gRPC port (8001 by default)")
        sys.exit(EXIT_UNREACHABLE)
    elapsed = time.perf_counter() - start
    if not stream:
        click.echo(text, nl=False)
    stats = final.stats if final and final.stats else {}
    click.echo()
    err.print(f"[dim]{len(ids)} tokens in {elapsed:.2f} s ({len(ids) / elapsed:.1f} tok/s), "
              f"τ {stats.get('mean_tau', 0):.2f}, finish: {final.finish_reason if final else '?'}[/]")


@main.command()
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC endpoint.")
@click.option("--metrics-url", default="http://127.0.0.1:8002/metrics", show_default=True)
@click.option("--concurrency", default="1,2,4,8,16,32", show_default=True, help="Comma-separated concurrencies.")
@click.option("--modes", default="off,mtp1,fixed,auto", show_default=True,
              help="Comma-separated: off, auto, fixed (full block), fixed:G (G drafts), mtp1 (= fixed:1: one draft "
                   "a round, always verified, the MTP-1 baseline).")
@click.option("--gammas", help="Run `fixed` once per block length, e.g. 1,3,5 (as fixed:1, fixed:3, fixed:5).")
@click.option("--sla", default="40,60,80", show_default=True,
              help="Per-user SLAs (tokens/s per user) of the SLA table: each mode's best system throughput "
                   "meeting it, and auto's gain over mtp1.")
@click.option("--prompts", default="code", show_default=True,
              help="Built-in set (code | chat) or a file (JSON list of strings, or one prompt per line).")
@click.option("--requests", default=16, show_default=True, type=click.IntRange(min=1),
              help="Requests per (mode, concurrency) cell; at least the concurrency.")
@click.option("--duration", type=click.FloatRange(min=0), help="Seconds per cell (stops starting new requests).")
@click.option("--slices", default=32, show_default=True, type=click.IntRange(min=1),
              help="Run each concurrency's cells interleaved in this many slices (at most requests / "
                   "concurrency), the order of the modes changing so that each mode takes every place and "
                   "follows every other mode equally often: a machine's drift, and what one mode leaves "
                   "behind for the next, land on every mode alike.")
@click.option("--min-slices", default=1, show_default=True, type=click.IntRange(min=1),
              help="At least this many slices at every concurrency: a cell then runs at least min-slices x "
                   "concurrency requests (more than --requests at high concurrency).")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Before each concurrency's cells, one uncounted slice of every mode (a server's first "
                   "calls at a new batch size are slower).")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("-o", "--output", "out_dir", default=Path("bench/results/client"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory for bench.json and bench.png.")
def bench(url: str, metrics_url: str, concurrency: str, modes: str, gammas: str | None, sla: str, prompts: str,
          requests: int, duration: float | None, slices: int, min_slices: int, warmup: bool, max_tokens: int,
          temperature: float, out_dir: Path) -> None:
    """Measure a running deployment: TTFT, inter-token latency, tokens/s per user and system, τ.

    For each mode and concurrency: TTFT and inter-token latency p50/p90/p99, per-user and system
    tokens/s, mean τ, the verified-length histogram and per-position acceptance (from the server's
    metrics). Writes JSON, a PNG plot (tokens/s vs concurrency per mode; acceptance per block
    position), the throughput-interactivity frontier (frontier.png: system against per-user tokens/s,
    one line per mode, points labelled by concurrency) and prints the SLA table.
    """
    from rich.table import Table
    from tritonclient.utils import InferenceServerException

    from . import prompts as prompt_sets
    from .bench import BenchConfig, expand_modes, run_bench, scrape, write
    from .stream import RequestError

    try:
        gamma_list = [int(g) for g in gammas.split(",")] if gammas else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {gammas!r}", param_hint="--gammas") from None
    try:
        slas = [float(v) for v in sla.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated tokens/s per user, got {sla!r}",
                                 param_hint="--sla") from None
    try:
        mode_list = expand_modes(modes.split(","), gamma_list)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--modes") from None
    try:
        texts = prompt_sets.load(prompts)
        scrape(metrics_url)
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(EXIT_UNREACHABLE if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else 2)
    config = BenchConfig(url, metrics_url, mode_list, [int(c) for c in concurrency.split(",")], texts,
                         requests, max_tokens, temperature, duration, slices, min_slices, warmup, slas)
    try:
        result = run_bench(config)
    except RequestError as e:
        err.print(f"[red]error:[/] a request failed: {escape(str(e))}")
        sys.exit(EXIT_NOT_READY)
    except (InferenceServerException, OSError) as e:
        err.print(f"[red]error:[/] no Triton server reachable at {escape(url)} over gRPC ({escape(str(e))})")
        sys.exit(EXIT_UNREACHABLE)
    table = Table("mode", "conc.", "tok/s user", "tok/s system", "TTFT p50 ms", "ITL p50/p90/p99 ms", "mean τ",
                  "draft / verify ms", title=f"dspark bench ({prompts} prompts, {max_tokens} tokens)")
    for c in result["cells"]:
        itl, calls = c["itl_ms"], c["model_calls"]
        draft = f"{calls['dspark_draft']['mean_ms']:.1f}" if calls["dspark_draft"]["calls"] else "-"
        table.add_row(c["mode"], str(c["concurrency"]), f"{c['per_user_tokens_per_s']:.1f}",
                      f"{c['system_tokens_per_s']:.1f}", f"{c['ttft_ms']['p50']:.0f}",
                      f"{itl['p50']:.0f}/{itl['p90']:.0f}/{itl['p99']:.0f}", f"{c['mean_tau']:.2f}",
                      f"{draft} / {calls['dspark_verify']['mean_ms']:.1f}")
    stdout.print(table)
    if result["comparison"]:
        others = [m for m in dict.fromkeys(c["mode"] for c in result["cells"]) if m != "auto"]
        ratios = Table("conc.", "auto / off per user", "auto / best fixed", *(f"auto / {m}" for m in others),
                       title="auto against the other modes (system tokens/s unless said; best fixed: mtp1, fixed:G)")

        def ratio(value: float | None) -> str:
            return f"{value:.2f}x" if value is not None else "-"
        for row in result["comparison"]:
            ratios.add_row(str(row["concurrency"]), ratio(row["per_user_over_off"]),
                           ratio(row["system_over_best_fixed"]), *(ratio(row["system_over"].get(m)) for m in others))
        stdout.print(ratios)
    modes_run = list(dict.fromkeys(c["mode"] for c in result["cells"]))
    sla_rows = Table("SLA tok/s/user", *(f"{m} tok/s" for m in modes_run), "auto vs mtp1",
                     title="highest system throughput meeting each per-user SLA (interpolated along the frontier)")
    for row in result["sla"]:
        reached = row["system_tokens_per_s"]
        gain = row["auto_over_mtp1"]
        sla_rows.add_row(f"{row['sla_tokens_per_s_per_user']:g}",
                         *(f"{reached[m]:.1f}" if reached[m] is not None else "not reached" for m in modes_run),
                         f"{gain:+.1%}" if gain is not None else "-")
    stdout.print(sla_rows)
    json_path, png_path, frontier_path = write(result, out_dir)
    stdout.print(f"wrote {json_path}, {png_path} and {frontier_path}")


if __name__ == "__main__":
    main()
