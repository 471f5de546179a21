"""DeepSeek-V4 target runner for the reference backend, and the V4 building blocks its drafter reuses.

Reads one rank of a converted checkpoint (DeepSeek's tensor names; see builder/families/deepseek_v4.py
for the sharding) and runs batched forwards where every slot brings its own number of new tokens,
behind the same interface as `Qwen3Target`. The maths follows transformers' `DeepseekV4ForCausalLM`
(the test oracle): mHC residual streams, shared-KV MQA with sinks and partial interleaved RoPE, sliding
window attention plus the compressed branches (CSA: overlapping windows of 4 picked by the lightning
indexer; HCA: windows of 128), grouped output projection, hash / top-k MoE with a shared expert.

Per-slot cache and exact rollback. transformers keeps the compressors' running state (buffered tokens,
overlap slice, emitted entries) as incremental cache objects that cannot be rewound. We keep instead,
per slot and position, the sliding K(=V) and the compressors' raw projections (kv and gate, before
pooling); compressed entry w is a pure function of the raw rows of windows w-1 and w. A forward that
covers positions [s, e) (re)computes entries s//m .. e//m - 1 before any query reads them, so every
entry read was computed from committed or current tokens only. Rollback is therefore exact and costs
nothing: it moves the slot's length back, like the Qwen3 runner.

Indexer ties. The indexer keeps the `index_topk` best-scoring visible entries. Scores are sums of ReLUs
and are often exactly 0, so ties at the cut are common (with few index heads); torch.topk orders ties
arbitrarily, and transformers' own full and incremental passes can then pick different entries. We
break ties towards the earlier entry (a stable sort), which does not depend on how the sequence was
split into forwards; the oracle test gives transformers the same rule.

Context features for DSpark (`target_feature`). `layer_output_hc_mean` (default): the mean over the
mHC streams of each chosen layer's OUTPUT, the residual after its hc_ffn post-mapping, concatenated in
the order the layers are listed. This is what the V4 DSpark checkpoints were built for: DeepSeek's
V4-Flash-DSpark `inference/model.py` does `h = layer(h); main_hiddens.append(h.mean(dim=2))` (quoted in
warpfront/hipfire docs/design/2026-06-28-dspark-deepseek4-forward-spec.md) and TensorRT-LLM captures
the post-mapped residual (NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_deepseekv4.py,
`DeepseekV4DecoderLayer.forward`). For l < num_layers - 1 it equals transformers'
`hidden_states[l + 1].mean(-2)`; the last layer's output is the residual before `hc_head`.
Two input-side readings are kept as explicit, non-default choices (no V4 DSpark checkpoint uses them):
`layer_input_hc_mean` (the streams entering layer l, i.e. layer l-1's output) and
`layer_input_hc_collapsed` (layer l's attention-side mHC collapse, what its attention sees before
`attn_norm`; DeepSeek's later V4.1 reference reads its target layers' attention input).

Tensor/expert parallelism (gloo): query heads, sinks and output groups, the shared expert's columns and
the vocabulary are sharded; routed experts live whole on their rank. Attention and FFN partial sums are
all_reduced once each; logits shards are all_gathered. Everything else is replicated and computed
redundantly (the indexer included, so every rank picks the same entries).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..builder.families.deepseek_v4 import shard_dim  # the converter's sharding, read back
from .errors import CheckpointError
from .fp8 import dequantize_fp8_block
from .layers import rms_norm, runner_device
from .runner import SlotRunner
from .safetensors_io import SafetensorsCheckpoint

SCALE_SUFFIX = "_scale_inv"
TARGET_FEATURES = ("layer_output_hc_mean", "layer_input_hc_mean", "layer_input_hc_collapsed")  # default first
CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class V4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    q_rank: int
    o_groups: int
    o_rank: int
    num_experts: int
    experts_per_token: int
    hc: int
    hc_iters: int
    hc_eps: float
    eps: float
    layer_types: tuple[str, ...]
    mlp_types: tuple[str, ...]
    compress_rates: dict[str, int]
    window: int
    index_heads: int
    index_dim: int
    index_topk: int
    scoring: str
    routed_scale: float
    swiglu_limit: float
    tp: int
    source: dict[str, Any]

    @classmethod
    def from_source(cls, c: dict[str, Any], tp: int = 1) -> V4Config:
        """From the original HF config (`source_config` in a converted config.json); HF's defaults."""
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"], head_dim=c.get("head_dim", 512), q_rank=c.get("q_lora_rank", 1024),
            o_groups=c.get("o_groups", 8), o_rank=c.get("o_lora_rank", 1024), num_experts=c["n_routed_experts"],
            experts_per_token=c["num_experts_per_tok"], hc=c.get("hc_mult", 4), hc_iters=c.get("hc_sinkhorn_iters", 20),
            hc_eps=c.get("hc_eps", 1e-6), eps=c.get("rms_norm_eps", 1e-6), layer_types=tuple(c["layer_types"]),
            mlp_types=tuple(c["mlp_layer_types"]), compress_rates=c.get("compress_rates") or {CSA: 4, HCA: 128},
            window=c.get("sliding_window", 128), index_heads=c.get("index_n_heads", 64),
            index_dim=c.get("index_head_dim", 128), index_topk=c.get("index_topk", 512),
            scoring=c.get("scoring_func", "sqrtsoftplus"), routed_scale=c.get("routed_scaling_factor", 1.5),
            swiglu_limit=c.get("swiglu_limit", 10.0), tp=tp, source=c)

    @classmethod
    def from_checkpoint(cls, directory: Path) -> V4Config:
        path = Path(directory) / "config.json"
        c = json.loads(path.read_text())
        if "source_config" not in c or c["source_config"].get("model_type") != "deepseek_v4":
            raise CheckpointError(path, "not a converted DeepSeek-V4 checkpoint", subject="source_config.model_type",
                                  found=(c.get("source_config") or {}).get("model_type"), expected="deepseek_v4")
        return cls.from_source(c["source_config"], c["mapping"]["tp_size"])


