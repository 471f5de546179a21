"""Drafters in DeepSpec's own format load: Markov head names, target layer -1, `num_anchors`.

DeepSpec (deepseek-ai/DeepSpec) is the definition: `deepspec/modeling/dspark/markov_head.py` names the
gated head's projection `markov_head.gate_proj` and the RNN head's `markov_head.joint_proj`;
`deepspec/modeling/dspark/common.py` lets target layer id -1 stand for the embedding output;
`deepspec/modeling/dspark/qwen3/modeling.py` requires `num_anchors` in the drafter config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_pair
from safetensors.torch import load_file, save_file

from dspark_trt.builder.cli import main as build
from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.heads import MarkovHead, canonical_markov_name
from dspark_trt.runtime.qwen3 import Qwen3Target

OLD_NAMES = {"gate_proj": "markov_gate", "joint_proj": "markov_rnn"}


def _inspect(*paths: Path) -> dict:
    result = CliRunner().invoke(build, ["inspect", "--json", *map(str, paths)])
    info = json.loads(result.output)
    assert (result.exit_code == 0) == info["ok"]
    return info


def _rename(path: Path, old_names: bool) -> None:
    """Rewrite a safetensors file with the Markov projections under this project's earlier names."""
    tensors = load_file(path)
    renamed = {}
    for name, t in tensors.items():
        for new, old in OLD_NAMES.items():
            if old_names:
                name = name.replace(f"markov_head.{new}.", f"markov_head.{old}.")
        renamed[name] = t
    save_file(renamed, str(path), metadata={"format": "pt"})


def _draft(ckpt: Path, context: torch.Tensor, anchor: int):
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=1, max_len=64)
    drafter.add_context(0, context)
    return drafter.draft([0], [anchor], [0.0], [None])


@pytest.fixture(scope="module", params=["gated", "rnn"])
def deepspec_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pair = tmp_path_factory.mktemp(request.param) / "pair"
    write_qwen3_fixture(pair, seed=0, markov_head_type=request.param)
    return request.param, pair


def test_deepspec_named_gated_and_rnn_drafters_inspect_convert_and_draft(deepspec_pair, tmp_path: Path) -> None:
    kind, pair = deepspec_pair
    proj = {"gated": "gate_proj", "rnn": "joint_proj"}[kind]
    stored = load_file(pair / "drafter" / "model.safetensors")
    assert f"markov_head.{proj}.weight" in stored and f"markov_head.{proj}.bias" in stored
    info = _inspect(pair / "target", pair / "drafter")
    assert info["ok"], info["problems"]
    assert info["drafter"]["markov_head_type"] == kind and not info["warnings"]  # every tensor is used
    ckpt = convert_pair(pair, tmp_path / "new")
    assert f"markov_head.{proj}.weight" in load_file(ckpt / "draft" / "rank0.safetensors")

    # Earlier versions of this project wrote markov_gate / markov_rnn: still read, written as DeepSpec's.
    old = tmp_path / "old"
    shutil.copytree(pair, old)
    _rename(old / "drafter" / "model.safetensors", old_names=True)
    assert f"markov_head.{OLD_NAMES[proj]}.weight" in load_file(old / "drafter" / "model.safetensors")
    assert _inspect(old / "target", old / "drafter")["ok"]
    old_ckpt = convert_pair(old, tmp_path / "old_ckpt")
    new_tensors = load_file(ckpt / "draft" / "rank0.safetensors")
    old_tensors = load_file(old_ckpt / "draft" / "rank0.safetensors")
    assert new_tensors.keys() == old_tensors.keys()
    assert all(torch.equal(new_tensors[n], old_tensors[n]) for n in new_tensors)

    # A converted checkpoint from an earlier version (old names in rank0) drafts exactly what the new one does.
    _rename(old_ckpt / "draft" / "rank0.safetensors", old_names=True)
    features = torch.randn(9, 3 * 128, generator=torch.Generator().manual_seed(1))
    new, again = _draft(ckpt, features, 17), _draft(old_ckpt, features, 17)
    assert torch.equal(new.tokens, again.tokens) and torch.equal(new.conf_logits, again.conf_logits)
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=1, max_len=64)
    assert drafter.markov.kind == kind and drafter.markov.proj_weight is not None


