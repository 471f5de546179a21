"""Ahead-of-time compilation of the DSpark kernels to PTX and cubin, without a GPU.

Triton compiles for an explicit `GPUTarget("cuda", 90 | 100, 32)`: its LLVM backend emits PTX and its
bundled `ptxas` assembles the cubin, neither of which needs a device. `dspark-build plugins` writes

    DIR/manifest.json                 format dspark-trt/plugins: one entry per (variant, arch)
    DIR/sm_90/<variant>.ptx|.cubin    the kernel as Triton compiled it (for Triton-style launchers)
    DIR/sm_90/<variant>.tensorrt.ptx  the same kernel declaring only the arguments TensorRT passes

A *variant* is one specialisation of a kernel: its pointer types and compile-time constants (Markov
head kind, noise source, padded rank, tile sizes). `trt.py` compiles the same specs on the build
machine, so what is tested here is what TensorRT gets.

Compilation needs Triton in GPU mode; when this process runs the interpreter (tests), the work is
re-run in a child process (`python -m dspark_trt.plugins.aot`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .launch import SCHEDULE_MAX_ROWS, confidence_constants, markov_constants, next_pow2, schedule_constants

ARCHS = ("sm_90", "sm_100")  # what `dspark-build plugins` targets by default; any sm_NN compiles
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
NUM_WARPS = 4


@dataclass(frozen=True)
class KernelSpec:
    """Everything Triton needs to compile one variant, and TensorRT to launch it."""

    plugin: str  # MarkovSample | DSparkConfidence | DSparkSchedule
    kernel: str  # function name in kernels.py
    variant: str  # file-name-safe identifier
    signature: dict[str, str] = field(hash=False)  # runtime arguments in kernel order -> Triton type
    constexprs: dict[str, Any] = field(hash=False)


def markov_spec(kind: str, philox: bool, rank: int, weight_dtype: str = "fp32", hidden_dtype: str = "fp32"
                ) -> KernelSpec:
    from .kernels import KIND_IDS

    w, h = f"*{weight_dtype}", f"*{hidden_dtype}"
    signature = {
        "base_logits_ptr": "*fp32", "hidden_ptr": h, "anchors_ptr": "*i32", "temperatures_ptr": "*fp32",
        "noise_ptr": "*i32" if philox else "*fp32", "w1_ptr": w, "w2_ptr": w, "proj_w_ptr": w, "proj_b_ptr": w,
        "gamma": "i32", "vocab": "i32", "rank": "i32", "dim": "i32",
        "tokens_ptr": "*i32", "probs_ptr": "*fp32", "emb_ptr": "*fp32", "state_ptr": "*fp32",
    }
    consts = {"KIND": KIND_IDS[kind], "PHILOX": philox, **markov_constants(rank)}
    noise = "philox" if philox else "uniforms"
    variant = f"markov_sample_{kind}_{noise}_r{consts['R_PAD']}_{weight_dtype}_{hidden_dtype}"
    return KernelSpec("MarkovSample", "markov_sample_kernel", variant, signature, consts)


def confidence_spec(with_markov: bool, weight_dtype: str = "fp32", hidden_dtype: str = "fp32") -> KernelSpec:
    signature = {
        "hidden_ptr": f"*{hidden_dtype}", "emb_ptr": "*fp32", "weight_ptr": f"*{weight_dtype}",
        "bias_ptr": f"*{weight_dtype}", "sts_ptr": "*fp32", "gamma": "i32", "dim": "i32", "rank": "i32",
        "logits_ptr": "*fp32", "conf_ptr": "*fp32", "survival_ptr": "*fp32",
    }
    markov = "markov" if with_markov else "hidden"
    return KernelSpec("DSparkConfidence", "dspark_confidence_kernel",
                      f"dspark_confidence_{markov}_{weight_dtype}_{hidden_dtype}", signature,
                      {"WITH_MARKOV": with_markov, **confidence_constants()})


def schedule_spec(production: bool, gamma: int, max_rows: int = SCHEDULE_MAX_ROWS) -> KernelSpec:
    signature = {"survival_ptr": "*fp32", "token_counts_ptr": "*fp32", "step_time_ptr": "*fp32",
                 "batch_sizes_ptr": "*fp32", "batch_overhead_ptr": "*fp32", "scalars_ptr": "*fp32",
                 "rows": "i32", "gamma": "i32", "n_tokens": "i32", "n_batches": "i32", "lengths_ptr": "*i32"}
    consts = {"PRODUCTION": production, **schedule_constants(max_rows, gamma)}
    mode = "production" if production else "paper"
    return KernelSpec("DSparkSchedule", "dspark_schedule_kernel",
                      f"dspark_schedule_{mode}_g{next_pow2(gamma, 1)}_r{consts['R_PAD']}", signature, consts)


def default_specs(rank: int = 256, gamma: int = 7, kinds: tuple[str, ...] = ("vanilla", "gated", "rnn"),
                  dtypes: tuple[str, ...] = ("fp32", "bf16"), with_markov: bool = True,
                  noise: tuple[bool, ...] = (True, False)) -> list[KernelSpec]:
    """Variants for drafters of this shape: every head kind and noise source (Philox, uniforms), both schedulers."""
    specs = [markov_spec(kind, philox, rank, dt, dt) for kind in kinds for philox in noise for dt in dtypes]
    specs += [confidence_spec(with_markov, dt, dt) for dt in dtypes]
    specs += [schedule_spec(production, gamma) for production in (False, True)]
    return specs


def specs_for_checkpoint(ckpt: Path) -> list[KernelSpec]:
    """Only the variants the converted checkpoint's drafter needs: its head, rank and γ, fp32 and bf16, Philox
    noise (what the exported draft graph uses; supplied uniforms are for tests)."""
    from ..runtime.errors import CheckpointError
    from ..runtime.manifest import read_manifest

    dspark = read_manifest(ckpt, "checkpoint").get("dspark")
    if not dspark:
        raise CheckpointError(Path(ckpt) / "manifest.json", "checkpoint has no drafter", subject="dspark",
                              expected="convert with --drafter")
    kind = dspark.get("markov_head_type", "vanilla")
    if kind not in ("vanilla", "gated", "rnn"):
        raise CheckpointError(Path(ckpt) / "manifest.json", "no MarkovSample kernel for this Markov head",
                              subject="dspark.markov_head_type", found=kind, expected="vanilla | gated | rnn")
    return default_specs(rank=int(dspark["markov_rank"]), gamma=int(dspark["block_size"]), kinds=(kind,),
                         with_markov=bool(dspark.get("confidence_head_with_markov", True)), noise=(True,))


def arch_number(arch: str) -> int:
    """`sm_90` -> 90. Below sm_80 is refused; the compiled kernels are checked for sm_90 and sm_100."""
    digits = arch.removeprefix("sm_").rstrip("a")
    if not arch.startswith("sm_") or not digits.isdigit() or int(digits) < 80:
        raise ValueError(f"unsupported architecture {arch!r}; expected sm_NN with NN >= 80, e.g. {', '.join(ARCHS)}")
    return int(digits)


@dataclass
class Compiled:
    spec: KernelSpec
    arch: str
    name: str  # the kernel's symbol in PTX / cubin
    ptx: str
    cubin: bytes
    num_warps: int
    shared_mem: int
    ptx_version: str
    seconds: float
    tensorrt_ptx: str  # `ptx` with the entry TensorRT's AOT launch matches (tensorrt_entry)


def compile_spec(spec: KernelSpec, arch: str, ptx_version: int | None = None) -> Compiled:
    """Compile one variant for one architecture (`sm_90`, `sm_100`). Needs Triton in GPU mode."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels
    from .interpret import InterpreterModeError

    if triton.knobs.runtime.interpret:
        raise InterpreterModeError("cannot compile while this process runs Triton's interpreter")
    capability = arch_number(arch)
    start = time.perf_counter()
    source = triton.compiler.ASTSource(fn=getattr(kernels, spec.kernel), signature=dict(spec.signature),
                                       constexprs=dict(spec.constexprs))
    # No FMA contraction: keeps GPU rounding closest to the interpreter the kernels are tested under.
    options: dict[str, Any] = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    meta = compiled.metadata
    # TensorRT's AOT launch has no buffers to give Triton's hidden scratch pointers (see tensorrt_entry).
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(f"{spec.variant}: kernel needs {scratch}={getattr(meta, scratch)}; "
                               "TensorRT's AOT launch cannot provide it")
    ptx = compiled.asm["ptx"]
    version = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".version")), "?")
    return Compiled(spec, arch, meta.name, ptx, compiled.asm["cubin"], meta.num_warps, meta.shared, version,
                    time.perf_counter() - start, tensorrt_entry(ptx, meta.name, len(spec.signature)))


