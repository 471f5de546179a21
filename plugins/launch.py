"""Launch the Triton kernels on torch tensors: CUDA tensors on a GPU, CPU tensors under the interpreter.

These are the Python entry points of the kernels (tests, onnxruntime custom ops, GPU tests). The
tile sizes chosen here are also what `aot.py` compiles, through `markov_constants` and friends.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .interpret import InterpreterModeError, interpreter_active

# Elements of the widest 2-D tile a program holds: about what a 4-warp program keeps in registers on a
# GPU. The interpreter runs tile by tile in numpy, so it gets much bigger tiles (fewer Python steps).
GPU_TILE = 8192
CPU_TILE = 1 << 16
SCHEDULE_MAX_ROWS = 256  # rows one DSparkSchedule program holds; the AOT kernel is compiled for this many


_forced_on_cpu = False


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_kernels(t: torch.Tensor) -> bool:
    """Whether the served path's DSpark heads and scheduler run as these kernels for tensors like `t`: on
    CUDA tensors (where OpenAI Triton is installed), and on CPU tensors inside `kernels_on_cpu()`. The torch
    versions (runtime/heads.py, runtime/scheduler.py) stay the CPU path and the oracle."""
    return (t.is_cuda and triton_available()) or (_forced_on_cpu and t.device.type == "cpu")


@contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Take the kernel path for CPU tensors too: tests, under the interpreter (see `enable_interpreter`)."""
    global _forced_on_cpu
    before, _forced_on_cpu = _forced_on_cpu, True
    try:
        yield
    finally:
        _forced_on_cpu = before


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def markov_constants(rank: int, tile: int = GPU_TILE) -> dict[str, int]:
    r_pad = next_pow2(rank)
    block = max(16, tile // r_pad)
    return {"R_PAD": r_pad, "BLOCK_V": block, "BLOCK_K": block}


def confidence_constants(tile: int = GPU_TILE) -> dict[str, int]:
    return {"BLOCK_K": min(1024, tile // 8)}


def schedule_constants(rows: int, gamma: int, tile: int = GPU_TILE) -> dict[str, int]:
    r_pad, g_pad = next_pow2(rows, 1), next_pow2(gamma, 1)
    return {"R_PAD": r_pad, "G_PAD": g_pad, "BLOCK_J": max(1, min(64, tile // (r_pad * g_pad)))}


def _kernels():
    from . import kernels  # imports triton: only when a kernel is actually launched

    return kernels


def _tile_for(*tensors: torch.Tensor) -> int:
    if all(t.is_cuda for t in tensors):
        return GPU_TILE
    if not interpreter_active():
        raise InterpreterModeError("Triton kernels run on CPU tensors only under the interpreter: call "
                                   "dspark_trt.plugins.interpret.enable_interpreter() before importing triton")
    return CPU_TILE


@dataclass
class MarkovSampleOutput:
    tokens: torch.Tensor  # [B, γ] int32
    probs: torch.Tensor  # [B, γ, V] float32
    markov_emb: torch.Tensor  # [B, γ, r] float32, W1[x_{k-1}]
    state: torch.Tensor  # [B, r] float32, rnn state after the block


def markov_sample(base_logits: torch.Tensor, hidden: torch.Tensor, anchors: torch.Tensor, temperatures: torch.Tensor,
                  noise: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, proj_weight: torch.Tensor | None = None,
                  proj_bias: torch.Tensor | None = None, *, kind: str = "vanilla") -> MarkovSampleOutput:
    """The MarkovSample kernel. `noise` is uniforms [B, γ, V] (float) or one Philox seed per row [B] (int)."""
    kernels = _kernels()
    if kind not in kernels.KIND_IDS:
        raise ValueError(f"MarkovSample supports Markov heads {sorted(kernels.KIND_IDS)}, got {kind!r}")
    batch, gamma, vocab = base_logits.shape
    rank, dim = w1.shape[1], hidden.shape[-1]
    if kind != "vanilla" and (proj_weight is None or proj_bias is None):
        raise ValueError(f"the {kind} Markov head needs its projection weight and bias")
    philox = not noise.is_floating_point()
    device = base_logits.device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    tokens = torch.empty(batch, gamma, dtype=torch.int32, device=device)
    probs = torch.empty(batch, gamma, vocab, dtype=torch.float32, device=device)
    emb = torch.empty(batch, gamma, rank, dtype=torch.float32, device=device)
    state = torch.empty(batch, rank, dtype=torch.float32, device=device)
    if batch == 0:
        return MarkovSampleOutput(tokens, probs, emb, state)
    consts = markov_constants(rank, _tile_for(base_logits))
    kernels.markov_sample_kernel[(batch,)](
        base_logits.float().contiguous(), hidden.contiguous(), anchors.to(torch.int32).contiguous(),
        temperatures.float().contiguous(), (noise.to(torch.int32) if philox else noise.float()).contiguous(),
        w1.contiguous(), w2.contiguous(),
        dummy if proj_weight is None else proj_weight.contiguous(),
        dummy if proj_bias is None else proj_bias.contiguous(),
        gamma, vocab, rank, dim,
        tokens, probs, emb, state,
        KIND=kernels.KIND_IDS[kind], PHILOX=philox, **consts,
    )
    return MarkovSampleOutput(tokens, probs, emb, state)


@dataclass
class ConfidenceOutput:
    logits: torch.Tensor  # [B, γ] raw confidence logits
    confidence: torch.Tensor  # [B, γ] calibrated
    survival: torch.Tensor  # [B, γ] cumulative product


def dspark_confidence(hidden: torch.Tensor, markov_emb: torch.Tensor | None, weight: torch.Tensor,
                      bias: torch.Tensor | None, sts_temperatures: torch.Tensor | None = None) -> ConfidenceOutput:
    """The DSparkConfidence kernel; `weight` is [1, d] or [1, d + r] (then W1[x_{k-1}] is used)."""
    kernels = _kernels()
    batch, gamma, dim = hidden.shape
    weight = weight.reshape(-1)
    with_markov = weight.numel() > dim
    if with_markov and (markov_emb is None or weight.numel() != dim + markov_emb.shape[-1]):
        raise ValueError(f"confidence weight has {weight.numel()} inputs; expected {dim} or d + r")
    rank = markov_emb.shape[-1] if with_markov else 0
    device = hidden.device
    sts = torch.ones(gamma) if sts_temperatures is None else torch.as_tensor(sts_temperatures)[:gamma]
    bias = torch.zeros(1) if bias is None else bias.reshape(-1)[:1]
    out = [torch.empty(batch, gamma, dtype=torch.float32, device=device) for _ in range(3)]
    if batch == 0:
        return ConfidenceOutput(*out)
    emb = markov_emb.float().contiguous() if with_markov else torch.zeros(1, device=device)
    kernels.dspark_confidence_kernel[(batch,)](
        hidden.contiguous(), emb, weight.contiguous(), bias.to(device).contiguous(),
        sts.to(device=device, dtype=torch.float32).contiguous(),
        gamma, dim, rank, *out,
        WITH_MARKOV=with_markov, **confidence_constants(_tile_for(hidden)),
    )
    return ConfidenceOutput(*out)


def cost_table_tensors(table, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A runtime.scheduler.CostTable as the float32 tensors DSparkSchedule reads.

    A one-point θ is given a second, equal point one token later: the kernel's extrapolation then
    continues flat, exactly like the table's (slope 0 with a single point).
    """
    xs, ys = list(table.token_counts), list(table.step_time_ms)
    if len(xs) == 1:
        xs, ys = [xs[0], xs[0] + 1], [ys[0], ys[0]]

    def f32(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    return {"token_counts": f32(xs), "step_time_ms": f32(ys), "batch_sizes": f32(table.batch_sizes),
            "batch_overhead_ms": f32(table.batch_overhead_ms)}


def dspark_schedule(survival: torch.Tensor, token_counts: torch.Tensor, step_time_ms: torch.Tensor,
                    batch_sizes: torch.Tensor, batch_overhead_ms: torch.Tensor, fixed_overhead_ms: float,
                    min_gain: float = 0.04, *, production: bool = False, max_rows: int | None = None) -> torch.Tensor:
    """The DSparkSchedule kernel: verify lengths ℓ_r (int32 [R]) for survival [R, γ].

    `max_rows` pads the program to that many rows (the AOT kernel is compiled for SCHEDULE_MAX_ROWS);
    by default the launch is sized to R.
    """
    kernels = _kernels()
    rows, gamma = survival.shape
    device = survival.device
    lengths = torch.empty(rows, dtype=torch.int32, device=device)
    if rows == 0:
        return lengths
    if token_counts.numel() < 2:
        raise ValueError("DSparkSchedule needs at least two token counts (see cost_table_tensors)")
    consts = schedule_constants(max(rows, max_rows or 0), gamma, _tile_for(survival))
    scalars = torch.tensor([fixed_overhead_ms, min_gain], dtype=torch.float32, device=device)
    kernels.dspark_schedule_kernel[(1,)](
        survival.float().contiguous(), *(t.float().contiguous() for t in (token_counts, step_time_ms, batch_sizes,
                                                                           batch_overhead_ms)),
        scalars, rows, gamma, token_counts.numel(), batch_sizes.numel(), lengths,
        PRODUCTION=production, **consts,
    )
    return lengths


def philox_uniforms(seeds: torch.Tensor, gamma: int, vocab: int) -> torch.Tensor:
    """The uniforms [B, γ, V] that MarkovSample draws from in Philox mode for these seeds."""
    kernels = _kernels()
    out = torch.empty(seeds.shape[0], gamma, vocab, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        kernels.philox_uniforms_kernel[(seeds.shape[0],)](seeds.to(torch.int32).contiguous(), gamma, vocab, out,
                                                          BLOCK_V=min(4096, next_pow2(vocab)))
    return out
