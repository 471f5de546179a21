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
from .layers import Rope, apply_rope, attention, rms_norm, runner_device, swiglu
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


@dataclass
class Step:
    """One forward's inputs as device tensors of fixed shapes [B, T] (B rows, T tokens each, L keys): all a
    forward reads, so that a step of given (B, T, L) can be replayed from a captured CUDA graph.

    Padding rows and padding tokens write their keys / values into the scratch slot (the cache's last)
    and attend to key 0 only; their outputs are discarded."""

    ids: torch.Tensor  # [B, T] token ids (0 where padded)
    positions: torch.Tensor  # [B, T] each token's position in its slot
    valid: torch.Tensor  # [B, T] bool: a real token, not padding
    read_slot: torch.Tensor  # [B] the slot whose cache each row reads
    write_slot: torch.Tensor  # [B, T] where each token's keys / values go: its row's slot, or the scratch slot
    keys: int  # L: the cache positions attended to (0 .. L - 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.ids.shape, self.keys)

    def padded(self, batch: int, width: int, keys: int, scratch: int) -> Step:
        """This step with rows, tokens and keys padded to (batch, width, keys) (a CUDA-graph bucket)."""
        b, t = self.ids.shape
        if batch < b or width < t or keys < self.keys:
            raise ValueError(f"cannot pad a step of shape {self.shape} to {(batch, width, keys)}")

        def pad(x: torch.Tensor, value: int | bool) -> torch.Tensor:
            out = x.new_full((batch, width), value)
            out[:b, :t] = x
            return out

        read_slot = self.read_slot.new_full((batch,), scratch)
        read_slot[:b] = self.read_slot
        return Step(pad(self.ids, 0), pad(self.positions, 0), pad(self.valid, False), read_slot,
                    pad(self.write_slot, scratch), keys)


