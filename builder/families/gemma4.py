"""Gemma4 targets and their DeepSpec `Gemma4DSparkModel` drafters.

A target is a `gemma4` checkpoint (Gemma4ForConditionalGeneration: the text model under
`model.language_model.`, its config under `text_config` of model_type `gemma4_text`) or a text-only
`gemma4_text` one (Gemma4ForCausalLM, under `model.`); both are read under the text-only names
(`model.layers.{i}...`) and their text config. Vision and audio towers are not used.

Gemma4 layers are sliding-window ("sliding_attention": `head_dim`, `num_key_value_heads`) or global
("full_attention": `global_head_dim`, and with `attention_k_eq_v` `num_global_key_value_heads` heads
whose keys are also their values: no v_proj). transformers >= 5.2x saves the global sizes as
`per_layer_config`; google's checkpoints and DeepSpec's drafters carry `global_head_dim` /
`num_global_key_value_heads`. Both are read.

Conversion writes the target in TensorRT-LLM's checkpoint names for Gemma (tensorrt_llm/models/gemma:
`transformer.vocab_embedding`, per layer `input_layernorm`, `attention.qkv` (fused per rank: this
rank's query heads, key heads, and value heads unless keys are values), `attention.q_layernorm` /
`k_layernorm`, `attention.dense`, `post_layernorm` (HF post_attention_layernorm),
`pre_feedforward_layernorm`, `post_feedforward_layernorm`, `mlp.fc` (gate) / `mlp.gate` (up) /
`mlp.proj` (down), `transformer.ln_f`, `lm_head`). Gemma4's norms multiply by their weight itself (not
1 + weight as Gemma 1-3), so weights are copied unchanged. What TensorRT-LLM's Gemma has no name for
keeps its HF name under `transformer.`: `layer_scalar` and the per-layer-input (PLE) tensors, all
replicated. The drafter keeps DeepSpec's names, as the Qwen3 family's does, and converts unsharded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...runtime.errors import CheckpointError
from ...runtime.heads import markov_tensor_shapes
from . import qwen3
from .common import (
    Expect,
    Item,
    Plan,
    Source,
    Target,
    dtype_tag,
    replicated,
    require_divisible,
    split,
)
from .family import Family

MODEL_TYPES = ("gemma4", "gemma4_text")
TEXT_MODEL_TYPE = "gemma4_text"
DRAFTER_ARCH = "Gemma4DSparkModel"
CONVERTED_ARCH = "Gemma4ForCausalLM"
SLIDING, FULL = "sliding_attention", "full_attention"
_MULTIMODAL_PREFIX = "model.language_model."


def canonical(stored: str) -> str:
    """Text-model names as Gemma4ForCausalLM stores them; Markov heads under DeepSpec's names."""
    if stored.startswith(_MULTIMODAL_PREFIX):
        stored = "model." + stored[len(_MULTIMODAL_PREFIX):]
    return qwen3.canonical(stored)


def text_config(config: dict[str, Any], path: str | Path = "config.json") -> dict[str, Any]:
    """The `gemma4_text` config of a checkpoint: `text_config` of a `gemma4` one (with the top-level
    architectures and dtype where it has none of its own), or the config itself."""
    if config.get("model_type") != "gemma4":
        return config
    text = config.get("text_config")
    if not isinstance(text, dict) or text.get("model_type") != TEXT_MODEL_TYPE:
        found = text.get("model_type") if isinstance(text, dict) else text
        raise CheckpointError(path, "a gemma4 config needs a gemma4_text text_config",
                              subject="text_config.model_type", found=found, expected=TEXT_MODEL_TYPE)
    inherited = {key: config[key] for key in ("architectures", "dtype", "torch_dtype") if config.get(key)}
    return {**inherited, **text}


def _size(src: Source, name: str, default: Any = ...) -> int:
    """A dimension from the config: a positive int, or a CheckpointError naming the field."""
    value = src.field(name, int, default)
    if value < 1:
        raise CheckpointError(src.config_path, "config size must be a positive integer", subject=name,
                              found=value, expected="an integer >= 1")
    return value


