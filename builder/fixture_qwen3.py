"""Tiny random Qwen3 target + DeepSpec `Qwen3DSparkModel` drafter, in their real on-disk formats.

The target is a genuine `transformers.Qwen3ForCausalLM` saved by `save_pretrained` (sharded, with an
index); the drafter follows DSPARK_SPEC §2 key for key. Everything is seeded, so the same seed gives
byte-identical files, and a default fixture takes about a second to write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..runtime.atomic import atomic_directory
from ..runtime.heads import markov_tensor_shapes
from .corpus import stdlib_root
from .tokenizer import QWEN3_SPECIAL_TOKENS, TOKENIZER_FILES, special_token_ids, train_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds to import
    from transformers import Qwen3Config

VOCAB_SIZE = 1024
BASE_HIDDEN = 128
BASE_INTERMEDIATE = 256
BASE_HEAD_DIM = 16
NUM_HEADS = 8
NUM_KV_HEADS = 4
TARGET_LAYERS = 6
DRAFT_LAYERS = 2
BLOCK_SIZE = 7
TARGET_LAYER_IDS = [1, 2, 4]
MARKOV_RANK = 32
# DeepSpec's anchors sampled per training sequence (config/dspark/dspark_qwen3_8b.py); inference ignores it,
# but DeepSpec's Qwen3DSparkModel requires the field.
NUM_ANCHORS = 512
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
MASK_TOKEN = "<|mask|>"

# The drafter draws from its own generator so that its tensors do not depend on how many random
# numbers transformers happened to consume while initialising the target.
_DRAFTER_SEED_OFFSET = 1_000_003
_MAX_SHARD_BYTES = 512 * 1024**2


def shard_size_for(model: torch.nn.Module) -> int:
    """A `max_shard_size` (bytes) that makes `save_pretrained` write at least two shards.

    About a third of the model, so small fixtures get 3-4 shards; capped for big benchmark models;
    never below the largest tensor, which transformers cannot split.
    """
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return max(min(sum(sizes) // 3, _MAX_SHARD_BYTES), max(sizes))


def _normal(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _norm_weight(size: int, gen: torch.Generator) -> torch.Tensor:
    # RMSNorm weights are trained around 1; a little noise makes a wrong mapping visible in tests.
    return (1.0 + torch.randn(size, generator=gen) * 0.01).to(torch.bfloat16)


def _target_config(token_ids: dict[str, int], scale: int, layers: int, rope_scaling: dict | None = None
                   ) -> Qwen3Config:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=BASE_HIDDEN * scale,
        intermediate_size=BASE_INTERMEDIATE * scale,
        num_hidden_layers=layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=BASE_HEAD_DIM * scale,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, **(rope_scaling or {})},
        # Qwen3 convention: <|endoftext|> is bos and pad, <|im_end|> ends a turn.
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )


def _write_target(target_dir: Path, token_ids: dict[str, int], seed: int, scale: int, layers: int,
                  rope_scaling: dict | None = None) -> None:
    from transformers import AutoModelForCausalLM

    config = _target_config(token_ids, scale, layers, rope_scaling)
    torch.manual_seed(seed)
    # Built directly in bf16 so a multi-GB benchmark model never exists in float32.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target_dir, max_shard_size=shard_size_for(model))


def drafter_tensors(
    config: dict,
    embed: torch.Tensor,
    lm_head: torch.Tensor,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """All tensors of a `Qwen3DSparkModel` drafter described by `config` (DSPARK_SPEC §2 names)."""
    h, v, r = config["hidden_size"], config["vocab_size"], config["markov_rank"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inter, n_ctx = config["intermediate_size"], len(config["target_layer_ids"])
    t: dict[str, torch.Tensor] = {
        # Copies of the target's: the drafter shares its token space and output space.
        "embed_tokens.weight": embed.clone(),
        "lm_head.weight": lm_head.clone(),
        "fc.weight": _normal((h, n_ctx * h), gen),
        "hidden_norm.weight": _norm_weight(h, gen),
        "norm.weight": _norm_weight(h, gen),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = _norm_weight(h, gen)
        t[p + "post_attention_layernorm.weight"] = _norm_weight(h, gen)
        t[p + "self_attn.q_proj.weight"] = _normal((nh * hd, h), gen)
        t[p + "self_attn.k_proj.weight"] = _normal((nkv * hd, h), gen)
        t[p + "self_attn.v_proj.weight"] = _normal((nkv * hd, h), gen)
        t[p + "self_attn.o_proj.weight"] = _normal((h, nh * hd), gen)
        t[p + "self_attn.q_norm.weight"] = _norm_weight(hd, gen)
        t[p + "self_attn.k_norm.weight"] = _norm_weight(hd, gen)
        t[p + "mlp.gate_proj.weight"] = _normal((inter, h), gen)
        t[p + "mlp.up_proj.weight"] = _normal((inter, h), gen)
        t[p + "mlp.down_proj.weight"] = _normal((h, inter), gen)
    for name, shape in markov_tensor_shapes(config["markov_head_type"], v, r, h).items():
        t[name] = _normal(shape, gen)
    conf_in = h + r if config["confidence_head_with_markov"] else h
    t["confidence_head.proj.weight"] = _normal((1, conf_in), gen)
    t["confidence_head.proj.bias"] = _normal((1,), gen)
    return t


def drafter_config(target_config: dict, mask_token_id: int, markov_head_type: str) -> dict:
    """The target's config with the DeepSpec drafter fields changed or added."""
    config = dict(target_config)
    config.update(
        architectures=["Qwen3DSparkModel"],
        num_hidden_layers=DRAFT_LAYERS,
        num_target_layers=target_config["num_hidden_layers"],
        block_size=BLOCK_SIZE,
        mask_token_id=mask_token_id,
        target_layer_ids=list(TARGET_LAYER_IDS),
        num_anchors=NUM_ANCHORS,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        markov_rank=MARKOV_RANK,
        markov_head_type=markov_head_type,
        tie_word_embeddings=False,
    )
    # The target's per-layer schedule would describe 6 layers for a 2-layer drafter.
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:DRAFT_LAYERS]
    return config


