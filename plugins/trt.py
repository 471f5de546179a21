"""The DSpark kernels as TensorRT plugins (`tensorrt.plugin`, namespace "dspark"). GPU machines only.

`register()` imports TensorRT (MissingDependencyError with the install command when it is absent)
and defines, per plugin, its shape/type descriptor (`@trtp.register`), an ahead-of-time implementation
(`@trtp.aot_impl`: Triton compiles the kernel for the build GPU and TensorRT embeds the PTX, so the
engine runs without Python) and a just-in-time fallback (`@trtp.impl`, launches the same kernel from
Python). Nothing here runs on machines without TensorRT; everything it relies on (kernel specs,
compilation, launch metadata) is in `aot.py` / `launch.py` and tested there.

Launch convention (TensorRT's AOT plugins): the kernel receives the input pointers, then the
`SymIntExprs` extra arguments (int32 only), then the output pointers; `KernelLaunchParams` give the
grid and block. Plugin attributes are not serialised into AOT engines; they only select the variant.
The PTX handed to TensorRT declares exactly those parameters (`aot.Compiled.tensorrt_ptx`).

No `from __future__ import annotations` here: `tensorrt.plugin` validates the decorated signatures
with `issubclass(annotation, TensorDesc)` and `annotation == str`, so the annotations must be the real
classes, not strings.
"""

import ctypes
import functools

from . import aot
from .deps import MissingDependencyError, require_tensorrt
from .launch import SCHEDULE_MAX_ROWS
from .onnx_ops import PLUGIN_NAMESPACE

__all__ = ["register", "MissingDependencyError"]


def _driver_ptx_version() -> int | None:
    """Highest PTX ISA the installed driver loads (TensorRT JIT-compiles the PTX we hand it)."""
    try:
        from triton.backends.nvidia.compiler import ptx_get_version

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return ptx_get_version(f"{version.value // 1000}.{(version.value % 1000) // 10}")
    except (OSError, ImportError, RuntimeError):
        return None


def _device_arch() -> str:
    import triton

    return f"sm_{triton.runtime.driver.active.get_current_target().arch}"


def _constant(expr, fallback: int | None = None) -> int:
    """The value of a build-time-constant `ShapeExpr` (`is_constant` is a property, `constant_value()` a method)."""
    if expr.is_constant:
        return int(expr.constant_value())
    if fallback is None:
        raise ValueError("this dimension must be static (a build-time constant) for the DSpark plugins")
    return fallback


