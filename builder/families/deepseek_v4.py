"""DeepSeek-V4 targets with the DSpark drafter built in under `mtp.{0,1,2}.*`.

Canonical names are DeepSeek's own (`layers.{i}.attn.wq_a.weight`, `embed.weight`,
`hc_head_fn`, `mtp.0.main_proj.weight`); transformers' `save_pretrained` writes a hybrid
(`model.layers...`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`), which `canonical` folds
back. Linear weights may be FP8 e4m3 with a float32 `*.weight_scale_inv` per 128x128 block.

TensorRT-LLM has no TensorRT-engine path for DeepSeek-V4, so the converted layout keeps the
canonical names and TensorRT-LLM's conventions: `config.json` with `mapping`, one
`rank{N}.safetensors` per rank, query heads and output groups column-parallel, `wo_b` and the
shared expert's `w2` row-parallel, routed experts expert-parallel (whole experts per rank, global
expert ids kept in the names), everything else replicated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ...runtime.errors import CheckpointError
from ...runtime.heads import canonical_markov_name
from .common import (
    SCALE_SUFFIX,
    Expect,
    Item,
    Plan,
    Source,
    check_block_size,
    dtype_tag,
    linear,
    on_rank,
    replicated,
    require_divisible,
)
from .family import Family

MODEL_TYPE = "deepseek_v4"
ARCH = "DeepseekV4ForCausalLM"
FP8 = "F8_E4M3"
# Linear weights DeepSeek ships in FP8 (compressor / indexer projections stay BF16).
_FP8_LINEAR = re.compile(r"(\.|^)(wq_a|wq_b|wkv|wo_a|wo_b|w1|w2|w3|main_proj)\.weight$")
_COMPRESSOR = re.compile(r"\.(compressor|indexer)\.")
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")
_HF_RENAMES = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
               "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}


def canonical(stored: str) -> str:
    name = stored.removeprefix("model.")
    return canonical_markov_name(_HF_RENAMES.get(name, name))


def dims(src: Source) -> dict[str, Any]:
    heads = src.size("num_attention_heads")
    head_dim = src.size("head_dim")
    o_groups = src.size("o_groups")
    layers = src.size("num_hidden_layers", per_tensor=True)
    compress_rates = src.field("compress_rates", dict,
                               {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    return {
        "vocab": src.size("vocab_size"), "hidden": src.size("hidden_size"),
        "layers": layers, "heads": heads, "head_dim": head_dim,
        "kv_heads": src.size("num_key_value_heads", 1),
        "q_rank": src.size("q_lora_rank"), "o_groups": o_groups, "o_rank": src.size("o_lora_rank"),
        "experts": src.size("n_routed_experts", per_tensor=True), "experts_per_token": src.size("num_experts_per_tok"),
        "expert_dim": src.size("moe_intermediate_size"), "hc": src.size("hc_mult", 4),
        "index_heads": src.size("index_n_heads", 64), "index_dim": src.size("index_head_dim", 128),
        "layer_types": src.per_layer("layer_types", layers, ["sliding_attention", *compress_rates]),
        "mlp_types": src.per_layer("mlp_layer_types", layers, ["moe", "hash_moe"]),
        "compress_rates": compress_rates,
    }


def mtp_stages(src: Source) -> int:
    """Drafter stages present, counted from the tensors (the config's num_nextn_predict_layers says 1)."""
    stages = {int(m.group(1)) for name in src.by_name if (m := re.match(r"mtp\.(\d+)\.", name))}
    return max(stages) + 1 if stages else 0


class _Expected:
    """Builds the expected-tensor list; FP8-able linears accept BF16 or FP8 (+ block scales)."""

    def __init__(self, src: Source) -> None:
        self.src, self.tag, self.out = src, dtype_tag(src), []
        self.wide = (self.tag, "F32")  # parameters transformers keeps in float32

    def add(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] | None = None) -> None:
        if dtypes is None and _FP8_LINEAR.search(name) and not _COMPRESSOR.search(name):
            dtypes = (self.tag, FP8)
            info = self.src.by_name.get(name)
            if info is not None and info.dtype == FP8:
                blocks = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
                self.out.append(Expect(name + SCALE_SUFFIX, blocks, ("F32",)))
        self.out.append(Expect(name, shape, dtypes or (self.tag,)))

    def block(self, p: str, d: dict[str, Any], attention: str, mlp: str) -> None:
        h, nh, hd, hc = d["hidden"], d["heads"], d["head_dim"], d["hc"]
        mix = (2 + hc) * hc
        for norm in ("attn_norm.weight", "ffn_norm.weight"):
            self.add(p + norm, (h,), self.wide)
        for part in ("attn", "ffn"):
            self.add(f"{p}hc_{part}_fn", (mix, hc * h), self.wide)
            self.add(f"{p}hc_{part}_base", (mix,), self.wide)
            self.add(f"{p}hc_{part}_scale", (3,), self.wide)
        a = p + "attn."
        self.add(a + "attn_sink", (nh,), self.wide)
        self.add(a + "wq_a.weight", (d["q_rank"], h))
        self.add(a + "q_norm.weight", (d["q_rank"],), self.wide)
        self.add(a + "wq_b.weight", (nh * hd, d["q_rank"]))
        self.add(a + "wkv.weight", (hd, h))
        self.add(a + "norm.weight", (hd,), self.wide)
        self.add(a + "wo_a.weight", (d["o_groups"] * d["o_rank"], nh * hd // d["o_groups"]))
        self.add(a + "wo_b.weight", (h, d["o_groups"] * d["o_rank"]))
        if attention != "sliding_attention":
            rate = d["compress_rates"][attention]
            csa = attention == "compressed_sparse_attention"
            width = 2 * hd if csa else hd  # CSA compresses overlapping windows: two halves per entry
            self._compressor(a + "compressor.", rate, width, hd, h)
            if csa:
                ihd = d["index_dim"]
                self._compressor(a + "indexer.compressor.", rate, 2 * ihd, ihd, h)
                self.add(a + "indexer.wq_b.weight", (d["index_heads"] * ihd, d["q_rank"]))
                self.add(a + "indexer.weights_proj.weight", (d["index_heads"], h))
        f = p + "ffn."
        self.add(f + "gate.weight", (d["experts"], h))
        if mlp == "hash_moe":
            self.add(f + "gate.tid2eid", (d["vocab"], d["experts_per_token"]), ("I64", "I32"))
        else:
            self.add(f + "gate.bias", (d["experts"],), self.wide)
        i = d["expert_dim"]
        for e in [f"experts.{n}." for n in range(d["experts"])] + ["shared_experts."]:
            self.add(f + e + "w1.weight", (i, h))
            self.add(f + e + "w3.weight", (i, h))
            self.add(f + e + "w2.weight", (h, i))

    def _compressor(self, p: str, rate: int, width: int, norm: int, h: int) -> None:
        self.add(p + "ape", (rate, width), self.wide)
        self.add(p + "wkv.weight", (width, h))
        self.add(p + "wgate.weight", (width, h))
        self.add(p + "norm.weight", (norm,), self.wide)

    def head(self, p: str, d: dict[str, Any]) -> None:
        h, hc = d["hidden"], d["hc"]
        self.add(p + "norm.weight", (h,), self.wide)
        self.add(p + "hc_head_fn", (hc, hc * h), self.wide)
        self.add(p + "hc_head_base", (hc,), self.wide)
        self.add(p + "hc_head_scale", (1,), self.wide)


def target_tensors(src: Source) -> list[Expect]:
    d = dims(src)
    exp = _Expected(src)
    exp.add("embed.weight", (d["vocab"], d["hidden"]))
    exp.add("head.weight", (d["vocab"], d["hidden"]))
    exp.head("", d)
    for i in range(d["layers"]):
        exp.block(f"layers.{i}.", d, d["layer_types"][i], d["mlp_types"][i])
    return exp.out


def drafter_tensors(src: Source) -> list[Expect]:
    d = dims(src)
    exp = _Expected(src)
    stages = mtp_stages(src)
    rank = src.field("dspark_markov_rank", int, 256)
    n_ids = len(src.field("dspark_target_layer_ids", list))
    for s in range(stages):
        p = f"mtp.{s}."
        mlp = "hash_moe" if p + "ffn.gate.tid2eid" in src.by_name else "moe"
        exp.block(p, d, "sliding_attention", mlp)
    exp.add("mtp.0.main_proj.weight", (d["hidden"], n_ids * d["hidden"]))
    exp.add("mtp.0.main_norm.weight", (d["hidden"],), exp.wide)
    last = f"mtp.{stages - 1}."
    exp.head(last, d)
    exp.add(last + "markov_head.markov_w1.weight", (d["vocab"], rank))
    exp.add(last + "markov_head.markov_w2.weight", (d["vocab"], rank))
    exp.add(last + "confidence_head.proj.weight", (1, d["hidden"] + rank))
    return exp.out


def check_drafter_fields(src: Source) -> list[CheckpointError]:
    problems: list[CheckpointError] = []
    d = dims(src)
    if mtp_stages(src) == 0:
        return [CheckpointError(src.path, "no DSpark drafter in this checkpoint", subject="mtp.*",
                                found="no mtp.N.* tensors", expected="mtp.0.* .. mtp.2.*")]
    problems += check_block_size(src, "dspark_block_size")
    mask = src.field("dspark_noise_token_id")
    if not 0 <= mask < d["vocab"]:
        problems.append(CheckpointError(src.config_path, "mask (noise) token id outside the vocabulary",
                                        subject="dspark_noise_token_id", found=mask,
                                        expected=f"0 <= id < {d['vocab']}"))
    # V4 reads each chosen layer's OUTPUT: the mean of its mHC streams after hc_ffn post-mapping. Unlike
    # Qwen3 (where DeepSpec excludes it), the last layer is allowed: its output is the residual before
    # hc_head and the final norm, and V4-Flash-DSpark itself lists [40, 41, 42] of 43 layers. The
    # references concatenate the features in layer order (DeepSeek's loop appends as it passes each
    # layer; TensorRT-LLM sorts the ids), which equals list order only for increasing ids.
    ids = src.field("dspark_target_layer_ids", list)
    out_of_range = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < d["layers"]]
    for layer in out_of_range:
        problems.append(CheckpointError(src.config_path, "target layer id out of range",
                                        subject="dspark_target_layer_ids", found=layer,
                                        expected=f"0 <= id < {d['layers']}"))
    if not out_of_range and (not ids or any(a >= b for a, b in zip(ids, ids[1:], strict=False))):
        problems.append(CheckpointError(src.config_path, "target layer ids must be strictly increasing",
                                        subject="dspark_target_layer_ids", found=ids,
                                        expected="a non-empty list in layer order, e.g. [40, 41, 42]"))
    return problems


def dspark_fields(src: Source) -> dict[str, Any]:
    return {
        "block_size": src.field("dspark_block_size"),
        "mask_token_id": src.field("dspark_noise_token_id"),
        "target_layer_ids": src.field("dspark_target_layer_ids", list),
        # What the V4 DSpark checkpoints were built for (see runtime/deepseek_v4.py `target_feature`).
        "target_feature": "layer_output_hc_mean",
        "markov_rank": src.field("dspark_markov_rank", int, 256),
        "markov_head_type": src.field("dspark_markov_head_type", str, "vanilla"),
        "confidence_head": True,
        "confidence_head_with_markov": True,
        "draft_layers": mtp_stages(src),
    }


def summary(src: Source) -> dict[str, Any]:
    d = dims(src)
    return {"layers": d["layers"], "hidden_size": d["hidden"], "attention_heads": d["heads"],
            "kv_heads": d["kv_heads"], "head_dim": d["head_dim"], "experts": d["experts"],
            "experts_per_token": d["experts_per_token"], "expert_intermediate_size": d["expert_dim"],
            "vocab_size": d["vocab"], "mhc_streams": d["hc"], "mtp_stages": mtp_stages(src)}


# ---------------------------------------------------------------------------------------------
# Conversion


def _check_tp(src: Source, d: dict[str, Any], tp: int) -> None:
    require_divisible(src.config_path, "num_attention_heads", d["heads"], tp)
    require_divisible(src.config_path, "o_groups", d["o_groups"], tp)
    require_divisible(src.config_path, "n_routed_experts", d["experts"], tp)
    require_divisible(src.config_path, "moe_intermediate_size", d["expert_dim"], tp)


_COLUMN_PARALLEL = re.compile(r"attn\.(wq_b|wo_a)\.weight$|attn\.attn_sink$|shared_experts\.w[13]\.weight$"
                              r"|^head\.weight$")
_ROW_PARALLEL = re.compile(r"attn\.wo_b\.weight$|shared_experts\.w2\.weight$")


def shard_dim(name: str) -> int | None:
    """The dimension `convert` splits tensor `name` along over the tensor-parallel ranks; None when it
    is replicated or a routed expert (held whole by one rank). The runtime reassembles ranks with it."""
    if _EXPERT.search(name) or _COMPRESSOR.search(name):
        return None
    if _COLUMN_PARALLEL.search(name):
        return 0
    if _ROW_PARALLEL.search(name):
        return 1
    return None


def _items(src: Source, expected: list[Expect], tp: int, dequantize: bool) -> list[Item]:
    """Shard every expected tensor by the rules in the module docstring."""
    d = dims(src)
    per_rank = d["experts"] // tp
    items: list[Item] = []
    for e in expected:
        name = e.name
        if name.endswith(SCALE_SUFFIX):
            continue  # produced together with its weight by `linear`
        if m := _EXPERT.search(name):
            rank = int(m.group(1)) // per_rank
            items += [on_rank(it, rank) for it in linear(src, name, name, 1, None, dequantize=dequantize)]
        elif _COMPRESSOR.search(name):
            items += linear(src, name, name, tp, None, dequantize=dequantize)
        elif (dim := shard_dim(name)) is not None:
            items += linear(src, name, name, tp, dim, dequantize=dequantize)
        elif _FP8_LINEAR.search(name):
            items += linear(src, name, name, tp, None, dequantize=dequantize)
        else:
            items.append(replicated(name, name, tp))
    return items


def _config(src: Source, tp: int, dequantize: bool, fp8: bool) -> dict[str, Any]:
    d = dims(src)
    return {
        "architecture": ARCH,
        "dtype": "bfloat16" if dequantize else (src.config.get("dtype") or "bfloat16"),
        "vocab_size": d["vocab"], "hidden_size": d["hidden"], "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"], "head_size": d["head_dim"],
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": tp},
        "quantization": {"quant_algo": "FP8_BLOCK_SCALES" if fp8 and not dequantize else None,
                         "kv_cache_quant_algo": None},
        # The runners rebuild the model from the original config.
        "source_config": {k: v for k, v in src.config.items() if k != "quantization_config" or not dequantize},
    }