def tensorrt_entry(ptx: str, kernel: str, declared: int) -> str:
    """`ptx` whose entry declares only the kernel's own `declared` arguments.

    Triton appends hidden parameters after the declared ones (`global_scratch`, `profile_scratch`;
    its own launchers and `triton/tools/compile.py` pass them). TensorRT's AOT launch passes exactly
    the input pointers, the `SymIntExprs` and the output pointers (`_TemplateAOTPlugin.get_launch_params`
    sets `nbSymExprs = len(extra_args)`, nothing more), while `cuLaunchKernel` reads one argument per
    parameter the entry declares: the hidden ones would be read past the end of TensorRT's argument
    array. So the entry handed to TensorRT drops them, which is only valid because the kernel never
    reads them (checked here; their scratch sizes are 0, checked in `compile_spec`).
    """
    header = re.search(rf"\.entry {re.escape(kernel)}\((.*?)\)", ptx, re.DOTALL)
    if header is None:
        raise RuntimeError(f"{kernel}: no `.entry {kernel}(...)` in the compiled PTX")
    params = [line for line in header.group(1).splitlines() if line.strip()]
    names = [line.strip().rstrip(",").split()[-1] for line in params]
    if names[:declared] != [f"{kernel}_param_{i}" for i in range(declared)]:
        raise RuntimeError(f"{kernel}: PTX parameters {names} do not start with the {declared} declared arguments")
    body = ptx[header.end():]
    used = [name for name in names[declared:] if re.search(rf"\b{re.escape(name)}\b", body)]
    if used:
        raise RuntimeError(f"{kernel}: the kernel reads Triton's hidden parameters {used}; TensorRT's AOT launch "
                           "does not pass them")
    kept = "\n".join(params[:declared]).rstrip(",")
    return ptx[:header.start(1)] + "\n" + kept + "\n" + ptx[header.end(1):]