class Rope:
    """V4's two rotary tables: `main` (sliding layers) and `compress` (CSA/HCA layers, their compressors and
    the indexer). Interleaved pairs on the trailing `rope_dim` channels of each head ([nope | rope])."""

    def __init__(self, cfg: V4Config) -> None:
        self.tables: dict[str, tuple[torch.Tensor, float]] = {}
        for kind, params in _rope_parameters(cfg).items():
            if params.get("rope_type", "default") == "default":
                dim = int(cfg.head_dim * params.get("partial_rotary_factor", 1.0))
                inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
                self.tables[kind] = (inv_freq, 1.0)
            else:  # YaRN etc. (the real V4's compress rope): transformers computes the frequencies
                from transformers import DeepseekV4Config
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                hf = DeepseekV4Config(**{k: v for k, v in cfg.source.items() if k != "quantization_config"})
                self.tables[kind] = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, None, layer_type=kind)

    def __call__(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., rope_dim / 2] for integer positions of any shape."""
        inv_freq, scaling = self.tables[kind]
        freqs = positions[..., None].float() * inv_freq
        return freqs.cos() * scaling, freqs.sin() * scaling

    def to(self, device: torch.device) -> Rope:
        """Keep the frequencies on `device`, where the positions will be."""
        self.tables = {kind: (inv_freq.to(device), scaling) for kind, (inv_freq, scaling) in self.tables.items()}
        return self


def _rope_parameters(cfg: V4Config) -> dict[str, dict[str, Any]]:
    """{"main": ..., "compress": ...} as transformers' DeepseekV4Config.__post_init__ normalises them."""
    # Older configs give the compress rope's scaling as `rope_scaling` (YaRN, with `type`), which
    # transformers folds into rope_parameters["compress"] the same way.
    rp = cfg.source.get("rope_parameters") or cfg.source.get("rope_scaling") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        return {"main": rp["main"], "compress": rp["compress"]}
    c = cfg.source
    partial = c.get("partial_rotary_factor") or c.get("qk_rope_head_dim", 64) / c.get("head_dim", 512)
    flat = {k: v for k, v in rp.items() if k not in ("main", "compress")}
    if "type" in flat:
        flat.setdefault("rope_type", flat["type"])
    main = {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0), "partial_rotary_factor": partial}
    return {"main": main,
            "compress": {"rope_type": "default", **flat, "rope_theta": c.get("compress_rope_theta", 160000.0),
                         "partial_rotary_factor": partial}}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2·cos.shape[-1] channels of x in interleaved pairs; cos/sin broadcast to x[..., :r/2]."""
    rd = 2 * cos.shape[-1]
    cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    nope, rope = x[..., :-rd], x[..., -rd:]
    rotated = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, (rope.float() * cos + rotated.float() * sin).to(x.dtype)], dim=-1)


# -------------------------------------------------------------------------------------------- weights


def read_rank(path: Path, dtype: torch.dtype, keep: re.Pattern | None = None) -> dict[str, torch.Tensor]:
    """One rank file with FP8 block-scaled weights dequantised; floating tensors cast to `dtype`."""
    ckpt = SafetensorsCheckpoint(path)
    out: dict[str, torch.Tensor] = {}
    for name in ckpt.tensors:
        if name.endswith(SCALE_SUFFIX) or (keep is not None and not keep.search(name)):
            continue
        t = ckpt.get(name)
        if t.dtype == torch.float8_e4m3fn:
            t = dequantize_fp8_block(t, ckpt.get(name + SCALE_SUFFIX), 128, dtype)
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def read_merged(directory: Path, tp: int, dtype: torch.dtype, keep: re.Pattern | None = None
                ) -> dict[str, torch.Tensor]:
    """All ranks of a converted directory reassembled into unsharded tensors."""
    parts = [read_rank(Path(directory) / f"rank{r}.safetensors", dtype, keep) for r in range(tp)]
    merged: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(n for part in parts for n in part):
        pieces = [part[name] for part in parts if name in part]
        dim = shard_dim(name)
        merged[name] = torch.cat(pieces, dim) if dim is not None and len(pieces) > 1 else pieces[0]
    return merged


# ---------------------------------------------------------------------------------------- V4 blocks


def hc_pre(streams: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC before a sub-block: (post [.., hc], comb [.., hc, hc], collapsed input [.., D]) from streams [.., hc, D]."""
    hc = cfg.hc
    flat = streams.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + cfg.eps)
    mixes = F.linear(flat, w[p + "fn"].float())
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = w[p + "base"].float().split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = w[p + "scale"].float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + cfg.hc_eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_s + comb_b.view(hc, hc), dim=-1) + cfg.hc_eps
    # Sinkhorn-Knopp towards a doubly stochastic residual mix (columns first, as transformers does).
    comb = comb / (comb.sum(-2, keepdim=True) + cfg.hc_eps)
    for _ in range(cfg.hc_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + cfg.hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + cfg.hc_eps)
    collapsed = (pre[..., None] * streams).sum(-2).to(streams.dtype)
    return post, comb, collapsed


