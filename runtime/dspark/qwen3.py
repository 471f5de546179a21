"""DSpark drafter for the Qwen3 family (DeepSpec `Qwen3DSparkModel`): its one backbone, and the
reference-backend drafter that runs it over per-slot caches.

One round for a batch of requests:
  1. context features: the target's hidden states at `target_layer_ids`, concatenated, through
     `fc` and `hidden_norm`; cached per slot as each draft layer's keys and values, appended as
     tokens are committed (the anchor's own features arrive with the next verification);
  2. the parallel backbone: the block [x0, MASK × (γ-1)] at positions ctx_len .. ctx_len+γ-1 runs
     through the draft layers, queries from the block, keys/values [context; block], no causal mask
     inside the block; `norm` and `lm_head` give base logits U_k for all γ positions at once;
  3. the sequential heads, left to right: U_k + Markov bias from x_{k-1}, temperature, sample
     x_k; confidence c_k from [h_k; W1[x_{k-1}]], calibrated by STS; survival = cumprod(c).

Context features enter each layer's k_proj / v_proj directly (they are already normalised by
`hidden_norm`), as in DFlash-style drafters.

Steps 1 and 2 are `context_keys_values` and `forward_backbone` (DeepSpec's `_forward_backbone`), pure
functions of `Qwen3DraftWeights` and their inputs. Everything that computes the Qwen3 drafter calls
them: this module's `Qwen3DSparkDrafter` (slot caches), training (builder/train_drafter.py: whole
sequences, many anchors under a block mask) and the ONNX export (builder/export_onnx.py: explicit
cache tensors). The callers differ only in the weights' form, where the block's keys and values go
(`with_context`) and the attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..layers import Projection, apply_rope, native_bf16, rms_norm
from ..qwen3 import qwen3_rope
from .base import SlotContext

Linear = Callable[[torch.Tensor], torch.Tensor]  # x -> x @ Wᵀ
# Where a layer's block keys [B, kv_heads, T, head_dim] (rotated) and values [B, T, kv_heads, head_dim]
# join the context: (layer, keys, values) -> the keys and values the block attends to, [B, kv_heads, L, head_dim].
WithContext = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _Separate:
    """`x @ Wᵀ` for each named weight, outputs concatenated: the checkpoint's own tensors, each applied
    with F.linear (looked up when called, so a graph being traced sees each as itself)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> None:
        self.weights, self.names = weights, names
        self.in_features = weights[names[0]].shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [F.linear(x, self.weights[name]) for name in self.names]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class Qwen3DraftWeights:
    """A Qwen3 drafter's sizes and tensors as `forward_backbone` and `context_keys_values` apply them.

    Where the checkpoint has two or three weights applied to the same input (q/k/v, gate/up, every
    layer's k/v for the context), the backbone makes one call, and `linear(*names)` decides how:
    `fused` (inference) multiplies by the concatenated weight, one bigger product (layers.Projection,
    bf16 products optional); `separate` (training, export) applies each tensor with F.linear and
    concatenates the outputs, so autograd reaches every tensor, an ONNX graph names each, and the
    arithmetic is that of the unfused model. Norm weights are kept as tensors; q_norm and k_norm as one
    [heads + kv_heads, head_dim] weight (a block's queries and keys are normalised and rotated together),
    the layers' k_norms as one [layers, 1, head_dim] for the context.
    """

    def __init__(self, config: Mapping[str, Any], w: Mapping[str, torch.Tensor],
                 linear: Callable[..., Linear]) -> None:
        c = config
        self.layers, self.eps = c["num_hidden_layers"], c["rms_norm_eps"]
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        layer = [f"layers.{i}." for i in range(self.layers)]
        self.embed, self.norm, self.hidden_norm = w["embed_tokens.weight"], w["norm.weight"], w["hidden_norm.weight"]
        self.fc, self.lm_head = linear("fc.weight"), linear("lm_head.weight")
        self.input_norm = [w[p + "input_layernorm.weight"] for p in layer]
        self.post_attention_norm = [w[p + "post_attention_layernorm.weight"] for p in layer]
        self.qkv = [linear(*(f"{p}self_attn.{n}_proj.weight" for n in "qkv")) for p in layer]
        self.qk_norm = [torch.cat([w[p + "self_attn.q_norm.weight"].expand(self.heads, -1),
                                   w[p + "self_attn.k_norm.weight"].expand(self.kv_heads, -1)]) for p in layer]
        self.o = [linear(f"{p}self_attn.o_proj.weight") for p in layer]
        self.gate_up = [linear(f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight") for p in layer]
        self.down = [linear(f"{p}mlp.down_proj.weight") for p in layer]
        # Context enters every layer's k_proj / v_proj straight from `hidden_norm`: one product for all
        # layers' context keys and values, one call for their k_norms.
        self.context_kv = linear(*(f"{p}self_attn.{n}_proj.weight" for p in layer for n in "kv"))
        self.context_k_norm = torch.stack([w[p + "self_attn.k_norm.weight"] for p in layer])[:, None]

    @classmethod
    def fused(cls, config: Mapping[str, Any], w: Mapping[str, torch.Tensor], bf16: bool) -> Qwen3DraftWeights:
        return cls(config, w, lambda *names: Projection(torch.cat([w[n] for n in names]), bf16=bf16))

    @classmethod
    def separate(cls, config: Mapping[str, Any], w: Mapping[str, torch.Tensor]) -> Qwen3DraftWeights:
        return cls(config, w, lambda *names: _Separate(w, names))


def context_keys_values(w: Qwen3DraftWeights, features: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every draft layer's keys and values [n, layers, kv_heads, head_dim] of n context tokens: their target
    features [n, len(target_layer_ids) · hidden] through `fc` and `hidden_norm`, then each layer's k_proj
    (k_norm, RoPE with `cos` / `sin` [n, head_dim] of the tokens' positions) and v_proj."""
    n = features.shape[0]
    ctx = rms_norm(w.fc(features), w.hidden_norm, w.eps)
    k, v = w.context_kv(ctx).view(n, w.layers, 2, w.kv_heads, w.head_dim).unbind(2)
    k = apply_rope(rms_norm(k, w.context_k_norm, w.eps), cos[:, None], sin[:, None])
    return k, v


def forward_backbone(w: Qwen3DraftWeights, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     with_context: WithContext, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft layers over blocks of tokens `ids` [B, T] (anchors and mask tokens) at RoPE `cos` / `sin`
    [B, T, head_dim]: hidden states [B, T, d] after `norm`, and base logits [B, T, V] (`lm_head`'s dtype).

    Each layer's queries come from the block; its keys and values are what `with_context` makes of the
    block's own and the context's. `mask` (bool, broadcast to [B, heads, T, L]; None: every query sees
    every key) says which of those each query sees.
    """
    batch, steps = ids.shape
    heads, kv_heads, head_dim, eps = w.heads, w.kv_heads, w.head_dim, w.eps
    x = F.embedding(ids, w.embed)
    for layer in range(w.layers):
        qkv = w.qkv[layer](rms_norm(x, w.input_norm[layer], eps))
        qk = qkv[..., : (heads + kv_heads) * head_dim].view(batch, steps, heads + kv_heads, head_dim)
        qk = apply_rope(rms_norm(qk, w.qk_norm[layer], eps).transpose(1, 2), cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[..., (heads + kv_heads) * head_dim:].view(batch, steps, kv_heads, head_dim)
        keys, values = with_context(layer, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)
        x = x + w.o[layer](out.transpose(1, 2).reshape(batch, steps, -1))
        h = rms_norm(x, w.post_attention_norm[layer], eps)
        gate, up = w.gate_up[layer](h).chunk(2, dim=-1)
        x = x + w.down[layer](F.silu(gate) * up)
    hidden = rms_norm(x, w.norm, eps)
    return hidden, w.lm_head(hidden)


class Qwen3DSparkDrafter(SlotContext):
    def __init__(self, draft_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, bf16_products: bool | None = None,
                 device: str | torch.device = "cpu") -> None:
        """`device`: where weights, caches and activations live (float32 on the CPU, bfloat16 elsewhere
        unless `dtype` says otherwise). `bf16_products`: on the CPU, multiply the large projections in
        bf16 (see layers.Projection); by default where this CPU does so natively."""
        draft_dir = Path(draft_dir)
        c, w, dtype = self._load_unsharded(draft_dir, device, dtype)
        bf16 = (self.device.type == "cpu" and native_bf16()) if bf16_products is None else bf16_products
        self.weights = Qwen3DraftWeights.fused(c, w, bf16)
        self.layers, self.kv_heads, self.head_dim = self.weights.layers, self.weights.kv_heads, self.weights.head_dim
        # A round writes its block's keys / values just past each slot's context (the next context
        # overwrites them), so attention reads one slice of the cache rather than a concatenation.
        shape = (self.layers, num_slots, self.kv_heads, max_len + self.block_size, self.head_dim)
        self.k_ctx = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_ctx = torch.zeros(shape, dtype=dtype, device=self.device)
        self.ctx_len = torch.zeros(num_slots, dtype=torch.long)
        self.max_len, self.dtype = max_len, dtype
        # Every position a context token or a block can take, computed once (a round is many small ops).
        self.rope = qwen3_rope(c, draft_dir / "config.json")
        cos, sin = self.rope(torch.arange(max_len + self.block_size))
        self.cos_table, self.sin_table = cos.to(self.device), sin.to(self.device)
        self.rope.to(self.device)

    @property
    def fc(self) -> Projection:
        """The context projection; its `in_features` is the width of the target features the drafter reads."""
        return self.weights.fc

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        k, v = context_keys_values(self.weights, features.to(self.device, self.dtype), self.cos_table[positions],
                                   self.sin_table[positions])  # [n, layers, kv_heads, head_dim] each
        if isinstance(positions, slice):  # basic indexing keeps the cache's dimension order
            k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        # else token t goes to (every layer, its slot, all heads, its position): advanced indices put t first.
        self.k_ctx[:, slot_of, :, positions] = k
        self.v_ctx[:, slot_of, :, positions] = v

    @torch.inference_mode()
    def backbone(self, slots: list[int], anchors: list[int], gamma: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parallel part of a round: hidden states [B, γ, d] after `norm`, base logits U [B, γ, V] (float32)."""
        gamma = gamma or self.block_size
        batch, dev = len(slots), self.device
        ids, slot_idx, positions, ctx_len = self._block(slots, anchors, gamma)
        # Every block position sees its slot's keys 0 .. ctx_len + γ - 1: the whole context and the whole
        # block. With one slot (or equal contexts) that needs no mask; otherwise shorter rows mask their tail.
        length = int(ctx_len.max()) + gamma
        single = slots[0] if batch == 1 else None
        mask = None if single is not None or bool((ctx_len == ctx_len[0]).all()) else \
            (torch.arange(length) < (ctx_len + gamma)[:, None])[:, None, None].to(dev)

        def with_context(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The block's keys / values written just past each slot's context; the slots' caches read back."""
            k_cache, v_cache = self.k_ctx[layer], self.v_ctx[layer]
            if single is not None:
                start = int(ctx_len[0])
                k_cache[single, :, start: start + gamma] = k[0]
                v_cache[single, :, start: start + gamma] = v[0].transpose(0, 1)
                return k_cache[single, None, :, :length], v_cache[single, None, :, :length]
            # the (slot, position) index pairs lead: [batch, γ, kv_heads, head_dim]
            k_cache[slot_idx[:, None], :, positions] = k.transpose(1, 2)
            v_cache[slot_idx[:, None], :, positions] = v
            return k_cache[slot_idx, :, :length], v_cache[slot_idx, :, :length]

        hidden, logits = forward_backbone(self.weights, ids, self.cos_table[positions], self.sin_table[positions],
                                          with_context, mask)
        return hidden, logits.float()
