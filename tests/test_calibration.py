"""STS must turn mis-scaled confidence logits into calibrated survival estimates, and its file must round-trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dspark_trt.runtime.calibration import (
    apply_sts,
    cumulative_ece,
    default_grid,
    ece,
    fit_sts,
    read_calibration,
    survival,
    write_calibration,
)
from dspark_trt.runtime.errors import CheckpointError

ROUNDS = 12_000  # enough for the binned ECE noise (~0.01) to sit far below the miscalibration (~0.1)


def synthetic_rounds(scales: list[float], rounds: int = ROUNDS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafting rounds whose true conditional acceptance logits are known; the head reports them × scale.

    A latent per-round difficulty makes positions of one round correlated, as in real decoding;
    acceptance is a Bernoulli chain, so it is prefix-shaped. Scale 1 gives a perfectly calibrated head.
    """
    gen = torch.Generator().manual_seed(seed)
    gamma = len(scales)
    difficulty = torch.randn(rounds, 1, generator=gen, dtype=torch.float64)
    true_logit = (
        torch.linspace(2.0, 0.5, gamma, dtype=torch.float64)  # later positions are harder
        + 1.5 * difficulty
        + 0.7 * torch.randn(rounds, gamma, generator=gen, dtype=torch.float64)
    )
    step = torch.rand(rounds, gamma, generator=gen, dtype=torch.float64) < torch.sigmoid(true_logit)
    accepted = torch.cumprod(step.long(), dim=1).bool()
    head_logits = (true_logit * torch.tensor(scales, dtype=torch.float64)).float()
    return head_logits, accepted


# ---------------------------------------------------------------- ECE


def test_ece_hand_computed() -> None:
    # 4 bins: [0, .25) [.25, .5) [.5, .75) [.75, 1]; 0.5 sits on a left edge, 1.0 on the inclusive right edge.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    hits = torch.tensor([False, False, True, True, True, True])
    # bin 0: |0.15 − 0| · 2/6;  bin 1: |0.3 − 1| · 1/6;  bin 2: |0.5 − 1| · 1/6;  bin 3: |0.95 − 1| · 2/6
    expected = (0.3 + 0.7 + 0.5 + 0.1) / 6
    assert ece(probs, hits, bins=4) == pytest.approx(expected, abs=1e-12)


def test_ece_small_when_calibrated_large_when_not() -> None:
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(100_000, generator=gen, dtype=torch.float64)
    hits = torch.rand(100_000, generator=gen, dtype=torch.float64) < probs
    assert ece(probs, hits) < 0.02
    # Pushing every probability towards the extremes (true chance p, reported p² or √p) is way off.
    assert ece(probs.sqrt(), hits) > 0.1
    assert ece(probs.square(), hits) > 0.1


