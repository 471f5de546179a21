"""DeepSeek-style block FP8: e4m3 weights with one float32 scale per 128×128 block.

A weight W [out, in] is stored as `W_fp8` (torch.float8_e4m3fn, same shape) plus `weight_scale_inv`
[ceil(out/block), ceil(in/block)] float32, and W ≈ W_fp8.float() * scale_inv broadcast over each
block. Edge blocks may be partial. Both directions are vectorised: pad to whole blocks, view as
[rows, block, cols, block], work per block, crop.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def scale_shape(shape: tuple[int, ...] | torch.Size, block: int = 128) -> tuple[int, int]:
    """Shape of the `weight_scale_inv` tensor that goes with a 2-D weight of `shape`."""
    out_features, in_features = shape
    return (-(-out_features // block), -(-in_features // block))


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to whole blocks and view it as [row_blocks, block, col_blocks, block]."""
    rows, cols = w.shape
    rb, cb = scale_shape(w.shape, block)
    padded = torch.nn.functional.pad(w, (0, cb * block - cols, 0, rb * block - rows))
    return padded.view(rb, block, cb, block)


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to (float8_e4m3fn weight, float32 per-block scale_inv).

    scale = amax(|block|) / 448, so each block's largest value lands on the largest e4m3 value.
    An all-zero block gets scale 1 (any scale reproduces zeros; 1 avoids a division by zero).
    """
    if w.dim() != 2:
        raise ValueError(f"block FP8 quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    blocks = _blocked(w.float(), block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Clamp: w / (amax / 448) can exceed 448 by one rounding step, and e4m3fn has no inf to saturate to.
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(scale.shape[0] * block, scale.shape[1] * block)[:rows, :cols]
    return q.to(FP8_DTYPE).contiguous(), scale.contiguous()


def dequantize_fp8_block(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: w_fp8.float() * scale_inv (one scale per block), cast to `dtype`."""
    if w_fp8.dim() != 2:
        raise ValueError(f"block FP8 dequantisation needs a 2-D weight, got shape {tuple(w_fp8.shape)}")
    expected = scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} "
            f"with block {block}: expected {expected}"
        )
    rows, cols = w_fp8.shape
    blocks = _blocked(w_fp8.float(), block) * scale_inv.float()[:, None, :, None]
    return blocks.view(expected[0] * block, expected[1] * block)[:rows, :cols].to(dtype).contiguous()
