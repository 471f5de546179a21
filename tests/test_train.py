"""Training the tiny pair: the training forward is the inference drafter, steps are deterministic,
and the shipped pair is valid and lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark_trt.builder.train_drafter import DrafterRecipe, DSparkDraftModel, drafter_config, train_drafter
from dspark_trt.builder.train_target import TargetRecipe, train_target
from dspark_trt.runtime.dspark import base as drafter_module
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "tiny-qwen3-dspark"


def _hf_target(pair: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32).eval()


def _features(hf, tokens: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = hf(tokens[None], output_hidden_states=True)
    return torch.cat([out.hidden_states[layer + 1][0] for layer in layer_ids], dim=-1)


def _training_model(ckpt: Path) -> DSparkDraftModel:
    """The converted drafter's own tensors and config (DeepSpec names are kept by convert)."""
    config = json.loads((ckpt / "draft" / "config.json").read_text())
    return DSparkDraftModel(config, load_file(ckpt / "draft" / "rank0.safetensors"))


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_training_forward_equals_inference_draft(kind: str, temperature: float, qwen3_pair: Path,
                                                 markov_ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    ckpt = markov_ckpts[kind]
    hf, model = _hf_target(qwen3_pair), _training_model(ckpt)
    layer_ids, gamma, p = model.config["target_layer_ids"], model.gamma, 11
    prefix = torch.randint(0, 1000, (p + 1,), generator=torch.Generator().manual_seed(3))

    # Inference: context = features of positions 0..p-1, anchor x_p; capture the backbone's output.
    # The same arithmetic as training (float32): bf16 products would move base logits by ~1e-3.
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=2, max_len=64, bf16_products=False)
    drafter.add_context(1, _features(hf, prefix, layer_ids)[:p])
    captured = {}

    def capture(markov, confidence, hidden, base_logits, *rest):
        captured["hidden"], captured["base"] = hidden.clone(), base_logits.clone()
        return heads(markov, confidence, hidden, base_logits, *rest)

    heads = drafter_module.sequential_heads
    monkeypatch.setattr(drafter_module, "sequential_heads", capture)
    draft = drafter.draft([1], [int(prefix[p])], [temperature], [torch.Generator().manual_seed(1)])

    # Training: the same anchor, teacher-forced with the tokens the drafter drew.
    seq = torch.cat([prefix, draft.tokens[0]])
    model_features = _features(hf, seq, layer_ids)
    with torch.no_grad():
        hidden, base, bias, conf = model.forward(seq[None], model_features[None], torch.tensor([[p]]))
    assert len(seq) == p + 1 + gamma
    assert (hidden[0, 0] - captured["hidden"][0]).abs().max() <= 1e-4
    assert (base[0, 0] - captured["base"][0]).abs().max() <= 1e-4
    assert (conf[0, 0] - draft.conf_logits[0]).abs().max() <= 1e-4
    biased = (base + bias)[0, 0]
    if temperature == 0:
        assert torch.equal(biased.argmax(-1), draft.tokens[0])
    else:
        assert (torch.log_softmax(biased, -1) - draft.probs[0].log()).abs().max() <= 1e-4
    # The Markov bias is really exercised (non-zero), so the comparison above covers it.
    assert bias.abs().max() > 0


def test_many_anchors_in_one_pass_equal_one_at_a_time(qwen3_pair: Path, qwen3_ckpt: Path) -> None:
    hf, model = _hf_target(qwen3_pair), _training_model(qwen3_ckpt)
    seq = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(4))
    features = _features(hf, seq, model.config["target_layer_ids"])[None]
    anchors = torch.tensor([[1, 3, 10, 11, 20, 32]])
    with torch.no_grad():
        together = model.forward(seq[None], features, anchors)
        for i in range(anchors.shape[1]):
            alone = model.forward(seq[None], features, anchors[:, i: i + 1])
            for a, b in zip(together, alone, strict=True):
                assert (a[:, i: i + 1] - b).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------- a few steps


def _stream(length: int = 4000, vocab: int = 1000) -> torch.Tensor:
    """Random tokens with a copyable structure: a repeating motif of 37 tokens, mildly perturbed."""
    gen = torch.Generator().manual_seed(7)
    stream = torch.randint(0, vocab, (37,), generator=gen).repeat(length // 37 + 1)[:length]
    noise = torch.rand(length, generator=gen) < 0.1
    stream[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=gen)
    return stream.int()


def test_drafter_steps_are_deterministic_and_write_a_valid_drafter(qwen3_pair: Path, tmp_path: Path) -> None:
    from dspark_trt.builder.families import open_pair, validate

    hf = _hf_target(qwen3_pair).requires_grad_(False)
    target_cfg = json.loads((qwen3_pair / "target" / "config.json").read_text())
    recipe = DrafterRecipe(layers=1, target_layer_ids=(1, 2, 4), markov_rank=16, seq_len=32, batch=2, anchors=4,
                           warmup=2, eval_windows=2, distill_rows=4, distill_prompt=8)
    config = drafter_config(target_cfg, 1023, recipe)
    records = []
    for run in ("a", "b"):
        records.append(train_drafter(tmp_path / run, hf, config, _stream(), _stream(400), seed=0, recipe=recipe,
                                     steps=3, quiet=True))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # Two cycles by default: the warm restart runs its own 3 steps from the first cycle's bf16 weights.
    assert [c["steps"] for c in records[0]["cycles"]] == [3, 3] and records[0]["heldout"]["loss"] > 0
    # Embedding and head are the target's, untouched by training.
    weights = load_file(tmp_path / "a" / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], hf.lm_head.weight.to(torch.bfloat16))
    assert weights["confidence_head.proj.weight"].shape == (1, config["hidden_size"] + 16)
    report = validate(open_pair([qwen3_pair / "target", tmp_path / "a"]))
    assert report.ok, report.problems


