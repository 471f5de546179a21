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


# -- values, ordering, sizes, tokenizer (nothing broken is accepted silently) --------------------------------


def convert_cli(pair: Path, out: Path, *extra: str):
    args = ["convert", "--target", str(pair / "target"), "-o", str(out), "--quiet", *extra]
    if (pair / "drafter").is_dir():
        args[3:3] = ["--drafter", str(pair / "drafter")]
    return CliRunner().invoke(main, args)


def test_nan_and_inf_in_weights_are_refused_with_file_tensor_count_and_index(qwen3_copy: Path, tmp_path: Path
                                                                                ) -> None:
    def poison(t):
        t["fc.weight"][3, 5] = float("nan")
        t["fc.weight"][7, 1] = float("-inf")

    edit_tensors(qwen3_copy / "drafter", poison)
    found = ("drafter/model.safetensors [fc.weight]: non-finite values (NaN or Inf) (found 2 of 49152 values, "
             "the first at index [3, 5]")
    expect_problem(inspect(qwen3_copy / "target", qwen3_copy / "drafter"), found)
    skipped = CliRunner().invoke(main, ["inspect", "--skip-value-check", str(qwen3_copy / "drafter")])
    assert skipped.exit_code == 0, skipped.output
    expect_problem(convert_cli(qwen3_copy, tmp_path / "out"), found)
    assert not (tmp_path / "out").exists()
    assert convert_cli(qwen3_copy, tmp_path / "out", "--skip-value-check").exit_code == 0


def test_nan_in_an_fp8_weight_and_inf_in_its_scale_are_refused(v4_copy: Path, tmp_path: Path) -> None:
    weight, scale = "model.layers.1.attn.wkv.weight", "mtp.2.attn.wq_b.weight_scale_inv"

    def poison(t):
        if weight in t:
            t[weight].view(torch.uint8)[0, 2] = 0x7F  # e4m3fn's NaN (it has no Inf)
            t[weight].view(torch.uint8)[0, 3] = 0x7E  # 448, the largest finite value: not a problem
        if scale in t:
            t[scale][1, 0] = float("inf")

    edit_tensors(v4_copy / "target", poison)
    result = inspect(v4_copy / "target")
    expect_problem(result, f"[{weight}]: non-finite values (NaN or Inf) (found 1 of",
                   "the first at index [0, 2]", f"[{scale}]: non-finite values (NaN or Inf) (found 1 of 4 values, "
                   "the first at index [1, 0]")
    expect_problem(convert_cli(v4_copy, tmp_path / "out"), f"[{weight}]", f"[{scale}]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype, bad, tag", [
    (torch.float64, float("nan"), "F64"), (torch.float32, float("inf"), "F32"), (torch.float16, float("-inf"), "F16"),
    (torch.bfloat16, float("nan"), "BF16"), (torch.float8_e5m2, float("inf"), "F8_E5M2"),
    (torch.float8_e4m3fn, float("nan"), "F8_E4M3")])
def test_count_nonfinite_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype, bad, tag
                                           ) -> None:
    from dspark_trt.runtime import safetensors_io
    from dspark_trt.runtime.safetensors_io import count_nonfinite, read_header

    monkeypatch.setattr(safetensors_io, "_SCAN_CHUNK_BYTES", 64)  # many chunks: the index must carry across
    values = torch.linspace(-400, 400, 1000).to(dtype)
    values[517], values[900], values[901] = bad, bad, bad
    save_file({"ok": torch.arange(10), "x": values.reshape(10, 100)}, str(tmp_path / "m.safetensors"))
    infos = read_header(tmp_path / "m.safetensors")
    assert infos["x"].dtype == tag
    assert count_nonfinite(infos["x"]) == (3, 517)
    assert count_nonfinite(infos["ok"]) == (0, None)


def test_target_layer_ids_repeated_or_unordered_are_refused(qwen3_copy: Path) -> None:
    # DeepSpec concatenates the features in list order, TensorRT-LLM in layer order: only an increasing
    # list means the same to both (and a repeated id would be read twice into `fc`).
    edit_config(qwen3_copy / "drafter", target_layer_ids=[1, 2, 2])
    expect_problem(inspect(qwen3_copy / "drafter"), "[target_layer_ids]: target layer ids repeat [2] (found [1, 2, 2]")
    edit_config(qwen3_copy / "drafter", target_layer_ids=[4, 1, 2])
    expect_problem(inspect(qwen3_copy / "drafter"), "[target_layer_ids]: target layer ids must be in increasing "
                   "order (found [4, 1, 2], expected [1, 2, 4])")


def test_block_size_bounds(qwen3_copy: Path, v4_copy: Path) -> None:
    from dspark_trt.builder.families.common import MAX_BLOCK_SIZE
    from dspark_trt.plugins.launch import GPU_TILE, SCHEDULE_MAX_ROWS

    assert MAX_BLOCK_SIZE == GPU_TILE // SCHEDULE_MAX_ROWS  # one DSparkSchedule tile holds 256 rows x γ
    for gamma in (1, 33, 1_000_000):
        edit_config(qwen3_copy / "drafter", block_size=gamma)
        expect_problem(inspect(qwen3_copy / "drafter"), f"[block_size]: block size out of range (found {gamma}, "
                       "expected 2 <= block_size <= 32)")
    edit_config(qwen3_copy / "drafter", block_size=32)
    assert inspect(qwen3_copy / "drafter").exit_code == 0
    edit_config(v4_copy / "target", dspark_block_size=1_000_000)
    expect_problem(inspect(v4_copy / "target"), "[dspark_block_size]: block size out of range (found 1000000")


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("hidden_size", -128), ("vocab_size", 0),
                                          ("num_hidden_layers", 0), ("head_dim", 0)])