def _read_embeddings(target_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's embed_tokens and lm_head, read back from its shards (what a user's target holds)."""
    from safetensors import safe_open

    index = json.loads((target_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = []
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        with safe_open(target_dir / index[name], framework="pt") as f:
            out.append(f.get_tensor(name))
    return out[0], out[1]


def write_qwen3_fixture(
    out: Path,
    seed: int = 0,
    markov_head_type: str = "vanilla",
    scale: int = 1,
    layers: int = TARGET_LAYERS,
    rope_scaling: dict | None = None,
) -> None:
    """Write `out/target` (Qwen3ForCausalLM, sharded bf16) and `out/drafter` (Qwen3DSparkModel, bf16).

    `scale` multiplies hidden size, intermediate size and head_dim (heads stay 8 / 4 KV); `layers` sets
    the target depth. Both are size knobs for benchmarks. `rope_scaling` (e.g. {"rope_type": "yarn",
    "factor": 4.0, "original_max_position_embeddings": 512}) goes into the target's `rope_parameters`, and
    so into the drafter's, whose config is the target's with the DSpark fields added (as DeepSpec's
    `build_draft_config` makes it). No `sts.json` is written: calibration is fitted later. The whole of
    `out` appears at once (built in a hidden sibling, then renamed).
    """
    if markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {markov_head_type!r}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if layers <= max(TARGET_LAYER_IDS) + 1:
        # The spec forbids the target's last layer as a feature layer.
        minimum = max(TARGET_LAYER_IDS) + 2
        raise ValueError(f"layers must be >= {minimum} for target_layer_ids {TARGET_LAYER_IDS}, got {layers}")

    # Regenerating a fixture is idempotent, so an existing `out` is replaced (atomically).
    with atomic_directory(out, force=True, inputs=[stdlib_root()]) as tmp:  # the tokenizer's corpus
        target_dir, drafter_dir = tmp / "target", tmp / "drafter"
        tokenizer_path = train_tokenizer(
            target_dir,
            VOCAB_SIZE,
            QWEN3_SPECIAL_TOKENS,
            seed=seed,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            model_max_length=2048,
        )
        token_ids = special_token_ids(tokenizer_path, QWEN3_SPECIAL_TOKENS)
        _write_target(target_dir, token_ids, seed, scale, layers, rope_scaling)

        drafter_dir.mkdir()
        for name in TOKENIZER_FILES:
            shutil.copyfile(target_dir / name, drafter_dir / name)
        target_config = json.loads((target_dir / "config.json").read_text())
        config = drafter_config(target_config, token_ids[MASK_TOKEN], markov_head_type)
        (drafter_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        embed, lm_head = _read_embeddings(target_dir)
        gen = torch.Generator().manual_seed(seed + _DRAFTER_SEED_OFFSET)
        tensors = drafter_tensors(config, embed, lm_head, gen)
        save_file(tensors, str(drafter_dir / "model.safetensors"), metadata={"format": "pt"})
