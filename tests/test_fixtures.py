"""The fixture generators write real on-disk formats, deterministically, in seconds.

Expected names and shapes below are written out from DSPARK_SPEC §2 on purpose, not imported from
the generators, so a generator that drifts from the spec fails here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspark_trt.builder import fixture_qwen3
from dspark_trt.builder.fixture_deepseek_v4 import write_deepseek_v4_fixture
from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture
from dspark_trt.builder.tokenizer import special_token_ids
from dspark_trt.runtime.fp8 import dequantize_fp8_block, quantize_fp8_block

INDEX = "model.safetensors.index.json"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _checkpoint(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        out.update(_tensors(path))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_index(root: Path) -> dict[str, str]:
    """The index names exactly the stored tensors, with the right file and total size."""
    index = json.loads((root / INDEX).read_text())
    weight_map = index["weight_map"]
    files = sorted(root.glob("*.safetensors"))
    assert len(files) >= 2, "checkpoint must be sharded"
    assert {p.name for p in files} == set(weight_map.values())
    stored: dict[str, str] = {}
    total = 0
    for path in files:
        for name, t in _tensors(path).items():
            stored[name] = path.name
            total += t.numel() * t.element_size()
    assert stored == weight_map
    assert index["metadata"]["total_size"] == total
    return weight_map


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_special_ids_fit(qwen3_pair: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    target = qwen3_pair / "target"
    config = json.loads((target / "config.json").read_text())
    drafter_config = json.loads((qwen3_pair / "drafter" / "config.json").read_text())
    ids = special_token_ids(target / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"])
    # Special tokens sit at the end of the vocabulary, as in Qwen's, and inside the model's vocab.
    assert sorted(ids.values()) == list(range(1020, 1024))
    assert ids["<|mask|>"] < config["vocab_size"]
    assert drafter_config["mask_token_id"] == ids["<|mask|>"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        ids["<|endoftext|>"],
        ids["<|im_end|>"],
        ids["<|endoftext|>"],
    )

    tok = AutoTokenizer.from_pretrained(target)
    assert len(tok) <= config["vocab_size"]
    assert tok.eos_token_id == ids["<|im_end|>"] and tok.pad_token_id == ids["<|endoftext|>"]
    text = "def f(x):\n    return x ** 2  # naïve ünïcödé 🎉<|im_start|>user<|mask|><|im_end|>"
    encoded = tok(text)["input_ids"]
    assert tok.decode(encoded) == text
    assert ids["<|mask|>"] in encoded and ids["<|im_end|>"] == encoded[-1]
    fast = PreTrainedTokenizerFast(tokenizer_file=str(target / "tokenizer.json"))
    assert fast(text)["input_ids"] == encoded
    assert (qwen3_pair / "drafter" / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()


def test_v4_tokenizer_prepends_bos(v4_pair: Path) -> None:
    from transformers import AutoTokenizer

    target = v4_pair / "target"
    config = json.loads((target / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(target)
    assert tok("hello")["input_ids"][0] == config["bos_token_id"]
    mask = special_token_ids(target / "tokenizer.json", ["<|mask|>"])["<|mask|>"]
    assert config["dspark_noise_token_id"] == mask < config["vocab_size"]


# ---------------------------------------------------------------- Qwen3 + DeepSpec drafter


def test_qwen3_target_is_sharded_and_runs(qwen3_pair: Path) -> None:
    from transformers import Qwen3ForCausalLM

    target = qwen3_pair / "target"
    weight_map = _check_index(target)
    assert {t.dtype for t in _checkpoint(target).values()} == {torch.bfloat16}
    assert "lm_head.weight" in weight_map and "model.embed_tokens.weight" in weight_map
    model, info = Qwen3ForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 12, 1024)
    assert torch.isfinite(logits.float()).all()
    assert not (qwen3_pair / "drafter" / "sts.json").exists()


def _expected_drafter(head_type: str) -> dict[str, tuple[int, ...]]:
    h, v, r, nh, nkv, hd, inter, n_ctx = 128, 1024, 32, 8, 4, 16, 256, 3
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "fc.weight": (h, n_ctx * h),
        "hidden_norm.weight": (h,),
        "norm.weight": (h,),
        "markov_head.markov_w1.weight": (v, r),
        "markov_head.markov_w2.weight": (v, r),
        "confidence_head.proj.weight": (1, h + r),
        "confidence_head.proj.bias": (1,),
    }
    for i in range(2):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    # DeepSpec's names (deepspec/modeling/dspark/markov_head.py): GatedMarkovHead.gate_proj, RNNHead.joint_proj.
    if head_type == "gated":
        shapes["markov_head.gate_proj.weight"] = (r, h + r)
        shapes["markov_head.gate_proj.bias"] = (r,)
    if head_type == "rnn":
        shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + h)
        shapes["markov_head.joint_proj.bias"] = (3 * r,)
    return shapes


@pytest.fixture(scope="module", params=["vanilla", "gated", "rnn"])
def drafter_pair(request: pytest.FixtureRequest, qwen3_pair: Path, tmp_path_factory) -> tuple[str, Path]:
    if request.param == "vanilla":
        return request.param, qwen3_pair
    out = tmp_path_factory.mktemp(request.param) / "pair"
    write_qwen3_fixture(out, seed=0, markov_head_type=request.param)
    return request.param, out


def test_drafter_keys_shapes_and_config(drafter_pair: tuple[str, Path]) -> None:
    head_type, pair = drafter_pair
    drafter = pair / "drafter"
    assert sorted(p.name for p in drafter.glob("*.safetensors")) == ["model.safetensors"]
    tensors = _tensors(drafter / "model.safetensors")
    assert {k: tuple(t.shape) for k, t in tensors.items()} == _expected_drafter(head_type)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    target = _checkpoint(pair / "target")
    assert torch.equal(tensors["embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert torch.equal(tensors["lm_head.weight"], target["lm_head.weight"])
    # Norms near 1, linears small: a loader that mixes them up produces visibly wrong numbers.
    assert (tensors["norm.weight"].float() - 1).abs().max() < 0.1
    assert tensors["fc.weight"].float().std() == pytest.approx(0.02, rel=0.1)

    config = json.loads((drafter / "config.json").read_text())
    target_config = json.loads((pair / "target" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    expected = {
        "num_hidden_layers": 2,
        "num_target_layers": 6,
        "block_size": 7,
        "target_layer_ids": [1, 2, 4],
        "num_anchors": 512,
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "markov_rank": 32,
        "markov_head_type": head_type,
        "tie_word_embeddings": False,
    }
    assert {k: config[k] for k in expected} == expected
    # Every field DeepSpec's Qwen3DSparkModel.__init__ asserts (deepspec/modeling/dspark/qwen3/modeling.py).
    deepspec_required = ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank",
                         "markov_head_type", "confidence_head_with_markov", "block_size")
    assert all(key in config for key in deepspec_required)
    for key in ("hidden_size", "vocab_size", "head_dim", "intermediate_size", "num_key_value_heads"):
        assert config[key] == target_config[key]


def test_qwen3_fixture_is_deterministic_fast_and_atomic(qwen3_pair: Path, tmp_path: Path, monkeypatch) -> None:
    start = time.perf_counter()
    write_qwen3_fixture(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 10
    for rel in [
        "drafter/model.safetensors",
        *(f"target/{p.name}" for p in (qwen3_pair / "target").glob("*.safetensors")),
    ]:
        assert _sha256(tmp_path / "again" / rel) == _sha256(qwen3_pair / rel), rel
    write_qwen3_fixture(tmp_path / "other", seed=1)
    assert _sha256(tmp_path / "other/drafter/model.safetensors") != _sha256(qwen3_pair / "drafter/model.safetensors")

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(fixture_qwen3, "drafter_tensors", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_qwen3_fixture(tmp_path / "half", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no half fixture, no debris


def test_qwen3_scale_knob(tmp_path: Path) -> None:
    write_qwen3_fixture(tmp_path / "big", seed=0, scale=2, layers=7)
    config = json.loads((tmp_path / "big/target/config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (256, 512, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (8, 4, 7)
    drafter = json.loads((tmp_path / "big/drafter/config.json").read_text())
    assert drafter["num_target_layers"] == 7
    fc = _tensors(tmp_path / "big/drafter/model.safetensors")["fc.weight"]
    assert tuple(fc.shape) == (256, 3 * 256)


# ---------------------------------------------------------------- DeepSeek-V4 + DSpark


def _fp8_expected(name: str) -> bool:
    """The brief's rule, restated: main attention/FFN linears (+ main_proj), not compressor/indexer."""
    linear = re.search(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|w1|w2|w3|main_proj)\.weight$", name)
    return bool(linear) and not re.search(r"\.(compressor|indexer)\.", name)


