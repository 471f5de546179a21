"""Qwen3 targets and their DeepSpec `Qwen3DSparkModel` drafters.

Target tensors use Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...) and are
written in TensorRT-LLM's checkpoint layout for its `Qwen3ForCausalLM` (qwen_type "qwen3"):
fused per-rank QKV, column-parallel `mlp.fc` (gate_proj) and `mlp.gate` (up_proj), row-parallel
`attention.dense` and `mlp.proj`, vocabulary-parallel `lm_head`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...runtime.errors import CheckpointError
from ...runtime.heads import canonical_markov_name, markov_tensor_shapes
from .common import (
    Expect,
    Item,
    Piece,
    Plan,
    Source,
    Target,
    check_block_size,
    dtype_tag,
    replicated,
    require_divisible,
    split,
)
from .family import Family

TARGET_ARCH = "Qwen3ForCausalLM"
DRAFTER_ARCH = "Qwen3DSparkModel"
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def canonical(stored: str) -> str:
    """Drafters written by earlier versions of this project name the gated / rnn Markov projections
    differently; they are read under DeepSpec's names (runtime/heads.py), which convert writes."""
    return canonical_markov_name(stored)


def dims(src: Source) -> dict[str, int]:
    hidden = src.size("hidden_size")
    heads = src.size("num_attention_heads")
    return {
        "vocab": src.size("vocab_size"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": src.size("num_key_value_heads", heads),
        "head_dim": src.size("head_dim", hidden // heads or 1),
        "intermediate": src.size("intermediate_size"),
        "layers": src.size("num_hidden_layers", per_tensor=True),
    }


def _layer_tensors(prefix: str, d: dict[str, int], tag: str) -> list[Expect]:
    h, hd, i = d["hidden"], d["head_dim"], d["intermediate"]
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (d["heads"] * hd, h),
        "self_attn.k_proj.weight": (d["kv_heads"] * hd, h),
        "self_attn.v_proj.weight": (d["kv_heads"] * hd, h),
        "self_attn.o_proj.weight": (h, d["heads"] * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    return [Expect(prefix + name, shape, (tag,)) for name, shape in shapes.items()]


def target_tensors(src: Source) -> list[Expect]:
    d, tag = dims(src), dtype_tag(src)
    out = [Expect("model.embed_tokens.weight", (d["vocab"], d["hidden"]), (tag,)),
           Expect("model.norm.weight", (d["hidden"],), (tag,))]
    for i in range(d["layers"]):
        out += _layer_tensors(f"model.layers.{i}.", d, tag)
    if not src.config.get("tie_word_embeddings", False):
        out.append(Expect("lm_head.weight", (d["vocab"], d["hidden"]), (tag,)))
    return out


def drafter_tensors(src: Source) -> list[Expect]:
    d, tag = dims(src), dtype_tag(src)
    h, v = d["hidden"], d["vocab"]
    rank = src.field("markov_rank")
    n_target = len(src.field("target_layer_ids", list))
    out = [Expect("embed_tokens.weight", (v, h), (tag,)), Expect("lm_head.weight", (v, h), (tag,)),
           Expect("fc.weight", (h, n_target * h), (tag,)), Expect("hidden_norm.weight", (h,), (tag,)),
           Expect("norm.weight", (h,), (tag,))]
    for i in range(d["layers"]):
        out += _layer_tensors(f"layers.{i}.", d, tag)
    kind = src.field("markov_head_type", str, "vanilla")
    if rank > 0 and kind in MARKOV_HEAD_TYPES:  # an unknown kind is reported by check_drafter_fields
        out += [Expect(name, shape, (tag,)) for name, shape in markov_tensor_shapes(kind, v, rank, h).items()]
    if src.config.get("enable_confidence_head", True):
        width = h + (rank if src.config.get("confidence_head_with_markov", True) and rank > 0 else 0)
        out += [Expect("confidence_head.proj.weight", (1, width), (tag,)),
                Expect("confidence_head.proj.bias", (1,), (tag,))]
    return out


def check_drafter_fields(src: Source) -> list[CheckpointError]:
    problems: list[CheckpointError] = []
    vocab = src.field("vocab_size")
    problems += check_block_size(src, "block_size")
    for flag in ("enable_confidence_head", "confidence_head_with_markov"):
        try:
            src.field(flag, bool, True)
        except CheckpointError as e:  # "false" or 0 would otherwise be read by truthiness
            problems.append(e)
    rank = src.field("markov_rank")
    if rank < 0:
        problems.append(CheckpointError(src.config_path, "negative Markov rank", subject="markov_rank", found=rank,
                                        expected="0 (no Markov head) or a positive rank"))
    mask = src.field("mask_token_id")
    if not 0 <= mask < vocab:
        problems.append(CheckpointError(src.config_path, "mask token id outside the vocabulary",
                                        subject="mask_token_id", found=mask, expected=f"0 <= id < {vocab}"))
    kind = src.field("markov_head_type", str, "vanilla")
    if kind not in MARKOV_HEAD_TYPES:
        problems.append(CheckpointError(src.config_path, "unknown Markov head type", subject="markov_head_type",
                                        found=kind, expected=" | ".join(MARKOV_HEAD_TYPES)))
    ids = src.field("target_layer_ids", list)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        problems.append(CheckpointError(src.config_path, "target layer ids must be a non-empty list of ints",
                                        subject="target_layer_ids", found=ids))
    elif len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        problems.append(CheckpointError(src.config_path, f"target layer ids repeat {repeated}",
                                        subject="target_layer_ids", found=ids, expected="each layer at most once"))
    elif ids != sorted(ids):
        # DeepSpec concatenates the features in list order, TensorRT-LLM in layer order (it sorts the
        # ids): the two agree, and `fc` sees what it was trained on, only for an increasing list.
        problems.append(CheckpointError(src.config_path, "target layer ids must be in increasing order",
                                        subject="target_layer_ids", found=ids, expected=sorted(ids)))
    return problems


def check_pair(target: Source, drafter: Source) -> list[CheckpointError]:
    """Drafter fields that must agree with the target it drafts for."""
    problems: list[CheckpointError] = []
    t, d = dims(target), dims(drafter)
    for key, field_name in (("vocab", "vocab_size"), ("hidden", "hidden_size")):
        if t[key] != d[key]:
            problems.append(CheckpointError(drafter.config_path, f"drafter {field_name} differs from the target's",
                                            subject=field_name, found=d[key], expected=t[key]))
    n_layers = t["layers"]
    declared = drafter.config.get("num_target_layers")
    if declared is not None and declared != n_layers:
        problems.append(CheckpointError(drafter.config_path, "num_target_layers differs from the target's depth",
                                        subject="num_target_layers", found=declared, expected=n_layers))
    # Layer id l reads HF hidden_states[l + 1], the OUTPUT of layer l, and -1 reads hidden_states[0], the
    # embedding output (DeepSpec: deepspec/modeling/dspark/common.py, `extract_context_feature` and
    # `validate_target_layer_ids`). DeepSpec also accepts the last layer, whose hidden_states entry is
    # taken after the final norm; the runners capture layer outputs before it, so it is refused here.
    ids = drafter.config.get("target_layer_ids")
    for layer in ids if isinstance(ids, list) else []:  # a wrong type is check_drafter_fields' to report
        if isinstance(layer, int) and not -1 <= layer < n_layers - 1:
            problems.append(CheckpointError(drafter.config_path, "target layer id out of range",
                                            subject="target_layer_ids", found=layer,
                                            expected=f"-1 (the embedding output) or 0 <= id < {n_layers - 1} "
                                                     "(the last layer is not allowed)"))
    t_embed = target.by_name.get("model.embed_tokens.weight")
    t_head = target.by_name.get("lm_head.weight") or t_embed  # tied embeddings serve as the head
    for name, tinfo in (("embed_tokens.weight", t_embed), ("lm_head.weight", t_head)):
        dinfo = drafter.by_name.get(name)
        if tinfo and dinfo and tinfo.shape != dinfo.shape:
            problems.append(CheckpointError(dinfo.path, f"drafter {name} shape differs from the target's",
                                            subject=name, found=list(dinfo.shape), expected=list(tinfo.shape)))
    return problems


def dspark_fields(drafter: Source) -> dict[str, Any]:
    """The family-neutral description of the drafter that the rest of the tool relies on."""
    rank = drafter.field("markov_rank")
    return {
        "block_size": drafter.field("block_size"),
        "mask_token_id": drafter.field("mask_token_id"),
        "target_layer_ids": drafter.field("target_layer_ids", list),
        "target_feature": "layer_output",  # HF hidden_states[l + 1]
        "markov_rank": rank,
        "markov_head_type": drafter.field("markov_head_type", str, "vanilla") if rank else "none",
        "confidence_head": bool(drafter.config.get("enable_confidence_head", True)),
        "confidence_head_with_markov": bool(drafter.config.get("confidence_head_with_markov", True)),
        "draft_layers": drafter.field("num_hidden_layers"),
    }


def summary(src: Source) -> dict[str, Any]:
    d = dims(src)
    return {"layers": d["layers"], "hidden_size": d["hidden"], "attention_heads": d["heads"],
            "kv_heads": d["kv_heads"], "head_dim": d["head_dim"], "intermediate_size": d["intermediate"],
            "vocab_size": d["vocab"], "experts": 0}


# ---------------------------------------------------------------------------------------------
# Conversion


def _kv_heads(d: dict[str, int], tp: int, rank: int) -> tuple[int, int]:
    """[first, last) KV heads of a rank: a block of them, or one replicated head when kv_heads < tp."""
    if d["kv_heads"] >= tp:
        per = d["kv_heads"] // tp
        return rank * per, (rank + 1) * per
    head = rank * d["kv_heads"] // tp
    return head, head + 1


def _head_rows(source: int, heads: tuple[int, int], head_dim: int) -> Piece:
    return Piece(source, 0, heads[0] * head_dim, heads[1] * head_dim)


def _check_tp(src: Source, d: dict[str, int], tp: int) -> None:
    require_divisible(src.config_path, "num_attention_heads", d["heads"], tp)
    require_divisible(src.config_path, "intermediate_size", d["intermediate"], tp)
    if d["kv_heads"] % tp and tp % d["kv_heads"]:
        raise CheckpointError(src.config_path, f"--tp {tp} and num_key_value_heads do not divide one another",
                              subject="num_key_value_heads", found=d["kv_heads"],
                              expected=f"a multiple or a divisor of {tp}")


def target_plan(src: Source, tp: int) -> Plan:
    d = dims(src)
    _check_tp(src, d, tp)
    require_divisible(src.config_path, "vocab_size", d["vocab"], tp)
    items: list[Item] = [replicated("model.embed_tokens.weight", "transformer.vocab_embedding.weight", tp)]
    hd, q_per = d["head_dim"], d["heads"] // tp
    for i in range(d["layers"]):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        attn = hf + "self_attn."
        # Fused QKV per rank: this rank's query heads, then its key heads, then its value heads.
        qkv = tuple(
            Target(r, trt + "attention.qkv.weight", (_head_rows(0, (r * q_per, (r + 1) * q_per), hd),
                                                      _head_rows(1, _kv_heads(d, tp, r), hd),
                                                      _head_rows(2, _kv_heads(d, tp, r), hd)))
            for r in range(tp))
        items += [
            replicated(hf + "input_layernorm.weight", trt + "input_layernorm.weight", tp),
            Item((attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), qkv),
            replicated(attn + "q_norm.weight", trt + "attention.q_layernorm.weight", tp),
            replicated(attn + "k_norm.weight", trt + "attention.k_layernorm.weight", tp),
            split(src, attn + "o_proj.weight", trt + "attention.dense.weight", tp, dim=1),
            replicated(hf + "post_attention_layernorm.weight", trt + "post_layernorm.weight", tp),
            # TensorRT-LLM's gated MLP: `fc` is the gate projection, `gate` the up projection.
            split(src, hf + "mlp.gate_proj.weight", trt + "mlp.fc.weight", tp, dim=0),
            split(src, hf + "mlp.up_proj.weight", trt + "mlp.gate.weight", tp, dim=0),
            split(src, hf + "mlp.down_proj.weight", trt + "mlp.proj.weight", tp, dim=1),
        ]
    items.append(replicated("model.norm.weight", "transformer.ln_f.weight", tp))
    head = "model.embed_tokens.weight" if src.config.get("tie_word_embeddings") else "lm_head.weight"
    items.append(split(src, head, "lm_head.weight", tp, dim=0))
    config = {
        "architecture": TARGET_ARCH,
        "qwen_type": "qwen3",
        "dtype": src.config.get("dtype") or src.config.get("torch_dtype") or "bfloat16",
        "logits_dtype": "float32",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_size": hd,
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": src.field("max_position_embeddings", int, 32768),
        "hidden_act": src.config.get("hidden_act", "silu"),
        "norm_epsilon": src.config.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        **_rotary_fields(src.config),
        "attn_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(src.config.get("tie_word_embeddings", False)),
        "use_parallel_embedding": False,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    return Plan(config, items, tp)


def _rotary_fields(config: dict[str, Any]) -> dict[str, Any]:
    """TensorRT-LLM's `rotary_base` and `rotary_scaling` (HF's scaling fields, the type also under its
    older name "type") from transformers' `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 1000000.0
    scaling = None if rope_type == "default" else {"type": rope_type, "rope_type": rope_type, **params}
    return {"rotary_base": theta, "rotary_scaling": scaling}


_ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
_COLUMN_PARALLEL = ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")
_KV = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


def drafter_plan(src: Source, tp: int) -> Plan:
    """The drafter keeps its DeepSpec names; with tp > 1 attention and MLP are split as in the target."""
    d = dims(src)
    if tp > 1:
        _check_tp(src, d, tp)
    items: list[Item] = []
    for name in (e.name for e in drafter_tensors(src)):
        leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if tp > 1 and leaf in _KV:
            items.append(Item((name,), tuple(Target(r, name, (_head_rows(0, _kv_heads(d, tp, r), d["head_dim"]),))
                                             for r in range(tp))))
        elif tp > 1 and leaf in _COLUMN_PARALLEL + _ROW_PARALLEL:
            items.append(split(src, name, name, tp, dim=1 if leaf in _ROW_PARALLEL else 0))
        else:
            items.append(replicated(name, name, tp))
    config = dict(src.config)
    config["mapping"] = {"world_size": tp, "tp_size": tp, "pp_size": 1}
    return Plan(config, items, tp)


def detect(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]] | None:
    archs = config.get("architectures") or []
    if DRAFTER_ARCH in archs:
        return "drafter", config
    if TARGET_ARCH in archs or config.get("model_type") == "qwen3":
        return "target", config
    return None


FAMILY = Family(
    name="qwen3", detect=detect, accepts=f"{TARGET_ARCH} or {DRAFTER_ARCH} (model_type qwen3)",
    canonical=canonical, target_tensors=target_tensors, drafter_tensors=drafter_tensors,
    check_drafter_fields=check_drafter_fields, check_pair=check_pair, dspark_fields=dspark_fields,
    summary=summary, target_plan=target_plan, drafter_plan=drafter_plan,
    target_runner="dspark_trt.runtime.qwen3:Qwen3Target",
    drafter_runner="dspark_trt.runtime.dspark.qwen3:Qwen3DSparkDrafter",
    fixture="dspark_trt.builder.fixture_qwen3:write_qwen3_fixture", fixture_options=("markov_head_type", "scale"),
    tensorrt_draft_plans=True, cuda_graphs=True,
)
