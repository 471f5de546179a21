"""Tiny random DeepSeek-V4 target with a DSpark drafter inside, in the real on-disk format.

Steps: transformers builds and saves a genuine `DeepseekV4ForCausalLM` (its save uses the original
DeepSeek tensor names for most keys); a second, throw-away V4 model with three sliding-window `moe`
layers is saved the same way and its layers become the drafter stages `mtp.0..2` (so their names,
shapes and dtypes are exactly what transformers writes for a block); finally every shard is rewritten
with DeepSeek block-FP8 linears (`*.weight` e4m3 + `*.weight_scale_inv` f32) and the drafter's shard
is added to the index, as in the published V4-DSpark checkpoints.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..runtime.atomic import atomic_directory
from ..runtime.fp8 import quantize_fp8_block
from .corpus import stdlib_root
from .fixture_qwen3 import shard_size_for
from .tokenizer import special_token_ids, train_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds to import
    from transformers import DeepseekV4Config

VOCAB_SIZE = 1024
HIDDEN = 256
MARKOV_RANK = 32
NUM_MTP_STAGES = 3
DSPARK_BLOCK_SIZE = 5
DSPARK_TARGET_LAYER_IDS = [1, 2, 3]
LAYER_TYPES = [
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
]
MLP_LAYER_TYPES = ["hash_moe", "moe", "moe", "moe"]

BOS, EOS, PAD, MASK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<|mask|>"
DEEPSEEK_SPECIAL_TOKENS = [BOS, EOS, PAD, MASK]

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
INDEX_NAME = "model.safetensors.index.json"

# Main attention / FFN linears are FP8 in DeepSeek's checkpoints; the compressor and indexer
# projections ship in BF16 (transformers' own V4 code lists them as not-to-convert), and so do the
# router (`ffn.gate.weight`), norms, embeddings and head.
_FP8_SUFFIXES = (
    ".wq_a.weight",
    ".wq_b.weight",
    ".wkv.weight",
    ".wo_a.weight",
    ".wo_b.weight",
    ".w1.weight",
    ".w2.weight",
    ".w3.weight",
    ".main_proj.weight",
)
_NOT_FP8 = re.compile(r"\.(compressor|indexer)\.")

# A forward over more tokens than the sliding window (128) and the HCA compression rate (128)
# makes every attention branch do real work.
_CHECK_SEQ_LEN = 136
_MTP_SEED_OFFSET = 2_000_003


def is_fp8_linear(name: str) -> bool:
    """Whether the fixture (and DeepSeek's FP8 release) stores tensor `name` as block FP8."""
    return name.endswith(_FP8_SUFFIXES) and not _NOT_FP8.search(name)


def v4_config(token_ids: dict[str, int], **overrides: object) -> DeepseekV4Config:
    """The tiny V4 config, with the DSpark fields of a V4-DSpark checkpoint."""
    from transformers import DeepseekV4Config

    fields: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        mlp_layer_types=list(MLP_LAYER_TYPES),
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        q_lora_rank=128,
        o_groups=8,
        o_lora_rank=32,
        n_routed_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        n_shared_experts=1,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=16,
        sliding_window=128,
        hc_mult=4,
        max_position_embeddings=4096,
        # The published config says 1 although three mtp stages are stored; readers must count prefixes.
        num_nextn_predict_layers=1,
        bos_token_id=token_ids[BOS],
        eos_token_id=token_ids[EOS],
        pad_token_id=token_ids[PAD],
        dspark_block_size=DSPARK_BLOCK_SIZE,
        dspark_noise_token_id=token_ids[MASK],
        # Layer outputs, the last layer's (3) included, as V4-Flash-DSpark reads [40, 41, 42] of 43 layers.
        dspark_target_layer_ids=list(DSPARK_TARGET_LAYER_IDS),
        dspark_markov_rank=MARKOV_RANK,
    )
    fields.update(overrides)
    return DeepseekV4Config(**fields)


