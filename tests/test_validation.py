"""Each class of bad input gets its own precise error (file, tensor or field, found, expected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dspark_trt.builder.cli import main
from dspark_trt.builder.families.common import Source, linear
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.safetensors_io import SafetensorsCheckpoint


def inspect(*paths: Path):
    return CliRunner().invoke(main, ["inspect", *map(str, paths)], catch_exceptions=False)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory: Path, edit) -> None:
    """Apply `edit(tensors)` to every weight file of a checkpoint, keeping the shard index in step."""
    index_path = directory / "model.safetensors.index.json"
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(file))
        before = set(tensors)
        edit(tensors)
        save_file(tensors, str(file), metadata={"format": "pt"})
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            for name in before - set(tensors):
                index["weight_map"].pop(name, None)
            for name in set(tensors) - before:
                index["weight_map"][name] = file.name
            index_path.write_text(json.dumps(index))


def expect_problem(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{result.output}"


def test_valid_pairs_pass(qwen3_pair: Path, v4_pair: Path) -> None:
    assert inspect(qwen3_pair / "target", qwen3_pair / "drafter").exit_code == 0
    assert inspect(qwen3_pair / "drafter", qwen3_pair / "target").exit_code == 0  # any order
    assert inspect(v4_pair / "target").exit_code == 0


def test_inspect_json_describes_both_sides(qwen3_pair: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", "--json", str(qwen3_pair / "target"), str(qwen3_pair / "drafter")])
    info = json.loads(result.output)
    assert info["ok"] and info["family"] == "qwen3" and info["problems"] == []
    assert info["target"]["layers"] == 6 and info["target"]["parameters"] > 0
    assert info["drafter"]["block_size"] == 7 and info["drafter"]["markov_head_type"] == "vanilla"


def test_missing_tensor(qwen3_copy: Path) -> None:
    name = "model.layers.2.mlp.up_proj.weight"
    edit_tensors(qwen3_copy / "target", lambda t: t.pop(name, None))
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"), f"[{name}]: missing tensor",
                   "expected [256, 128] BF16")


def test_wrong_shape(qwen3_copy: Path) -> None:
    edit_tensors(qwen3_copy / "drafter", lambda t: t.update({"fc.weight": t["fc.weight"][:, :256].contiguous()}))
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"), "drafter/model.safetensors [fc.weight]",
                   "wrong shape (found [128, 256], expected [128, 384])")


def test_wrong_dtype(qwen3_copy: Path) -> None:
    key = "markov_head.markov_w1.weight"
    edit_tensors(qwen3_copy / "drafter", lambda t: t.update({key: t[key].float()}))
    expect_problem(inspect(qwen3_copy / "drafter"), f"[{key}]: tensor has the wrong dtype (found F32, expected BF16)")


def test_vocab_mismatch(qwen3_copy: Path) -> None:
    edit_config(qwen3_copy / "drafter", vocab_size=2048)
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"),
                   "drafter/config.json [vocab_size]: drafter vocab_size differs from the target's (found 2048, "
                   "expected 1024)")


def test_hidden_size_mismatch(qwen3_copy: Path) -> None:
    edit_config(qwen3_copy / "drafter", hidden_size=256)
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"),
                   "[hidden_size]: drafter hidden_size differs from the target's (found 256, expected 128)")


@pytest.mark.parametrize("layer, why", [(9, "out of range"), (5, "the last layer is not allowed")])
def test_qwen3_target_layer_ids(qwen3_copy: Path, layer: int, why: str) -> None:
    edit_config(qwen3_copy / "drafter", target_layer_ids=[1, 2, layer])
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"),
                   f"[target_layer_ids]: target layer id out of range (found {layer},", why)


def test_v4_target_layer_ids(v4_copy: Path) -> None:
    # V4 reads a layer's output (the residual before hc_head for the last): layer 3 of 4 is fine, 4 is not.
    edit_config(v4_copy / "target", dspark_target_layer_ids=[1, 2, 4])
    expect_problem(inspect(v4_copy / "target"), "[dspark_target_layer_ids]: target layer id out of range (found 4, "
                   "expected 0 <= id < 4)")
    # The references concatenate the features in layer order, so the list must be in that order.
    edit_config(v4_copy / "target", dspark_target_layer_ids=[2, 1, 3])
    expect_problem(inspect(v4_copy / "target"), "[dspark_target_layer_ids]: target layer ids must be strictly "
                   "increasing (found [2, 1, 3]")


def test_mask_id_outside_vocab(qwen3_copy: Path, v4_copy: Path) -> None:
    edit_config(qwen3_copy / "drafter", mask_token_id=1024)
    expect_problem(inspect(qwen3_copy / "drafter"), "[mask_token_id]: mask token id outside the vocabulary (found 1024")
    edit_config(v4_copy / "target", dspark_noise_token_id=-1)
    expect_problem(inspect(v4_copy / "target"), "[dspark_noise_token_id]", "found -1")


def test_pickle_offered_as_weights(qwen3_copy: Path) -> None:
    target = qwen3_copy / "target"
    for f in target.glob("*.safetensors*"):
        f.unlink()
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    expect_problem(inspect(target), "pytorch_model.bin: refusing a pickle-based weight file")


def test_corrupt_header_names_the_file(qwen3_copy: Path) -> None:
    shard = sorted((qwen3_copy / "target").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xfe\x00{"
    shard.write_bytes(bytes(data))
    expect_problem(inspect(qwen3_copy / "target"), f"{shard.name}: corrupt safetensors header")


def test_missing_fp8_scale(v4_copy: Path) -> None:
    name = "mtp.1.attn.wq_b.weight_scale_inv"
    edit_tensors(v4_copy / "target", lambda t: t.pop(name, None))
    expect_problem(inspect(v4_copy / "target"), f"[{name}]: missing tensor")


def test_unknown_architecture(qwen3_copy: Path) -> None:
    edit_config(qwen3_copy / "target", architectures=["LlamaForCausalLM"], model_type="llama")
    expect_problem(inspect(qwen3_copy / "target"), "config.json [architectures/model_type]: unsupported model")


def test_bad_input_makes_convert_write_nothing(qwen3_copy: Path, tmp_path: Path) -> None:
    edit_config(qwen3_copy / "drafter", mask_token_id=99999)
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(main, ["convert", "--target", str(qwen3_copy / "target"), "--drafter",
                                       str(qwen3_copy / "drafter"), "-o", str(out)])
    expect_problem(result, "[mask_token_id]")
    assert not out.exists()


def test_fp8_shard_that_splits_scale_blocks_unevenly_suggests_dequantize(tmp_path: Path) -> None:
    # 384 rows over tp 2 -> 192 per rank: neither a multiple nor a divisor of the 128-row block.
    save_file({"w": torch.zeros(384, 256).to(torch.float8_e4m3fn), "w_scale_inv": torch.ones(3, 2)},
              str(tmp_path / "model.safetensors"))
    src = Source(tmp_path, {}, SafetensorsCheckpoint(tmp_path))
    with pytest.raises(CheckpointError, match=r"\[w\].*unevenly.*shard of 192.*--dequantize"):
        linear(src, "w", "w", 2, 0)
    assert len(linear(src, "w", "w", 2, 0, dequantize=True)) == 1
    assert len(linear(src, "w", "w", 3, 0)) == 2  # 128 rows per rank: scales follow their rows
