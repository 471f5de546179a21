"""Qwen3 target runner for the reference backend.

Reads one rank of a converted checkpoint (TensorRT-LLM layout: fused per-rank QKV, column-parallel
MLP, row-parallel output projections, vocabulary-parallel head) and runs batched forwards where
every sequence slot brings its own number of new tokens. Each slot has a KV cache; `rollback` drops
rejected tokens by moving the slot's length back (their cache entries are simply overwritten later).

With torch.distributed initialised (gloo on CPU) and tp > 1, each process holds its rank's heads and
MLP columns; partial outputs are summed with all_reduce and the vocabulary shards of the logits are
gathered, exactly where TensorRT-LLM communicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import CheckpointError
from .layers import Rope, apply_rope, attention, rms_norm, swiglu
from .runner import SlotRunner
from .safetensors_io import SafetensorsCheckpoint


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_parameters: dict[str, Any]  # transformers' `rope_parameters` (rope_type, rope_theta, scaling fields)
    max_positions: int
    tp: int

    @classmethod
    def from_checkpoint(cls, target_dir: Path) -> Qwen3Config:
        path = Path(target_dir) / "config.json"
        c = json.loads(path.read_text())
        if c.get("architecture") != "Qwen3ForCausalLM":
            raise CheckpointError(path, "not a converted Qwen3 target", subject="architecture",
                                  found=c.get("architecture"), expected="Qwen3ForCausalLM")
        # TensorRT-LLM's `rotary_base` + `rotary_scaling` (HF's scaling fields, its type also under "type").
        scaling = {k: v for k, v in (c.get("rotary_scaling") or {}).items() if k != "type"}
        rope_type = scaling.get("rope_type") or (c.get("rotary_scaling") or {}).get("type") or "default"
        rope = {**scaling, "rope_type": rope_type, "rope_theta": float(c["rotary_base"])}
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["num_key_value_heads"], c["head_size"], c["intermediate_size"], c["norm_epsilon"],
                   rope, c["max_position_embeddings"], c["mapping"]["tp_size"])

    def rope(self, source: str | Path) -> Rope:
        return qwen3_rope({"rope_parameters": self.rope_parameters, "head_dim": self.head_dim,
                           "hidden_size": self.hidden_size, "num_attention_heads": self.num_heads,
                           "max_position_embeddings": self.max_positions}, source)


# The config fields transformers' Qwen3 rotary embedding reads.
_ROPE_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling", "head_dim", "hidden_size", "num_attention_heads",
                "max_position_embeddings")


def qwen3_rope(config: dict[str, Any], source: str | Path) -> Rope:
    """A Qwen3 model's rotary embedding from its HF config fields (`rope_parameters`, or the older
    `rope_theta` + `rope_scaling`), computed by transformers' `Qwen3RotaryEmbedding`: targets and
    DeepSpec's drafters (`Qwen3DSparkModel.rotary_emb`, deepspec/modeling/dspark/qwen3/modeling.py) alike."""
    from transformers import Qwen3Config  # imported here: transformers takes seconds to import
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf = Qwen3Config(**{k: config[k] for k in _ROPE_FIELDS if config.get(k) is not None})
    return Rope(Qwen3RotaryEmbedding(hf), source)