def hc_post(out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """Expand a sub-block's output back into the streams and add the mixed residual (comb is used transposed)."""
    dtype = streams.dtype
    return post.to(dtype)[..., None] * out[..., None, :] + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def hc_head(streams: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config) -> torch.Tensor:
    """Final collapse of the streams (before the last norm)."""
    flat = streams.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + cfg.eps)
    pre = torch.sigmoid(F.linear(flat, w[p + "hc_head_fn"].float()) * w[p + "hc_head_scale"].float()
                        + w[p + "hc_head_base"].float()) + cfg.hc_eps
    return (pre[..., None] * streams).sum(-2).to(streams.dtype)


def _clamped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float
                    ) -> torch.Tensor:
    gate, up = F.linear(x, w1).clamp(max=limit), F.linear(x, w3).clamp(-limit, limit)
    return F.linear(F.silu(gate) * up, w2)


def moe(x: torch.Tensor, ids: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config, experts: range
        ) -> torch.Tensor:
    """Routed experts `experts` (this rank's) + this rank's slice of the shared expert, for tokens x [N, D].

    The router is replicated: every rank routes every token, and computes only its own experts.
    """
    logits = F.linear(x, w[p + "gate.weight"])
    if cfg.scoring == "sqrtsoftplus":
        scores = F.softplus(logits).sqrt()
    elif cfg.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = torch.softmax(logits, dim=-1)
    if p + "gate.tid2eid" in w:  # hash MoE: a fixed token -> experts table
        chosen = w[p + "gate.tid2eid"][ids].long()
    else:
        chosen = torch.topk(scores + w[p + "gate.bias"], cfg.experts_per_token, dim=-1, sorted=False).indices
    weights = scores.gather(1, chosen)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scale
    out = torch.zeros_like(x)
    for e in experts:
        rows, k = torch.where(chosen == e)
        if rows.numel():
            e_p = f"{p}experts.{e}."
            y = _clamped_swiglu(x[rows], w[e_p + "w1.weight"], w[e_p + "w3.weight"], w[e_p + "w2.weight"],
                                cfg.swiglu_limit)
            # A token picks an expert at most once, so rows are distinct (index_add_ is pathologically slow
            # with several threads on a busy CPU; index_put_ is not).
            out.index_put_((rows,), y * weights[rows, k, None], accumulate=True)
    s = p + "shared_experts."
    return out + _clamped_swiglu(x, w[s + "w1.weight"], w[s + "w3.weight"], w[s + "w2.weight"], cfg.swiglu_limit)


