"""The few building blocks the reference runners share: RMSNorm, rotary embeddings, attention."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError

# Weights from this many elements up are multiplied in bf16 where the CPU does so natively (Projection).
BF16_MIN_WEIGHTS = 1 << 17


def runner_device(device: str | torch.device, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Where a runner keeps its weights, caches and features, and in which dtype: float32 on the CPU
    (the reference and the oracle of every other device), bfloat16 elsewhere unless `dtype` is given."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return device, dtype


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same tensors on the CPU, with one device-to-host copy for the whole list (not one per tensor)."""
    if not tensors or tensors[0].device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    sizes = [t.numel() for t in tensors]
    return [part.view(t.shape) for part, t in zip(flat.split(sizes), tensors, strict=True)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # The same arithmetic in one call (two when `weight` broadcasts over more than the last dim):
        # rounds are hundreds of small ops, and each call's overhead counts.
        if weight.shape == x.shape[-1:]:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, x.shape[-1:], None, eps) * weight
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


# Rope types whose frequencies change with the length of the sequence in flight: transformers'
# `dynamic_rope_update` recomputes them call by call, statefully. The reference runners rotate each key
# once, when it enters the cache, so they take only rope types with fixed frequencies.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class Rope:
    """Rotary embeddings exactly as transformers computes them for a model.

    The frequencies and the attention scaling come from the model's own transformers rotary-embedding
    module (`Qwen3RotaryEmbedding(config)`, ...), i.e. from `transformers.modeling_rope_utils`'s
    ROPE_INIT_FUNCTIONS for the config's `rope_parameters` / `rope_scaling` (linear, yarn, llama3, ...) or
    the model's default; cos / sin are its forward: [freqs; freqs] (the "rotate half" layout), scaled.
    Shared by every family's runners, so a new rope type or family needs no table of its own here.
    """

    def __init__(self, rotary: torch.nn.Module, source: str | Path) -> None:
        """`rotary`: a transformers rotary-embedding module; `source`: the config it came from (for errors)."""
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in LENGTH_DEPENDENT_ROPE:
            raise CheckpointError(source, "rope type not supported: its frequencies change with the sequence length",
                                  subject="rope_parameters.rope_type", found=rope_type,
                                  expected="default, linear, yarn, llama3 or another fixed-frequency type")
        self.rope_type = rope_type
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32)
        self.attention_scaling = float(rotary.attention_scaling)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin [..., rotary dim] for integer `positions` of any shape."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def to(self, device: torch.device) -> Rope:
        """Keep the frequencies on `device`, where the positions will be (no copy inside a forward)."""
        self.inv_freq = self.inv_freq.to(device)
        return self


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; cos/sin [B, T, head_dim]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention. q [B, Hq, T, D]; k, v [B, Hkv, L, D]; allowed [B, T, L] bool."""
    # enable_gqa shares each kv head with its query group without materialising the repeated cache.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=q.shape[1] != k.shape[1])


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There oneDNN's bf16 product
    beats MKL's float32 one (docs/measurements.md); elsewhere bf16 is emulated and no faster."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


class Projection:
    """`x @ Wᵀ` for a weight W [out, in] (a checkpoint's layout) that a round applies to a few rows.

    By default the weight is kept in the runner's dtype as [in, out] and applied as `x @ W`. With
    `bf16`, a weight of BF16_MIN_WEIGHTS elements or more is kept in bf16 as [out, in] (the layout
    oneDNN wants) and multiplied in bf16 with float32 accumulation, which is what makes a draft round's
    lm_head cheap on CPUs with bf16 instructions (docs/measurements.md).
    Inputs and outputs are rounded to bf16 (~0.4 % relative): fine for proposals that verification
    checks exactly. Smaller weights stay float32, where the two casts cost more than the product saves.
    """

    def __init__(self, weight: torch.Tensor, *, bf16: bool = False) -> None:
        self.bf16 = bf16 and weight.numel() >= BF16_MIN_WEIGHTS
        self.in_features = weight.shape[1]
        self.weight = weight.to(torch.bfloat16).contiguous() if self.bf16 else weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16:
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return x @ self.weight