def test_zero_or_negative_sizes_are_named_not_divided_by(qwen3_copy: Path, v4_copy: Path, field: str, value: int
                                                         ) -> None:
    edit_config(qwen3_copy / "target", **{field: value})
    edit_config(v4_copy / "target", **{field: value})
    for result in (inspect(qwen3_copy / "target", qwen3_copy / "drafter"), inspect(v4_copy / "target")):
        expect_problem(result, f"config.json [{field}]: config size must be a positive integer (found {value}, "
                       "expected an integer >= 1)")
        assert "Traceback" not in result.output
        assert sum(f"[{field}]" in line for line in result.output.splitlines() if "•" in line) == 1  # said once


def test_absurd_layer_and_expert_counts_are_refused_before_building_the_tensor_list(qwen3_copy: Path,
                                                                                    v4_copy: Path) -> None:
    edit_config(qwen3_copy / "target", num_hidden_layers=10**12)  # the expected-tensor list would fill memory
    edit_config(v4_copy / "target", n_routed_experts=10**12)
    for result, field in ((inspect(qwen3_copy / "target"), "num_hidden_layers"),
                          (inspect(v4_copy / "target"), "n_routed_experts")):
        expect_problem(result, f"config.json [{field}]: config count exceeds what the checkpoint holds "
                       f"(found {10**12}, expected at most")


@pytest.mark.parametrize("family, field, value, message", [
    ("qwen3", "target_layer_ids", -1, "config field has the wrong type (found -1, expected list)"),
    ("qwen3", "enable_confidence_head", "yes", "config field has the wrong type (found 'yes', expected bool)"),
    ("v4", "layer_types", [], "per-layer list does not fit the model (found [], expected 4 entries"),
    ("v4", "layer_types", ["bogus"] * 4, "per-layer list does not fit the model (found ['bogus'"),
    ("v4", "mlp_layer_types", ["moe"], "per-layer list does not fit the model (found ['moe'], expected 4 entries"),
    ("v4", "dtype", ["bfloat16"], "unsupported dtype (found ['bfloat16'], expected bfloat16 | float16 | float32)"),
    ("qwen3", "dtype", 0, "unsupported dtype (found 0, expected bfloat16 | float16 | float32)"),
])
def test_malformed_config_fields_are_named_not_tracebacks(qwen3_copy: Path, v4_copy: Path, family: str, field: str,
                                                          value: object, message: str) -> None:
    directory = qwen3_copy / "drafter" if family == "qwen3" else v4_copy / "target"
    edit_config(directory, **{field: value})
    result = inspect(*([qwen3_copy / "target", directory] if family == "qwen3" else [directory]))
    expect_problem(result, f"config.json [{field}]: {message}")


def test_missing_or_corrupt_tokenizer_is_named_by_inspect_and_convert(qwen3_copy: Path, v4_copy: Path,
                                                                      tmp_path: Path) -> None:
    (v4_copy / "target" / "tokenizer.json").unlink()
    expect_problem(inspect(v4_copy / "target"), "target/tokenizer.json: file not found")
    expect_problem(convert_cli(v4_copy, tmp_path / "v4_out"), "target/tokenizer.json: file not found")
    tokenizer = qwen3_copy / "target" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:-200])
    unloadable = "target/tokenizer.json: not a tokenizer the server can load"
    expect_problem(inspect(qwen3_copy / "target"), unloadable)
    expect_problem(convert_cli(qwen3_copy, tmp_path / "q"), unloadable)
    assert not (tmp_path / "v4_out").exists() and not (tmp_path / "q").exists()


def test_tokenizer_with_ids_beyond_the_vocabulary_is_refused(qwen3_copy: Path) -> None:
    edit_config(qwen3_copy / "target", vocab_size=512)  # the fixture's tokenizer has 1024 ids
    expect_problem(inspect(qwen3_copy / "target"), "target/tokenizer.json [vocab_size]: tokenizer ids exceed the "
                   "model's vocabulary (found token id")


def test_engine_and_repo_refuse_a_checkpoint_without_a_loadable_tokenizer(qwen3_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt, ckpt)
    engine = tmp_path / "engine"
    assert CliRunner().invoke(main, ["engine", str(ckpt), "-o", str(engine)]).exit_code == 0
    for broken in (ckpt / "tokenizer" / "tokenizer.json", engine / "checkpoint" / "tokenizer" / "tokenizer.json"):
        broken.unlink()
        broken.write_text('{"version": "1.0", "model": {"type": "nothing"}}')
    result = CliRunner().invoke(main, ["engine", str(ckpt), "-o", str(tmp_path / "engine2")])
    expect_problem(result, "ckpt/tokenizer/tokenizer.json: not a tokenizer the server can load")
    result = CliRunner().invoke(main, ["repo", str(engine), "-o", str(tmp_path / "repo")])
    expect_problem(result, "engine/checkpoint/tokenizer/tokenizer.json: not a tokenizer the server can load")
    (engine / "checkpoint" / "tokenizer" / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["repo", str(engine), "-o", str(tmp_path / "repo")])
    expect_problem(result, "engine/checkpoint/tokenizer/tokenizer.json: file not found")
    assert not (tmp_path / "engine2").exists() and not (tmp_path / "repo").exists()