def _has_fp8(src: Source, drafter: bool) -> bool:
    return any(i.dtype == FP8 for n, i in src.by_name.items() if n.startswith("mtp.") == drafter)


def target_plan(src: Source, tp: int, dequantize: bool = False) -> Plan:
    d = dims(src)
    _check_tp(src, d, tp)
    require_divisible(src.config_path, "vocab_size", d["vocab"], tp)
    return Plan(_config(src, tp, dequantize, _has_fp8(src, drafter=False)),
                _items(src, target_tensors(src), tp, dequantize), tp)


def drafter_plan(src: Source, tp: int, dequantize: bool = False) -> Plan:
    d = dims(src)
    _check_tp(src, d, tp)
    config = _config(src, tp, dequantize, _has_fp8(src, drafter=True))
    config["architecture"] = "DeepseekV4DSparkDrafter"
    config["mtp_stages"] = mtp_stages(src)
    # The drafter has no embedding or head of its own: it reads the target's.
    config["shared_with_target"] = {"embed": "embed.weight", "head": "head.weight"}
    return Plan(config, _items(src, drafter_tensors(src), tp, dequantize), tp)


def detect(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]] | None:
    if config.get("model_type") == MODEL_TYPE or ARCH in (config.get("architectures") or []):
        return "target", config
    return None


