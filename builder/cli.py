"""`dspark-build`: from checkpoints to a Triton model repository.

Exit codes: 0 success · 1 invalid input (the message names the file, tensor or field, what was
found and what was expected) · 2 bad command-line usage · 3 output exists (pass --force) ·
4 a missing optional dependency (TensorRT) · 5 the server failed to start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from ..runtime.atomic import check_output
from .cli_common import EXIT_INVALID_INPUT, EXIT_SERVER, err, reports_errors, stdout
from .cli_engine import engine, export, plugins
from .evaluate import eval_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dspark-trt")
def main() -> None:
    """Build a DSpark speculative-decoding deployment from a target checkpoint and its drafter.

    \b
    A typical run:
      dspark-build fixture qwen3 build/fixture          # or use real checkpoints
      dspark-build inspect build/fixture/target build/fixture/drafter
      dspark-build convert --target build/fixture/target --drafter build/fixture/drafter --tp 2 -o build/ckpt

    \b
    Families: Qwen3 target + DeepSpec Qwen3DSparkModel drafter; DeepSeek-V4 with the drafter
    built in under mtp.0..2.*.

    \b
    Exit codes:
      0  success
      1  invalid input: the message names the file, tensor or field, what was found and what
         was expected (also: an output that overlaps an input or cannot be written there)
      2  bad command-line usage
      3  the output exists (pass --force to replace it)
      4  a missing optional dependency (TensorRT / TensorRT-LLM; the message names the install)
      5  the server failed to start (its log is printed)
    """


class FamilyName(click.ParamType):
    """A registered family's name (builder/families), the registry imported only when one is read: it
    imports torch, which `--help` and the other commands do not need."""

    name = "family"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        from .families import FAMILIES

        return "{" + "|".join(FAMILIES) + "}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .families import FAMILIES

        if value not in FAMILIES:
            self.fail(f"{value!r} is not one of {', '.join(map(repr, FAMILIES))}.", param, ctx)
        return value


@main.command()
@click.argument("family", type=FamilyName())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for weights (same seed, same bytes).")
@click.option("--markov-head", "markov_head", type=click.Choice(["vanilla", "gated", "rnn"]), default="vanilla",
              show_default=True, help="Qwen3 / Gemma4 drafter's Markov head variant.")
@click.option("--scale", default=1, show_default=True, type=click.IntRange(min=1),
              help="Qwen3 only: multiply hidden and MLP widths (a size knob for benchmarks).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@reports_errors
def fixture(family: str, out: Path, seed: int, markov_head: str, scale: int, force: bool) -> None:
    """Write a tiny random checkpoint pair in the real on-disk formats to OUT.

    \b
    qwen3        OUT/target  (Qwen3ForCausalLM, sharded safetensors, tokenizer)
                 OUT/drafter (DeepSpec Qwen3DSparkModel)
    deepseek-v4  OUT/target  (DeepseekV4ForCausalLM, FP8 e4m3 linears with 128x128 block
                 scales, DSpark drafter under mtp.0..2.*)
    gemma4       OUT/target  (Gemma4ForConditionalGeneration: sliding + global layers, PLE,
                 k_eq_v, softcapping; tokenizer)  OUT/drafter (DeepSpec Gemma4DSparkModel)

    Generated locally in seconds; nothing is downloaded.
    """
    from .corpus import stdlib_root

    check_output(out, inputs=[stdlib_root()], force=force)  # the tokenizer is trained on that corpus
    # The generators write atomically themselves: OUT appears whole or not at all.
    from .families import FAMILIES
    from .families.family import resolve

    fam = FAMILIES[family]
    options = {"markov_head_type": markov_head, "scale": scale}
    resolve(fam.fixture)(out, seed=seed, **{name: options[name] for name in fam.fixture_options})
    stdout.print(f"[green]✓[/] wrote {family} fixture to {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="One seed for every stage.")
@click.option("--target-steps", type=click.IntRange(min=1), help="Exact optimiser steps (else --target-minutes).")
@click.option("--drafter-steps", help="Optimiser steps per warm-restart cycle, e.g. 1600,800 (else --drafter-minutes).")
@click.option("--target-minutes", default=20.0, show_default=True, help="Wall-clock budget for the target.")
@click.option("--drafter-minutes", default=20.0, show_default=True, help="Wall-clock budget per drafter.")
@click.option("--ablation", type=click.Path(path_type=Path), help="Also train the no-Markov (markov_rank 0) drafter.")
@click.option("--draft-layers", type=click.IntRange(min=1), help="Drafter layers (default: the recipe's).")
@click.option("--markov-rank", type=click.IntRange(min=0), help="Markov head rank (default: the recipe's).")
@click.option("--random-init", is_flag=True, help="Draft layers from noise, not copied from the target's.")
@click.option("--distill-rows", type=click.IntRange(min=0),
              help="Windows continued by the target itself, mixed into the drafter's batches (default: the recipe's).")
# Thread counts are part of the determinism recipe: the shipped pair used 2 for the target, 1 per drafter.
@click.option("--target-threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="Torch threads while training the target.")
@click.option("--drafter-threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Torch threads while training a drafter.")
@click.option("--resume", is_flag=True, help="Keep the finished stages of an earlier run in OUT.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def train(out: Path, seed: int, target_steps: int | None, drafter_steps: str | None, target_minutes: float,
          drafter_minutes: float, ablation: Path | None, draft_layers: int | None, markov_rank: int | None,
          random_init: bool, distill_rows: int | None, target_threads: int, drafter_threads: int, resume: bool,
          force: bool, quiet: bool) -> None:
    """Train a tiny Qwen3 target + DSpark drafter on CPU from the Python standard library's source.

    \b
    OUT/target         Qwen3ForCausalLM + byte-level BPE tokenizer (with <|mask|>)
    OUT/drafter        DeepSpec Qwen3DSparkModel (γ 5, vanilla Markov head, confidence head, sts.json)
    OUT/training.json  steps, minutes, losses, held-out acceptance and calibration error

    This is how examples/tiny-qwen3-dspark was made (`make fixture` repeats it with its step counts).
    With a wall-clock budget the step count is estimated from the first steps' speed and recorded in
    OUT/training.json; pass it back as --target-steps / --drafter-steps to reproduce a run exactly.
    """
    from .train import train_pair
    from .train_drafter import DrafterRecipe

    recipe = {name: value for name, value in
              {"layers": draft_layers, "markov_rank": markov_rank, "distill_rows": distill_rows}.items()
              if value is not None}
    train_pair(out, seed=seed, steps_target=target_steps, minutes_target=target_minutes,
               steps_drafter=_ints(drafter_steps) if drafter_steps else None,
               minutes_drafter=drafter_minutes, ablation=ablation,
               drafter_recipe=DrafterRecipe(**recipe, init_from_target=not random_init),
               target_threads=target_threads, drafter_threads=drafter_threads, resume=resume, force=force,
               quiet=quiet)


@main.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--skip-value-check", is_flag=True,
              help="Do not read the weights looking for NaN/Inf (headers, shapes and configs are still checked).")
@reports_errors
def inspect_cmd(paths: tuple[Path, ...], as_json: bool, skip_value_check: bool) -> None:
    """Describe checkpoints and validate a target against its drafter.

    PATHS are checkpoint directories in any order: a target, a drafter, or both (a DeepSeek-V4
    target carries its drafter inside). Prints architecture, size, dtypes and quantisation; for the
    drafter γ, Markov rank and type, mask id, target layers, confidence head and calibration.

    Every problem found is listed with its file, tensor or field, what was found and what was
    expected; any problem makes the exit code 1. Every weight is read once to look for NaN/Inf
    (FP8 scales included) unless --skip-value-check.
    """
    from .families import open_pair, validate
    from .inspection import describe, render

    pair = open_pair(list(paths))
    info = describe(pair, validate(pair, values=not skip_value_check))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        render(info, stdout)
    if not info["ok"]:
        sys.exit(EXIT_INVALID_INPUT)


@main.command()
@click.option("--target", "target", required=True, type=click.Path(path_type=Path),
              help="Target checkpoint directory (Hugging Face layout, safetensors).")
@click.option("--drafter", type=click.Path(path_type=Path),
              help="DeepSpec drafter directory. Not needed for DeepSeek-V4: its drafter is mtp.* inside.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size: number of rank{N}.safetensors per model.")
@click.option("--draft-tp", type=click.IntRange(min=1),
              help="Tensor-parallel size of the drafter. Default: 1 for a separate drafter, --tp for mtp.*.")
@click.option("--dequantize", is_flag=True, help="Write FP8 block-scaled weights as bf16 instead of keeping FP8.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--full-hash", is_flag=True,
              help="Record the sha256 of every source byte in the manifest (default: a sampled sha256).")
@click.option("--skip-value-check", is_flag=True,
              help="Do not read the weights for NaN/Inf before converting (saves one full read of the sources).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def convert(target: Path, drafter: Path | None, tp: int, draft_tp: int | None, dequantize: bool, out: Path,
            force: bool, full_hash: bool, skip_value_check: bool, quiet: bool) -> None:
    """Validate, then write sharded weights in TensorRT-LLM's checkpoint layout.

    \b
    OUT/target/   config.json (architecture, dtype, mapping, quantization) + rank{N}.safetensors
    OUT/draft/    drafter weights + heads (+ sts.json calibration when present)
    OUT/tokenizer/
    OUT/manifest.json  family, γ, mask id, target layers, tp, source hashes, tool versions

    Tensors stream one at a time (memory stays flat however large the model). The output is
    written to a hidden temporary directory and renamed into place at the end: an interrupted run
    leaves nothing behind. Nothing is written if validation fails (NaN/Inf in any weight included,
    unless --skip-value-check) or --tp does not divide a sharded dimension.
    """
    from .convert import convert as run_convert

    manifest = run_convert(target, drafter, out, tp=tp, draft_tp=draft_tp, dequantize=dequantize, force=force,
                           show_progress=not quiet, full_hash=full_hash, check_values=not skip_value_check)
    extra = f", draft tp={manifest['draft_tp']}" if manifest["draft_tp"] else " (no drafter)"
    stdout.print(f"[green]✓[/] {manifest['family']} converted to {out} with tp={tp}{extra}")


@main.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the SPS table (JSON).")
@click.option("--batch-sizes", default="1,2,4,8,16", show_default=True, help="Comma-separated batch sizes R.")
@click.option("--verify-lengths", default=None, help="Comma-separated draft counts l per request (default 0..γ).")
@click.option("--context", default=64, show_default=True, help="Tokens already cached in each slot.")
@click.option("--warmup", default=2, show_default=True, help="Discarded steps per grid cell.")
@click.option("--steps", default=15, show_default=True,
              help="Measured steps per grid cell (the lower quartile is kept: load from elsewhere only adds time).")
@click.option("--force", is_flag=True, help="Replace the output file(s) if they exist.")
@click.option("--backend", type=click.Choice(["reference", "tensorrt-llm"]), default="reference", show_default=True,
              help="reference: time our target's verify steps on this machine. tensorrt-llm (GPU host, TensorRT-LLM "
                   "installed): time the deployment `repo --backend tensorrt-llm` serves, through TensorRT-LLM's LLM "
                   "API (see below).")
@click.option("--trtllm-output", type=click.Path(dir_okay=False, path_type=Path),
              help="tensorrt-llm: where TensorRT-LLM's own table goes (default: OUTPUT's name + .trtllm.json).")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="tensorrt-llm: tensor parallel size (as `repo --gpus`).")
@click.option("--max-batch-size", type=click.IntRange(min=1),
              help="tensorrt-llm: the served max batch size (`repo --num-slots`; default: the largest batch size).")
@reports_errors
def profile(engine_dir: Path, out: Path, batch_sizes: str, verify_lengths: str | None, context: int, warmup: int,
            steps: int, force: bool, backend: str, trtllm_output: Path | None, gpus: int,
            max_batch_size: int | None) -> None:
    """Measure the SPS cost table the confidence scheduler plans with.

    Times verify steps of the target on this machine over a grid of batch size R × verify length l
    (each request carries 1 + l tokens), keeps the lower quartile of steady steps after warm-up, and fits
    step time = fixed + α(R) + θ(tokens) with θ monotone. ENGINE_DIR is a converted checkpoint
    (the reference backend runs it directly).

    \b
    JSON: {"format": "dspark-trt/sps-table", "token_counts": [...], "step_time_ms": [...],
           "fixed_overhead_ms": x, "batch_sizes": [...], "batch_overhead_ms": [...], "meta": {...}}

    \b
    --backend tensorrt-llm runs on a GPU host with TensorRT-LLM (DSpark in its PyTorch backend):
    one LLM per draft length l (the model.yaml arguments of `repo --backend tensorrt-llm`, block
    cut to l; l = 0 without speculation), R requests with --context random prompt tokens per batch
    size; LLM.get_stats() gives each iteration's hostStepTimeMS, and only generation-only iterations
    with exactly R requests verifying l drafts count (median after --warmup; try --steps 64).
    Writes OUTPUT (ours, verify_batching "packed") and TensorRT-LLM's table for
    confidence_sps_table_path as read on its confidence-scheduling branch (PR #17056: the same
    fixed + alpha(R) + theta(tokens), _meta.engine = tp/ep/block/max_batch_size). Not written: the
    schema-v2 table of PR #18392, which only loads with a live fingerprint of the running engine
    that TensorRT-LLM's runtime produces. Without TensorRT-LLM it exits 4 and writes nothing.
    """
    from ..runtime.scheduler import FORMAT
    from .profile import profile_checkpoint

    # The table may live in ENGINE_DIR (where `repo` looks for it) but never replace another file there.
    check_output(out, inputs=[engine_dir], force=force, replaceable=lambda f: _json_field(f, "format") == FORMAT)
    if backend == "tensorrt-llm":
        from . import profile_trtllm as trt

        trt.check_tensorrt_llm()
        trtllm_output = trtllm_output or trt.trtllm_output_path(out)
        check_output(trtllm_output, inputs=[engine_dir], force=force, replaceable=trt.is_trtllm_table)
        table, trtllm_table = trt.profile_trtllm(engine_dir, batch_sizes=_ints(batch_sizes),
                                                 draft_lengths=_ints(verify_lengths) if verify_lengths else None,
                                                 gpus=gpus, max_batch_size=max_batch_size, prompt_tokens=context,
                                                 warmup=warmup, steps=steps)
        table.save(out)
        trt.write_trtllm_table(trtllm_table, trtllm_output)
        stdout.print(f"[green]✓[/] wrote {out} and {trtllm_output} (TensorRT-LLM {table.meta['tensorrt_llm_version']}"
                     f" on {table.meta['gpu']})")
        return
    table = profile_checkpoint(engine_dir, batch_sizes=_ints(batch_sizes),
                               verify_lengths=_ints(verify_lengths) if verify_lengths else None,
                               context=context, warmup=warmup, steps=steps)
    table.save(out)
    one, many = table.step_ms(1, 1), table.step_ms(table.batch_sizes[-1], table.token_counts[-1])
    stdout.print(f"[green]✓[/] wrote {out}: {one:.2f} ms for one token, {many:.2f} ms for "
                 f"{table.token_counts[-1]} tokens in a batch of {table.batch_sizes[-1]}")


def _json_field(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`, or None when the file is not such a JSON object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document.get(key) if isinstance(document, dict) else None


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"expected non-negative integers, got {text!r}")
    return values


@main.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out prompts: a JSON list of strings or one prompt per line. Default: built-in code.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration JSON to write. Default: ENGINE_DIR/draft/sts.json (picked up by the drafter).")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="Decoding temperature while collecting.")
@reports_errors
def calibrate(engine_dir: Path, prompts_file: Path | None, out: Path | None, max_new_tokens: int,
              temperature: float) -> None:
    """Fit STS temperatures for the drafter's confidence head, with the target in the loop.

    Decodes the prompts verifying full blocks, records raw confidence logits and accepted positions,
    fits one temperature per block position (position by position, earlier ones frozen, minimising
    the calibration error of the cumulative product) on two thirds of the rounds, and reports the
    ECE on the held-out third before and after.
    """
    from ..runtime.calibration import CALIBRATION_FILE, KEY
    from .calibrate import builtin_prompts, encode, read_prompts
    from .calibrate import calibrate as run_calibration

    out = out or engine_dir / "draft" / CALIBRATION_FILE
    # Writing ENGINE_DIR/draft/sts.json is the point (the drafter picks it up); replacing any other
    # file of the checkpoint is not. Recalibrating replaces the earlier calibration without --force.
    check_output(out, inputs=[engine_dir, prompts_file], force=True,
                 replaceable=lambda f: _json_field(f, KEY) is not None)
    texts = read_prompts(prompts_file) if prompts_file else builtin_prompts()
    report = run_calibration(engine_dir, encode(engine_dir, texts), out, max_new_tokens=max_new_tokens,
                             temperature=temperature)
    table = Table("position", "temperature", "acceptance", "ECE before", "ECE after", title="STS calibration "
                  f"({report['rounds']} rounds, ECE on the held-out third)")
    for k, (t, a, b, c) in enumerate(zip(report["temperatures"], report["acceptance"], report["ece_before"],
                                         report["ece_after"], strict=True)):
        table.add_row(str(k + 1), f"{t:.3f}", f"{a:.3f}", f"{b:.4f}", f"{c:.4f}")
    stdout.print(table)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    stdout.print(f"[green]✓[/] wrote {out}: mean ECE {mean(report['ece_before']):.4f} -> "
                 f"{mean(report['ece_after']):.4f}")


@main.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Repository to write.")
@click.option("--layout", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: reference backend on CPU. gpu: instance groups and device ids for N GPUs.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(min=1), help="GPUs (gpu layout).")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor parallelism of verify (default: the checkpoint's).")
@click.option("--num-slots", default=16, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together (in-flight batch); more wait in a queue.")
@click.option("--max-prompt-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--scheduler", type=click.Choice(["paper", "production"]), default="production", show_default=True,
              help="Confidence scheduler: production = last round's confidences, global best, full block unless "
                   "a shorter plan gains --min-gain (robust to cost-model error); paper = Algorithm 1 on this "
                   "round's confidences.")
@click.option("--min-gain", default=0.04, show_default=True, help="Production scheduler's minimum predicted gain.")
@click.option("--sps-table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Cost table from `dspark-build profile` (default: ENGINE_DIR/sps_table.json if present).")
@click.option("--live-costs/--profiled-costs", default=True, show_default=True,
              help="Correct the cost table by the times served rounds actually take (calls between models, "
                   "responses), or plan with the profiled table alone.")
@click.option("--draft-threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU threads of the reference drafter (1 suits a CPU shared with verify; see its config).")
@click.option("--drafter", type=click.Choice(["orchestrator", "model"]),
              help="Where the drafter runs: orchestrator = inside the dspark orchestrator's process (no process "
                   "crossing per round; cpu layout only), model = the dspark_draft model, its own process. "
                   "[default: orchestrator in the cpu layout, model in the gpu layout]")
@click.option("--backend", type=click.Choice(["dspark", "tensorrt-llm"]), default="dspark", show_default=True,
              help="dspark: our orchestrator and models (--layout). tensorrt-llm: TensorRT-LLM's PyTorch backend "
                   "behind tensorrtllm_backend's llmapi model on --gpus GPUs (--num-slots = its max batch size).")
@click.option("--trtllm-fields", type=click.Choice(["installed", "pr15808"]),
              help="tensorrt-llm: the TensorRT-LLM release whose DSparkDecodingConfig fields model.yaml uses "
                   "(default: the installed one, else pr15808 = TensorRT-LLM main, no confidence scheduling).")
@click.option("--llmapi-model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="tensorrt-llm: tensorrtllm_backend's all_models/llmapi/tensorrt_llm, whose 1/*.py are copied "
                   "(in NVIDIA's container: /app/all_models/llmapi/tensorrt_llm).")
@click.option("--trtllm-sps-table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tensorrt-llm, releases with confidence scheduling: TensorRT-LLM's cost table for the served "
                   "engine, from `dspark-build profile --backend tensorrt-llm` (its --trtllm-output) or "
                   "TensorRT-LLM's own profiler.")
@click.option("--force", is_flag=True, help="Replace the repository if it exists.")
@reports_errors
def repo(engine_dir: Path, out: Path, layout: str, gpus: int, tp: int | None, num_slots: int, max_prompt_tokens: int,
         max_new_tokens: int, scheduler: str, min_gain: float, sps_table: Path | None, live_costs: bool,
         draft_threads: int, drafter: str | None, backend: str, trtllm_fields: str | None,
         llmapi_model: Path | None, trtllm_sps_table: Path | None, force: bool) -> None:
    """Write a Triton model repository serving ENGINE_DIR.

    \b
    ensemble        text_input | input_ids (+ max_tokens, temperature, seed, stop, stop_ids,
                    speculation, gamma) -> streamed text_output, output_ids; finish_reason and
                    stats on the final response
      preprocessing tokenizer
      dspark        decoupled orchestrator: in-flight batching, confidence scheduler; in the
                    cpu layout it also runs the drafter (per-slot context)
      dspark_draft  the drafter as a model of its own (gpu layout, or --drafter model)
      dspark_verify target (per-slot KV cache)
      postprocessing incremental detokenisation

    With --backend tensorrt-llm: the same ensemble over preprocessing, dspark_llmapi (bridge) and
    tensorrt_llm (tensorrtllm_backend's llmapi model, model.yaml generated; serve --world-size N).
    """
    from .repo import build_repo

    if backend == "tensorrt-llm":
        from .trtllm import build_trtllm_repo

        values = build_trtllm_repo(engine_dir, out, gpus=gpus, release=trtllm_fields, llmapi_model=llmapi_model,
                                   sps_table=trtllm_sps_table, max_batch_size=num_slots,
                                   max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, force=force)
        missing = "" if values["llmapi_model"] else " (no --llmapi-model: copy its 1/*.py into tensorrt_llm/1/)"
        stdout.print(f"[green]✓[/] wrote {out}: TensorRT-LLM route, tensor parallel {gpus}, DSparkDecodingConfig "
                     f"fields of {values['release']}{missing}; serve with --world-size {gpus}")
        return

    if layout == "gpu" and drafter == "orchestrator":
        raise click.BadParameter("the gpu layout places the drafter on verify's rank-0 GPU as the dspark_draft "
                                 "model; the orchestrator runs on the CPU (use --drafter model)",
                                 param_hint="--drafter")
    if sps_table is None and (engine_dir / "sps_table.json").is_file():
        sps_table = engine_dir / "sps_table.json"
    values = build_repo(engine_dir, out, layout=layout, gpus=gpus, tp=tp, num_slots=num_slots,
                        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, scheduler=scheduler,
                        min_gain=min_gain, sps_table=sps_table, live_costs=live_costs, draft_threads=draft_threads,
                        drafter=drafter, force=force)
    table = f"cost table {sps_table}" if sps_table else "no cost table (auto verifies every draft)"
    stdout.print(f"[green]✓[/] wrote {out}: layout {layout}, verify tp={values['tp']}, drafter in the "
                 f"{values['drafter']}, {num_slots} slots, {table}")


@main.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gpus", default=8, show_default=True, type=click.IntRange(min=1), help="GPUs per node.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1),
              help="1: a `docker run` line for this host. More: Kubernetes LeaderWorkerSet objects (--lws).")
@click.option("--release", help="tritonserver:<release>-trtllm-python-py3 (default: pinned in builder/deploy.py).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="This project's source tree, installed inside the container.")
@click.option("--run", is_flag=True, help="nodes 1: run the docker command instead of printing it.")
@click.option("--lws", "lws_out", type=click.Path(path_type=Path), help="nodes > 1: YAML file to write.")
@click.option("--image", help="nodes > 1: an image with kubectl + kubessh built from NVIDIA's (see README).")
@click.option("--models-claim", default="dspark-models", show_default=True,
              help="nodes > 1: PersistentVolumeClaim holding the checkpoints and --source, at their paths here.")
@reports_errors
def deploy(engine_dir: Path, gpus: int, nodes: int, release: str | None, source: Path, run: bool,
           lws_out: Path | None, image: str | None, models_claim: str) -> None:
    """Serve ENGINE_DIR's checkpoint with TensorRT-LLM on GPU hosts (NVIDIA's Triton TensorRT-LLM container).

    The container writes the repository (repo --backend tensorrt-llm, its own TensorRT-LLM's fields)
    and serves it under mpirun, one rank per GPU (serve --world-size).
    """
    import os
    import shlex

    from .deploy import TRITON_RELEASE, docker_run_command, lws_manifests

    release = release or TRITON_RELEASE
    if nodes == 1:
        command = docker_run_command(engine_dir, gpus=gpus, release=release, source=source)
        stdout.print(shlex.join(command), soft_wrap=True, highlight=False, markup=False)
        if run:
            os.execvp(command[0], command)
        return
    if lws_out is None:
        raise click.UsageError("--nodes > 1 writes Kubernetes objects: give --lws FILE")
    import yaml

    from ..runtime.atomic import check_output, write_text_atomic

    check_output(lws_out, inputs=[engine_dir, source], force=True)
    objects = lws_manifests(engine_dir, nodes=nodes, gpus_per_node=gpus, source=source, release=release,
                            models_claim=models_claim, image_name=image)
    write_text_atomic(lws_out, yaml.safe_dump_all(objects, sort_keys=False))
    stdout.print(f"[green]✓[/] wrote {lws_out}: LeaderWorkerSet of {nodes} pods x {gpus} GPUs "
                 f"(kubectl apply -f {lws_out})")


@main.command()
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost unless told).")
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--detach", is_flag=True, help="Return once ready, leaving the server running (see `stop`).")
@click.option("--pid-file", type=click.Path(path_type=Path),
              help="Server state file: pid, ports, shared-memory prefix (default: "
                   "~/.local/state/dspark-trt/tritonserver-HTTP_PORT.json; $DSPARK_STATE_DIR overrides the folder).")
@click.option("--log", "log_file", type=click.Path(path_type=Path), help="Server log (default: next to REPO).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for readiness.")
@click.option("--world-size", type=click.IntRange(min=1),
              help="TensorRT-LLM-route repository: run one tritonserver per GPU under mpirun (= its tensor "
                   "parallel size), as tensorrtllm_backend's launch_triton_server.py; runs in the foreground.")
@click.option("--mpi-hosts", help="With --world-size over several nodes: their host names, rank 0's first.")
@click.option("--print-command", is_flag=True, help="With --world-size: print the mpirun command, start nothing.")
@reports_errors
def serve(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, detach: bool, pid_file: Path,
          log_file: Path | None, timeout: float, world_size: int | None, mpi_hosts: str | None,
          print_command: bool) -> None:
    """Run tritonserver on REPO and wait until every model is ready.

    Uses the system tritonserver if there is one, else the one bundled with nvidia-pytriton
    (preparing its Python backend for this environment). Binds to 127.0.0.1 unless --host says
    otherwise. Exit code 5 if the server fails to start (its log is printed).
    """
    from .serve import ServerError, start_server

    if world_size is not None:
        import os
        import shlex

        from .serve import find_tritonserver
        from .trtllm import check_trtllm_repo, mpirun_command

        check_trtllm_repo(repo, world_size)
        command = mpirun_command(repo, world_size, tritonserver=str(find_tritonserver()[0]), host=host,
                                 http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                 mpi_hosts=mpi_hosts.split(",") if mpi_hosts else None)
        stdout.print(shlex.join(command), soft_wrap=True, highlight=False, markup=False)
        if not print_command:
            os.execvp(command[0], command)
        return
    try:
        server = start_server(repo, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              log=log_file, timeout=timeout, state_file=pid_file)
    except ServerError as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(EXIT_SERVER)
    for name, url in server.endpoints.items():
        stdout.print(f"  {name:8s} {url}")
    stdout.print(f"[green]✓[/] tritonserver ready (pid {server.process.pid}, log {server.log})")
    if detach:
        return
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()  # also what a crashed server left: model processes, shared memory, its state file


@main.command()
@click.option("--http-port", default=8000, show_default=True, help="The server to stop, by its HTTP port.")
@click.option("--pid-file", type=click.Path(path_type=Path), help="The server to stop, by its state file.")
@click.option("--all", "stop_all", is_flag=True, help="Every server this user started (all state files).")
def stop(http_port: int, pid_file: Path | None, stop_all: bool) -> None:
    """Stop a server started with `serve`, from any directory: tritonserver, its model processes and
    their shared memory, also what a crashed or killed server left behind."""
    from .serve import clean_stale, default_state_file, process_alive, read_state, state_dir, stop_process

    wanted = pid_file or default_state_file(http_port)
    files = sorted(state_dir().glob("tritonserver-*.json")) if stop_all else [wanted]
    states = [(f, read_state(f)) for f in files if f.is_file()]
    if not states:
        cleaned = clean_stale()
        left = f"; removed what {len(cleaned)} dead server(s) left behind" if cleaned else ""
        stdout.print(f"no server running (no state file {'in ' + str(state_dir()) if stop_all else wanted}){left}")
        return
    for path, state in states:
        running = process_alive(state["pid"])
        stop_process(state["pid"], shm_prefix=state.get("shm_prefix", ""))
        path.unlink(missing_ok=True)
        stdout.print(f"[green]✓[/] stopped tritonserver (pid {state['pid']})" if running
                     else f"tritonserver (pid {state['pid']}) was not running; removed what it left behind")


for command in (plugins, export, engine, eval_cmd):
    main.add_command(command)

if __name__ == "__main__":
    main()