def _global_sizes(src: Source) -> tuple[int, int]:
    """(head_dim, key/value heads) of the full-attention layers."""
    c = src.config
    heads = _size(src, "num_key_value_heads")
    k_eq_v = bool(c.get("attention_k_eq_v", False))
    if "global_head_dim" in c:
        kv = _size(src, "num_global_key_value_heads", heads) if k_eq_v else heads
        return _size(src, "global_head_dim"), kv
    types = c.get("layer_types") or []
    for key, override in (c.get("per_layer_config") or {}).items():
        if str(key).isdigit() and int(key) < len(types) and types[int(key)] == FULL and isinstance(override, dict):
            return (int(override.get("head_dim", _size(src, "head_dim"))),
                    int(override.get("num_key_value_heads", heads)))
    return _size(src, "head_dim"), heads


def layer_types(src: Source) -> list[str]:
    types = src.field("layer_types", list)
    n = _size(src, "num_hidden_layers")
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise CheckpointError(src.config_path, "layer_types must name each layer sliding_attention or full_attention",
                              subject="layer_types", found=types, expected=f"{n} entries")
    return types


def dims(src: Source) -> dict[str, Any]:
    global_head_dim, global_kv = _global_sizes(src)
    return {
        "vocab": _size(src, "vocab_size"),
        "hidden": _size(src, "hidden_size"),
        "heads": _size(src, "num_attention_heads"),
        "kv_heads": _size(src, "num_key_value_heads"),
        "head_dim": _size(src, "head_dim"),
        "global_head_dim": global_head_dim,
        "global_kv_heads": global_kv,
        "k_eq_v": bool(src.config.get("attention_k_eq_v", False)),
        "intermediate": _size(src, "intermediate_size"),
        "layers": _size(src, "num_hidden_layers"),
        "per_layer_input": src.field("hidden_size_per_layer_input", int, 0),
        "per_layer_vocab": src.field("vocab_size_per_layer_input", int, src.config.get("vocab_size", 0)),
    }


def _unsupported(src: Source) -> None:
    """Gemma4 variants the reference runners do not implement: refused by name rather than run wrong."""
    c = src.config
    for name, value, expected in (("enable_moe_block", c.get("enable_moe_block", False), False),
                                  ("num_kv_shared_layers", c.get("num_kv_shared_layers", 0), 0),
                                  ("attention_bias", c.get("attention_bias", False), False),
                                  ("use_bidirectional_attention", c.get("use_bidirectional_attention"), None)):
        if value != expected and not (expected is False and not value):
            raise CheckpointError(src.config_path, "Gemma4 variant not supported by dspark-trt", subject=name,
                                  found=value, expected=expected)


def layer_geometry(d: dict[str, Any], layer_type: str) -> tuple[int, int, bool]:
    """(head_dim, key/value heads, has v_proj) of a layer of `layer_type`."""
    if layer_type == FULL:
        return d["global_head_dim"], d["global_kv_heads"], not d["k_eq_v"]
    return d["head_dim"], d["kv_heads"], True


def _layer_tensors(prefix: str, d: dict[str, Any], layer_type: str, tag: str, *, ple: bool) -> list[Expect]:
    h, i = d["hidden"], d["intermediate"]
    hd, kv, has_v = layer_geometry(d, layer_type)
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,),
        "post_feedforward_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (d["heads"] * hd, h),
        "self_attn.k_proj.weight": (kv * hd, h),
        **({"self_attn.v_proj.weight": (kv * hd, h)} if has_v else {}),
        "self_attn.o_proj.weight": (h, d["heads"] * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "layer_scalar": (1,),
    }
    if ple:
        p = d["per_layer_input"]
        shapes |= {"per_layer_input_gate.weight": (p, h), "per_layer_projection.weight": (h, p),
                   "post_per_layer_input_norm.weight": (h,)}
    return [Expect(prefix + name, shape, (tag,)) for name, shape in shapes.items()]


