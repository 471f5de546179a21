"""convert: shards reassemble bit-exactly into the sources; failures leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dspark_trt.builder.cli import main
from dspark_trt.builder.families import open_pair
from dspark_trt.runtime.fp8 import dequantize_fp8_block
from dspark_trt.runtime.safetensors_io import SafetensorsCheckpoint, read_header


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def load_ranks(directory: Path) -> list[dict[str, torch.Tensor]]:
    config = json.loads((directory / "config.json").read_text())
    tp = config["mapping"]["tp_size"]
    ranks = []
    for r in range(tp):
        ckpt = SafetensorsCheckpoint(directory / f"rank{r}.safetensors")
        ranks.append({name: ckpt.get(name) for name in ckpt.tensors})
    return ranks


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def reassemble(src: torch.Tensor, shards: list[torch.Tensor]) -> torch.Tensor:
    """Undo a replicate or an even split, found from the shard shapes alone."""
    if all(s.shape == src.shape for s in shards):
        assert all(same_bits(s, shards[0]) for s in shards), "replicated tensor differs between ranks"
        return shards[0]
    (dim,) = [d for d in range(src.dim()) if shards[0].shape[d] != src.shape[d]]
    return torch.cat(shards, dim)


# -------------------------------------------------------------------------------------------- Qwen3


def qwen3_sources(pair: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    ckpt = SafetensorsCheckpoint(pair / "target")
    config = json.loads((pair / "target" / "config.json").read_text())
    return config, {n: ckpt.get(n) for n in ckpt.tensors}


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_qwen3_target_shards_reassemble_bit_exactly(qwen3_pair: Path, tmp_path: Path, tp: int) -> None:
    out = tmp_path / "ckpt"
    result = run_cli("convert", "--target", str(qwen3_pair / "target"), "--drafter", str(qwen3_pair / "drafter"),
                     "--tp", str(tp), "-o", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    config, src = qwen3_sources(qwen3_pair)
    ranks = load_ranks(out / "target")
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    kv_local = max(1, nkv // tp)

    def gather(name: str) -> list[torch.Tensor]:
        return [r[name] for r in ranks]

    rebuilt: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    simple = {"input_layernorm.weight": "input_layernorm.weight", "self_attn.o_proj.weight": "attention.dense.weight",
              "self_attn.q_norm.weight": "attention.q_layernorm.weight",
              "self_attn.k_norm.weight": "attention.k_layernorm.weight",
              "post_attention_layernorm.weight": "post_layernorm.weight", "mlp.gate_proj.weight": "mlp.fc.weight",
              "mlp.up_proj.weight": "mlp.gate.weight", "mlp.down_proj.weight": "mlp.proj.weight"}
    for i in range(config["num_hidden_layers"]):
        for hf, trt in simple.items():
            name = f"transformer.layers.{i}.{trt}"
            rebuilt[f"model.layers.{i}.{hf}"] = reassemble(src[f"model.layers.{i}.{hf}"], gather(name))
            used.add(name)
        name = f"transformer.layers.{i}.attention.qkv.weight"
        used.add(name)
        parts = [t.split([nh // tp * hd, kv_local * hd, kv_local * hd]) for t in gather(name)]
        rebuilt[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.cat([p[0] for p in parts])
        for j, proj in ((1, "k_proj"), (2, "v_proj")):
            # With fewer KV heads than ranks each head is replicated on tp / nkv consecutive ranks.
            step = max(1, tp // nkv)
            for r in range(tp):
                assert same_bits(parts[r][j], parts[r - r % step][j])
            rebuilt[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.cat([p[j] for p in parts[::step]])
    for hf, trt in (("model.embed_tokens.weight", "transformer.vocab_embedding.weight"),
                    ("model.norm.weight", "transformer.ln_f.weight"), ("lm_head.weight", "lm_head.weight")):
        rebuilt[hf] = reassemble(src[hf], gather(trt))
        used.add(trt)
    assert set(ranks[0]) == used, "unexpected tensors in the rank files"
    assert set(rebuilt) == set(src)
    for name, tensor in src.items():
        assert same_bits(rebuilt[name], tensor), name
    trt_config = json.loads((out / "target" / "config.json").read_text())
    assert trt_config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert trt_config["architecture"] == "Qwen3ForCausalLM" and trt_config["qwen_type"] == "qwen3"


@pytest.mark.parametrize("draft_tp", [1, 2])
def test_qwen3_drafter_is_kept_and_optionally_sharded(qwen3_pair: Path, tmp_path: Path, draft_tp: int) -> None:
    out = tmp_path / "ckpt"
    result = run_cli("convert", "--target", str(qwen3_pair / "target"), "--drafter", str(qwen3_pair / "drafter"),
                     "--tp", "2", "--draft-tp", str(draft_tp), "-o", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    src = SafetensorsCheckpoint(qwen3_pair / "drafter")
    ranks = load_ranks(out / "draft")
    assert len(ranks) == draft_tp
    nkv = json.loads((qwen3_pair / "drafter" / "config.json").read_text())["num_key_value_heads"]
    for name in src.tensors:
        rebuilt = reassemble(src.get(name), [r[name] for r in ranks])
        if draft_tp > nkv and name.endswith(("k_proj.weight", "v_proj.weight")):
            continue  # replicated KV heads, covered by the target test
        assert same_bits(rebuilt, src.get(name)), name
    manifest = json.loads((out / "manifest.json").read_text())
    draft_config = json.loads((out / "draft" / "config.json").read_text())
    assert manifest["dspark"] == {k: v for k, v in draft_config["dspark"].items() if k != "family"}
    assert manifest["dspark"]["block_size"] == 7 and manifest["draft_tp"] == draft_tp
    assert set(manifest["sources"]) == {"target", "drafter"}
    assert (out / "tokenizer" / "tokenizer.json").is_file()


# -------------------------------------------------------------------------------------- DeepSeek-V4


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_v4_shards_reassemble_bit_exactly_with_consistent_fp8_scales(v4_pair: Path, tmp_path: Path, tp: int) -> None:
    out = tmp_path / "ckpt"
    result = run_cli("convert", "--target", str(v4_pair / "target"), "--tp", str(tp), "-o", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    pair = open_pair([v4_pair / "target"])
    src = pair.target
    n_experts = src.config["n_routed_experts"]
    written = {role: load_ranks(out / role) for role in ("target", "draft")}
    seen = {role: set() for role in written}
    fp8_checked = 0
    for name in src.by_name:
        role = "draft" if name.startswith("mtp.") else "target"
        ranks = written[role]
        source = src.tensor(name)
        holders = [r for r, tensors in enumerate(ranks) if name in tensors]
        seen[role].add(name)
        if ".ffn.experts." in name:
            expert = int(name.split(".ffn.experts.")[1].split(".")[0])
            assert holders == [expert // (n_experts // tp)], f"{name} on ranks {holders}"
            assert same_bits(ranks[holders[0]][name], source), name
            continue
        assert holders == list(range(tp)), f"{name} missing on some ranks"
        if name.endswith("_scale_inv"):
            continue  # checked through the weight it scales
        shards = [r[name] for r in ranks]
        assert same_bits(reassemble(source, shards), source), name
        scale = name + "_scale_inv"
        if scale in src.by_name:
            full = dequantize_fp8_block(source, src.tensor(scale), 128, torch.float32)
            offset = [0, 0]
            for r in range(tp):
                local = dequantize_fp8_block(shards[r], ranks[r][scale], 128, torch.float32)
                dims = [d for d in range(2) if shards[r].shape[d] != source.shape[d]]
                piece = full if not dims else full.narrow(dims[0], offset[dims[0]], shards[r].shape[dims[0]])
                if dims:
                    offset[dims[0]] += shards[r].shape[dims[0]]
                assert torch.equal(local, piece), f"{name}: rank {r} scales do not match its rows"
            fp8_checked += 1
    assert fp8_checked > 10, "the fixture should exercise FP8 block scales"
    for role, ranks in written.items():
        assert set().union(*ranks) == seen[role], f"unexpected tensors in {role}"
    config = json.loads((out / "target" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8_BLOCK_SCALES"
    assert config["mapping"]["moe_ep_size"] == tp


def test_v4_dequantize_writes_bf16_equal_to_direct_dequantisation(v4_pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = run_cli("convert", "--target", str(v4_pair / "target"), "--tp", "2", "--dequantize", "-o", str(out),
                     "--quiet")
    assert result.exit_code == 0, result.output
    src = open_pair([v4_pair / "target"]).target
    ranks = load_ranks(out / "target")
    assert not any(i.dtype == "F8_E4M3" for r in range(2)
                   for i in read_header(out / "target" / f"rank{r}.safetensors").values())
    name = "layers.1.attn.wq_b.weight"
    w, s = src.tensor(name), src.tensor(name + "_scale_inv")
    direct = torch.empty(w.shape, dtype=torch.float32)
    for i in range(w.shape[0]):  # element by element from the definition: w * scale of its 128x128 block
        direct[i] = w[i].float() * s[i // 128].repeat_interleave(128)[: w.shape[1]]
    assert torch.equal(torch.cat([r[name] for r in ranks]), direct.to(torch.bfloat16))
    assert json.loads((out / "target" / "config.json").read_text())["quantization"]["quant_algo"] is None


# ----------------------------------------------------------------------------------------- failures


def test_tp_that_does_not_divide_is_refused_before_writing(qwen3_pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = run_cli("convert", "--target", str(qwen3_pair / "target"), "--tp", "3", "-o", str(out))
    assert result.exit_code == 1
    assert "--tp 3 does not divide num_attention_heads" in result.output and "found 8" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(qwen3_pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("precious")
    result = run_cli("convert", "--target", str(qwen3_pair / "target"), "-o", str(out), "--quiet")
    assert result.exit_code == 3 and "--force" in result.output
    assert (out / "keep").read_text() == "precious"
    result = run_cli("convert", "--target", str(qwen3_pair / "target"), "-o", str(out), "--quiet", "--force")
    assert result.exit_code == 0 and not (out / "keep").exists()


_SLOW_CONVERT = """
import sys, time
from dspark_trt.runtime import safetensors_io
original = safetensors_io.StreamingWriter.begin
calls = []
def stall_at_fifth_tensor(self, *args):
    calls.append(args)
    if len(calls) == 5:
        print("mid-way", flush=True)
        time.sleep(120)
    original(self, *args)
safetensors_io.StreamingWriter.begin = stall_at_fifth_tensor
from dspark_trt.builder.cli import main
main(sys.argv[1:])
"""


def test_sigkill_mid_convert_leaves_no_output(qwen3_pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    args = ["convert", "--target", str(qwen3_pair / "target"), "--drafter", str(qwen3_pair / "drafter"),
            "--tp", "2", "-o", str(out), "--quiet"]
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "mid-way"
        partials = list(tmp_path.glob(".ckpt.partial-*"))
        assert partials and any(partials[0].rglob("rank0.safetensors")), "convert had started writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not out.exists()
    # The next run cleans up what the killed one left and succeeds.
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert out.is_dir() and not list(tmp_path.glob(".ckpt.partial-*"))