@functools.cache
def register() -> None:
    """Register the dspark plugins with TensorRT's plugin registry (once per process)."""
    require_tensorrt()
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "fp32", trt.bfloat16: "bf16", trt.float16: "fp16"}
    ns = PLUGIN_NAMESPACE

    def compile_for_device(spec: aot.KernelSpec) -> aot.Compiled:
        return aot.compile_spec(spec, _device_arch(), _driver_ptx_version())

    # What an aot_impl returns: kernel name, PTX, launch parameters, the int32 scalar arguments.
    AotKernel = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def launch(compiled: aot.Compiled, grid_x, extra: list) -> AotKernel:
        params = trtp.KernelLaunchParams()
        params.grid_x = grid_x
        params.block_x = compiled.num_warps * 32
        params.shared_mem = compiled.shared_mem
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])
        return compiled.name.encode(), compiled.tensorrt_ptx.encode(), params, args

    # -- MarkovSample ----------------------------------------------------------------------------
    @trtp.register(f"{ns}::MarkovSample")
    def _markov_desc(base_logits: trtp.TensorDesc, hidden: trtp.TensorDesc, anchors: trtp.TensorDesc,
                     temperatures: trtp.TensorDesc, noise: trtp.TensorDesc, w1: trtp.TensorDesc, w2: trtp.TensorDesc,
                     proj_weight: trtp.TensorDesc, proj_bias: trtp.TensorDesc, kind: str, noise_source: str
                     ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        batch, gamma, _ = base_logits.shape_expr
        rank = w1.shape_expr[1]
        return (trtp.from_shape_expr((batch, gamma), dtype=trt.int32), base_logits.like(),
                trtp.from_shape_expr((batch, gamma, rank), dtype=trt.float32),
                trtp.from_shape_expr((batch, rank), dtype=trt.float32))

    @trtp.aot_impl(f"{ns}::MarkovSample")
    def _markov_aot(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_weight, proj_bias, kind: str,
                    noise_source: str, outputs, tactic: int) -> AotKernel:
        rank = _constant(w1.shape_expr[1])
        spec = aot.markov_spec(kind, noise_source == "philox", rank, dtype_names[w1.dtype], dtype_names[hidden.dtype])
        shape = base_logits.shape_expr
        return launch(compile_for_device(spec), shape[0], [shape[1], shape[2], w1.shape_expr[1], hidden.shape_expr[2]])

    @trtp.impl(f"{ns}::MarkovSample")
    def _markov_jit(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_weight, proj_bias, kind: str,
                    noise_source: str, outputs, stream: int) -> None:
        import torch

        from .launch import markov_sample

        t = functools.partial(torch.as_tensor, device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            projection = (None, None) if kind == "vanilla" else (t(proj_weight), t(proj_bias))
            out = markov_sample(t(base_logits), t(hidden), t(anchors), t(temperatures), t(noise), t(w1), t(w2),
                                *projection, kind=kind)
            for dst, src in zip(outputs, (out.tokens, out.probs, out.markov_emb, out.state), strict=True):
                t(dst).copy_(src)

    # -- DSparkConfidence ------------------------------------------------------------------------
    @trtp.register(f"{ns}::DSparkConfidence")
    def _confidence_desc(hidden: trtp.TensorDesc, markov_emb: trtp.TensorDesc, weight: trtp.TensorDesc,
                         bias: trtp.TensorDesc, sts_temperatures: trtp.TensorDesc, with_markov: int
                         ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        batch, gamma, _ = hidden.shape_expr
        return tuple(trtp.from_shape_expr((batch, gamma), dtype=trt.float32) for _ in range(3))

    @trtp.aot_impl(f"{ns}::DSparkConfidence")
    def _confidence_aot(hidden, markov_emb, weight, bias, sts_temperatures, with_markov: int, outputs,
                        tactic: int) -> AotKernel:
        spec = aot.confidence_spec(bool(with_markov), dtype_names[weight.dtype], dtype_names[hidden.dtype])
        shape = hidden.shape_expr
        return launch(compile_for_device(spec), shape[0], [shape[1], shape[2], markov_emb.shape_expr[2]])

    @trtp.impl(f"{ns}::DSparkConfidence")
    def _confidence_jit(hidden, markov_emb, weight, bias, sts_temperatures, with_markov: int, outputs,
                        stream: int) -> None:
        import torch

        from .launch import dspark_confidence

        t = functools.partial(torch.as_tensor, device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = dspark_confidence(t(hidden), t(markov_emb) if with_markov else None, t(weight), t(bias),
                                    t(sts_temperatures))
            for dst, src in zip(outputs, (out.logits, out.confidence, out.survival), strict=True):
                t(dst).copy_(src)

    # -- DSparkSchedule --------------------------------------------------------------------------
    @trtp.register(f"{ns}::DSparkSchedule")
    def _schedule_desc(survival: trtp.TensorDesc, token_counts: trtp.TensorDesc, step_time_ms: trtp.TensorDesc,
                       batch_sizes: trtp.TensorDesc, batch_overhead_ms: trtp.TensorDesc, scalars: trtp.TensorDesc,
                       mode: str) -> trtp.TensorDesc:
        return trtp.from_shape_expr((survival.shape_expr[0],), dtype=trt.int32)

    @trtp.aot_impl(f"{ns}::DSparkSchedule")
    def _schedule_aot(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars, mode: str,
                      outputs, tactic: int) -> AotKernel:
        gamma = _constant(survival.shape_expr[1])
        # One program holds every live request: engines must cap the batch at SCHEDULE_MAX_ROWS.
        spec = aot.schedule_spec(mode == "production", gamma, SCHEDULE_MAX_ROWS)
        return launch(compile_for_device(spec), 1, [survival.shape_expr[0], gamma, token_counts.shape_expr[0],
                                                    batch_sizes.shape_expr[0]])

    @trtp.impl(f"{ns}::DSparkSchedule")
    def _schedule_jit(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars, mode: str,
                      outputs, stream: int) -> None:
        import torch

        from .launch import dspark_schedule

        t = functools.partial(torch.as_tensor, device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            s = t(scalars).cpu()
            lengths = dspark_schedule(t(survival), t(token_counts), t(step_time_ms), t(batch_sizes),
                                      t(batch_overhead_ms), float(s[0]), float(s[1]),
                                      production=mode == "production")
            t(outputs[0]).copy_(lengths)
