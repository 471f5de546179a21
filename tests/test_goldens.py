"""The Qwen3 drafter drafts what DeepSpec's drafter drafts: goldens made by tests/make_goldens.py.

make_goldens.py re-implements DeepSpec's float32 inference path independently (its docstring names the
DeepSpec files and commits); its outputs for the fixture drafters (vanilla / gated / RNN Markov heads,
default rope and YaRN) are stored in tests/goldens/. Here the current `Qwen3DSparkDrafter` (float32
products) drafts the same two contexts in one batched call: tokens must be equal, base logits, Markov-
corrected logits and confidence logits within 1e-5. A change to the drafter's maths fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import convert_pair
from make_goldens import CASES, GOLDENS, weights_hash  # tests/make_goldens.py
from safetensors import safe_open
from safetensors.torch import load_file

from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each golden's fixture pair, written again and converted (the drafters are seeded: same bytes)."""
    out = {}
    for name in CASES:
        with safe_open(GOLDENS / f"{name}.safetensors", "pt") as f:
            meta = f.metadata()
        fixture = json.loads(meta["fixture"])
        pair = tmp_path_factory.mktemp(name) / "pair"
        write_qwen3_fixture(pair, **fixture)
        now = weights_hash(load_file(pair / "drafter" / "model.safetensors"))
        assert now == meta["drafter_weights_sha256"], (
            f"{name}: the fixture drafter's weights changed since the goldens were made; if that is intended, "
            "rerun tests/make_goldens.py (the goldens then check the maths on the new weights)")
        out[name] = convert_pair(pair, pair.parent / "ckpt")
    return out


def test_goldens_cover_every_head_and_rope() -> None:
    assert sorted(p.stem for p in GOLDENS.glob("*.safetensors")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_drafter_matches_the_goldens(converted: dict[str, Path], name: str) -> None:
    golden = load_file(GOLDENS / f"{name}.safetensors")
    cases = sorted({int(key.split(".")[1]) for key in golden})
    drafter = Qwen3DSparkDrafter(converted[name] / "draft", num_slots=len(cases), max_len=64, bf16_products=False)
    assert drafter.markov.kind == CASES[name]["markov_head_type"]
    for slot in cases:  # contexts of different lengths: the batched round masks the shorter one's tail
        drafter.add_context(slot, golden[f"features.{slot}"])
    anchors = [int(golden[f"anchor.{i}"]) for i in cases]
    draft = drafter.draft(cases, anchors, [0.0] * len(cases), [None] * len(cases))
    hidden, base = drafter.backbone(cases, anchors)
    # The Markov-corrected logits of each position, from the drafted tokens (as `sequential_heads` adds them).
    prev, state, corrected = torch.tensor(anchors), drafter.markov.initial_state(len(cases)), []
    for k in range(drafter.block_size):
        bias, _, state = drafter.markov.step(prev, hidden[:, k], state)
        corrected.append(base[:, k] + bias.float())
        prev = draft.tokens[:, k]
    corrected = torch.stack(corrected, dim=1)
    for row, i in enumerate(cases):
        assert draft.tokens[row].tolist() == golden[f"tokens.{i}"].tolist(), f"{name} context {i}"
        assert (base[row] - golden[f"base_logits.{i}"]).abs().max() <= TOLERANCE
        assert (corrected[row] - golden[f"logits.{i}"]).abs().max() <= TOLERANCE
        assert (draft.conf_logits[row] - golden[f"conf_logits.{i}"]).abs().max() <= TOLERANCE
