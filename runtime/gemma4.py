"""Gemma4 target runner for the reference backend.

Reads one rank of a converted checkpoint (builder/families/gemma4.py: TensorRT-LLM's Gemma names, fused
per-rank QKV, column-parallel MLP, row-parallel output projections, vocabulary-parallel head) and
computes what transformers' Gemma4 text model computes (models/gemma4/modeling_gemma4.py):

- embedding times sqrt(hidden); with per-layer inputs (PLE), each layer's extra input
  (RMSNorm(W_p · x / sqrt(hidden)) + E_p[token] · sqrt(p)) / sqrt(2);
- per layer: x += post_attention_norm(attention(input_norm(x))); x += post_ff_norm(MLP(pre_ff_norm(x)))
  (gelu-tanh gated MLP); with PLE x += norm(W_up · (gelu(W_gate · x) ⊙ per_layer_input)); x *= layer_scalar;
- attention: RMSNorm on q and k per head (weighted), on v (unweighted), scale 1, rotary embeddings of
  the layer's type; sliding layers see the newest `sliding_window` keys, global layers all keys;
  global layers with `attention_k_eq_v` take v from the key projection (before k's norm);
- final norm, tied head, logits softcapped: tanh(z / c) · c.

Every slot keeps each layer's whole key/value history (sliding layers mask instead of evicting), so a
rollback is the slot's length moving back, as in the Qwen3 runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import CheckpointError
from .layers import Rope, apply_rope, rms_norm, runner_device
from .runner import SlotRunner
from .safetensors_io import SafetensorsCheckpoint

SLIDING, FULL = "sliding_attention", "full_attention"


def gemma4_rope(config: dict[str, Any], layer_type: str, source: str | Path) -> Rope:
    """The rotary embedding transformers' `Gemma4TextRotaryEmbedding` gives layers of `layer_type`
    (rope_parameters[layer_type]: "default" for sliding layers, "proportional" with a partial rotary
    factor for global ones), for a Gemma4 text config dict (HF field names)."""
    from transformers import Gemma4TextConfig  # imported here: transformers takes seconds to import
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
              "num_global_key_value_heads", "attention_k_eq_v", "rope_parameters", "max_position_embeddings")
    kwargs = {k: config[k] for k in fields if config.get(k) is not None}
    # transformers forces the last layer to full attention: a sliding layer goes first.
    hf = Gemma4TextConfig(**kwargs, layer_types=[layer_type, FULL], num_hidden_layers=2)
    rotary = Gemma4TextRotaryEmbedding(hf)
    return Rope(SimpleNamespace(rope_type=rotary.rope_type[layer_type],
                                inv_freq=getattr(rotary, f"{layer_type}_inv_freq"),
                                attention_scaling=getattr(rotary, f"{layer_type}_attention_scaling")), source)


@dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dim: int  # sliding layers
    num_kv_heads: int
    global_head_dim: int  # full-attention layers
    num_global_kv_heads: int
    k_eq_v: bool
    sliding_window: int
    intermediate_size: int
    per_layer_input: int
    norm_eps: float
    softcap: float | None
    hf: dict[str, Any]  # the HF-named fields rotary embeddings are built from
    tp: int

    @classmethod
    def from_checkpoint(cls, target_dir: Path) -> Gemma4Config:
        path = Path(target_dir) / "config.json"
        c = json.loads(path.read_text())
        if c.get("architecture") != "Gemma4ForCausalLM":
            raise CheckpointError(path, "not a converted Gemma4 target", subject="architecture",
                                  found=c.get("architecture"), expected="Gemma4ForCausalLM")
        hf = {"hidden_size": c["hidden_size"], "num_attention_heads": c["num_attention_heads"],
              "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_size"],
              "global_head_dim": c["global_head_size"], "num_global_key_value_heads": c["num_global_key_value_heads"],
              "attention_k_eq_v": c["attention_k_eq_v"], "rope_parameters": c["rope_parameters"],
              "max_position_embeddings": c["max_position_embeddings"]}
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   tuple(c["layer_types"]), c["head_size"], c["num_key_value_heads"], c["global_head_size"],
                   c["num_global_key_value_heads"], bool(c["attention_k_eq_v"]), c["sliding_window"],
                   c["intermediate_size"], c.get("hidden_size_per_layer_input") or 0, c["norm_epsilon"],
                   c.get("final_logit_softcapping"), hf, c["mapping"]["tp_size"])

    def geometry(self, layer: int) -> tuple[int, int, bool]:
        """(head_dim, key/value heads, has its own values) of a layer, before sharding."""
        if self.layer_types[layer] == FULL:
            return self.global_head_dim, self.num_global_kv_heads, not self.k_eq_v
        return self.head_dim, self.num_kv_heads, True


class Gemma4Target(SlotRunner):
    """One tensor-parallel rank of a Gemma4 target, with a KV cache of `num_slots` sequences.

    `device` / `dtype`: as for the Qwen3 target (float32 on the CPU, bfloat16 elsewhere); `lengths` stays
    on the host."""

    def __init__(self, target_dir: Path, *, rank: int = 0, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> None:
        self.config = cfg = Gemma4Config.from_checkpoint(target_dir)
        self.device, dtype = runner_device(device, dtype)
        self.rank, self.dtype = rank, dtype
        source = Path(target_dir) / "config.json"
        self.ropes = {t: gemma4_rope(cfg.hf, t, source).to(self.device) for t in set(cfg.layer_types)}
        if cfg.tp > 1 and not (dist.is_initialized() and dist.get_world_size() == cfg.tp):
            raise RuntimeError(f"{target_dir} is sharded for tp={cfg.tp}: run it with tp={cfg.tp} processes "
                               "(runtime.tp.DistributedTarget)")
        ckpt = SafetensorsCheckpoint(Path(target_dir) / f"rank{rank}.safetensors")
        self.w = {name: ckpt.get(name).to(device=self.device, dtype=dtype) for name in ckpt.tensors}
        self.q_heads = cfg.num_heads // cfg.tp
        # Per layer: (head_dim, this rank's kv heads, has values); a cache shaped for it.
        self.layer_shapes = []
        self.k_cache, self.v_cache = [], []
        for layer in range(cfg.num_layers):
            head_dim, kv, has_v = cfg.geometry(layer)
            kv = max(1, kv // cfg.tp)
            self.layer_shapes.append((head_dim, kv, has_v))
            self.k_cache.append(torch.zeros(num_slots, kv, max_len, head_dim, dtype=dtype, device=self.device))
            self.v_cache.append(torch.zeros(num_slots, kv, max_len, head_dim, dtype=dtype, device=self.device))
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.max_len = max_len

    def _per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, T, layers, p]: Gemma4TextModel.get_per_layer_inputs + project_per_layer_inputs."""
        cfg, w, p = self.config, self.w, self.config.per_layer_input
        token = F.embedding(ids, w["transformer.embed_tokens_per_layer.weight"]) * torch.tensor(p**0.5, dtype=x.dtype,
                                                                                                device=x.device)
        proj = F.linear(x, w["transformer.per_layer_model_projection.weight"]) * cfg.hidden_size**-0.5
        proj = rms_norm(proj.view(*x.shape[:2], cfg.num_layers, p), w["transformer.per_layer_projection_norm.weight"],
                        cfg.norm_eps)
        return (proj + token.view(*x.shape[:2], cfg.num_layers, p)) * 2.0**-0.5

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: list[list[int]], capture: tuple[int, ...] = (),
                start: list[int] | None = None, logits: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append `tokens[i]` to slot `slots[i]` and run them; the Qwen3 runner's contract (runtime/qwen3.py):
        per slot the (softcapped) logits of its new tokens, or their argmax ids with `logits` False, and the
        outputs of the `capture` layers concatenated (HF `hidden_states[l + 1]`; -1: the scaled embedding).
        All on the runner's device; index tensors and masks are built on the host and copied there once."""
        cfg, w, dev = self.config, self.w, self.device
        batch, n_new = len(slots), [len(t) for t in tokens]
        width = max(n_new)
        self.continue_from(slots, start)
        start = self.lengths[slots]
        if int((start + torch.tensor(n_new)).max()) > self.max_len:
            raise ValueError(f"a slot would exceed the cache length {self.max_len}")
        ids = torch.zeros(batch, width, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        positions = start[:, None] + torch.arange(width)
        total = int((start + torch.tensor(n_new)).max())
        keys = torch.arange(total)
        valid = torch.arange(width)[None, :] < torch.tensor(n_new)[:, None]  # [B, T]
        causal = keys[None, None, :] <= positions[:, :, None]
        # transformers' sliding_window_overlay: key k is visible from query q when k > q - window.
        masks = {FULL: causal, SLIDING: causal & (keys[None, None, :] > positions[:, :, None] - cfg.sliding_window)}
        for mask in masks.values():  # padded query rows see key 0 only (their output is discarded)
            mask &= valid[:, :, None]
            mask[:, :, 0] |= ~valid
        masks = {t: mask.to(dev) for t, mask in masks.items()}
        ids, slot_idx, positions = ids.to(dev), torch.tensor(slots, device=dev), positions.to(dev)
        rope = {t: r(positions) for t, r in self.ropes.items()}

        # Gemma4TextScaledWordEmbedding: the scale in the weights' dtype.
        x = F.embedding(ids, w["transformer.vocab_embedding.weight"]) * torch.tensor(cfg.hidden_size**0.5,
                                                                                      dtype=self.dtype, device=dev)
        per_layer = self._per_layer_inputs(ids, x) if cfg.per_layer_input else None
        captured = [x] if -1 in capture else []
        for layer in range(cfg.num_layers):
            p = f"transformer.layers.{layer}."
            head_dim, kv_heads, has_v = self.layer_shapes[layer]
            layer_type = cfg.layer_types[layer]
            cos, sin = rope[layer_type]
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
            qkv = F.linear(h, w[p + "attention.qkv.weight"])
            q_width, kv_width = self.q_heads * head_dim, kv_heads * head_dim
            q, k = qkv[..., :q_width], qkv[..., q_width: q_width + kv_width]
            v = qkv[..., q_width + kv_width:] if has_v else k
            q = rms_norm(q.view(batch, width, self.q_heads, head_dim), w[p + "attention.q_layernorm.weight"],
                         cfg.norm_eps).transpose(1, 2)
            k = rms_norm(k.view(batch, width, kv_heads, head_dim), w[p + "attention.k_layernorm.weight"],
                         cfg.norm_eps).transpose(1, 2)
            v = F.rms_norm(v.reshape(batch, width, kv_heads, head_dim), (head_dim,), None, cfg.norm_eps).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
            for b, slot in enumerate(slots):
                s, n = int(start[b]), n_new[b]
                k_cache[slot, :, s: s + n] = k[b, :, :n]
                v_cache[slot, :, s: s + n] = v[b, :, :n]
            # Scale 1: q_norm and k_norm set the logits' size (Gemma4TextAttention.scaling).
            out = F.scaled_dot_product_attention(q, k_cache[slot_idx, :, :total], v_cache[slot_idx, :, :total],
                                                 attn_mask=masks[layer_type][:, None], scale=1.0,
                                                 enable_gqa=self.q_heads != kv_heads)
            out = F.linear(out.transpose(1, 2).reshape(batch, width, -1), w[p + "attention.dense.weight"])
            x = x + rms_norm(self._all_reduce(out), w[p + "post_layernorm.weight"], cfg.norm_eps)
            h = rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], cfg.norm_eps)
            mlp = F.linear(F.gelu(F.linear(h, w[p + "mlp.fc.weight"]), approximate="tanh")
                           * F.linear(h, w[p + "mlp.gate.weight"]), w[p + "mlp.proj.weight"])
            x = x + rms_norm(self._all_reduce(mlp), w[p + "post_feedforward_layernorm.weight"], cfg.norm_eps)
            if per_layer is not None:
                gate = F.gelu(F.linear(x, w[p + "per_layer_input_gate.weight"]), approximate="tanh")
                extra = F.linear(gate * per_layer[:, :, layer], w[p + "per_layer_projection.weight"])
                x = x + rms_norm(extra, w[p + "post_per_layer_input_norm.weight"], cfg.norm_eps)
            x = x * w[p + "layer_scalar"]
            if layer in capture:
                captured.append(x)
        self.lengths[slots] = start + torch.tensor(n_new)
        h = rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_eps)
        z = F.linear(h, w["lm_head.weight"]).float()
        if cfg.softcap is not None:  # monotonic: the argmax of each shard is unchanged by it
            z = torch.tanh(z / cfg.softcap) * cfg.softcap
        head = self._head(z, full=logits)
        order = [captured[sorted(capture).index(layer)] for layer in capture]
        features = torch.cat(order, dim=-1) if capture else None
        return ([head[b, : n_new[b]] for b in range(batch)],
                [features[b, : n_new[b]] for b in range(batch)] if capture else [])