def _v4_block(h=256, nh=8, hd=64, ql=128, og=8, ol=32, experts=16, inter=128) -> dict[str, tuple]:
    """A sliding-window `moe` block, original naming: suffix -> (shape, dtype) as stored."""
    f32, bf16, fp8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
    block: dict[str, tuple] = {
        "attn_norm.weight": ((h,), f32),
        "ffn_norm.weight": ((h,), f32),
        "attn.attn_sink": ((nh,), f32),
        "attn.wq_a.weight": ((ql, h), fp8),
        "attn.q_norm.weight": ((ql,), f32),
        "attn.wq_b.weight": ((nh * hd, ql), fp8),
        "attn.wkv.weight": ((hd, h), fp8),
        "attn.norm.weight": ((hd,), f32),
        "attn.wo_a.weight": ((og * ol, nh * hd // og), fp8),
        "attn.wo_b.weight": ((h, og * ol), fp8),
        "ffn.gate.weight": ((experts, h), bf16),
        "ffn.gate.bias": ((experts,), f32),
        "ffn.shared_experts.w1.weight": ((inter, h), fp8),
        "ffn.shared_experts.w3.weight": ((inter, h), fp8),
        "ffn.shared_experts.w2.weight": ((h, inter), fp8),
    }
    for e in range(experts):
        block[f"ffn.experts.{e}.w1.weight"] = ((inter, h), fp8)
        block[f"ffn.experts.{e}.w3.weight"] = ((inter, h), fp8)
        block[f"ffn.experts.{e}.w2.weight"] = ((h, inter), fp8)
    for kind in ("attn", "ffn"):
        block[f"hc_{kind}_fn"] = ((24, 4 * h), f32)  # (2 + hc_mult) * hc_mult rows over hc_mult * H
        block[f"hc_{kind}_base"] = ((24,), f32)
        block[f"hc_{kind}_scale"] = ((3,), f32)
    for name, (shape, dtype) in list(block.items()):
        if dtype == fp8:
            block[name + "_scale_inv"] = ((math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), f32)
    return block


def test_v4_checkpoint_layout(v4_pair: Path) -> None:
    target = v4_pair / "target"
    weight_map = _check_index(target)
    files = sorted(set(weight_map.values()))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    tensors = _checkpoint(target)

    # FP8 exactly where the rule says, each with a float32 per-128-block scale.
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if _fp8_expected(name):
            assert t.dtype == torch.float8_e4m3fn, name
            scale = tensors[name + "_scale_inv"]
            assert scale.dtype == torch.float32
            assert tuple(scale.shape) == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)), name
        else:
            assert t.dtype in (torch.bfloat16, torch.float32, torch.int64), name
            assert name + "_scale_inv" not in tensors, name
    assert tensors["model.layers.1.attn.indexer.wq_b.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64

    # The drafter: its own shard, three stages, each a full sliding-window moe block.
    mtp_files = {weight_map[k] for k in weight_map if k.startswith("mtp.")}
    assert len(mtp_files) == 1 and all(k.startswith("mtp.") for k, f in weight_map.items() if f in mtp_files)
    assert {k.split(".")[1] for k in weight_map if k.startswith("mtp.")} == {"0", "1", "2"}
    block = _v4_block()
    extra = {
        "mtp.0.main_proj.weight": ((256, 768), torch.float8_e4m3fn),
        "mtp.0.main_proj.weight_scale_inv": ((2, 6), torch.float32),
        "mtp.0.main_norm.weight": ((256,), torch.float32),
        "mtp.2.norm.weight": ((256,), torch.float32),
        "mtp.2.hc_head_fn": ((4, 1024), torch.float32),
        "mtp.2.hc_head_base": ((4,), torch.float32),
        "mtp.2.hc_head_scale": ((1,), torch.float32),
        "mtp.2.markov_head.markov_w1.weight": ((1024, 32), torch.bfloat16),
        "mtp.2.markov_head.markov_w2.weight": ((1024, 32), torch.bfloat16),
        "mtp.2.confidence_head.proj.weight": ((1, 256 + 32), torch.bfloat16),
    }
    expected = {f"mtp.{i}.{k}": v for i in range(3) for k, v in block.items()} | extra
    found = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items() if k.startswith("mtp.")}
    assert found == expected

    # Same names, shapes and dtypes as what transformers saved for the target's sliding layer 0,
    # apart from the prefix and the router: layer 0 is hash-MoE (tid2eid), the stages are top-k (bias).
    layer0 = {k[len("model.layers.0.") :]: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    layer0 = {k: (tuple(t.shape), t.dtype) for k, t in layer0.items()}
    stage0 = {k[len("mtp.1.") :]: v for k, v in found.items() if k.startswith("mtp.1.")}
    assert set(layer0) - set(stage0) == {"ffn.gate.tid2eid"}
    assert set(stage0) - set(layer0) == {"ffn.gate.bias"}
    assert all(layer0[k] == stage0[k] for k in set(layer0) & set(stage0))
    assert stage0["ffn.gate.bias"] == (tuple(tensors["model.layers.1.ffn.gate.bias"].shape), torch.float32)
    for part in ("fn", "base", "scale"):
        assert found[f"mtp.2.hc_head_{part}"][0] == tuple(tensors[f"model.hc_head.hc_{part}"].shape)


def test_v4_config(v4_pair: Path) -> None:
    from transformers import AutoConfig

    target = v4_pair / "target"
    raw = json.loads((target / "config.json").read_text())
    assert raw["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    config = AutoConfig.from_pretrained(target)
    assert config.model_type == "deepseek_v4"
    assert set(config.layer_types) == {
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    }
    assert config.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert (config.dspark_block_size, config.dspark_target_layer_ids, config.dspark_markov_rank) == (5, [1, 2, 3], 32)
    assert config.num_nextn_predict_layers == 1  # as published, although three mtp stages exist


def test_v4_target_loads_into_transformers(v4_pair: Path, tmp_path: Path) -> None:
    """Dequantised (transformers' FP8 loader needs accelerate and a GPU), the target loads with no
    missing or unexpected keys (mtp.* is ignored by design) and runs all three attention types."""
    from transformers import AutoModelForCausalLM

    target = v4_pair / "target"
    for path in target.glob("*.safetensors"):
        tensors = _tensors(path)
        plain = {
            k: dequantize_fp8_block(t, tensors[k + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
            for k, t in tensors.items()
            if not k.endswith("_scale_inv")
        }
        save_file(plain, str(tmp_path / path.name), metadata={"format": "pt"})
    index = json.loads((target / INDEX).read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if not k.endswith("_scale_inv")}
    (tmp_path / INDEX).write_text(json.dumps(index))
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Longer than the sliding window (128) and the HCA compression rate (128).
    ids = torch.randint(0, 1024, (1, 136), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert logits.shape == (1, 136, 1024) and torch.isfinite(logits.float()).all()


def test_v4_fixture_is_deterministic_and_fast(v4_pair: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    write_deepseek_v4_fixture(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 15
    names = sorted(p.name for p in (v4_pair / "target").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "again/target").glob("*.safetensors"))
    for name in names:
        assert _sha256(tmp_path / "again/target" / name) == _sha256(v4_pair / "target" / name), name


# ---------------------------------------------------------------- block FP8


def _loop_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one block at a time, the obvious way."""
    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rb, cb, dtype=torch.float32)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            amax = blk.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).clamp(-448, 448).to(q.dtype)
    return q, scale


def _loop_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = (q[sl].float() * scale[i, j]).to(dtype)
    return out


@pytest.mark.parametrize(
    ("shape", "block", "dtype"),
    [((300, 200), 128, torch.float32), ((256, 768), 128, torch.bfloat16), ((130, 70), 64, torch.bfloat16)],
)
def test_fp8_block_round_trip(shape: tuple[int, int], block: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.02
    w[:block, :block] *= 1000  # blocks of very different magnitude: scales must be per block
    w[-1, -1] = 7.0  # an outlier in a partial edge block
    w[block : 2 * block, :block] = 0  # an all-zero block
    w = w.to(dtype)

    q, scale = quantize_fp8_block(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert tuple(scale.shape) == (math.ceil(shape[0] / block), math.ceil(shape[1] / block))
    deq = dequantize_fp8_block(q, scale, block, dtype=torch.float32)

    # e4m3 keeps 3 mantissa bits, so rounding costs at most half an ulp: 2**-4 of |w| for normal
    # values and 2**-10 * scale in the subnormal range. Over a block of Gaussian values that is a
    # relative (Frobenius) error of about 2.6%; we allow 4%.
    ref = w.float()
    per_elem_scale = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]
    assert ((deq - ref).abs() <= ref.abs() * 2**-4 + per_elem_scale * 2**-10).all()
    assert (deq - ref).norm() / ref.norm() < 0.04
    assert (deq[block : 2 * block, :block] == 0).all()

    # Vectorised == block-by-block loop, bit for bit.
    loop_q, loop_scale = _loop_quantize(w, block)
    assert torch.equal(q.view(torch.uint8), loop_q.view(torch.uint8))
    assert torch.equal(scale, loop_scale)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(
            dequantize_fp8_block(q, scale, block, dtype=out_dtype), _loop_dequantize(q, scale, block, out_dtype)
        )


def test_fp8_rejects_mismatched_scale() -> None:
    q, scale = quantize_fp8_block(torch.randn(256, 256))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_block(q, scale[:1])
