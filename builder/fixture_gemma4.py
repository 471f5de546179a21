"""Tiny random Gemma4 target + DeepSpec `Gemma4DSparkModel` drafter, in their real on-disk formats.

The target is a genuine `transformers.Gemma4ForConditionalGeneration` (top-level `gemma4` config whose
`text_config` is `gemma4_text`, as google/gemma-4-*-it ship; no vision or audio tower) saved by
`save_pretrained`, sharded. It has what the architecture has, kept tiny: sliding and global layers with
different head sizes, keys equal to values on the global layers (`attention_k_eq_v`), per-layer inputs
(PLE), final-logit softcapping, `layer_scalar`, tied embeddings.

The drafter follows DeepSpec (deepseek-ai/DeepSpec): its config is what
`deepspec/modeling/dspark/gemma4/config.py` `build_draft_config` makes of the target's text config, its
tensors are the state dict of `Gemma4DSparkModel` (`deepspec/modeling/dspark/gemma4/modeling.py`), with
the Markov head of `deepspec/modeling/dspark/markov_head.py` and the confidence head
(`AcceptRatePredictor`) of `deepspec/modeling/dspark/common.py`. Sizes follow `dspark_gemma4_12b`
(block 7, a mask id, a Markov rank, target layers spread over the depth), scaled down.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.atomic import atomic_directory
from ..runtime.heads import markov_tensor_shapes
from .corpus import stdlib_root
from .fixture_qwen3 import _norm_weight, _normal, shard_size_for
from .tokenizer import TOKENIZER_FILES, special_token_ids, train_tokenizer

VOCAB_SIZE = 1024
HIDDEN = 64
INTERMEDIATE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2  # sliding layers
HEAD_DIM = 16  # sliding layers
GLOBAL_HEAD_DIM = 32  # full-attention layers (and every drafter layer)
NUM_GLOBAL_KV_HEADS = 1  # full-attention layers, whose keys are their values (attention_k_eq_v)
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
SLIDING_WINDOW = 8  # short, so that prompts in the tests run past it
PER_LAYER_INPUT = 8  # hidden_size_per_layer_input (PLE)
# Real Gemma4 caps at 30; the tiny model's logits are small, so a small cap is what makes it matter.
SOFTCAP = 2.0
ROPE_PARAMETERS = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DRAFT_LAYERS = 2
BLOCK_SIZE = 7
TARGET_LAYER_IDS = [0, 2, 4]  # a sliding, a global and a sliding layer; never the last
MARKOV_RANK = 32
NUM_ANCHORS = 512
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
GEMMA4_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
MASK_TOKEN = "<mask>"

_DRAFTER_SEED_OFFSET = 1_000_003


def _target_config(token_ids: dict[str, int]):  # -> transformers.Gemma4Config (imported lazily)
    from transformers import Gemma4Config

    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=len(LAYER_TYPES), num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=NUM_GLOBAL_KV_HEADS,
        attention_k_eq_v=True, layer_types=list(LAYER_TYPES), sliding_window=SLIDING_WINDOW,
        final_logit_softcapping=SOFTCAP, hidden_size_per_layer_input=PER_LAYER_INPUT,
        vocab_size_per_layer_input=VOCAB_SIZE, max_position_embeddings=2048, rope_parameters=ROPE_PARAMETERS,
        tie_word_embeddings=True, pad_token_id=token_ids["<pad>"], eos_token_id=token_ids["<eos>"],
        bos_token_id=token_ids["<bos>"],
    )
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None, tie_word_embeddings=True)


def _randomise_scales(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises every RMSNorm weight and `layer_scalar` to 1: a swapped norm or a missing
    scalar would then go unnoticed. Trained values differ; so do these."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight") or name.endswith("layer_scalar"):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))


def _write_target(target_dir: Path, token_ids: dict[str, int], seed: int) -> None:
    from transformers import AutoModelForImageTextToText

    config = _target_config(token_ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _randomise_scales(model, seed)
    model.save_pretrained(target_dir, max_shard_size=shard_size_for(model))


def drafter_config(target_config: dict, mask_token_id: int, markov_head_type: str) -> dict:
    """DeepSpec's `build_draft_config` (deepspec/modeling/dspark/gemma4/config.py): the target's text
    config with the DSpark fields set. `global_head_dim` and `num_global_key_value_heads` are written as
    fields because `Gemma4DSparkModel` requires them (newer transformers fold them into `per_layer_config`,
    which describes the target's layers, not the drafter's)."""
    text = dict(target_config.get("text_config") or target_config)  # a gemma4 or a gemma4_text target
    per_layer = text.pop("per_layer_config", None) or {}
    full = next((v for k, v in per_layer.items() if text["layer_types"][int(k)] == "full_attention"), {})
    text.setdefault("global_head_dim", full.get("head_dim", text["head_dim"]))
    text.setdefault("num_global_key_value_heads", full.get("num_key_value_heads", text["num_key_value_heads"]))
    text.update(
        architectures=["Gemma4DSparkModel"],
        target_model_type=target_config["model_type"],
        target_text_model_type=text["model_type"],
        num_target_layers=text["num_hidden_layers"],
        num_hidden_layers=DRAFT_LAYERS,
        enable_moe_block=False,
        hidden_size_per_layer_input=0,
        block_size=BLOCK_SIZE,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * DRAFT_LAYERS,
        mask_token_id=mask_token_id,
        target_layer_ids=list(TARGET_LAYER_IDS),
        num_anchors=NUM_ANCHORS,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        markov_rank=MARKOV_RANK,
        markov_head_type=markov_head_type,
        dtype=target_config.get("dtype", "bfloat16"),
    )
    return text


def drafter_tensors(config: dict, embed: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The state dict of DeepSpec's `Gemma4DSparkModel` for `config` (names and shapes from its modules:
    `Gemma4DSparkAttention` has no v_proj when `attention_k_eq_v`, and its v_norm has no weight;
    `Gemma4DSparkDecoderLayer` has four norms and a `layer_scalar` buffer)."""
    h, v, r = config["hidden_size"], config["vocab_size"], config["markov_rank"]
    nh, hd, inter = config["num_attention_heads"], config["global_head_dim"], config["intermediate_size"]
    k_eq_v = bool(config["attention_k_eq_v"])
    nkv = config["num_global_key_value_heads"] if k_eq_v else config["num_key_value_heads"]
    t: dict[str, torch.Tensor] = {
        # DeepSpec's `initialize_embeddings_and_head` copies the target's embedding into both.
        "embed_tokens.weight": embed.clone(),
        "lm_head.weight": embed.clone(),
        "fc.weight": _normal((h, len(config["target_layer_ids"]) * h), gen),
        "hidden_norm.weight": _norm_weight(h, gen),
        "norm.weight": _norm_weight(h, gen),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            t[p + norm + ".weight"] = _norm_weight(h, gen)
        t[p + "self_attn.q_proj.weight"] = _normal((nh * hd, h), gen)
        t[p + "self_attn.k_proj.weight"] = _normal((nkv * hd, h), gen)
        if not k_eq_v:
            t[p + "self_attn.v_proj.weight"] = _normal((nkv * hd, h), gen)
        t[p + "self_attn.o_proj.weight"] = _normal((h, nh * hd), gen)
        t[p + "self_attn.q_norm.weight"] = _norm_weight(hd, gen)
        t[p + "self_attn.k_norm.weight"] = _norm_weight(hd, gen)
        t[p + "mlp.gate_proj.weight"] = _normal((inter, h), gen)
        t[p + "mlp.up_proj.weight"] = _normal((inter, h), gen)
        t[p + "mlp.down_proj.weight"] = _normal((h, inter), gen)
        t[p + "layer_scalar"] = _norm_weight(1, gen)
    for name, shape in markov_tensor_shapes(config["markov_head_type"], v, r, h).items():
        t[name] = _normal(shape, gen)
    conf_in = h + r if config["confidence_head_with_markov"] else h
    t["confidence_head.proj.weight"] = _normal((1, conf_in), gen)
    t["confidence_head.proj.bias"] = _normal((1,), gen)
    return t


def _read_embedding(target_dir: Path) -> torch.Tensor:
    from safetensors import safe_open

    name = "model.language_model.embed_tokens.weight"
    index = json.loads((target_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(target_dir / index[name], framework="pt") as f:
        return f.get_tensor(name)


def write_gemma4_fixture(out: Path, seed: int = 0, markov_head_type: str = "vanilla") -> None:
    """Write `out/target` (Gemma4ForConditionalGeneration, sharded bf16, tokenizer) and `out/drafter`
    (DeepSpec Gemma4DSparkModel, bf16). The whole of `out` appears at once."""
    if markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {markov_head_type!r}")
    with atomic_directory(out, force=True, inputs=[stdlib_root()]) as tmp:  # the tokenizer's corpus
        target_dir, drafter_dir = tmp / "target", tmp / "drafter"
        tokenizer_path = train_tokenizer(target_dir, VOCAB_SIZE, GEMMA4_SPECIAL_TOKENS, seed=seed, eos_token="<eos>",
                                         pad_token="<pad>", bos_token="<bos>", model_max_length=2048,
                                         tokenizer_class="PreTrainedTokenizerFast")
        token_ids = special_token_ids(tokenizer_path, GEMMA4_SPECIAL_TOKENS)
        _write_target(target_dir, token_ids, seed)

        drafter_dir.mkdir()
        for name in TOKENIZER_FILES:
            shutil.copyfile(target_dir / name, drafter_dir / name)
        target_config = json.loads((target_dir / "config.json").read_text())
        config = drafter_config(target_config, token_ids[MASK_TOKEN], markov_head_type)
        (drafter_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = torch.Generator().manual_seed(seed + _DRAFTER_SEED_OFFSET)
        tensors = drafter_tensors(config, _read_embedding(target_dir), gen)
        save_file(tensors, str(drafter_dir / "model.safetensors"), metadata={"format": "pt"})