def target_tensors(src: Source) -> list[Expect]:
    _unsupported(src)
    d, tag, types = dims(src), dtype_tag(src), layer_types(src)
    ple = d["per_layer_input"] > 0
    out = [Expect("model.embed_tokens.weight", (d["vocab"], d["hidden"]), (tag,)),
           Expect("model.norm.weight", (d["hidden"],), (tag,))]
    if ple:
        width = d["layers"] * d["per_layer_input"]
        out += [Expect("model.embed_tokens_per_layer.weight", (d["per_layer_vocab"], width), (tag,)),
                Expect("model.per_layer_model_projection.weight", (width, d["hidden"]), (tag,)),
                Expect("model.per_layer_projection_norm.weight", (d["per_layer_input"],), (tag,))]
    for i, layer_type in enumerate(types):
        out += _layer_tensors(f"model.layers.{i}.", d, layer_type, tag, ple=ple)
    if not src.config.get("tie_word_embeddings", True):
        out.append(Expect("lm_head.weight", (d["vocab"], d["hidden"]), (tag,)))
    return out


def _drafter_dims(src: Source) -> dict[str, Any]:
    """The drafter's layers are all full attention of `global_head_dim` (Gemma4DSparkAttention)."""
    d = dims(src)
    d["global_head_dim"] = _size(src, "global_head_dim")  # required by Gemma4DSparkModel
    d["global_kv_heads"] = _size(src, "num_global_key_value_heads") if d["k_eq_v"] else d["kv_heads"]
    return d


def drafter_tensors(src: Source) -> list[Expect]:
    d, tag = _drafter_dims(src), dtype_tag(src)
    h, v = d["hidden"], d["vocab"]
    out = [Expect("embed_tokens.weight", (v, h), (tag,)), Expect("lm_head.weight", (v, h), (tag,)),
           Expect("fc.weight", (h, len(src.field("target_layer_ids", list)) * h), (tag,)),
           Expect("hidden_norm.weight", (h,), (tag,)), Expect("norm.weight", (h,), (tag,))]
    for i in range(d["layers"]):
        out += _layer_tensors(f"layers.{i}.", d, FULL, tag, ple=False)
    return out + _head_tensors(src, v, h, tag)


def _head_tensors(src: Source, vocab: int, hidden: int, tag: str) -> list[Expect]:
    """Markov head (deepspec/modeling/dspark/markov_head.py) and confidence head (`AcceptRatePredictor`,
    deepspec/modeling/dspark/common.py): the same in every DeepSpec drafter."""
    rank = src.field("markov_rank")
    kind = src.field("markov_head_type", str, "vanilla")
    out = []
    if rank > 0 and kind in qwen3.MARKOV_HEAD_TYPES:  # an unknown kind is reported by check_drafter_fields
        out += [Expect(name, shape, (tag,)) for name, shape in markov_tensor_shapes(kind, vocab, rank, hidden).items()]
    if src.config.get("enable_confidence_head", True):
        width = hidden + (rank if src.config.get("confidence_head_with_markov", True) and rank > 0 else 0)
        out += [Expect("confidence_head.proj.weight", (1, width), (tag,)),
                Expect("confidence_head.proj.bias", (1,), (tag,))]
    return out


def check_drafter_fields(src: Source) -> list[CheckpointError]:
    problems = qwen3.check_drafter_fields(src)
    # Gemma4DSparkModel's required fields and the assertions of Gemma4DSparkDecoderLayer.
    for name in ("global_head_dim", "num_global_key_value_heads", "num_anchors", "enable_confidence_head"):
        if name not in src.config:
            problems.append(CheckpointError(src.config_path, "missing config field (Gemma4DSparkModel requires it)",
                                            subject=name))
    for name in ("enable_moe_block", "hidden_size_per_layer_input"):
        if src.config.get(name):
            problems.append(CheckpointError(src.config_path, "Gemma4DSparkModel's layers are dense without "
                                            "per-layer inputs", subject=name, found=src.config[name], expected=0))
    return problems