def test_ece_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ece(torch.tensor([0.5, 1.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError):
        ece(torch.tensor([0.5]), torch.tensor([True, False]))


def test_helpers_and_grid() -> None:
    logits = torch.tensor([[0.0, 2.0, -2.0]])
    conf = apply_sts(logits, [1.0, 2.0, 0.5])
    assert torch.allclose(conf, torch.sigmoid(torch.tensor([[0.0, 1.0, -4.0]])))
    assert torch.allclose(survival(conf), torch.cumprod(conf, dim=-1))
    grid = default_grid()
    assert (grid == 1.0).any()
    assert grid.min() == pytest.approx(0.05) and grid.max() == pytest.approx(20.0)
    assert bool((grid[1:] > grid[:-1]).all())


# ---------------------------------------------------------------- STS fitting


def test_sts_fixes_over_and_under_confidence() -> None:
    scales = [3.0, 0.3, 3.0, 0.3]  # over-, under-, over-, under-confident
    logits, accepted = synthetic_rounds(scales)
    temps = fit_sts(logits, accepted)
    before = cumulative_ece(logits, accepted)
    after = cumulative_ece(logits, accepted, temps)

    # Measured (seed 0): before ≈ [0.108, 0.116, 0.067, 0.101], after ≈ [0.010, 0.008, 0.011, 0.011].
    assert all(a < b for a, b in zip(after, before, strict=True))
    assert sum(after) / len(after) < 0.25 * sum(before) / len(before)  # margin: at least 4× lower on average
    assert max(after) < 0.03
    for temp, scale in zip(temps, scales, strict=True):
        assert (temp > 1) == (scale > 1)
        assert abs(math.log(temp / scale)) < math.log(1.25)  # recovers the distortion within 25 %


def test_sts_leaves_calibrated_head_alone() -> None:
    logits, accepted = synthetic_rounds([1.0, 1.0, 1.0, 1.0], seed=3)
    temps = fit_sts(logits, accepted)
    assert all(abs(math.log(t)) < math.log(1.2) for t in temps), temps  # tolerance: within a factor 1.2 of 1
    before = cumulative_ece(logits, accepted)
    after = cumulative_ece(logits, accepted, temps)
    # Greedy fitting only guarantees "not worse" at position 1 exactly; later ones within sampling noise.
    assert after[0] <= before[0] + 1e-12
    assert all(a <= b + 0.003 for a, b in zip(after, before, strict=True))
    assert sum(after) <= sum(before) + 1e-9


def test_sts_ties_go_to_one() -> None:
    # Zero logits give σ = 0.5 at every temperature: nothing to choose, so nothing should be scaled.
    logits = torch.zeros(50, 3)
    accepted = torch.zeros(50, 3, dtype=torch.bool)
    assert fit_sts(logits, accepted) == [1.0, 1.0, 1.0]


def test_fit_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        fit_sts(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.bool))


# ---------------------------------------------------------------- file format


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "calib" / "sts.json"
    write_calibration(path, [2.5, 0.4, 1.0], [0.1, 0.2, 0.3], [0.01, 0.02, 0.03], samples=1234,
                      meta={"model": "tiny"})
    assert read_calibration(path) == [2.5, 0.4, 1.0]
    assert read_calibration(path, block_size=3) == [2.5, 0.4, 1.0]
    doc = json.loads(path.read_text())
    assert doc["format"] == "dspark-trt/sts" and doc["format_version"] == 1
    assert doc["block_size"] == 3 and doc["samples"] == 1234 and doc["bins"] == 15
    assert doc["ece_after"] == [0.01, 0.02, 0.03] and doc["meta"] == {"model": "tiny"}
    assert [p.name for p in path.parent.iterdir()] == ["sts.json"]  # no temp file left behind


def test_reads_file_with_only_the_trt_llm_key(tmp_path: Path) -> None:
    path = tmp_path / "sts.json"
    path.write_text(json.dumps({"sts_temperatures": [1.2, 0.8, 1]}))
    assert read_calibration(path, block_size=3) == [1.2, 0.8, 1.0]


@pytest.mark.parametrize(
    ("document", "block_size", "problem"),
    [
        ({"ece_before": [0.1]}, None, "missing key"),
        ({"sts_temperatures": [1.0, 1.0]}, 3, "wrong number"),
        ({"sts_temperatures": [1.0, 0.0, 1.0]}, None, "position 2"),
        ({"sts_temperatures": [1.0, -2.0]}, None, "position 2"),
        ({"sts_temperatures": [1.0, "1.0"]}, None, "position 2"),
        ({"sts_temperatures": []}, None, "non-empty"),
    ],
)
def test_read_errors_name_the_field(tmp_path: Path, document: dict, block_size: int | None, problem: str) -> None:
    path = tmp_path / "sts.json"
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError) as info:
        read_calibration(path, block_size=block_size)
    assert info.value.subject == "sts_temperatures"
    assert "[sts_temperatures]" in str(info.value) and str(path) in str(info.value)
    assert problem in str(info.value)


def test_read_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "sts.json"
    path.write_text("not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_calibration(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_calibration(tmp_path / "missing.json")


def test_calibration_file_name_is_one_constant() -> None:
    """Every reader and writer of the STS file uses runtime.calibration.CALIBRATION_FILE, not its own literal."""
    root = Path(__file__).resolve().parent.parent
    literal = '"' + "sts.json" + '"'
    spelled = [f"{path.relative_to(root)}:{number}"
               for folder in ("builder", "runtime", "client", "model_repository", "plugins", "bench")
               for path in sorted((root / folder).rglob("*.py"))
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if literal in line and not line.lstrip().startswith("#")]
    assert [where.split(":")[0] for where in spelled] == ["runtime/calibration.py"], spelled