def check_pair(target: Source, drafter: Source) -> list[CheckpointError]:
    """Nothing to match: the drafter is the target checkpoint's own mtp.* stages."""
    return []


def target_options(ckpt_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The runner computes the context features the drafter was converted for."""
    return {"target_feature": (manifest.get("dspark") or {}).get("target_feature")}


def drafter_options(ckpt_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The mtp stages share the target's embedding and head, read from the converted target."""
    return {"target_dir": Path(ckpt_dir) / "target"}


FAMILY = Family(
    name="deepseek-v4", detect=detect, accepts=f"{ARCH} (model_type {MODEL_TYPE}, drafter under mtp.*)",
    canonical=canonical, target_tensors=target_tensors, drafter_tensors=drafter_tensors,
    check_drafter_fields=check_drafter_fields, check_pair=check_pair,
    dspark_fields=dspark_fields, summary=summary, target_plan=target_plan, drafter_plan=drafter_plan,
    plan_options=("dequantize",), drafter_in_target=mtp_stages,
    target_options=target_options, drafter_options=drafter_options,
    target_runner="dspark_trt.runtime.deepseek_v4:DeepseekV4Target",
    drafter_runner="dspark_trt.runtime.dspark.deepseek_v4:DeepseekV4DSparkDrafter",
    fixture="dspark_trt.builder.fixture_deepseek_v4:write_deepseek_v4_fixture",
    expert_parallel=True,
)