class Qwen3Target(SlotRunner):
    """One tensor-parallel rank of a Qwen3 target, with a KV cache of `num_slots` sequences."""

    def __init__(self, target_dir: Path, *, rank: int = 0, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype = torch.float32) -> None:
        self.config = cfg = Qwen3Config.from_checkpoint(target_dir)
        self.rank, self.dtype = rank, dtype
        self.rope = cfg.rope(Path(target_dir) / "config.json")
        if cfg.tp > 1 and not (dist.is_initialized() and dist.get_world_size() == cfg.tp):
            raise RuntimeError(f"{target_dir} is sharded for tp={cfg.tp}: run it with tp={cfg.tp} processes "
                               "(runtime.tp.DistributedTarget)")
        ckpt = SafetensorsCheckpoint(Path(target_dir) / f"rank{rank}.safetensors")
        self.w = {name: ckpt.get(name).to(dtype) for name in ckpt.tensors}
        self.q_heads = cfg.num_heads // cfg.tp
        self.kv_heads = max(1, cfg.num_kv_heads // cfg.tp)
        shape = (cfg.num_layers, num_slots, self.kv_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.max_len = max_len

    # -- forward -----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: list[list[int]], capture: tuple[int, ...] = (),
                start: list[int] | None = None, logits: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append `tokens[i]` to slot `slots[i]` and run them.

        `start`, when given, is each slot's cache length to continue from: shorter than what the slot
        holds rolls back (rejected drafts), 0 starts afresh. One call then carries the rollback, which
        matters with tensor parallelism where every call is a broadcast to the other ranks.

        Returns per slot the logits of its new tokens [n_i, vocab] (float32) and, when `capture`
        lists layer ids, the outputs of those layers concatenated [n_i, len(capture) * hidden]
        (HF `hidden_states[l + 1]`, what DSpark's drafter reads; -1 is the embedding output). With
        `logits` False, each slot's argmax token ids [n_i] stand in for its logits: all that greedy
        decoding needs, and under tensor parallelism the vocabulary shards are never gathered.
        """
        cfg, w = self.config, self.w
        batch, n_new = len(slots), [len(t) for t in tokens]
        width = max(n_new)
        slot_idx = torch.tensor(slots)
        self.continue_from(slots, start)
        start = self.lengths[slot_idx]
        if int((start + torch.tensor(n_new)).max()) > self.max_len:
            raise ValueError(f"a slot would exceed the cache length {self.max_len}")
        ids = torch.zeros(batch, width, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        positions = start[:, None] + torch.arange(width)
        cos, sin = self.rope(positions)
        total = int((start + torch.tensor(n_new)).max())
        keys = torch.arange(total)
        valid = torch.arange(width)[None, :] < torch.tensor(n_new)[:, None]  # [B, T]
        # Causal over the slot's cache; padded query rows see key 0 only (their output is discarded).
        allowed = (keys[None, None, :] <= positions[:, :, None]) & valid[:, :, None]
        allowed[:, :, 0] |= ~valid

        x = F.embedding(ids, w["transformer.vocab_embedding.weight"])
        captured = [x] if -1 in capture else []  # layer id -1: the embedding output (HF hidden_states[0])
        for layer in range(cfg.num_layers):
            p = f"transformer.layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
            qkv = F.linear(h, w[p + "attention.qkv.weight"])
            q, k, v = qkv.split([self.q_heads * cfg.head_dim, self.kv_heads * cfg.head_dim,
                                 self.kv_heads * cfg.head_dim], dim=-1)
            q = q.view(batch, width, self.q_heads, cfg.head_dim)
            k = k.view(batch, width, self.kv_heads, cfg.head_dim)
            q = rms_norm(q, w[p + "attention.q_layernorm.weight"], cfg.norm_eps).transpose(1, 2)
            k = rms_norm(k, w[p + "attention.k_layernorm.weight"], cfg.norm_eps).transpose(1, 2)
            v = v.view(batch, width, self.kv_heads, cfg.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            for b, slot in enumerate(slots):
                s, n = int(start[b]), n_new[b]
                self.k_cache[layer, slot, :, s: s + n] = k[b, :, :n]
                self.v_cache[layer, slot, :, s: s + n] = v[b, :, :n]
            out = attention(q, self.k_cache[layer, slot_idx, :, :total], self.v_cache[layer, slot_idx, :, :total],
                            allowed)
            out = F.linear(out.transpose(1, 2).reshape(batch, width, -1), w[p + "attention.dense.weight"])
            x = x + self._all_reduce(out)
            h = rms_norm(x, w[p + "post_layernorm.weight"], cfg.norm_eps)
            x = x + self._all_reduce(swiglu(h, w[p + "mlp.fc.weight"], w[p + "mlp.gate.weight"],
                                            w[p + "mlp.proj.weight"]))
            if layer in capture:
                captured.append(x)
        self.lengths[slot_idx] = start + torch.tensor(n_new)
        h = rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_eps)
        head = self._head(F.linear(h, w["lm_head.weight"]).float(), full=logits)
        order = [captured[sorted(capture).index(layer)] for layer in capture]
        features = torch.cat(order, dim=-1) if capture else None
        return ([head[b, : n_new[b]] for b in range(batch)],
                [features[b, : n_new[b]] for b in range(batch)] if capture else [])
