"""The Gemma4 family: fixture, inspect / convert, target runner against transformers, DeepSpec drafter.

`DeepSpecGemma4Drafter` below restates DeepSpec's `Gemma4DSparkModel` (deepseek-ai/DeepSpec,
`deepspec/modeling/dspark/gemma4/modeling.py` @ d2caaebd396254607c4f7bc2cd921cdf050a53e3) module for
module, with transformers' own Gemma4 building blocks where DeepSpec imports them, and the inference
path of `deepspec/eval/dspark/draft_ops.py` (context positions before the block, block positions
ctx_len .. ctx_len + γ - 1, no mask). Its `load_state_dict(strict=True)` is the check that the fixture
drafter has every tensor DeepSpec's model declares and no other; its forward is the oracle for
`runtime.dspark.gemma4`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dspark_trt.builder.families import open_pair, validate
from dspark_trt.builder.fixture_gemma4 import TARGET_LAYER_IDS, write_gemma4_fixture


@pytest.fixture(scope="module")
def gemma4_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma4") / "pair"
    write_gemma4_fixture(out, seed=0)
    return out


def _convert(pair: Path, out: Path, tp: int = 1) -> Path:
    from dspark_trt.builder.convert import convert

    convert(pair / "target", pair / "drafter", out, tp=tp, show_progress=False)
    return out


@pytest.fixture(scope="module")
def gemma4_ckpt(gemma4_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(gemma4_pair, tmp_path_factory.mktemp("gemma4-ckpt") / "tp1")


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ------------------------------------------------------------------------------- DeepSpec's drafter


def deepspec_gemma4_drafter(draft_dir: Path) -> torch.nn.Module:
    """DeepSpec's Gemma4DSparkModel (inference path) built from a drafter directory, float32."""
    from torch import nn
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4RMSNorm,
        Gemma4TextMLP,
        Gemma4TextRotaryEmbedding,
        Gemma4TextScaledWordEmbedding,
        apply_rotary_pos_emb,
    )

    raw = json.loads((draft_dir / "config.json").read_text())
    keep = {k: v for k, v in raw.items() if k in Gemma4TextConfig.__dataclass_fields__ or k in (
        "global_head_dim", "num_global_key_value_heads")}
    config = Gemma4TextConfig(**keep)
    for k in ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "confidence_head_with_markov"):
        setattr(config, k, raw[k])
    k_eq_v = bool(raw["attention_k_eq_v"])

    class Attention(nn.Module):  # Gemma4DSparkAttention
        def __init__(self) -> None:
            super().__init__()
            h, self.heads, self.head_dim = raw["hidden_size"], raw["num_attention_heads"], raw["global_head_dim"]
            self.kv = raw["num_global_key_value_heads"] if k_eq_v else raw["num_key_value_heads"]
            self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(h, self.kv * self.head_dim, bias=False)
            self.v_proj = None if k_eq_v else nn.Linear(h, self.kv * self.head_dim, bias=False)
            self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
            eps = raw["rms_norm_eps"]
            self.q_norm, self.k_norm = Gemma4RMSNorm(self.head_dim, eps), Gemma4RMSNorm(self.head_dim, eps)
            self.v_norm = Gemma4RMSNorm(self.head_dim, eps, with_scale=False)

        def forward(self, x, ctx, cos, sin):
            b, q_len = x.shape[:2]
            n = ctx.shape[1] + q_len
            q = self.q_norm(self.q_proj(x).view(b, q_len, self.heads, self.head_dim)).transpose(1, 2)
            k_ctx, k_noise = self.k_proj(ctx), self.k_proj(x)
            v_ctx, v_noise = (k_ctx, k_noise) if self.v_proj is None else (self.v_proj(ctx), self.v_proj(x))
            k = torch.cat([k_ctx, k_noise], 1).view(b, n, self.kv, self.head_dim)
            v = torch.cat([v_ctx, v_noise], 1).view(b, n, self.kv, self.head_dim)
            k, v = self.k_norm(k).transpose(1, 2), self.v_norm(v).transpose(1, 2)
            q = apply_rotary_pos_emb(q, cos[:, -q_len:], sin[:, -q_len:], unsqueeze_dim=1)
            k = apply_rotary_pos_emb(k, cos, sin, unsqueeze_dim=1)
            groups = self.heads // self.kv
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
            return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))

    class Layer(nn.Module):  # Gemma4DSparkDecoderLayer
        def __init__(self, i: int) -> None:
            super().__init__()
            h, eps = raw["hidden_size"], raw["rms_norm_eps"]
            self.self_attn, self.mlp = Attention(), Gemma4TextMLP(config, i)
            self.input_layernorm, self.post_attention_layernorm = Gemma4RMSNorm(h, eps), Gemma4RMSNorm(h, eps)
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = (Gemma4RMSNorm(h, eps),
                                                                               Gemma4RMSNorm(h, eps))
            self.register_buffer("layer_scalar", torch.ones(1))

        def forward(self, x, ctx, cos, sin):
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx, cos, sin))
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x * self.layer_scalar

    class Model(nn.Module):  # Gemma4DSparkModel
        def __init__(self) -> None:
            super().__init__()
            h, v, eps = raw["hidden_size"], raw["vocab_size"], raw["rms_norm_eps"]
            self.embed_tokens = Gemma4TextScaledWordEmbedding(v, h, raw.get("pad_token_id"), embed_scale=h**0.5)
            self.layers = nn.ModuleList(Layer(i) for i in range(raw["num_hidden_layers"]))
            self.norm, self.hidden_norm = Gemma4RMSNorm(h, eps), Gemma4RMSNorm(h, eps)
            # transformers >= 5.2x: one rotary module for every layer type (DeepSpec passes layer_type).
            self.rotary_emb = Gemma4TextRotaryEmbedding(config)
            self.fc = nn.Linear(len(raw["target_layer_ids"]) * h, h, bias=False)
            self.lm_head = nn.Linear(h, v, bias=False)
            rank = raw["markov_rank"]
            self.markov_head = nn.Module()
            self.markov_head.markov_w1 = nn.Embedding(v, rank)
            self.markov_head.markov_w2 = nn.Linear(rank, v, bias=False)
            if raw["markov_head_type"] == "gated":  # GatedMarkovHead
                self.markov_head.gate_proj = nn.Linear(h + rank, rank)
            elif raw["markov_head_type"] == "rnn":  # RNNHead
                self.markov_head.joint_proj = nn.Linear(2 * rank + h, 3 * rank)
            self.confidence_head = nn.Module()
            self.confidence_head.proj = nn.Linear(h + rank, 1)

        def compute_logits(self, hidden):
            logits = self.lm_head(hidden)
            cap = raw.get("final_logit_softcapping")
            return logits if cap is None else torch.tanh(logits / cap) * cap

        def backbone(self, features, anchor):  # draft_ops.forward_dspark_draft_block, one request
            gamma, ctx_len = raw["block_size"], features.shape[0]
            ids = torch.full((1, gamma), raw["mask_token_id"])
            ids[0, 0] = anchor
            x = self.embed_tokens(ids)
            ctx = self.hidden_norm(self.fc(features[None]))
            positions = torch.arange(ctx_len + gamma)[None]
            cos, sin = self.rotary_emb(x, positions, "full_attention")
            for layer in self.layers:
                x = layer(x, ctx, cos, sin)
            hidden = self.norm(x)
            return hidden[0], self.compute_logits(hidden)[0]

    model = Model()
    model.load_state_dict({k: v.float() for k, v in load_file(draft_dir / "model.safetensors").items()}, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ fixture


def test_fixture_target_is_a_real_gemma4_with_what_the_architecture_has(gemma4_pair: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(gemma4_pair / "target")
    text = config.text_config
    assert config.model_type == "gemma4" and text.model_type == "gemma4_text"
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert text.attention_k_eq_v and text.hidden_size_per_layer_input > 0 and text.final_logit_softcapping
    model = AutoModelForImageTextToText.from_pretrained(gemma4_pair / "target")  # loads with no missing keys
    stored = _tensors(gemma4_pair / "target")
    assert len(list((gemma4_pair / "target").glob("*.safetensors"))) >= 2
    # Norm weights and layer scalars are not transformers' all-ones initialisation.
    scalars = torch.stack([t.float() for k, t in stored.items() if k.endswith("layer_scalar")])
    assert scalars.std() > 0.01
    assert sum(p.numel() for p in model.parameters()) > 0


def test_fixture_drafter_loads_strictly_in_deepspecs_model(gemma4_pair: Path) -> None:
    config = json.loads((gemma4_pair / "drafter" / "config.json").read_text())
    # Gemma4DSparkModel's required fields (deepspec/modeling/dspark/gemma4/modeling.py) and the ones
    # build_draft_config writes (deepspec/modeling/dspark/gemma4/config.py).
    for field in ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank",
                  "num_global_key_value_heads", "global_head_dim", "markov_head_type", "confidence_head_with_markov",
                  "block_size", "num_target_layers", "target_model_type", "target_text_model_type"):
        assert field in config, field
    assert config["architectures"] == ["Gemma4DSparkModel"] and config["block_size"] == 7
    assert config["layer_types"] == ["full_attention"] * config["num_hidden_layers"]
    assert config["hidden_size_per_layer_input"] == 0 and not config["enable_moe_block"]
    assert config["target_layer_ids"] == TARGET_LAYER_IDS
    deepspec_gemma4_drafter(gemma4_pair / "drafter")  # strict: no missing or unexpected tensor


def test_fixture_is_deterministic(gemma4_pair: Path, tmp_path: Path) -> None:
    write_gemma4_fixture(tmp_path / "again", seed=0)
    for role in ("target", "drafter"):
        a, b = _tensors(gemma4_pair / role), _tensors(tmp_path / "again" / role)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------- inspect / convert


def test_inspect_accepts_the_pair_without_warnings(gemma4_pair: Path) -> None:
    pair = open_pair([gemma4_pair / "drafter", gemma4_pair / "target"])
    assert pair.family == "gemma4"
    report = validate(pair)
    assert report.ok, [p.describe() for p in report.problems]
    assert not report.warnings


def test_inspect_names_a_missing_drafter_field_and_tensor(gemma4_pair: Path, tmp_path: Path) -> None:
    pair_dir = tmp_path / "pair"
    shutil.copytree(gemma4_pair, pair_dir)
    config_path = pair_dir / "drafter" / "config.json"
    config = json.loads(config_path.read_text())
    del config["global_head_dim"]
    config_path.write_text(json.dumps(config))
    weights = load_file(pair_dir / "drafter" / "model.safetensors")
    del weights["layers.1.layer_scalar"]
    save_file(weights, str(pair_dir / "drafter" / "model.safetensors"))
    report = validate(open_pair([pair_dir / "target", pair_dir / "drafter"]))
    assert any(p.subject == "global_head_dim" for p in report.problems)
    config_path.write_text(json.dumps({**config, "global_head_dim": 32}))
    report = validate(open_pair([pair_dir / "target", pair_dir / "drafter"]))
    assert [(p.problem, p.subject) for p in report.problems] == [("missing tensor", "layers.1.layer_scalar")]


def test_unsupported_gemma4_variant_is_refused_by_name(gemma4_pair: Path, tmp_path: Path) -> None:
    pair_dir = tmp_path / "pair"
    shutil.copytree(gemma4_pair, pair_dir)
    config_path = pair_dir / "target" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["enable_moe_block"] = True
    config_path.write_text(json.dumps(config))
    report = validate(open_pair([pair_dir / "target"]))
    assert any(p.subject == "enable_moe_block" for p in report.problems)


def test_googles_global_fields_read_like_transformers_per_layer_config(gemma4_pair: Path, tmp_path: Path) -> None:
    """google/gemma-4-* configs carry global_head_dim / num_global_key_value_heads where transformers
    5.2x writes per_layer_config: both describe the same model."""
    from dspark_trt.builder.families import gemma4

    pair_dir = tmp_path / "pair"
    shutil.copytree(gemma4_pair, pair_dir)
    before = gemma4.dims(open_pair([pair_dir / "target"]).target)
    config_path = pair_dir / "target" / "config.json"
    config = json.loads(config_path.read_text())
    del config["text_config"]["per_layer_config"]
    config["text_config"] |= {"global_head_dim": 32, "num_global_key_value_heads": 1}
    config_path.write_text(json.dumps(config))
    pair = open_pair([pair_dir / "target", pair_dir / "drafter"])
    assert gemma4.dims(pair.target) == before and before["global_head_dim"] == 32
    assert validate(pair).ok


@pytest.mark.parametrize("kind", ["gated", "rnn"])
def test_gated_and_rnn_drafters_inspect_convert_and_draft(tmp_path: Path, kind: str) -> None:
    from dspark_trt.runtime.dspark.gemma4 import Gemma4DSparkDrafter

    write_gemma4_fixture(tmp_path / "pair", seed=0, markov_head_type=kind)
    report = validate(open_pair([tmp_path / "pair" / "target", tmp_path / "pair" / "drafter"]))
    assert report.ok and not report.warnings
    ckpt = _convert(tmp_path / "pair", tmp_path / "ckpt")
    deepspec_gemma4_drafter(tmp_path / "pair" / "drafter")  # loads strictly: no missing or unexpected tensor
    drafter = Gemma4DSparkDrafter(ckpt / "draft", num_slots=1, max_len=32)
    assert drafter.markov.kind == kind
    drafter.add_context(0, torch.randn(5, len(TARGET_LAYER_IDS) * 64))
    draft = drafter.draft([0], [11], [0.0], [None])
    hidden, base = drafter.backbone([0], [11])
    assert draft.tokens.shape == (1, 7) and base.shape == (1, 7, 1024)
    bias, _, _ = drafter.markov.step(torch.tensor([11]), hidden[:, 0], drafter.markov.initial_state(1))
    assert bias is not None and bias.abs().max() > 0  # the head's own projection is in use


def test_convert_tp2_writes_tensorrt_llm_names_that_reassemble(gemma4_pair: Path, tmp_path: Path) -> None:
    ckpt = _convert(gemma4_pair, tmp_path / "tp2", tp=2)
    source = {k.replace("model.language_model.", "model."): v for k, v in _tensors(gemma4_pair / "target").items()}
    ranks = [load_file(ckpt / "target" / f"rank{r}.safetensors") for r in range(2)]
    config = json.loads((ckpt / "target" / "config.json").read_text())
    assert config["architecture"] == "Gemma4ForCausalLM" and config["mapping"]["tp_size"] == 2
    assert ranks[0].keys() == ranks[1].keys()
    # Row-parallel output projections and column-parallel MLP reassemble to the source.
    for i in range(config["num_hidden_layers"]):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        dense = torch.cat([r[trt + "attention.dense.weight"] for r in ranks], 1)
        assert torch.equal(dense, source[hf + "self_attn.o_proj.weight"])
        gate = torch.cat([r[trt + "mlp.fc.weight"] for r in ranks], 0)
        assert torch.equal(gate, source[hf + "mlp.gate_proj.weight"])
        assert torch.equal(ranks[1][trt + "layer_scalar"], source[hf + "layer_scalar"])
    # A global layer (keys are values: q and k only) with one KV head: each rank holds its query heads
    # and the one key head.
    hd = config["global_head_size"]
    q, k = source["model.layers.2.self_attn.q_proj.weight"], source["model.layers.2.self_attn.k_proj.weight"]
    half = q.shape[0] // 2
    assert torch.equal(ranks[1]["transformer.layers.2.attention.qkv.weight"], torch.cat([q[half:], k[:hd]]))
    # Tied embeddings: the head is the embedding, split over the vocabulary.
    assert torch.equal(torch.cat([r["lm_head.weight"] for r in ranks]), source["model.embed_tokens.weight"])
    draft = load_file(ckpt / "draft" / "rank0.safetensors")
    assert draft.keys() == load_file(gemma4_pair / "drafter" / "model.safetensors").keys()


# ------------------------------------------------------------------------------------ target runner

CAPTURE = (-1, 0, 2, 4)  # the embedding output, sliding, global and sliding layers


def prompts(count: int = 3, seed: int = 0) -> list[list[int]]:
    """Lengths 20, 3, 13: the first and last run past the sliding window (8)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (20, 3, 13, 9, 30, 1)[:count]]


@pytest.fixture(scope="module")
def hf_target(gemma4_pair: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(gemma4_pair / "target", dtype=torch.float32).eval()


def test_target_matches_transformers_with_rollback(hf_target: torch.nn.Module, gemma4_ckpt: Path) -> None:
    from dspark_trt.runtime.gemma4 import Gemma4Target

    target = Gemma4Target(gemma4_ckpt / "target", num_slots=4, max_len=128)
    batch = prompts(3)
    logits, features = target.forward([2, 0, 1], batch, capture=CAPTURE)  # slots out of order on purpose
    with torch.no_grad():
        for i, p in enumerate(batch):
            ref = hf_target(torch.tensor([p]), output_hidden_states=True)
            assert (logits[i] - ref.logits[0]).abs().max() <= 1e-4
            # DeepSpec's extract_context_feature: layer l is hidden_states[l + 1], -1 is hidden_states[0].
            expected = torch.cat([ref.hidden_states[layer + 1][0] for layer in CAPTURE], dim=-1)
            assert (features[i] - expected).abs().max() <= 1e-4
        # Incremental decoding past the window, then a rollback of two rejected tokens.
        more, _ = target.forward([2, 1], [[5, 6, 7], [9]])
        full = hf_target(torch.tensor([batch[0] + [5, 6, 7]])).logits[0]
        assert (more[0] - full[-3:]).abs().max() <= 1e-4
        again, _ = target.forward([2], [[8, 4]], start=[len(batch[0]) + 1])
        full = hf_target(torch.tensor([batch[0] + [5, 8, 4]])).logits[0]
        assert (again[0] - full[-2:]).abs().max() <= 1e-4
        ids, _ = target.forward([0], [[3]], logits=False)
        assert ids[0].tolist() == hf_target(torch.tensor([batch[1] + [3]])).logits[0, -1:].argmax(-1).tolist()


def test_target_softcaps_and_windows(gemma4_ckpt: Path, hf_target: torch.nn.Module) -> None:
    """The two Gemma-specific steps matter on the fixture: without them the logits differ."""
    from dspark_trt.runtime import gemma4 as module

    target = module.Gemma4Target(gemma4_ckpt / "target", num_slots=1, max_len=64)
    p = prompts(1)[0]
    ref = hf_target(torch.tensor([p])).logits[0]
    uncapped = module.Gemma4Target(gemma4_ckpt / "target", num_slots=1, max_len=64)
    object.__setattr__(uncapped.config, "softcap", None)
    assert (uncapped.forward([0], [p])[0][0] - ref).abs().max() > 1e-3
    wide = module.Gemma4Target(gemma4_ckpt / "target", num_slots=1, max_len=64)
    object.__setattr__(wide.config, "sliding_window", 1000)
    assert (wide.forward([0], [p])[0][0] - ref).abs().max() > 1e-3
    assert (target.forward([0], [p])[0][0] - ref).abs().max() <= 1e-4


def test_tensor_parallel_equals_tp1(gemma4_pair: Path, gemma4_ckpt: Path, tmp_path: Path) -> None:
    from dspark_trt.runtime.gemma4 import Gemma4Target
    from dspark_trt.runtime.tp import open_target

    tp2 = _convert(gemma4_pair, tmp_path / "tp2", tp=2)
    single = Gemma4Target(gemma4_ckpt / "target", num_slots=2, max_len=96)
    batch = prompts(2)
    ref_logits, ref_features = single.forward([0, 1], batch, capture=CAPTURE)
    ref_more, _ = single.forward([0], [[7, 8]], start=[5])
    with open_target("gemma4", tp2 / "target", num_slots=2, max_len=96) as target:
        logits, features = target.forward([0, 1], batch, capture=CAPTURE)
        more, _ = target.forward([0], [[7, 8]], start=[5])
        ids, _ = target.forward([1], [[4]], logits=False)
    for a, b in zip(logits + features + more, ref_logits + ref_features + ref_more, strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert ids[0].tolist() == single.forward([1], [[4]])[0][0].argmax(-1).tolist()


# ------------------------------------------------------------------------------------------ drafter


def deepspec_draft(model: torch.nn.Module, features: torch.Tensor, anchor: int
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Greedy block, base logits and confidence logits as DeepSpec drafts them (draft_ops.build_dspark_proposal
    with markov_head.VanillaMarkov.sample_block_tokens and Gemma4DSparkModel.predict_confidence_step)."""
    hidden, base = model.backbone(features, anchor)
    w1, w2 = model.markov_head.markov_w1, model.markov_head.markov_w2
    prev, tokens, conf = anchor, [], []
    for k in range(base.shape[0]):
        e = w1(torch.tensor(prev))
        conf.append(model.confidence_head.proj(torch.cat([hidden[k], e]))[0])
        prev = int((base[k] + w2(e)).argmax())
        tokens.append(prev)
    return tokens, base, torch.stack(conf)


def test_drafter_drafts_what_deepspec_drafts(gemma4_pair: Path, gemma4_ckpt: Path) -> None:
    from dspark_trt.runtime.dspark.gemma4 import Gemma4DSparkDrafter

    reference = deepspec_gemma4_drafter(gemma4_pair / "drafter")
    drafter = Gemma4DSparkDrafter(gemma4_ckpt / "draft", num_slots=3, max_len=64)
    gen = torch.Generator().manual_seed(20260)
    width = len(TARGET_LAYER_IDS) * 64
    contexts = [(torch.randn(13, width, generator=gen), 101), (torch.randn(6, width, generator=gen), 517)]
    # Context in two pieces for slot 2 (as verification commits it), one for slot 0; both drafted in one round.
    drafter.add_context_batch([2, 0], [contexts[0][0][:9], contexts[1][0]])
    drafter.add_context(2, contexts[0][0][9:])
    draft = drafter.draft([2, 0], [a for _, a in contexts], [0.0, 0.0], [None, None])
    hidden, base = drafter.backbone([2, 0], [a for _, a in contexts])
    with torch.no_grad():
        for i, (features, anchor) in enumerate(contexts):
            tokens, ref_base, ref_conf = deepspec_draft(reference, features, anchor)
            assert draft.tokens[i].tolist() == tokens
            assert (base[i] - ref_base).abs().max() <= 1e-5
            assert (draft.conf_logits[i] - ref_conf).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------- speculation


def test_greedy_speculation_is_token_identical(gemma4_ckpt: Path) -> None:
    from dspark_trt.runtime.dspark.gemma4 import Gemma4DSparkDrafter
    from dspark_trt.runtime.gemma4 import Gemma4Target
    from dspark_trt.runtime.generate import Request, generate

    target = Gemma4Target(gemma4_ckpt / "target", num_slots=6, max_len=128)
    drafter = Gemma4DSparkDrafter(gemma4_ckpt / "draft", num_slots=6, max_len=128)
    batch = prompts(6)

    def run(mode: str, **options) -> list:
        requests = [Request(p, max_new_tokens=16 + i % 5, speculation=mode, stop_ids=(7,) if i % 4 == 0 else ())
                    for i, p in enumerate(batch)]
        return generate(target, drafter, requests, num_slots=6, **options)

    reference = run("off")
    for mode, options in (("fixed", {}), ("auto", {"scheduler": "production"})):
        for ref, got in zip(reference, run(mode, **options), strict=True):
            assert got.tokens == ref.tokens, f"{mode} {options}"
            assert sum(got.taus) == len(got.tokens) - 1
    # With drafts that are often right (the target's own continuation, one block in three corrupted),
    # long acceptances, partial ones and rollbacks across the sliding window all happen.
    from oracle import OracleDrafter  # tests/oracle.py

    right = OracleDrafter(drafter, [p + r.tokens + [0] * 16 for p, r in zip(batch, reference, strict=True)])
    requests = [Request(p, max_new_tokens=16 + i % 5, speculation="fixed", stop_ids=(7,) if i % 4 == 0 else ())
                for i, p in enumerate(batch)]
    results = generate(target, right, requests, num_slots=6)
    assert [r.tokens for r in results] == [r.tokens for r in reference]
    taus = [t for r in results for t in r.taus]
    assert max(taus) == 8 and sum(taus) / len(taus) > 2.5


VOCAB, PROMPT, SAMPLES = 16, [3, 1, 4], 2000


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A 16-token text-only Gemma4 target (gemma4_text) with peaked distributions and its drafter, converted."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from dspark_trt.builder.fixture_gemma4 import drafter_config, drafter_tensors

    root = tmp_path_factory.mktemp("gemma4-small-vocab")
    config = Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, sliding_window=4,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=4, vocab_size_per_layer_input=VOCAB,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config)
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so the test has teeth
        model.lm_head.weight.mul_(60)
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "target")
    from test_sampling import write_word_tokenizer  # tests/test_sampling.py

    write_word_tokenizer(root / "target", VOCAB)
    draft_config = drafter_config(json.loads((root / "target" / "config.json").read_text()), VOCAB - 1, "vanilla")
    (root / "drafter").mkdir()
    (root / "drafter" / "config.json").write_text(json.dumps(draft_config))
    tensors = drafter_tensors(draft_config, model.model.embed_tokens.weight.detach(), torch.Generator().manual_seed(1))
    tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()
    save_file(tensors, str(root / "drafter" / "model.safetensors"))
    _convert(root, root / "ckpt")
    return root / "ckpt", model.float().eval()


