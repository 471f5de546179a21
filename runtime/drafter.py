"""DSpark drafter for the Qwen3 family (DeepSpec `Qwen3DSparkModel`), reference backend.

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..plugins import launch
from .calibration import CALIBRATION_FILE, read_calibration
from .errors import CheckpointError
from .heads import ConfidenceHead, MarkovHead, sample
from .layers import Projection, apply_rope, native_bf16, rms_norm, runner_device
from .qwen3 import qwen3_rope
from .safetensors_io import SafetensorsCheckpoint


@dataclass
class Draft:
    """One round's proposals for a batch: tokens [B, γ], the distributions they came from [B, γ, V]
    ([B, γ, 0] when every row is greedy), raw confidence logits and calibrated confidences [B, γ],
    survival = cumprod(confidence)."""

    tokens: torch.Tensor
    probs: torch.Tensor
    conf_logits: torch.Tensor
    confidence: torch.Tensor

    @property
    def survival(self) -> torch.Tensor:
        return torch.cumprod(self.confidence, dim=-1)

    def cpu(self) -> Draft:
        """This draft on the host (what the wire protocol sends; a no-op for a CPU drafter)."""
        return Draft(self.tokens.cpu(), self.probs.cpu(), self.conf_logits.cpu(), self.confidence.cpu())


class SlotContext:
    """What every drafter does with its per-slot context: the target features of committed tokens,
    turned into each draft layer's keys / values by `_write_context`, for many slots in one pass."""

    ctx_len: torch.Tensor  # [num_slots] tokens of context each slot holds (on the host: bookkeeping)
    max_len: int
    device = torch.device("cpu")  # where the drafter's weights and caches live

    @torch.inference_mode()
    def draft(self, slots: list[int], anchors: list[int], temperatures: list[float],
              generators: list[torch.Generator | None], gamma: int | None = None) -> Draft:
        """One round: the family's parallel `backbone` (hidden [B, γ, d], base logits [B, γ, V]), then the
        shared sequential heads. A family whose heads read something else overrides this (DeepSeek-V4)."""
        hidden, base_logits = self.backbone(slots, anchors, gamma)
        return sequential_heads(self.markov, self.confidence, hidden, base_logits,
                                torch.tensor(anchors, device=self.device), temperatures, generators)

    def reset(self, slot: int) -> None:
        self.ctx_len[slot] = 0

    def add_context(self, slot: int, features: torch.Tensor) -> None:
        """Append target features [n, len(target_layer_ids) * hidden] of newly committed tokens."""
        self.add_context_batch([slot], [features])

    @torch.inference_mode()
    def add_context_batch(self, slots: list[int], features: list[torch.Tensor]) -> None:
        """`add_context` for several slots at once: one pass over the draft layers, not one per slot."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one context update: {slots}")
        kept = [(slot, f) for slot, f in zip(slots, features, strict=True) if f.shape[0]]
        if not kept:
            return
        kept_slots = [slot for slot, _ in kept]
        starts = self.ctx_len[kept_slots].tolist()
        ends = [start + f.shape[0] for (_, f), start in zip(kept, starts, strict=True)]
        for slot, end in zip(kept_slots, ends, strict=True):
            if end > self.max_len:
                raise ValueError(f"slot {slot}: context would exceed {self.max_len} tokens")
        if len(kept) == 1:  # one slot's new tokens are a slice of its positions: no index tensors
            self._write_context(kept_slots[0], slice(starts[0], ends[0]), kept[0][1])
        else:  # token t of the concatenation goes to slot slot_of[t], position positions[t]
            slot_of = torch.tensor([slot for slot, f in kept for _ in range(f.shape[0])], device=self.device)
            positions = torch.tensor([p for start, end in zip(starts, ends, strict=True) for p in range(start, end)],
                                     device=self.device)
            self._write_context(slot_of, positions, torch.cat([f for _, f in kept]))
        self.ctx_len[kept_slots] = torch.tensor(ends)

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        raise NotImplementedError

    def _load_unsharded(self, draft_dir: Path, device: str | torch.device, dtype: torch.dtype | None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.dtype]:
        """What every drafter converted as one unsharded file set loads first: its config.json (refused
        unless tp 1), rank0.safetensors on `device` in the runner's dtype (layers.runner_device), the
        DSpark fields (block size, mask token, target layers) and the Markov / confidence heads.
        Sets those attributes and returns (config, weights, dtype) for the family's own layers."""
        self.device, dtype = runner_device(device, dtype)
        self.config = c = json.loads((draft_dir / "config.json").read_text())
        if c["mapping"]["tp_size"] != 1:
            raise CheckpointError(draft_dir / "config.json", "the reference drafter runs unsharded",
                                  subject="mapping.tp_size", found=c["mapping"]["tp_size"], expected=1)
        dspark = c["dspark"]
        ckpt = SafetensorsCheckpoint(draft_dir / "rank0.safetensors")
        self.w = w = {name: ckpt.get(name).to(device=self.device, dtype=dtype) for name in ckpt.tensors}
        self.block_size, self.mask_token_id = dspark["block_size"], dspark["mask_token_id"]
        self.target_layer_ids = tuple(dspark["target_layer_ids"])
        self.markov = MarkovHead.from_weights(dspark["markov_head_type"], w, source=draft_dir / "rank0.safetensors")
        calibration = draft_dir / CALIBRATION_FILE
        temperatures = read_calibration(calibration, self.block_size) if calibration.is_file() else None
        self.confidence = ConfidenceHead(w["confidence_head.proj.weight"], w.get("confidence_head.proj.bias"),
                                         dspark["confidence_head_with_markov"], temperatures)
        return c, w, dtype