def check_pair(target: Source, drafter: Source) -> list[CheckpointError]:
    """The Qwen3 checks (vocabulary, width, depth, layer ids, embedding shapes) apply as they are."""
    return qwen3.check_pair(target, drafter)


def dspark_fields(drafter: Source) -> dict[str, Any]:
    return qwen3.dspark_fields(drafter)


def summary(src: Source) -> dict[str, Any]:
    d = dims(src)
    types = src.config.get("layer_types") or []
    return {"layers": d["layers"], "hidden_size": d["hidden"], "attention_heads": d["heads"],
            "kv_heads": d["kv_heads"], "head_dim": d["head_dim"], "global_head_dim": d["global_head_dim"],
            "global_kv_heads": d["global_kv_heads"], "sliding_layers": types.count(SLIDING),
            "sliding_window": src.config.get("sliding_window"), "intermediate_size": d["intermediate"],
            "vocab_size": d["vocab"], "experts": 0}


# ---------------------------------------------------------------------------------------------
# Conversion


def _check_tp(src: Source, d: dict[str, Any], tp: int) -> None:
    require_divisible(src.config_path, "num_attention_heads", d["heads"], tp)
    require_divisible(src.config_path, "intermediate_size", d["intermediate"], tp)
    require_divisible(src.config_path, "vocab_size", d["vocab"], tp)
    for name, kv in (("num_key_value_heads", d["kv_heads"]), ("num_global_key_value_heads", d["global_kv_heads"])):
        if kv % tp and tp % kv:
            raise CheckpointError(src.config_path, f"--tp {tp} and {name} do not divide one another", subject=name,
                                  found=kv, expected=f"a multiple or a divisor of {tp}")