def test_speculative_sampling_keeps_the_target_distribution(small_vocab) -> None:
    from test_sampling import chi_square_p  # tests/test_sampling.py

    from dspark_trt.runtime.dspark.gemma4 import Gemma4DSparkDrafter
    from dspark_trt.runtime.gemma4 import Gemma4Target
    from dspark_trt.runtime.generate import Request, generate

    ckpt, model = small_vocab
    with torch.no_grad():  # P(2nd, 3rd generated token) of target-only sampling at temperature 1
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1], -1)
        p2 = torch.softmax(model(torch.tensor([PROMPT + [a] for a in range(VOCAB)])).logits[:, -1], -1)
        seqs = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = torch.softmax(model(seqs).logits[:, -1], -1).view(VOCAB, VOCAB, VOCAB)
    exact = torch.einsum("a,ab,abc->bc", p1.double(), p2.double(), p3.double())
    target = Gemma4Target(ckpt / "target", num_slots=64, max_len=32)
    drafter = Gemma4DSparkDrafter(ckpt / "draft", num_slots=64, max_len=32)
    for mode in ("off", "fixed"):
        requests = [Request(PROMPT, max_new_tokens=3, temperature=1.0, seed=s, speculation=mode)
                    for s in range(SAMPLES)]
        results = generate(target, drafter, requests, num_slots=64)
        counts = torch.zeros(VOCAB, VOCAB)
        for r in results:
            counts[r.tokens[1], r.tokens[2]] += 1
        p = chi_square_p(counts, exact)
        assert p > 1e-3, f"{mode}: chi-square p = {p:.2e}"
        if mode == "fixed":
            verified = sum(sum(r.verified) for r in results) / sum(r.rounds for r in results)
            assert verified > 0.5  # drafts really were verified: the test is not vacuous


