"""Write the golden draft outputs in tests/goldens/ (checked by tests/test_goldens.py).

    .venv/bin/python tests/make_goldens.py        # rewrites tests/goldens/qwen3_*.safetensors

How the goldens are made. DeepSpec (deepseek-ai/DeepSpec) is not installable here (it is not on PyPI
and needs flex attention on a GPU), so this script re-implements, independently of `runtime/`, the
float32 inference path of DeepSpec's Qwen3 drafter from its source, module for module and with
transformers' own Qwen3 building blocks where DeepSpec imports them:

- `deepspec/modeling/dspark/qwen3/modeling.py` (deepseek-ai/DeepSpec @ 5905deb7611cae6aaa0519cd3d048589af101144):
  `Qwen3DSparkAttention.forward` (q from the block; k / v from [context features; block], k_norm on
  both; `apply_rotary_pos_emb` with q on the last q_len positions; no mask), `Qwen3DSparkDecoderLayer`,
  `Qwen3DSparkModel._forward_backbone` (fc -> hidden_norm on the features, `Qwen3RotaryEmbedding(config)`
  over [context positions; block positions], `norm`), `compute_logits`, `sample_draft_tokens`,
  `predict_confidence_step`;
- `deepspec/modeling/dspark/markov_head.py` (read at curnane-lab/DeepSpec @
  bec2c8a5c6391c3948508df49cfb89fee5e2a5ff, a fork; the upstream file was not in the index):
  `VanillaMarkov`, `GatedMarkovHead` (gate_proj on [h_k; W1[x_{k-1}]]), `RNNHead` (joint_proj on
  [s_{k-1}; W1[x_{k-1}]; h_k], chunks gate / candidate / output), `sample_block_tokens`;
- `deepspec/modeling/dspark/common.py` (@ 3bc8dc7452b5f17401a46af8aaa2370fa5408343): `AcceptRatePredictor`;
- `deepspec/eval/dspark/draft_ops.py` (curnane-lab/DeepSpec @ 399e595756e73c31e44d92dee91117c4164cb11e):
  `forward_dspark_draft_block` (context positions start - ctx_len .. start - 1, block positions
  start .. start + block_size - 1, attention_mask None, is_causal False), `build_dspark_proposal`
  (block [anchor, MASK x (block_size - 1)], greedy `sample_tokens` = argmax, confidence from
  prev ids [anchor, drafted[:-1]]);
- `deepspec/utils/sampling.py` (@ 6789d0a25ec66b2de1d354beb1c466036617be19): `sample_tokens`.

The drafters are the fixtures (`write_qwen3_fixture`, seed 0) of each Markov head type, with the default
rope and with YaRN; their DeepSpec-format `model.safetensors` loads into these modules with
`strict=True`, so every tensor is used and none is missing. Each golden file holds, for two contexts
of random target features: the features, the anchor, the drafted tokens, the base logits, the
Markov-corrected logits and the confidence logits, plus (metadata) a hash of the drafter's weights so
that a changed fixture is told apart from changed drafter maths.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

GOLDENS = Path(__file__).resolve().parent / "goldens"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
CASES = {f"qwen3_{kind}_{rope}": {"markov_head_type": kind, "rope_scaling": YARN if rope == "yarn" else None}
         for kind in ("vanilla", "gated", "rnn") for rope in ("default", "yarn")}
CONTEXTS = ((13, 101), (6, 517))  # (context length, anchor token) of the two drafted blocks
FEATURE_SEED = 20260


class Attention(nn.Module):  # Qwen3DSparkAttention
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        d, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.heads, self.kv_heads = d, h, kv
        self.num_key_value_groups, self.scaling = h // kv, d**-0.5
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=config.attention_bias)
        self.q_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
        bsz, q_len = hidden.shape[:-1]
        ctx_len = context.shape[1]
        q = self.q_norm(self.q_proj(hidden).view(bsz, q_len, self.heads, self.head_dim)).transpose(1, 2)
        k = torch.cat([self.k_proj(context), self.k_proj(hidden)], dim=1)
        v = torch.cat([self.v_proj(context), self.v_proj(hidden)], dim=1)
        k = self.k_norm(k.view(bsz, ctx_len + q_len, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(bsz, ctx_len + q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # DeepSpec's apply_rotary_pos_emb
        q = q * cos[..., -q_len:, :] + rotate_half(q) * sin[..., -q_len:, :]
        k = k * cos + rotate_half(k) * sin
        out, _ = eager_attention_forward(self, q, k, v, None, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(bsz, q_len, -1))


class DecoderLayer(nn.Module):  # Qwen3DSparkDecoderLayer
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), context, cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MarkovHead(nn.Module):  # VanillaMarkov, GatedMarkovHead, RNNHead
    def __init__(self, kind: str, vocab: int, rank: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank)

    def sample_block_tokens(self, base_logits: torch.Tensor, first_prev: torch.Tensor, hidden: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy (temperature 0): tokens [B, γ] and the corrected logits [B, γ, V]."""
        state = torch.zeros(base_logits.shape[0], self.markov_w1.embedding_dim, dtype=hidden.dtype)
        tokens, logits, prev = [], [], first_prev.long()
        for k in range(base_logits.shape[1]):
            e = self.markov_w1(prev)
            if self.kind == "vanilla":
                bias = self.markov_w2(e)
            elif self.kind == "gated":
                gate = torch.sigmoid(self.gate_proj(torch.cat([hidden[:, k], e], dim=-1)))
                bias = self.markov_w2(gate * e)
            else:
                joint = self.joint_proj(torch.cat([state, e, hidden[:, k]], dim=-1))
                gate_raw, candidate_raw, output_raw = joint.chunk(3, dim=-1)
                gate = torch.sigmoid(gate_raw)
                state = gate * state + (1.0 - gate) * torch.tanh(candidate_raw)
                bias = self.markov_w2(torch.tanh(output_raw))
            step = base_logits[:, k] + bias
            logits.append(step)
            prev = torch.argmax(step, dim=-1)  # sample_tokens at temperature 0
            tokens.append(prev)
        return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