def target_plan(src: Source, tp: int) -> Plan:
    _unsupported(src)
    d, types = dims(src), layer_types(src)
    _check_tp(src, d, tp)
    items: list[Item] = [replicated("model.embed_tokens.weight", "transformer.vocab_embedding.weight", tp)]
    ple = d["per_layer_input"] > 0
    if ple:
        for name in ("embed_tokens_per_layer.weight", "per_layer_model_projection.weight",
                     "per_layer_projection_norm.weight"):
            items.append(replicated("model." + name, "transformer." + name, tp))
    q_per = d["heads"] // tp
    for i, layer_type in enumerate(types):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        attn = hf + "self_attn."
        hd, kv, has_v = layer_geometry(d, layer_type)
        geometry = {"kv_heads": kv}
        sources = (attn + "q_proj.weight", attn + "k_proj.weight") + ((attn + "v_proj.weight",) if has_v else ())
        qkv = tuple(
            Target(r, trt + "attention.qkv.weight",
                   (qwen3._head_rows(0, (r * q_per, (r + 1) * q_per), hd),
                    *(qwen3._head_rows(s, qwen3._kv_heads(geometry, tp, r), hd) for s in range(1, len(sources)))))
            for r in range(tp))
        items += [
            replicated(hf + "input_layernorm.weight", trt + "input_layernorm.weight", tp),
            Item(sources, qkv),
            replicated(attn + "q_norm.weight", trt + "attention.q_layernorm.weight", tp),
            replicated(attn + "k_norm.weight", trt + "attention.k_layernorm.weight", tp),
            split(src, attn + "o_proj.weight", trt + "attention.dense.weight", tp, dim=1),
            replicated(hf + "post_attention_layernorm.weight", trt + "post_layernorm.weight", tp),
            replicated(hf + "pre_feedforward_layernorm.weight", trt + "pre_feedforward_layernorm.weight", tp),
            replicated(hf + "post_feedforward_layernorm.weight", trt + "post_feedforward_layernorm.weight", tp),
            split(src, hf + "mlp.gate_proj.weight", trt + "mlp.fc.weight", tp, dim=0),
            split(src, hf + "mlp.up_proj.weight", trt + "mlp.gate.weight", tp, dim=0),
            split(src, hf + "mlp.down_proj.weight", trt + "mlp.proj.weight", tp, dim=1),
            replicated(hf + "layer_scalar", trt + "layer_scalar", tp),
        ]
        if ple:
            for name in ("per_layer_input_gate.weight", "per_layer_projection.weight",
                         "post_per_layer_input_norm.weight"):
                items.append(replicated(hf + name, trt + name, tp))
    items.append(replicated("model.norm.weight", "transformer.ln_f.weight", tp))
    tied = src.config.get("tie_word_embeddings", True)
    items.append(split(src, "model.embed_tokens.weight" if tied else "lm_head.weight", "lm_head.weight", tp, dim=0))
    rope = src.field("rope_parameters", dict)
    for layer_type in set(types):
        if not isinstance(rope.get(layer_type), dict):
            raise CheckpointError(src.config_path, f"rope_parameters has no entry for {layer_type}",
                                  subject=f"rope_parameters.{layer_type}", found=rope, expected="a dict")
    config = {
        "architecture": CONVERTED_ARCH,
        "dtype": src.config.get("dtype") or src.config.get("torch_dtype") or "bfloat16",
        "logits_dtype": "float32",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_size": d["head_dim"],
        "global_head_size": d["global_head_dim"],
        "num_global_key_value_heads": d["global_kv_heads"],
        "attention_k_eq_v": d["k_eq_v"],
        "layer_types": types,
        "sliding_window": src.field("sliding_window", int),
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": src.field("max_position_embeddings", int, 131072),
        "hidden_act": src.config.get("hidden_activation", "gelu_pytorch_tanh"),
        "norm_epsilon": src.config.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope.get(FULL, {}).get("rope_theta"),
        "rotary_base_local": rope.get(SLIDING, {}).get("rope_theta"),
        "rope_parameters": rope,  # per layer type, as transformers reads it
        "final_logit_softcapping": src.config.get("final_logit_softcapping"),
        "hidden_size_per_layer_input": d["per_layer_input"],
        "vocab_size_per_layer_input": d["per_layer_vocab"],
        "attn_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(tied),
        "use_parallel_embedding": False,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    return Plan(config, items, tp)


def drafter_plan(src: Source, tp: int) -> Plan:
    """DeepSpec's names, unsharded: the reference drafter runs on one device."""
    if tp != 1:
        raise CheckpointError(src.config_path, "the Gemma4 drafter converts unsharded", subject="--draft-tp",
                              found=tp, expected=1)
    items = [replicated(e.name, e.name, 1) for e in drafter_tensors(src)]
    config = dict(src.config)
    config["mapping"] = {"world_size": 1, "tp_size": 1, "pp_size": 1}
    return Plan(config, items, 1)


def detect(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]] | None:
    if DRAFTER_ARCH in (config.get("architectures") or []):
        return "drafter", config
    if config.get("model_type") in MODEL_TYPES:
        return "target", text_config(config, Path(path) / "config.json")
    return None


FAMILY = Family(
    name="gemma4", detect=detect, accepts=f"{DRAFTER_ARCH} or model_type {' | '.join(MODEL_TYPES)}",
    canonical=canonical, target_tensors=target_tensors, drafter_tensors=drafter_tensors,
    check_drafter_fields=check_drafter_fields, check_pair=check_pair, dspark_fields=dspark_fields,
    summary=summary, target_plan=target_plan, drafter_plan=drafter_plan,
    target_runner="dspark_trt.runtime.gemma4:Gemma4Target",
    drafter_runner="dspark_trt.runtime.dspark.gemma4:Gemma4DSparkDrafter",
    fixture="dspark_trt.builder.fixture_gemma4:write_gemma4_fixture", fixture_options=("markov_head_type",),
)