def test_continuing_from_a_saved_drafter_equals_an_uninterrupted_run(qwen3_pair: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    hf = _hf_target(qwen3_pair).requires_grad_(False)
    target_cfg = json.loads((qwen3_pair / "target" / "config.json").read_text())
    recipe = DrafterRecipe(layers=1, target_layer_ids=(1, 4), markov_rank=8, seq_len=32, batch=2, anchors=4,
                           warmup=2, eval_windows=2, distill_rows=4, distill_prompt=8, cycles=2)
    config = drafter_config(target_cfg, 1023, recipe)
    streams = _stream(), _stream(400)
    train_drafter(tmp_path / "whole", hf, config, *streams, seed=0, recipe=recipe, steps=[3, 2], quiet=True)
    train_drafter(tmp_path / "split", hf, config, *streams, seed=0, recipe=replace(recipe, cycles=1), steps=3,
                  quiet=True)
    record = train_drafter(tmp_path / "split", hf, config, *streams, seed=0, recipe=recipe, steps=[3, 2],
                           quiet=True, first_cycle=1)
    assert [c["steps"] for c in record["cycles"]] == [2]
    whole, split = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "split"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_no_markov_ablation_has_no_markov_tensors(qwen3_pair: Path, tmp_path: Path) -> None:
    from dspark_trt.builder.families import open_pair, validate

    hf = _hf_target(qwen3_pair).requires_grad_(False)
    target_cfg = json.loads((qwen3_pair / "target" / "config.json").read_text())
    recipe = DrafterRecipe(target_layer_ids=(1, 4), markov_rank=0, seq_len=32, batch=2, anchors=4, warmup=2,
                           eval_windows=2, distill_rows=0)
    config = drafter_config(target_cfg, 1023, recipe)
    train_drafter(tmp_path / "d", hf, config, _stream(), _stream(400), seed=0, recipe=recipe, steps=2, quiet=True)
    weights = load_file(tmp_path / "d" / "model.safetensors")
    assert not [k for k in weights if k.startswith("markov_head.")]
    assert weights["confidence_head.proj.weight"].shape == (1, config["hidden_size"])
    assert validate(open_pair([qwen3_pair / "target", tmp_path / "d"])).ok


def test_target_steps_are_deterministic(tmp_path: Path) -> None:
    from dspark_trt.builder.train_target import target_config

    recipe = TargetRecipe(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, seq_len=32, batch=2,
                          warmup=2, eval_windows=2)
    ids = {"<|endoftext|>": 997, "<|im_end|>": 998}
    config = target_config(1000, ids, recipe)
    losses = [train_target(tmp_path / run, config, _stream(), _stream(400), seed=0, recipe=recipe, steps=4,
                           quiet=True)["heldout_loss"] for run in ("a", "b")]
    assert losses[0] == losses[1]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


# ------------------------------------------------------------------------------------ shipped pair


def test_shipped_pair_is_valid() -> None:
    from click.testing import CliRunner

    from dspark_trt.builder.cli import main

    result = CliRunner().invoke(main, ["inspect", str(SHIPPED / "target"), str(SHIPPED / "drafter"), "--json"])
    assert result.exit_code == 0, result.output
    drafter = json.loads(result.output)["drafter"]
    assert drafter["block_size"] == 5 and drafter["markov_head_type"] == "vanilla" and drafter["calibration"]
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 20 * 1000**2


def test_shipped_pair_greedy_speculation_equals_greedy_decoding(tmp_path: Path) -> None:
    from dspark_trt.builder.calibrate import encode
    from dspark_trt.builder.convert import convert
    from dspark_trt.builder.corpus import heldout_prompts
    from dspark_trt.runtime.generate import Request, generate
    from dspark_trt.runtime.loader import open_checkpoint

    ckpt = tmp_path / "ckpt"
    convert(SHIPPED / "target", SHIPPED / "drafter", ckpt, show_progress=False)
    prompts = encode(ckpt, heldout_prompts(6, part=1))
    outputs = {}
    for mode in ("off", "fixed", "auto"):
        target, drafter, _ = open_checkpoint(ckpt, num_slots=4, max_len=256)
        results = generate(target, drafter, [Request(p, max_new_tokens=48, speculation=mode) for p in prompts],
                           num_slots=4)
        outputs[mode] = [r.tokens for r in results]
        if mode == "fixed":  # a trained drafter: most rounds accept more than the bonus token
            assert sum(t for r in results for t in r.taus) / sum(r.rounds for r in results) > 2
    assert outputs["fixed"] == outputs["off"] and outputs["auto"] == outputs["off"]