def test_markov_names_have_one_home() -> None:
    assert canonical_markov_name("markov_head.markov_gate.weight") == "markov_head.gate_proj.weight"
    assert canonical_markov_name("markov_head.markov_rnn.bias") == "markov_head.joint_proj.bias"
    assert canonical_markov_name("mtp.2.markov_head.embed.weight") == "mtp.2.markov_head.markov_w1.weight"
    assert canonical_markov_name("mtp.2.markov_head.head.weight") == "mtp.2.markov_head.markov_w2.weight"
    for unchanged in ("head.weight", "embed.weight", "markov_head.gate_proj.weight", "layers.0.mlp.gate_proj.weight"):
        assert canonical_markov_name(unchanged) == unchanged
    w = {"markov_head.markov_w1.weight": torch.zeros(4, 2), "markov_head.markov_w2.weight": torch.zeros(4, 2)}
    with pytest.raises(CheckpointError, match=r"missing gated Markov head tensor.*markov_head\.gate_proj\.weight"):
        MarkovHead.from_weights("gated", w, source="draft/rank0.safetensors")


# ------------------------------------------------------------------------------ target layer id -1


@pytest.fixture(scope="module")
def embedding_layer_pair(qwen3_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default fixture with the drafter reading [-1, 2, 4]: the embedding output in place of layer 1."""
    pair = tmp_path_factory.mktemp("layer_minus_one") / "pair"
    shutil.copytree(qwen3_pair, pair)
    path = pair / "drafter" / "config.json"
    config = json.loads(path.read_text())
    config["target_layer_ids"] = [-1, 2, 4]
    path.write_text(json.dumps(config))
    return pair, convert_pair(pair, pair.parent / "ckpt")


def test_layer_minus_one_inspects_converts_and_captures_the_embedding(embedding_layer_pair) -> None:
    from transformers import AutoModelForCausalLM

    pair, ckpt = embedding_layer_pair
    info = _inspect(pair / "target", pair / "drafter")
    assert info["ok"], info["problems"]
    assert info["drafter"]["target_layer_ids"] == [-1, 2, 4]
    assert json.loads((ckpt / "draft" / "config.json").read_text())["dspark"]["target_layer_ids"] == [-1, 2, 4]
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=2, max_len=128)
    target = Qwen3Target(ckpt / "target", num_slots=2, max_len=128)
    prompt = list(range(40, 75))
    _, features = target.forward([1], [prompt], capture=drafter.target_layer_ids)
    hf = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    # DeepSpec's extract_context_feature: hidden_states[0] for -1, hidden_states[l + 1] otherwise.
    expected = torch.cat([hidden[0][0], hidden[3][0], hidden[5][0]], dim=-1)
    assert (features[0] - expected).abs().max() <= 1e-4
    assert torch.equal(features[0][:, :128], hf.model.embed_tokens(torch.tensor(prompt)).float())


def test_layer_minus_one_speculation_is_lossless(embedding_layer_pair) -> None:
    _, ckpt = embedding_layer_pair
    target = Qwen3Target(ckpt / "target", num_slots=3, max_len=128)
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=3, max_len=128)

    def run(mode: str) -> list[list[int]]:
        requests = [Request(list(range(30 + 11 * i, 48 + 11 * i)), max_new_tokens=24, speculation=mode)
                    for i in range(3)]
        return [r.tokens for r in generate(target, drafter, requests, num_slots=3)]

    assert run("fixed") == run("off")


def test_target_layer_ids_out_of_range_are_refused(qwen3_copy: Path) -> None:
    path = qwen3_copy / "drafter" / "config.json"
    config = json.loads(path.read_text())
    config["target_layer_ids"] = [-2, 2, 4]
    path.write_text(json.dumps(config))
    info = _inspect(qwen3_copy / "target", qwen3_copy / "drafter")
    assert not info["ok"]
    assert any("target layer id out of range" in p and "found -2" in p and "-1 (the embedding output)" in p
               for p in info["problems"])


def test_every_drafter_config_this_project_writes_has_num_anchors(qwen3_pair: Path) -> None:
    """DeepSpec's Qwen3DSparkModel asserts `num_anchors`: the fixture's and the trainer's configs carry it."""
    from dspark_trt.builder.train_drafter import DrafterRecipe, drafter_config

    assert json.loads((qwen3_pair / "drafter" / "config.json").read_text())["num_anchors"] == 512
    target_config = json.loads((qwen3_pair / "target" / "config.json").read_text())
    recipe = DrafterRecipe(anchors=24)
    assert drafter_config(target_config, 5, recipe)["num_anchors"] == 24