class Qwen3DSparkDrafter(SlotContext):
    def __init__(self, draft_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, bf16_products: bool | None = None,
                 device: str | torch.device = "cpu") -> None:
        """`device`: where weights, caches and activations live (float32 on the CPU, bfloat16 elsewhere
        unless `dtype` says otherwise). `bf16_products`: on the CPU, multiply the large projections in
        bf16 (see layers.Projection); by default where this CPU does so natively."""
        draft_dir = Path(draft_dir)
        c, w, dtype = self._load_unsharded(draft_dir, device, dtype)
        self.layers, self.eps = c["num_hidden_layers"], c["rms_norm_eps"]
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        # One projection where the checkpoint has two or three weights (q/k/v, k/v, gate/up): fewer,
        # bigger products.
        bf16 = (self.device.type == "cpu" and native_bf16()) if bf16_products is None else bf16_products

        def projection(*names: str) -> Projection:
            return Projection(torch.cat([w[n] for n in names]), bf16=bf16)

        layer = [f"layers.{i}." for i in range(self.layers)]
        self.qkv = [projection(*(f"{p}self_attn.{n}_proj.weight" for n in "qkv")) for p in layer]
        self.o = [projection(f"{p}self_attn.o_proj.weight") for p in layer]
        self.gate_up = [projection(f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight") for p in layer]
        self.down = [projection(f"{p}mlp.down_proj.weight") for p in layer]
        self.fc, self.lm_head = projection("fc.weight"), projection("lm_head.weight")
        # Context enters every layer's k_proj / v_proj straight from `hidden_norm`, so all layers'
        # context keys and values come from one product, and their k_norms apply in one call.
        self.context_kv = projection(*(f"{p}self_attn.{n}_proj.weight" for p in layer for n in "kv"))
        self.context_k_norm = torch.stack([w[p + "self_attn.k_norm.weight"] for p in layer])[:, None]
        # q_norm and k_norm as one [heads + kv_heads, head_dim] weight: a block's queries and keys are
        # normalised and rotated together.
        self.qk_norm = [torch.cat([w[p + "self_attn.q_norm.weight"].expand(self.heads, -1),
                                   w[p + "self_attn.k_norm.weight"].expand(self.kv_heads, -1)]) for p in layer]
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

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        n = features.shape[0]
        ctx = rms_norm(self.fc(features.to(self.device, self.dtype)), self.w["hidden_norm.weight"], self.eps)
        # [n, layers, kv_heads, head_dim] each
        k, v = self.context_kv(ctx).view(n, self.layers, 2, self.kv_heads, self.head_dim).unbind(2)
        k = apply_rope(rms_norm(k, self.context_k_norm, self.eps), self.cos_table[positions][:, None],
                       self.sin_table[positions][:, None])
        if isinstance(positions, slice):  # basic indexing keeps the cache's dimension order
            k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        # else token t goes to (every layer, its slot, all heads, its position): advanced indices put t first.
        self.k_ctx[:, slot_of, :, positions] = k
        self.v_ctx[:, slot_of, :, positions] = v

    @torch.inference_mode()
    def backbone(self, slots: list[int], anchors: list[int], gamma: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parallel part of a round: hidden states [B, γ, d] after `norm`, base logits U [B, γ, V] (float32)."""
        w, gamma = self.w, gamma or self.block_size
        batch, heads, kv_heads, head_dim = len(slots), self.heads, self.kv_heads, self.head_dim
        # Index tensors are made on the host (ctx_len is host bookkeeping) and copied to the device once.
        dev = self.device
        ctx_len = self.ctx_len[slots]
        ids = torch.full((batch, gamma), self.mask_token_id, dtype=torch.long)
        ids[:, 0] = torch.tensor(anchors)
        ids, slot_idx = ids.to(dev), torch.tensor(slots, device=dev)
        positions = (ctx_len[:, None] + torch.arange(gamma)).to(dev)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        # Every block position sees its slot's keys 0 .. ctx_len + γ - 1: the whole context and the whole
        # block. With one slot (or equal contexts) that needs no mask; otherwise shorter rows mask their tail.
        length = int(ctx_len.max()) + gamma
        single = slots[0] if batch == 1 else None
        mask = None if single is not None or bool((ctx_len == ctx_len[0]).all()) else \
            (torch.arange(length) < (ctx_len + gamma)[:, None])[:, None, None].to(dev)

        x = F.embedding(ids, w["embed_tokens.weight"])
        for layer in range(self.layers):
            p = f"layers.{layer}."
            qkv = self.qkv[layer](rms_norm(x, w[p + "input_layernorm.weight"], self.eps))
            qk = qkv[..., : (heads + kv_heads) * head_dim].view(batch, gamma, heads + kv_heads, head_dim)
            qk = apply_rope(rms_norm(qk, self.qk_norm[layer], self.eps).transpose(1, 2), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[..., (heads + kv_heads) * head_dim:].view(batch, gamma, kv_heads, head_dim)
            k_cache, v_cache = self.k_ctx[layer], self.v_ctx[layer]
            if single is not None:
                start = int(ctx_len[0])
                k_cache[single, :, start: start + gamma] = k[0]
                v_cache[single, :, start: start + gamma] = v[0].transpose(0, 1)
                keys, values = k_cache[single, None, :, :length], v_cache[single, None, :, :length]
            else:  # the (slot, position) index pairs lead: [batch, γ, kv_heads, head_dim]
                k_cache[slot_idx[:, None], :, positions] = k.transpose(1, 2)
                v_cache[slot_idx[:, None], :, positions] = v
                keys, values = k_cache[slot_idx, :, :length], v_cache[slot_idx, :, :length]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)
            x = x + self.o[layer](out.transpose(1, 2).reshape(batch, gamma, -1))
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
            gate, up = self.gate_up[layer](h).chunk(2, dim=-1)
            x = x + self.down[layer](F.silu(gate) * up)
        hidden = rms_norm(x, w["norm.weight"], self.eps)
        return hidden, self.lm_head(hidden).float()


def sequential_heads(markov: MarkovHead, confidence: ConfidenceHead, hidden: torch.Tensor, base_logits: torch.Tensor,
                     anchors: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None],
                     confidence_hidden: torch.Tensor | None = None) -> Draft:
    """The cheap left-to-right part of a DSpark round, shared by every family's drafter.

    `confidence_hidden` is the confidence head's input where a family feeds it something other than
    `hidden` (DeepSeek-V4: the hidden before the final norm).

    An all-greedy batch returns probs [B, γ, 0]: greedy drafts are verified by argmax, so their
    (one-hot) distributions would carry nothing.

    On a GPU these steps run as the MarkovSample and DSparkConfidence kernels (plugins/kernels.py; the
    dispatch is `launch.use_kernels`); this torch code is the CPU path and their oracle.
    """
    if markov.kind in KERNEL_MARKOV_KINDS and launch.use_kernels(base_logits):
        return kernel_heads(markov, confidence, hidden, base_logits, anchors, temperatures, generators,
                            confidence_hidden)
    batch, gamma, _ = base_logits.shape
    greedy = all(t <= 0 for t in temperatures)
    tokens, probs, markov_embeddings = [], [], []
    prev, state = anchors, markov.initial_state(batch)
    for base, h in zip(base_logits.unbind(1), hidden.unbind(1), strict=True):
        bias, e, state = markov.step(prev, h, state)
        logits = base if bias is None else base + bias.float()
        if greedy:
            prev = logits.argmax(dim=-1)
        else:
            prev, p = sample(logits, temperatures, generators)
            probs.append(p)
        tokens.append(prev)
        markov_embeddings.append(e)
    # Confidence needs nothing drawn later, so all positions go in one call once the tokens exist.
    e = None if markov_embeddings[0] is None else torch.stack(markov_embeddings, dim=1)
    conf_logits = confidence.logit(hidden if confidence_hidden is None else confidence_hidden, e).float()
    return Draft(torch.stack(tokens, dim=1), torch.stack(probs, dim=1) if probs else base_logits[..., :0],
                 conf_logits, confidence.calibrated(conf_logits))


KERNEL_MARKOV_KINDS = ("vanilla", "gated", "rnn")  # MarkovSample's heads (kernels.KIND_IDS)


def kernel_heads(markov: MarkovHead, confidence: ConfidenceHead, hidden: torch.Tensor, base_logits: torch.Tensor,
                 anchors: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None],
                 confidence_hidden: torch.Tensor | None = None) -> Draft:
    """`sequential_heads` as the MarkovSample + DSparkConfidence kernels: greedy rows take the argmax (the
    same tokens as the torch path up to float ties); sampled rows draw from Philox with one seed per row,
    taken from the row's generator, so a request's drafts follow its own seed (not the torch path's draws)."""
    device = base_logits.device
    seeds = [0 if t <= 0 else int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for t, g in
             zip(temperatures, generators, strict=True)]
    out = launch.markov_sample(base_logits, hidden, anchors, torch.tensor(temperatures, device=device),
                               torch.tensor(seeds, dtype=torch.int32, device=device), markov.w1, markov.w2,
                               markov.proj_weight, markov.proj_bias, kind=markov.kind)
    sts = None if confidence.temperatures is None else torch.tensor(confidence.temperatures, device=device)
    conf = launch.dspark_confidence(hidden if confidence_hidden is None else confidence_hidden, out.markov_emb,
                                    confidence.weight, confidence.bias, sts)
    greedy = all(t <= 0 for t in temperatures)
    return Draft(out.tokens.long(), base_logits[..., :0] if greedy else out.probs, conf.logits, conf.confidence)
