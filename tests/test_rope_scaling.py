"""Rope scaling (`rope_parameters` / `rope_scaling`): targets and drafters rotate as transformers does.

Each rope type a Qwen3 config can carry with fixed frequencies gets a fixture: the converted target's
logits and features must equal transformers' (float32, 1e-4), and the drafter's cos / sin tables must
equal what DeepSpec's `Qwen3DSparkModel` uses: `Qwen3RotaryEmbedding(config)` of the drafter's own config
(deepspec/modeling/dspark/qwen3/modeling.py, `self.rotary_emb`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import convert_pair

from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.qwen3 import Qwen3Target

CAPTURE = (1, 2, 4)
ROPES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def scaled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    pair = tmp_path_factory.mktemp(request.param) / "pair"
    write_qwen3_fixture(pair, seed=0, rope_scaling=ROPES[request.param])
    return request.param, pair, convert_pair(pair, pair.parent / "ckpt")


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (90, 7, 33)]


def test_target_logits_equal_transformers(scaled: tuple[str, Path, Path], qwen3_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM

    kind, pair, ckpt = scaled
    assert json.loads((ckpt / "target" / "config.json").read_text())["rotary_scaling"]["type"] == kind
    hf = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == kind
    target = Qwen3Target(ckpt / "target", num_slots=3, max_len=160)
    batch = _prompts()
    logits, features = target.forward([0, 1, 2], batch, capture=CAPTURE)
    with torch.no_grad():
        for i, p in enumerate(batch):
            ref = hf(torch.tensor([p]), output_hidden_states=True)
            assert (logits[i] - ref.logits[0]).abs().max() <= 1e-4
            expected = torch.cat([ref.hidden_states[layer + 1][0] for layer in CAPTURE], dim=-1)
            assert (features[i] - expected).abs().max() <= 1e-4
        more, _ = target.forward([0], [[5, 6, 7]])  # incremental, past the prefill
        assert (more[0] - hf(torch.tensor([batch[0] + [5, 6, 7]])).logits[0][-3:]).abs().max() <= 1e-4
    # The scaling matters at these positions: the unscaled fixture (same weights) gives other logits.
    plain = Qwen3Target(qwen3_ckpt / "target", num_slots=1, max_len=160)
    unscaled, _ = plain.forward([0], batch[:1])
    assert (unscaled[0] - logits[0]).abs().max() > 1e-2


def test_drafter_rope_is_deepspecs(scaled: tuple[str, Path, Path]) -> None:
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    kind, pair, ckpt = scaled
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=1, max_len=600)
    # DeepSpec's drafter: Qwen3RotaryEmbedding of its config, called on the absolute positions.
    rotary = Qwen3RotaryEmbedding(Qwen3Config.from_pretrained(pair / "drafter"))
    assert rotary.rope_type == kind
    positions = torch.arange(drafter.cos_table.shape[0])[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.equal(drafter.cos_table, cos[0]) and torch.equal(drafter.sin_table, sin[0])
    default = Qwen3RotaryEmbedding(Qwen3Config(head_dim=drafter.head_dim, rope_theta=1e6))
    assert (default(torch.zeros(1), positions)[0][0] - cos[0]).abs().max() > 0.1  # scaling changes the table


def test_legacy_rope_scaling_fields_are_read(tmp_path: Path) -> None:
    """Configs written before transformers 5 carry `rope_theta` + `rope_scaling` with the old "type" key."""
    from transformers import AutoModelForCausalLM

    pair = tmp_path / "pair"
    write_qwen3_fixture(pair, seed=0, rope_scaling=ROPES["yarn"])
    for role in ("target", "drafter"):
        path = pair / role / "config.json"
        config = json.loads(path.read_text())
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
        path.write_text(json.dumps(config))
    ckpt = convert_pair(pair, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    prompt = _prompts()[0]
    logits, _ = Qwen3Target(ckpt / "target", num_slots=1, max_len=128).forward([0], [prompt])
    with torch.no_grad():
        assert (logits[0] - hf(torch.tensor([prompt])).logits[0]).abs().max() <= 1e-4
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=1, max_len=64)
    assert drafter.rope.rope_type == "yarn" and drafter.rope.attention_scaling > 1


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused_by_name(qwen3_ckpt: Path, tmp_path: Path, rope_type: str) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt, ckpt)
    path = ckpt / "target" / "config.json"
    config = json.loads(path.read_text())
    extra = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8} if rope_type == "longrope" else {}
    config["rotary_scaling"] = {"type": rope_type, "factor": 2.0, "original_max_position_embeddings": 1024, **extra}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"rope type not supported.*found {rope_type}") as info:
        Qwen3Target(ckpt / "target", num_slots=1, max_len=32)
    assert str(path) in str(info.value)
