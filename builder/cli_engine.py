"""`dspark-build plugins | export | engine`: standalone click commands, registered by cli.py.

Exit codes as in cli_common.py (0 ok, 1 invalid input, 2 usage, 3 output exists) plus 4: a GPU-side
dependency (TensorRT, TensorRT-LLM) is not installed; the message names the install command.
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import reports_errors, stdout


def _csv(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise click.BadParameter(f"expected a comma-separated list, got {text!r}")
    return values


@click.command("plugins")
@click.option("--arch", "archs", default="sm_90,sm_100", show_default=True,
              help="Comma-separated GPU architectures to compile for.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Converted checkpoint: compile only the variants its drafter needs (head, rank, γ).")
@click.option("--dtype", "dtypes", default="fp32,bf16", show_default=True,
              help="Comma-separated weight/activation types to specialise for (fp32, bf16, fp16).")
@click.option("--ptx-version", type=int, help="Cap the PTX ISA (e.g. 86 for CUDA 12.8 drivers); default: Triton's.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@reports_errors
def plugins(archs: str, out: Path, ckpt: Path | None, dtypes: str, ptx_version: int | None, force: bool) -> None:
    """Compile the DSpark kernels (MarkovSample, DSparkConfidence, DSparkSchedule) to PTX and cubin.

    No GPU needed: Triton compiles for an explicit target. Writes OUT/<arch>/<variant>.{ptx,cubin} and
    OUT/manifest.json (kernel names, launch metadata, signatures, compile times).
    """
    from ..plugins import aot
    from ..runtime.atomic import check_output

    check_output(out, inputs=[ckpt], force=force)
    arch_list = _csv(archs)
    for arch in arch_list:
        try:
            aot.arch_number(arch)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--arch") from None
    kinds = tuple(_csv(dtypes))
    if unknown := set(kinds) - {"fp32", "bf16", "fp16"}:
        raise click.BadParameter(f"unknown dtype(s) {sorted(unknown)}", param_hint="--dtype")
    specs = aot.specs_for_checkpoint(ckpt) if ckpt else aot.default_specs()
    specs = [s for s in specs if s.plugin == "DSparkSchedule" or s.signature.get("hidden_ptr", "").lstrip("*") in kinds]
    manifest = aot.compile_plugins(out, arch_list, specs, force=force, ptx_version=ptx_version)
    seconds = sum(k["compile_seconds"] for k in manifest["kernels"])
    stdout.print(f"[green]✓[/] compiled {len(specs)} kernel variants for {', '.join(arch_list)} into {out} "
               f"({seconds:.1f} s of compilation)")


@click.command("export")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--schedule-mode", type=click.Choice(["paper", "production"]), default="paper", show_default=True,
              help="Which scheduler schedule.onnx runs (Algorithm 1, or the production variant).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@reports_errors
def export(ckpt: Path, out: Path, schedule_mode: str, force: bool) -> None:
    """Export the Qwen3 drafter as ONNX with the DSpark kernels as TensorRT plugin nodes.

    \b
    OUT/draft.onnx      backbone + MarkovSample + DSparkConfidence (one drafting round)
    OUT/context.onnx    target features -> draft-layer keys/values (fills the draft cache)
    OUT/schedule.onnx   DSparkSchedule (verify lengths from survival and the SPS table)
    Weights are external data (*.onnx.data); every graph passes onnx.checker's full check.
    """
    import contextlib
    import io

    from .export_onnx import check_onnx, export_onnx

    with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx reports every step on stdout
        manifest = export_onnx(ckpt, out, force=force, schedule_mode=schedule_mode)
    for graph in manifest["graphs"].values():
        check_onnx(out / graph["file"])
        ops = ", ".join(n["op"] for n in graph["plugin_nodes"]) or "no plugin nodes"
        stdout.print(f"  {graph['file']}: {ops}")
    stdout.print(f"[green]✓[/] exported the drafter to {out} (onnx.checker full check passed)")


@click.command("engine")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["reference", "tensorrt"]), default="reference", show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Engine directory.")
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(1, 256),
              help="TensorRT: largest batch of live requests (DSparkSchedule holds at most 256).")
@click.option("--max-input-len", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--max-seq-len", default=8192, show_default=True, type=click.IntRange(min=2))
@click.option("--force", is_flag=True, help="Replace the engine directory if it exists.")
@reports_errors
def engine(ckpt: Path, backend: str, out: Path, max_batch_size: int, max_input_len: int, max_seq_len: int,
           force: bool) -> None:
    """Build what the server loads from a converted checkpoint.

    \b
    reference  ENGINE/manifest.json + ENGINE/checkpoint/ (hard links): the PyTorch backend, any machine.
    tensorrt   Qwen3: draft/context/schedule TensorRT plans with the dspark plugins (the drafter of our
               own orchestrator on a GPU). Needs TensorRT (exit code 4 if absent).
    Target + drafter on TensorRT-LLM (any family): no engine step, `repo ENGINE_DIR --backend tensorrt-llm`.
    """
    from .engine import build_engine

    manifest = build_engine(ckpt, out, backend=backend, force=force, max_batch_size=max_batch_size,
                            max_input_len=max_input_len, max_seq_len=max_seq_len)
    stdout.print(f"[green]✓[/] {manifest['family']} {backend} engine written to {out}")