def queries(h: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, H, T, hd] normed and rotated, the low-rank query residual [B, T, q_rank]) for h [B, T, D]."""
    q_res = rms_norm(F.linear(h, w[p + "wq_a.weight"]), w[p + "q_norm.weight"], cfg.eps)
    q = F.linear(q_res, w[p + "wq_b.weight"]).unflatten(-1, (-1, cfg.head_dim))
    q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + cfg.eps).to(q.dtype)
    return apply_rope(q, cos[..., None, :], sin[..., None, :]).transpose(1, 2), q_res


def shared_kv(h: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """The single K = V head [.., T, hd] of V4's shared-KV MQA."""
    return apply_rope(rms_norm(F.linear(h, w[p + "wkv.weight"]), w[p + "norm.weight"], cfg.eps), cos, sin)


def attend(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention with per-head sinks. q [B, H, T, hd]; kv [B, L, hd] (K = V); allowed [B, T, L] -> [B, T, H, hd].

    The sink is one extra logit per head that takes probability mass but contributes no value.
    """
    scores = torch.matmul(q, kv[:, None].transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    logits = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)], dim=-1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs, kv[:, None]).transpose(1, 2)


def project_out(out: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """Undo the values' RoPE at the query position, then the grouped low-rank output projection (partial under tp)."""
    out = apply_rope(out, cos[..., None, :], -sin[..., None, :])
    wa = w[p + "wo_a.weight"]
    groups = wa.shape[0] // cfg.o_rank  # this rank's groups
    grouped = out.flatten(-2).unflatten(-1, (groups, -1))
    mixed = torch.einsum("btgi,goi->btgo", grouped, wa.view(groups, cfg.o_rank, -1)).flatten(-2)
    return F.linear(mixed, w[p + "wo_b.weight"])


# ------------------------------------------------------------------------------ compressed attention


@dataclass
class _Compressed:
    """Per-slot state of one compressor: raw projections per position, pooled entries per window."""

    rate: int
    overlap: bool  # CSA pools windows w-1 (first half of the channels) and w (second half)
    dim: int
    kv: torch.Tensor  # [slots, max_len, width]
    gate: torch.Tensor  # [slots, max_len, width]
    entries: torch.Tensor  # [slots, max_len // rate + 1, dim]

    @classmethod
    def empty(cls, rate: int, dim: int, overlap: bool, slots: int, max_len: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> _Compressed:
        width = 2 * dim if overlap else dim
        return cls(rate, overlap, dim, torch.zeros(slots, max_len, width, dtype=dtype, device=device),
                   torch.zeros(slots, max_len, width, dtype=dtype, device=device),
                   torch.zeros(slots, max_len // rate + 1, dim, dtype=dtype, device=device))

    def update(self, slot: int, start: int, kv: torch.Tensor, gate: torch.Tensor, w: dict[str, torch.Tensor],
               p: str, cfg: V4Config, rope: Rope) -> None:
        """Store raw rows for positions [start, start + n) and pool every window they complete."""
        m, end = self.rate, start + kv.shape[0]
        self.kv[slot, start:end], self.gate[slot, start:end] = kv, gate
        first, last = start // m, end // m
        if last <= first:
            return
        ape = w[p + "ape"].to(gate.dtype)
        cur_kv = self.kv[slot, first * m: last * m].unflatten(0, (-1, m))
        cur_gate = self.gate[slot, first * m: last * m].unflatten(0, (-1, m)) + ape
        if self.overlap:
            d, n = self.dim, last - first
            prev_kv = cur_kv.new_zeros(n, m, d)
            prev_gate = cur_gate.new_full((n, m, d), float("-inf"))  # window 0 has no predecessor: weight 0
            prev_kv[1:], prev_gate[1:] = cur_kv[:-1, :, :d], cur_gate[:-1, :, :d]
            if first > 0:
                prev_kv[0] = self.kv[slot, (first - 1) * m: first * m, :d]
                prev_gate[0] = self.gate[slot, (first - 1) * m: first * m, :d] + ape[:, :d]
            cur_kv = torch.cat([prev_kv, cur_kv[..., d:]], dim=1)
            cur_gate = torch.cat([prev_gate, cur_gate[..., d:]], dim=1)
        pooled = (cur_kv * cur_gate.softmax(dim=1, dtype=torch.float32).to(cur_kv.dtype)).sum(dim=1)
        pooled = rms_norm(pooled, w[p + "norm.weight"], cfg.eps)
        cos, sin = rope("compress", torch.arange(first, last, device=self.kv.device) * m)
        self.entries[slot, first:last] = apply_rope(pooled, cos, sin)


def _select_indexed(cache: _Compressed, h: torch.Tensor, q_res: torch.Tensor, slot_idx: torch.Tensor,
                    visible: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: V4Config,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Lightning indexer: which visible compressed entries each query keeps [B, T, E] (top-k, ties to earlier)."""
    keys = cache.entries[slot_idx, : visible.shape[-1]]  # [B, E, index_dim]
    q = F.linear(q_res, w[p + "indexer.wq_b.weight"]).unflatten(-1, (-1, cfg.index_dim))
    q = apply_rope(q, cos[..., None, :], sin[..., None, :])  # [B, T, IH, d]
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)[:, None]).relu() * cfg.index_dim ** -0.5
    weights = F.linear(h, w[p + "indexer.weights_proj.weight"]).float() * cfg.index_heads ** -0.5
    scores = (scores * weights[..., None]).sum(-2).masked_fill(~visible, float("-inf"))  # [B, T, E]
    k = min(cfg.index_topk, scores.shape[-1])
    best = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(visible).scatter_(-1, best, True) & visible


# ------------------------------------------------------------------------------------------ target


class DeepseekV4Target(SlotRunner):
    """One tensor/expert-parallel rank of a DeepSeek-V4 target, with a cache of `num_slots` sequences.

    `device` / `dtype` as for the Qwen3 runner (float32 on the CPU, bfloat16 elsewhere); slot lengths stay
    on the host. The reference MoE picks each expert's tokens with `torch.where`, which waits for the
    device once per expert and layer. `target_feature`: what `forward(capture=...)` returns (see the
    module docstring); the loader passes the checkpoint manifest's `dspark.target_feature`."""

    def __init__(self, target_dir: Path, *, rank: int = 0, num_slots: int = 8, max_len: int = 1024,
                 dtype: torch.dtype | None = None, target_feature: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        target_dir = Path(target_dir)
        self.device, dtype = runner_device(device, dtype)
        self.config = cfg = V4Config.from_checkpoint(target_dir)
        if cfg.tp > 1 and not (dist.is_initialized() and dist.get_world_size() == cfg.tp):
            raise RuntimeError(f"{target_dir} is sharded for tp={cfg.tp}: run it with tp={cfg.tp} processes "
                               "(runtime.tp.DistributedTarget)")
        self.rank, self.dtype, self.max_len = rank, dtype, max_len
        self.target_feature = target_feature or TARGET_FEATURES[0]
        if self.target_feature not in TARGET_FEATURES:
            raise ValueError(f"target_feature must be one of {TARGET_FEATURES}, got {self.target_feature!r}")
        weights = read_rank(target_dir / f"rank{rank}.safetensors", dtype)
        self.w = {name: t.to(self.device) for name, t in weights.items()}
        per_rank = cfg.num_experts // cfg.tp
        self.experts = range(rank * per_rank, (rank + 1) * per_rank)
        self.rope = Rope(cfg).to(self.device)
        self.kv = torch.zeros(cfg.num_layers, num_slots, max_len, cfg.head_dim, dtype=dtype, device=self.device)
        self.compressors: dict[int, _Compressed] = {}
        self.indexers: dict[int, _Compressed] = {}
        for layer, kind in enumerate(cfg.layer_types):
            if kind != SLIDING:
                rate = cfg.compress_rates[kind]
                self.compressors[layer] = _Compressed.empty(rate, cfg.head_dim, kind == CSA, num_slots, max_len, dtype,
                                                              self.device)
            if kind == CSA:
                self.indexers[layer] = _Compressed.empty(rate, cfg.index_dim, True, num_slots, max_len, dtype,
                                                            self.device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long)

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: list[list[int]], capture: tuple[int, ...] = (),
                start: list[int] | None = None, logits: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append `tokens[i]` to slot `slots[i]` and run them.

        `start`, when given, is each slot's cache length to continue from: shorter than what the slot
        holds rolls back (rejected drafts), 0 starts afresh; one call then carries the rollback (one
        broadcast under tensor parallelism).

        Returns per slot the logits of its new tokens [n_i, vocab] (float32) and, when `capture` lists
        layer ids, their context features [n_i, len(capture) * hidden] (see `target_feature`). With
        `logits` False, each slot's argmax token ids [n_i] stand in for its logits (greedy decoding;
        the vocabulary shards are never gathered).
        """
        cfg, w = self.config, self.w
        if any(not 0 <= layer < cfg.num_layers for layer in capture):
            raise ValueError(f"capture layers {capture} outside 0..{cfg.num_layers - 1}")
        batch, n_new = len(slots), torch.tensor([len(t) for t in tokens])
        width = int(n_new.max())
        self.continue_from(slots, start)
        start = self.lengths[slots]  # host: the per-slot loops below read it without waiting for the device
        if int((start + n_new).max()) > self.max_len:
            raise ValueError(f"a slot would exceed the cache length {self.max_len}")
        ids = torch.zeros(batch, width, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        positions = start[:, None] + torch.arange(width)
        valid = torch.arange(width)[None, :] < n_new[:, None]
        ids, positions, valid = ids.to(self.device), positions.to(self.device), valid.to(self.device)

        streams = F.embedding(ids, w["embed.weight"])[:, :, None].expand(-1, -1, cfg.hc, -1).contiguous()
        captured: dict[int, torch.Tensor] = {}
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}."
            post, comb, collapsed = hc_pre(streams, w, p + "hc_attn_", cfg)
            if layer in capture and self.target_feature == "layer_input_hc_mean":
                captured[layer] = streams.mean(-2)
            elif layer in capture and self.target_feature == "layer_input_hc_collapsed":
                captured[layer] = collapsed
            h = rms_norm(collapsed, w[p + "attn_norm.weight"], cfg.eps)
            out = self._attention(layer, h, slots, start, n_new, positions)
            streams = hc_post(self._all_reduce(out), post, comb, streams)
            post, comb, collapsed = hc_pre(streams, w, p + "hc_ffn_", cfg)
            h = rms_norm(collapsed, w[p + "ffn_norm.weight"], cfg.eps)
            ffn = torch.zeros_like(h)
            ffn[valid] = moe(h[valid], ids[valid], w, p + "ffn.", cfg, self.experts)
            streams = hc_post(self._all_reduce(ffn), post, comb, streams)
            if layer in capture and self.target_feature == "layer_output_hc_mean":
                captured[layer] = streams.mean(-2)
        self.lengths[slots] = start + n_new
        hidden = rms_norm(hc_head(streams, w, "", cfg), w["norm.weight"], cfg.eps)
        head = self._head(F.linear(hidden, w["head.weight"]).float(), full=logits)
        features = torch.cat([captured[layer] for layer in capture], dim=-1) if capture else None
        counts = n_new.tolist()
        return ([head[b, : counts[b]] for b in range(batch)],
                [features[b, : counts[b]] for b in range(batch)] if capture else [])

    def _attention(self, layer: int, h: torch.Tensor, slots: list[int], start: torch.Tensor, n_new: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """Sliding-window attention over the slot's cache plus, for CSA/HCA layers, its compressed entries."""
        cfg, w, p = self.config, self.w, f"layers.{layer}.attn."
        kind = cfg.layer_types[layer]
        cos, sin = self.rope("main" if kind == SLIDING else "compress", positions)
        q, q_res = queries(h, w, p, cfg, cos, sin)
        kv = shared_kv(h, w, p, cfg, cos, sin)
        for b, slot in enumerate(slots):
            self.kv[layer, slot, start[b]: start[b] + n_new[b]] = kv[b, : n_new[b]]
        # Only the last `window` positions before the earliest query can be visible.
        total, low = int((start + n_new).max()), max(0, int(start.min()) - cfg.window + 1)
        slot_idx = torch.tensor(slots, device=self.device)
        keys = torch.arange(low, total, device=self.device)
        allowed = (keys <= positions[..., None]) & (keys > positions[..., None] - cfg.window)
        kv = self.kv[layer, slot_idx, low:total]
        if kind != SLIDING:
            compressed = self._compressed(layer, h, q_res, slots, start, n_new, positions)
            kv, allowed = torch.cat([kv, compressed[0]], dim=1), torch.cat([allowed, compressed[1]], dim=-1)
        out = attend(q, kv, allowed, w[p + "attn_sink"])
        return project_out(out, w, p, cfg, cos, sin)

    def _compressed(self, layer: int, h: torch.Tensor, q_res: torch.Tensor, slots: list[int], start: torch.Tensor,
                    n_new: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(entries [B, E, hd], allowed [B, T, E]): the compressed keys/values each query may read."""
        cfg, w, p = self.config, self.w, f"layers.{layer}.attn."
        comp = self.compressors[layer]
        kv, gate = F.linear(h, w[p + "compressor.wkv.weight"]), F.linear(h, w[p + "compressor.wgate.weight"])
        index = self.indexers.get(layer)
        if index is not None:
            ikv = F.linear(h, w[p + "indexer.compressor.wkv.weight"])
            igate = F.linear(h, w[p + "indexer.compressor.wgate.weight"])
        for b, slot in enumerate(slots):
            s, n = int(start[b]), int(n_new[b])
            comp.update(slot, s, kv[b, :n], gate[b, :n], w, p + "compressor.", cfg, self.rope)
            if index is not None:
                index.update(slot, s, ikv[b, :n], igate[b, :n], w, p + "indexer.compressor.", cfg, self.rope)
        count = int((start + n_new).max()) // comp.rate
        slot_idx = torch.tensor(slots, device=self.device)
        # Entry w pools positions up to (w + 1)·m - 1: query t may read it once t has reached that position.
        visible = torch.arange(count, device=self.device) < ((positions + 1) // comp.rate)[..., None]
        if index is not None and count:
            cos, sin = self.rope("compress", positions)
            visible = _select_indexed(index, h, q_res, slot_idx, visible, w, p, cfg, cos, sin)
        return comp.entries[slot_idx, :count], visible