class AcceptRatePredictor(nn.Module):
    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


class DSparkModel(nn.Module):  # Qwen3DSparkModel, inference path
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        c = config
        self.block_size, self.mask_token_id = int(c.block_size), int(c.mask_token_id)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(c)
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.markov_head = MarkovHead(c.markov_head_type, c.vocab_size, c.markov_rank, c.hidden_size)
        self.confidence_head = AcceptRatePredictor(c.hidden_size + c.markov_rank)

    @torch.no_grad()
    def draft(self, features: torch.Tensor, anchor: int) -> dict[str, torch.Tensor]:
        """One block after a context of target features [1, n, n_layers * hidden] (draft_ops)."""
        start = features.shape[1]
        ids = torch.full((1, self.block_size), self.mask_token_id, dtype=torch.long)
        ids[0, 0] = anchor
        positions = torch.arange(start + self.block_size)[None]  # [context; block]
        cos, sin = self.rotary_emb(features, positions)
        context = self.hidden_norm(self.fc(features))
        hidden = self.embed_tokens(ids)
        for layer in self.layers:
            hidden = layer(hidden, context, cos, sin)
        hidden = self.norm(hidden)
        base = self.lm_head(hidden)
        tokens, logits = self.markov_head.sample_block_tokens(base, ids[:, 0], hidden)
        prev = torch.cat([ids[:, :1], tokens[:, :-1]], dim=1)
        conf = self.confidence_head(torch.cat([hidden, self.markov_head.markov_w1(prev)], dim=-1)).float()
        return {"tokens": tokens[0], "base_logits": base[0].float(), "logits": logits[0].float(),
                "conf_logits": conf[0]}


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the drafter's tensors (names, dtypes, shapes, bytes), independent of the file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def context_features(n: int, width: int, case: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(FEATURE_SEED + case))


def make(drafter_dir: Path) -> dict[str, torch.Tensor]:
    config = Qwen3Config.from_pretrained(drafter_dir)
    assert config.confidence_head_with_markov and config.markov_rank > 0
    model = DSparkModel(config).float().eval()
    state = load_file(drafter_dir / "model.safetensors")
    model.load_state_dict(state, strict=True)
    width = len(config.target_layer_ids) * config.hidden_size
    out: dict[str, torch.Tensor] = {}
    for i, (n, anchor) in enumerate(CONTEXTS):
        features = context_features(n, width, i)
        out[f"features.{i}"] = features
        out[f"anchor.{i}"] = torch.tensor([anchor])
        for key, value in model.draft(features[None], anchor).items():
            out[f"{key}.{i}"] = value.contiguous()
    return out


def main() -> None:
    GOLDENS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fixture in CASES.items():
            pair = Path(tmp) / name
            write_qwen3_fixture(pair, seed=0, **fixture)
            tensors = make(pair / "drafter")
            meta = {"fixture": json.dumps({"seed": 0, **fixture}),
                    "drafter_weights_sha256": weights_hash(load_file(pair / "drafter" / "model.safetensors")),
                    "made_by": "tests/make_goldens.py"}
            save_file(tensors, str(GOLDENS / f"{name}.safetensors"), metadata=meta)
            print(name, [int(t) for t in tensors["tokens.0"]], [int(t) for t in tensors["tokens.1"]])


if __name__ == "__main__":
    main()
