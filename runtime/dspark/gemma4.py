"""DSpark drafter for the Gemma4 family (DeepSpec `Gemma4DSparkModel`), reference backend.

What DeepSpec's model computes (deepseek-ai/DeepSpec `deepspec/modeling/dspark/gemma4/modeling.py`,
with the inference path of `deepspec/eval/dspark/draft_ops.py`), for a batch of requests:

- context: the target features at `target_layer_ids`, concatenated, through `fc` and `hidden_norm`
  (`_forward_backbone`); each draft layer turns them into keys `k_norm(k_proj(c))`, rotated at the
  context positions, and values `v_norm(v_proj(c))` (`k_proj(c)` when `attention_k_eq_v`; v_norm has
  no weight) — cached per slot as tokens are committed;
- the block [anchor, MASK × (γ-1)] embedded times sqrt(hidden) (`Gemma4TextScaledWordEmbedding`) at
  positions ctx_len .. ctx_len+γ-1 through the draft layers (`Gemma4DSparkDecoderLayer`):
  x += post_attention_norm(attention(input_norm(x))); x += post_ff_norm(MLP(pre_ff_norm(x)));
  x *= layer_scalar. Attention (`Gemma4DSparkAttention`): every layer is full attention of
  `global_head_dim` with the full-attention rotary embedding, queries `q_norm(q_proj(x))`, keys and
  values from [context; block] with no mask, scale 1;
- `norm`, `lm_head` and the final-logit softcap (`compute_logits`) give the base logits; then the
  sequential Markov / confidence heads shared by every family (`sequential_heads`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..gemma4 import FULL, gemma4_rope
from ..layers import apply_rope, rms_norm
from .base import SlotContext


class Gemma4DSparkDrafter(SlotContext):
    def __init__(self, draft_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> None:
        """`device` / `dtype`: as for the Qwen3 drafter (float32 on the CPU, bfloat16 elsewhere)."""
        draft_dir = Path(draft_dir)
        c, w, dtype = self._load_unsharded(draft_dir, device, dtype)
        self.layers, self.eps, self.hidden_size = c["num_hidden_layers"], c["rms_norm_eps"], c["hidden_size"]
        self.heads, self.head_dim = c["num_attention_heads"], c["global_head_dim"]
        self.k_eq_v = bool(c.get("attention_k_eq_v", False))
        self.kv_heads = c["num_global_key_value_heads"] if self.k_eq_v else c["num_key_value_heads"]
        self.softcap = c.get("final_logit_softcapping")
        # Keys and values come from one product: [k_proj; v_proj] (just k_proj when keys are values).
        self.kv_proj = [torch.cat([w[f"layers.{i}.self_attn.{n}_proj.weight"] for n in ("k" if self.k_eq_v else "kv")])
                        for i in range(self.layers)]
        shape = (self.layers, num_slots, self.kv_heads, max_len + self.block_size, self.head_dim)
        self.k_ctx = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_ctx = torch.zeros(shape, dtype=dtype, device=self.device)
        self.ctx_len = torch.zeros(num_slots, dtype=torch.long)
        self.max_len, self.dtype = max_len, dtype
        # Gemma4DSparkModel.rotary_emb: the full-attention rotary embedding, for every position a context
        # token or a block can take.
        rope = gemma4_rope(c, FULL, draft_dir / "config.json")
        cos, sin = rope(torch.arange(max_len + self.block_size))
        self.cos_table, self.sin_table = cos.to(self.device), sin.to(self.device)

    def _keys_values(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_norm(k) and v_norm(v) [..., kv_heads, head_dim] of inputs x [..., hidden] (before rotation)."""
        kv = F.linear(x, self.kv_proj[layer]).unflatten(-1, (-1, self.kv_heads, self.head_dim))
        k = kv[..., 0, :, :]
        v = k if self.k_eq_v else kv[..., 1, :, :]
        k = rms_norm(k, self.w[f"layers.{layer}.self_attn.k_norm.weight"], self.eps)
        return k, F.rms_norm(v, (self.head_dim,), None, self.eps)

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        ctx = F.linear(features.to(self.device, self.dtype), self.w["fc.weight"])
        ctx = rms_norm(ctx, self.w["hidden_norm.weight"], self.eps)
        cos, sin = self.cos_table[positions], self.sin_table[positions]  # [n, head_dim]: apply_rope adds the head dim
        for layer in range(self.layers):
            k, v = self._keys_values(layer, ctx)  # [n, kv_heads, head_dim]
            k = apply_rope(k, cos, sin)
            if isinstance(positions, slice):  # basic indexing keeps the cache's dimension order
                self.k_ctx[layer, slot_of, :, positions] = k.transpose(0, 1)
                self.v_ctx[layer, slot_of, :, positions] = v.transpose(0, 1)
            else:
                self.k_ctx[layer, slot_of, :, positions] = k
                self.v_ctx[layer, slot_of, :, positions] = v

    @torch.inference_mode()
    def backbone(self, slots: list[int], anchors: list[int], gamma: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, γ, d] after `norm` and base logits U [B, γ, V] (softcapped, float32)."""
        w, gamma, eps = self.w, gamma or self.block_size, self.eps
        batch, heads, head_dim = len(slots), self.heads, self.head_dim
        dev = self.device
        ids, slot_idx, positions, ctx_len = self._block(slots, anchors, gamma)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        # Every block position sees its slot's context and the whole block; shorter contexts mask their tail.
        length = int(ctx_len.max()) + gamma
        mask = (torch.arange(length) < (ctx_len + gamma)[:, None])[:, None, None].to(dev)

        x = F.embedding(ids, w["embed_tokens.weight"]) * torch.tensor(self.hidden_size**0.5, dtype=self.dtype,
                                                                      device=dev)
        for layer in range(self.layers):
            p = f"layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = F.linear(h, w[p + "self_attn.q_proj.weight"]).view(batch, gamma, heads, head_dim)
            q = apply_rope(rms_norm(q, w[p + "self_attn.q_norm.weight"], eps).transpose(1, 2), cos, sin)
            k, v = self._keys_values(layer, h)  # [B, γ, kv_heads, head_dim]
            k = apply_rope(k.transpose(1, 2), cos, sin)
            # The block's keys / values go just past each slot's context (the next context overwrites them).
            self.k_ctx[layer, slot_idx[:, None], :, positions] = k.transpose(1, 2)
            self.v_ctx[layer, slot_idx[:, None], :, positions] = v
            keys, values = self.k_ctx[layer, slot_idx, :, :length], self.v_ctx[layer, slot_idx, :, :length]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                                 enable_gqa=heads != self.kv_heads)
            out = F.linear(out.transpose(1, 2).reshape(batch, gamma, -1), w[p + "self_attn.o_proj.weight"])
            x = x + rms_norm(out, w[p + "post_attention_layernorm.weight"], eps)
            h = rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps)
            mlp = F.linear(F.gelu(F.linear(h, w[p + "mlp.gate_proj.weight"]), approximate="tanh")
                           * F.linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
            x = (x + rms_norm(mlp, w[p + "post_feedforward_layernorm.weight"], eps)) * w[p + "layer_scalar"]
        hidden = rms_norm(x, w["norm.weight"], eps)
        logits = F.linear(hidden, w["lm_head.weight"]).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return hidden, logits