def compile_plugins(out: Path, archs: list[str], specs: list[KernelSpec], *, force: bool = False,
                    ptx_version: int | None = None) -> dict[str, Any]:
    """Compile every spec for every arch into `out` (atomically) and return the manifest."""
    from ..runtime.atomic import OutputExistsError
    from .interpret import interpreter_active

    if Path(out).exists() and not force:
        raise OutputExistsError(Path(out).absolute())
    if interpreter_active():
        return _compile_in_child(out, archs, specs, force=force, ptx_version=ptx_version)

    import triton

    from ..runtime.atomic import atomic_directory
    from ..runtime.manifest import write_manifest

    entries = []
    with atomic_directory(out, force=force) as tmp:
        for arch in archs:
            (tmp / arch).mkdir()
            for spec in specs:
                result = compile_spec(spec, arch, ptx_version)
                ptx_path, cubin_path = tmp / arch / f"{spec.variant}.ptx", tmp / arch / f"{spec.variant}.cubin"
                trt_ptx_path = tmp / arch / f"{spec.variant}.tensorrt.ptx"
                ptx_path.write_text(result.ptx)
                trt_ptx_path.write_text(result.tensorrt_ptx)
                cubin_path.write_bytes(result.cubin)
                entries.append({
                    "plugin": spec.plugin, "variant": spec.variant, "arch": arch, "kernel_name": result.name,
                    "ptx": f"{arch}/{ptx_path.name}", "cubin": f"{arch}/{cubin_path.name}",
                    "tensorrt_ptx": f"{arch}/{trt_ptx_path.name}",
                    "ptx_version": result.ptx_version, "num_warps": result.num_warps,
                    "shared_mem": result.shared_mem, "signature": spec.signature, "constexprs": spec.constexprs,
                    "cubin_sha256": hashlib.sha256(result.cubin).hexdigest(),
                    "compile_seconds": round(result.seconds, 3),
                })
        manifest = write_manifest(tmp, "plugins", archs=archs, triton=triton.__version__, kernels=entries,
                                  launch="TensorRT AOT order: input pointers, int32 scalars, output pointers; "
                                         "grid (B,) for MarkovSample / DSparkConfidence, (1,) for DSparkSchedule")
    return manifest


def _compile_in_child(out: Path, archs: list[str], specs: list[KernelSpec], *, force: bool,
                      ptx_version: int | None) -> dict[str, Any]:
    from .interpret import ENV

    request = {"out": str(out), "archs": archs, "force": force, "ptx_version": ptx_version,
               "specs": [asdict(spec) for spec in specs]}
    env = {k: v for k, v in os.environ.items() if k != ENV}
    done = subprocess.run([sys.executable, "-m", "dspark_trt.plugins.aot"], input=json.dumps(request), text=True,
                          capture_output=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compilation failed in a child process:\n{done.stderr[-4000:]}")
    return json.loads(Path(out, "manifest.json").read_text())


def _main() -> None:
    request = json.loads(sys.stdin.read())
    specs = [KernelSpec(**spec) for spec in request["specs"]]
    compile_plugins(Path(request["out"]), request["archs"], specs, force=request["force"],
                    ptx_version=request["ptx_version"])


if __name__ == "__main__":
    _main()