class Qwen3Target(SlotRunner):
    """One tensor-parallel rank of a Qwen3 target, with a KV cache of `num_slots` sequences.

    `device`: where weights, caches and activations live (cpu, cuda:N; meta for tests that only check
    placement); `dtype`: float32 on the CPU and bfloat16 elsewhere by default. Slot lengths stay on the
    host: they are the wire protocol's START / COUNTS, read without waiting for the device."""

    def __init__(self, target_dir: Path, *, rank: int = 0, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu", cuda_graphs: bool = False
                 ) -> None:
        """`cuda_graphs`: replay decode-shaped steps from CUDA graphs (see `use_cuda_graphs`)."""
        cfg = Qwen3Config.from_checkpoint(target_dir)
        if cfg.tp > 1 and not (dist.is_initialized() and dist.get_world_size() == cfg.tp):
            raise RuntimeError(f"{target_dir} is sharded for tp={cfg.tp}: run it with tp={cfg.tp} processes "
                               "(runtime.tp.DistributedTarget)")
        device, dtype = runner_device(device, dtype)
        ckpt = SafetensorsCheckpoint(Path(target_dir) / f"rank{rank}.safetensors")
        weights = {name: ckpt.get(name).to(device=device, dtype=dtype) for name in ckpt.tensors}
        self._setup(cfg, weights, Path(target_dir) / "config.json", rank, num_slots, max_len, device, dtype,
                    cuda_graphs)

    @classmethod
    def with_random_weights(cls, cfg: Qwen3Config, *, num_slots: int = 8, max_len: int = 1024,
                            device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
                            cuda_graphs: bool = False) -> Qwen3Target:
        """An unsharded runner of `cfg`'s shapes with random weights made on `device`: timings at real-model
        sizes (8B: 16 GB of bf16) without a checkpoint on disk."""
        device, dtype = runner_device(device, dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02

        weights = {"transformer.vocab_embedding.weight": rand(cfg.vocab_size, h),
                   "transformer.ln_f.weight": torch.ones(h, device=device, dtype=dtype),
                   "lm_head.weight": rand(cfg.vocab_size, h)}
        for layer in range(cfg.num_layers):
            p = f"transformer.layers.{layer}."
            weights |= {p + "input_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
                        p + "post_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
                        p + "attention.q_layernorm.weight": torch.ones(hd, device=device, dtype=dtype),
                        p + "attention.k_layernorm.weight": torch.ones(hd, device=device, dtype=dtype),
                        p + "attention.qkv.weight": rand(qkv, h),
                        p + "attention.dense.weight": rand(h, cfg.num_heads * hd),
                        p + "mlp.fc.weight": rand(inter, h), p + "mlp.gate.weight": rand(inter, h),
                        p + "mlp.proj.weight": rand(h, inter)}
        runner = cls.__new__(cls)
        runner._setup(cfg, weights, "<random weights>", 0, num_slots, max_len, device, dtype, cuda_graphs)
        return runner

    def _setup(self, cfg: Qwen3Config, weights: dict[str, torch.Tensor], source: str | Path, rank: int,
               num_slots: int, max_len: int, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.config, self.w, self.device = cfg, weights, device
        self.rank, self.dtype = rank, dtype
        self.rope = cfg.rope(source).to(self.device)
        self.q_heads = cfg.num_heads // cfg.tp
        self.kv_heads = max(1, cfg.num_kv_heads // cfg.tp)
        self.scratch = num_slots  # one more cache slot, written by padding (see Step)
        shape = (cfg.num_layers, num_slots + 1, self.kv_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.max_len = max_len
        self.graphs = None  # runtime.cuda_graphs.GraphedSteps once `use_cuda_graphs` is called
        if cuda_graphs:
            self.use_cuda_graphs()

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
        All on the runner's device.
        """
        n_new = [len(t) for t in tokens]
        self.continue_from(slots, start)
        step = self.step_inputs(slots, tokens)
        if self.graphs is not None and self.graphs.fits(step):
            head, features = self.graphs.run(step, capture, logits)
        else:
            head, features = self.run(step, capture, logits)
        self.lengths[slots] = self.lengths[slots] + torch.tensor(n_new)
        return ([head[b, : n_new[b]] for b in range(len(slots))],
                [features[b, : n_new[b]] for b in range(len(slots))] if capture else [])

    def step_inputs(self, slots: list[int], tokens: list[list[int]]) -> Step:
        """The Step for appending `tokens[i]` to slot `slots[i]`: built on the host, copied to the device once."""
        batch, n_new = len(slots), [len(t) for t in tokens]
        width, starts = max(n_new), self.lengths[slots]
        total = int((starts + torch.tensor(n_new)).max())
        if total > self.max_len:
            raise ValueError(f"a slot would exceed the cache length {self.max_len}")
        ids = torch.zeros(batch, width, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        valid = torch.arange(width)[None, :] < torch.tensor(n_new)[:, None]
        read_slot = torch.tensor(slots)
        write_slot = torch.where(valid, read_slot[:, None], self.scratch)
        positions = torch.where(valid, starts[:, None] + torch.arange(width), 0)
        dev = self.device
        return Step(ids.to(dev), positions.to(dev), valid.to(dev), read_slot.to(dev), write_slot.to(dev), total)

    def run(self, step: Step, capture: tuple[int, ...], logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward of a Step on the device, without reading anything back to the host (what a CUDA
        graph captures): (logits [B, T, vocab] float32, or argmax ids [B, T]; features [B, T, F] or None)."""
        cfg, w = self.config, self.w
        batch, width, total = step.shape
        positions, valid = step.positions, step.valid
        cos, sin = self.rope(positions)
        keys = torch.arange(total, device=positions.device)
        # Causal over the slot's cache; padded query rows see key 0 only (their output is discarded).
        allowed = (keys[None, None, :] <= positions[:, :, None]) & valid[:, :, None]
        allowed[:, :, 0] |= ~valid

        x = F.embedding(step.ids, w["transformer.vocab_embedding.weight"])
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
            v = v.view(batch, width, self.kv_heads, cfg.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # Token (b, t) goes to (its slot, all heads, its position): one scatter per cache and layer.
            self.k_cache[layer][step.write_slot, :, positions] = k.transpose(1, 2)
            self.v_cache[layer][step.write_slot, :, positions] = v
            out = attention(q, self.k_cache[layer, step.read_slot, :, :total],
                            self.v_cache[layer, step.read_slot, :, :total], allowed)
            out = F.linear(out.transpose(1, 2).reshape(batch, width, -1), w[p + "attention.dense.weight"])
            x = x + self._all_reduce(out)
            h = rms_norm(x, w[p + "post_layernorm.weight"], cfg.norm_eps)
            x = x + self._all_reduce(swiglu(h, w[p + "mlp.fc.weight"], w[p + "mlp.gate.weight"],
                                            w[p + "mlp.proj.weight"]))
            if layer in capture:
                captured.append(x)
        h = rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_eps)
        head = self._head(F.linear(h, w["lm_head.weight"]).float(), full=logits)
        order = [captured[sorted(capture).index(layer)] for layer in capture]
        return head, torch.cat(order, dim=-1) if capture else None

    def use_cuda_graphs(self, **buckets: Any) -> None:
        """Replay decode-shaped steps from CUDA graphs (runtime.cuda_graphs; CUDA devices only)."""
        from .cuda_graphs import GraphedSteps

        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this runner is on {self.device}")

        self.graphs = GraphedSteps(self, **buckets)
