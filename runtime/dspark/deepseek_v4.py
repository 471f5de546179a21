"""DSpark drafter of DeepSeek-V4 (the `mtp.0..N-1.*` stages inside the target checkpoint), reference backend.

Mirrors the Qwen3 drafter (runtime/dspark/qwen3.py) with V4 blocks; one round for a batch of requests:
  1. context features: the target's features at `target_layer_ids` (see `target_feature` in
     runtime/deepseek_v4.py), concatenated, through `mtp.0.main_proj` and `mtp.0.main_norm`; each stage
     turns them into its shared K = V (`wkv`, `attn.norm`, main RoPE at the token's position), cached
     per slot and appended as tokens are committed (the anchor's features arrive with the next verify);
  2. the parallel backbone: the block [x0, MASK × (γ-1)] at positions ctx_len .. ctx_len+γ-1. Its
     embeddings (the target's `embed`) are copied into the `hc_mult` mHC streams, exactly as the target
     forms its residual from token embeddings. Each stage is a full V4 block (mHC, MQA with sinks, MoE):
     queries from the block; keys/values [context; block]; no causal mask inside the block; every block
     query sees the same context: the newest min(window, ctx_len) positions (the window is anchored at
     the block, unlike the target's per-query sliding window). The stages are sliding-attention blocks,
     so no compressor runs. Then the last stage's `hc_head` and `norm`, and the target's `head` give the
     base logits of all γ positions at once;
  3. the shared sequential heads (runtime/dspark/base.py `sequential_heads`): Markov head from the last
     stage's `markov_head` (older `embed`/`head` names are canonicalised by the converter and accepted
     here too), bias-free confidence head on the pre-norm `hc_head` output, STS calibration from
     `sts.json` when present.
The README section "DeepSeek-V4 specifics" checks each step against the public implementations.

Sharded drafts (convert --tp N writes the `mtp.*` shards like the target's) are reassembled into one
unsharded drafter on the calling process: the drafter is small next to the target, and that keeps it
out of the collective schedule of the verify ranks. The shared embedding and head are read from the
target's rank files (`shared_with_target` names them; the vocabulary-sharded head is concatenated).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..deepseek_v4 import (
    Rope,
    V4Config,
    attend,
    hc_head,
    hc_post,
    hc_pre,
    moe,
    project_out,
    queries,
    read_merged,
    shared_kv,
)
from ..errors import CheckpointError
from ..layers import rms_norm, runner_device
from .base import Draft, SlotContext, load_heads, sequential_heads


class DeepseekV4DSparkDrafter(SlotContext):
    def __init__(self, draft_dir: Path, *, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 target_dir: Path | None = None) -> None:
        """`device` / `dtype`: as for the Qwen3 drafter (float32 on the CPU, bfloat16 elsewhere).
        `target_dir`: the converted target whose embedding and head the stages share (the loader passes
        it; default: `target` beside `draft_dir`, the layout `convert` writes)."""
        draft_dir = Path(draft_dir)
        self.device, dtype = runner_device(device, dtype)
        c = json.loads((draft_dir / "config.json").read_text())
        dspark = c["dspark"]
        self.cfg = cfg = V4Config.from_source(c["source_config"])  # unsharded here, whatever the files say
        w = {n: t.to(self.device) for n, t in read_merged(draft_dir, c["mapping"]["tp_size"], dtype).items()}
        self.stages = c.get("mtp_stages") or 1 + max(int(m.group(1)) for n in w if (m := re.match(r"mtp\.(\d+)\.", n)))
        target_dir = Path(target_dir) if target_dir is not None else draft_dir.parent / "target"
        shared = c.get("shared_with_target") or {"embed": "embed.weight", "head": "head.weight"}
        target_tp = json.loads((target_dir / "config.json").read_text())["mapping"]["tp_size"]
        wanted = re.compile("^(" + "|".join(re.escape(n) for n in shared.values()) + ")$")
        from_target = read_merged(target_dir, target_tp, dtype, keep=wanted)
        missing = [n for n in shared.values() if n not in from_target]
        if missing:
            raise CheckpointError(target_dir, "the drafter's shared tensors are missing from the target",
                                  subject=", ".join(missing), expected="embed and head of the target")
        self.embed = from_target[shared["embed"]].to(self.device)
        self.head = from_target[shared["head"]].to(self.device)
        self.w = w

        self.block_size, self.mask_token_id = dspark["block_size"], dspark["mask_token_id"]
        self.target_layer_ids = tuple(dspark["target_layer_ids"])
        last = f"mtp.{self.stages - 1}."
        self.last = last
        self.markov, self.confidence = load_heads(w, draft_dir, self.block_size,
                                                  dspark.get("markov_head_type", "vanilla"),
                                                  dspark.get("confidence_head_with_markov", True), last, draft_dir)
        self.rope = Rope(cfg).to(self.device)
        self.experts = range(cfg.num_experts)
        self.ctx_kv = torch.zeros(self.stages, num_slots, max_len, cfg.head_dim, dtype=dtype, device=self.device)
        self.ctx_len = torch.zeros(num_slots, dtype=torch.long)
        self.max_len, self.dtype = max_len, dtype

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        cfg, w = self.cfg, self.w
        if isinstance(positions, slice):
            positions = torch.arange(positions.start, positions.stop, device=self.device)
        ctx = rms_norm(F.linear(features.to(self.device, self.dtype), w["mtp.0.main_proj.weight"]),
                       w["mtp.0.main_norm.weight"], cfg.eps)
        cos, sin = self.rope("main", positions)
        for stage in range(self.stages):
            self.ctx_kv[stage, slot_of, positions] = shared_kv(ctx, w, f"mtp.{stage}.attn.", cfg, cos, sin)

    def visible_context(self, ctx_len: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(low, high, visible [B, high - low]): the context positions low .. high-1 that each slot's block sees.

        Every block query sees the same keys: the slot's newest min(window, ctx_len) context positions (and,
        in `draft`, the whole block, non-causally), as `get_dspark_topk_idxs` in NVIDIA/TensorRT-LLM
        tensorrt_llm/_torch/models/modeling_dspark.py, ported from DeepSeek's reference, selects them. The
        window is anchored at the block, not slid per query as in the target's own attention.
        """
        low, high = max(0, int(ctx_len.min()) - self.cfg.window), int(ctx_len.max())
        keys = torch.arange(low, high)
        return low, high, (keys < ctx_len[:, None]) & (keys >= ctx_len[:, None] - self.cfg.window)

    @torch.inference_mode()
    def draft(self, slots: list[int], anchors: list[int], temperatures: list[float],
              generators: list[torch.Generator | None], gamma: int | None = None) -> Draft:
        cfg, w, gamma = self.cfg, self.w, gamma or self.block_size
        dev, batch = self.device, len(slots)
        ids, slot_idx, positions, ctx_len = self._block(slots, anchors, gamma)
        low, high, in_context = self.visible_context(ctx_len)
        allowed = torch.cat([in_context[:, None].expand(-1, gamma, -1),
                             torch.ones(batch, gamma, gamma, dtype=torch.bool)], dim=-1).to(dev)
        cos, sin = self.rope("main", positions)

        streams = F.embedding(ids, self.embed)[:, :, None].expand(-1, -1, cfg.hc, -1).contiguous()
        for stage in range(self.stages):
            p = f"mtp.{stage}."
            post, comb, collapsed = hc_pre(streams, w, p + "hc_attn_", cfg)
            h = rms_norm(collapsed, w[p + "attn_norm.weight"], cfg.eps)
            q, _ = queries(h, w, p + "attn.", cfg, cos, sin)
            kv = torch.cat([self.ctx_kv[stage, slot_idx, low:high], shared_kv(h, w, p + "attn.", cfg, cos, sin)], 1)
            out = attend(q, kv, allowed, w[p + "attn.attn_sink"])
            streams = hc_post(project_out(out, w, p + "attn.", cfg, cos, sin), post, comb, streams)
            post, comb, collapsed = hc_pre(streams, w, p + "hc_ffn_", cfg)
            h = rms_norm(collapsed, w[p + "ffn_norm.weight"], cfg.eps)
            ffn = moe(h.flatten(0, 1), ids.flatten(), w, p + "ffn.", cfg, self.experts).view_as(h)
            streams = hc_post(ffn, post, comb, streams)
        head_hidden = hc_head(streams, w, self.last, cfg)
        hidden = rms_norm(head_hidden, w[self.last + "norm.weight"], cfg.eps)
        base_logits = F.linear(hidden, self.head).float()
        # The confidence head reads the PRE-norm hc_head output: DeepSeek's V4-Flash-DSpark
        # `inference/model.py` `forward_head` does `x = hc_head(x)`, `logits = head(norm(x))`, confidence on
        # `cat[x, markov_w1[prev]]` (quoted in warpfront/hipfire
        # docs/design/2026-06-28-dspark-deepseek4-forward-spec.md); vLLM feeds the same tensor
        # (vllm-project/vllm vllm/models/deepseek_v4/nvidia/dspark.py: the model returns the pre-norm
        # hc_head hidden, `compute_logits` norms it, `compute_confidence` does not). TensorRT-LLM passes the
        # normed one but ships with confidence truncation disabled.
        return sequential_heads(self.markov, self.confidence, hidden, base_logits, ids[:, 0], temperatures, generators,
                                confidence_hidden=head_hidden)