# ------------------------------------------------------------------------------------------- served


def test_served_greedy_output_equals_target_only(gemma4_pair: Path, tmp_path: Path) -> None:
    """A real tritonserver (tp 2 on CPU) streams what target-only decoding produces, in every mode."""
    from dspark_trt.builder.repo import build_repo
    from dspark_trt.builder.serve import start_server
    from dspark_trt.client.stream import complete
    from dspark_trt.runtime.generate import Request, generate
    from dspark_trt.runtime.loader import open_checkpoint
    from dspark_trt.runtime.tp import free_port

    ckpt = _convert(gemma4_pair, tmp_path / "ckpt", tp=2)
    batch = prompts(3)
    target, drafter, manifest = open_checkpoint(ckpt, num_slots=3, max_len=128)
    try:
        assert manifest["family"] == "gemma4" and type(drafter).__name__ == "Gemma4DSparkDrafter"
        expected = [r.tokens for r in generate(target, drafter, [Request(p, max_new_tokens=20, speculation="off")
                                                                 for p in batch])]
    finally:
        target.close()
    build_repo(ckpt, tmp_path / "repo", num_slots=4, max_prompt_tokens=64, max_new_tokens=64)
    ports = [free_port() for _ in range(3)]
    server = start_server(tmp_path / "repo", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                          cache=tmp_path / "cache", timeout=300)
    try:
        for mode in ("auto", "fixed", "off"):
            for prompt, want in zip(batch, expected, strict=True):
                got = complete(server.endpoints["grpc"], prompt, max_tokens=20, speculation=mode)
                assert got.ids == want, mode
    finally:
        server.stop()