def _randomise_hash_routing(model: torch.nn.Module, seed: int) -> None:
    """Give hash-MoE layers a real token→experts table.

    transformers initialises `tid2eid` to zeros (the real table comes from the checkpoint), which would
    send every token to expert 0 twice; a fixture should route like a trained model: distinct experts.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor):
            vocab, k = table.shape
            n_experts = module.weight.shape[0]
            choice = torch.rand(vocab, n_experts, generator=gen).argsort(dim=1)[:, :k]
            table.copy_(choice.to(table.dtype))


def _check_forward(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_SIZE, (1, _CHECK_SEQ_LEN), generator=gen)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    if logits.shape != (1, _CHECK_SEQ_LEN, VOCAB_SIZE) or not torch.isfinite(logits.float()).all():
        raise RuntimeError(f"V4 fixture forward check failed: logits {tuple(logits.shape)} not finite/shaped")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _mtp_tensors(token_ids: dict[str, int], seed: int, scratch: Path) -> dict[str, torch.Tensor]:
    """The DSpark drafter: three sliding-window `moe` V4 blocks under `mtp.{i}.`, plus its extra keys.

    The blocks are saved by transformers from a throw-away model so that their names, shapes and
    dtypes are by construction those of a target layer; only the prefix is changed.
    """
    from transformers import AutoModelForCausalLM

    config = v4_config(
        token_ids,
        num_hidden_layers=NUM_MTP_STAGES,
        layer_types=["sliding_attention"] * NUM_MTP_STAGES,
        mlp_layer_types=["moe"] * NUM_MTP_STAGES,
    )
    torch.manual_seed(seed + _MTP_SEED_OFFSET)
    donor = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    donor.save_pretrained(scratch)
    saved: dict[str, torch.Tensor] = {}
    for path in sorted(scratch.glob("*.safetensors")):
        saved.update(_load_file(path))

    last = f"mtp.{NUM_MTP_STAGES - 1}."
    out: dict[str, torch.Tensor] = {}
    for name, tensor in saved.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            out[f"mtp.{m.group(1)}.{m.group(2)}"] = tensor
    # The last stage owns the final norm and the mHC head, in the original naming (`hc_head_fn`,
    # where transformers' own save keeps `model.hc_head.hc_fn`).
    out[last + "norm.weight"] = saved["model.norm.weight"]
    for part in ("fn", "base", "scale"):
        out[f"{last}hc_head_{part}"] = saved[f"model.hc_head.hc_{part}"]

    gen = torch.Generator().manual_seed(seed + _MTP_SEED_OFFSET)
    h, v, r = HIDDEN, VOCAB_SIZE, MARKOV_RANK
    n_ctx = len(DSPARK_TARGET_LAYER_IDS)
    norm_dtype = out["mtp.0.attn_norm.weight"].dtype  # a norm like the block's own norms

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    out["mtp.0.main_proj.weight"] = normal(h, n_ctx * h)
    out["mtp.0.main_norm.weight"] = (1.0 + torch.randn(h, generator=gen) * 0.01).to(norm_dtype)
    out[last + "markov_head.markov_w1.weight"] = normal(v, r)
    out[last + "markov_head.markov_w2.weight"] = normal(v, r)
    out[last + "confidence_head.proj.weight"] = normal(1, h + r)
    return out


def _quantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_fp8_linear(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(tensor)
        else:
            out[name] = tensor
    return out


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _rewrite_checkpoint(target_dir: Path, mtp: dict[str, torch.Tensor]) -> None:
    """Quantise every shard, add the drafter as one more shard, and rewrite the index to match."""
    index_path = target_dir / INDEX_NAME
    old_files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    n = len(old_files) + 1  # shard names change ("-of-N"), as if the release had been saved this way
    weight_map: dict[str, str] = {}
    total_size = total_params = 0

    def write(i: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total_size, total_params
        name = _shard_name(i, n)
        tensors = _quantize(tensors)
        save_file(tensors, str(target_dir / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total_size += t.numel() * t.element_size()
            total_params += t.numel()

    for i, old in enumerate(old_files, start=1):
        tensors = _load_file(target_dir / old)
        (target_dir / old).unlink()
        write(i, tensors)
    write(n, mtp)
    index = {
        "metadata": {"total_parameters": total_params, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def _finish_config(target_dir: Path) -> None:
    from transformers import AutoConfig

    path = target_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    reloaded = AutoConfig.from_pretrained(target_dir)
    if reloaded.model_type != "deepseek_v4" or reloaded.dspark_target_layer_ids != DSPARK_TARGET_LAYER_IDS:
        raise RuntimeError(f"{path} does not round-trip through AutoConfig")


def write_deepseek_v4_fixture(out: Path, seed: int = 0) -> None:
    """Write `out/target`: a sharded, block-FP8 DeepSeek-V4 checkpoint with DSpark stages `mtp.0..2`.

    The whole of `out` appears at once (built in a hidden sibling, then renamed).
    """
    from transformers import AutoModelForCausalLM

    # Regenerating a fixture is idempotent, so an existing `out` is replaced (atomically).
    with atomic_directory(out, force=True, inputs=[stdlib_root()]) as tmp:  # the tokenizer's corpus
        target_dir = tmp / "target"
        tokenizer_path = train_tokenizer(
            target_dir,
            VOCAB_SIZE,
            DEEPSEEK_SPECIAL_TOKENS,
            seed=seed,
            eos_token=EOS,
            pad_token=PAD,
            bos_token=BOS,
            model_max_length=4096,
            tokenizer_class="PreTrainedTokenizerFast",
        )
        token_ids = special_token_ids(tokenizer_path, DEEPSEEK_SPECIAL_TOKENS)

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(v4_config(token_ids), dtype=torch.bfloat16)
        _randomise_hash_routing(model, seed)
        _check_forward(model, seed)
        model.save_pretrained(target_dir, max_shard_size=shard_size_for(model))
        del model

        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            mtp = _mtp_tensors(token_ids, seed, Path(scratch))
        _rewrite_checkpoint(target_dir, mtp)
        _finish_config(target_dir)
