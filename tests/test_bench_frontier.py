"""`dspark-client bench`: modes (mtp1, fixed:G), the throughput-interactivity frontier and the SLA table."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspark_trt.client.bench import (
    comparison,
    expand_modes,
    frontier,
    mode_request,
    plot_frontier,
    sla_table,
    throughput_at_sla,
)
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint


def cell(mode: str, concurrency: int, user: float, system: float) -> dict:
    return {"mode": mode, "concurrency": concurrency, "per_user_tokens_per_s": user, "system_tokens_per_s": system}


def test_modes() -> None:
    assert mode_request("mtp1") == ("fixed", 1)
    assert mode_request("fixed:3") == ("fixed", 3) and mode_request("fixed") == ("fixed", None)
    assert mode_request("auto") == ("auto", None) and mode_request("off") == ("off", None)
    for bad in ("fast", "fixed:0", "fixed:x", "auto:3"):
        with pytest.raises(ValueError, match="unknown bench mode"):
            mode_request(bad)
    assert expand_modes(["off", "mtp1", "fixed", "auto"], [1, 3, 5]) == [
        "off", "mtp1", "fixed:1", "fixed:3", "fixed:5", "auto"]
    assert expand_modes(["off", "fixed"], None) == ["off", "fixed"]
    with pytest.raises(ValueError):
        expand_modes(["off", "fixed"], [0])
    with pytest.raises(ValueError, match="--gammas expands the mode `fixed`"):
        expand_modes(["off", "auto"], [1, 3])


@pytest.mark.parametrize(("args", "message"), [
    (["--sla", "a,b"], "Invalid value for --sla: expected comma-separated tokens/s per user, got 'a,b'"),
    (["--gammas", "x"], "Invalid value for --gammas: expected comma-separated integers, got 'x'"),
    (["--modes", "off,fast"], "unknown bench mode 'fast'"),
    (["--modes", "off,auto", "--gammas", "1,3"], "--gammas expands the mode `fixed`"),
])
def test_bench_usage_errors_name_the_option(args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from dspark_trt.client.cli import main

    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and message in result.output


def test_throughput_at_sla_interpolates_along_the_frontier() -> None:
    # (concurrency, per user, system): per-user speed falls as concurrency rises.
    points = [(1, 100.0, 100.0), (2, 90.0, 180.0), (4, 70.0, 280.0), (8, 40.0, 320.0)]
    assert throughput_at_sla(points, 90.0) == 180.0  # a measured point exactly at the SLA
    assert throughput_at_sla(points, 80.0) == pytest.approx(230.0)  # halfway between c=2 and c=4
    assert throughput_at_sla(points, 50.0) == pytest.approx(280.0 + 40.0 * 20 / 30)
    assert throughput_at_sla(points, 30.0) == 320.0  # every point meets it: the best one
    assert throughput_at_sla(points, 101.0) is None  # never reached
    # A frontier that bends back (system falls at high concurrency) keeps its best point.
    bent = [(1, 100.0, 100.0), (2, 80.0, 300.0), (4, 60.0, 250.0)]
    assert throughput_at_sla(bent, 60.0) == 300.0
    assert throughput_at_sla([], 10.0) is None


def test_sla_table_and_gain_over_mtp1() -> None:
    cells = [cell("mtp1", 1, 70.0, 70.0), cell("mtp1", 4, 50.0, 200.0),
             cell("auto", 1, 100.0, 100.0), cell("auto", 4, 60.0, 240.0),
             cell("off", 1, 50.0, 50.0), cell("off", 4, 40.0, 160.0)]
    assert frontier(cells, "auto") == [(1, 100.0, 100.0), (4, 60.0, 240.0)]
    rows = sla_table(cells, [60.0, 80.0])
    assert rows[0]["system_tokens_per_s"] == {"mtp1": pytest.approx(135.0), "auto": 240.0, "off": None}
    assert rows[0]["auto_over_mtp1"] == pytest.approx(240 / 135 - 1)
    assert rows[1]["system_tokens_per_s"]["mtp1"] is None and rows[1]["auto_over_mtp1"] is None
    assert rows[1]["system_tokens_per_s"]["auto"] == pytest.approx(170.0)


def test_comparison_of_auto_with_the_best_fixed_mode_per_concurrency() -> None:
    cells = [cell("off", 1, 50.0, 50.0), cell("mtp1", 1, 70.0, 70.0), cell("fixed:3", 1, 90.0, 90.0),
             cell("fixed:5", 1, 95.0, 96.0), cell("auto", 1, 99.0, 93.0),
             cell("mtp1", 8, 40.0, 300.0), cell("auto", 8, 45.0, 330.0)]
    one, eight = comparison(cells)
    assert one["concurrency"] == 1 and one["per_user_over_off"] == pytest.approx(99 / 50)
    assert one["system_over_best_fixed"] == pytest.approx(93 / 96)  # fixed:5, the best of mtp1 / fixed:G
    assert one["system_over"] == pytest.approx({"off": 93 / 50, "mtp1": 93 / 70, "fixed:3": 93 / 90,
                                                "fixed:5": 93 / 96})
    assert eight["per_user_over_off"] is None and eight["system_over_best_fixed"] == pytest.approx(1.1)
    assert comparison([cell("off", 1, 50.0, 50.0)]) == []


def test_frontier_plot(tmp_path: Path) -> None:
    cells = [cell("mtp1", 1, 70.0, 70.0), cell("mtp1", 4, 50.0, 200.0), cell("auto", 1, 100.0, 100.0)]
    path = plot_frontier({"cells": cells, "sla": sla_table(cells, [60.0])}, tmp_path / "frontier.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_mtp1_drafts_the_full_block_and_verifies_its_first_position(qwen3_ckpt: Path) -> None:
    """What `mtp1` sends (fixed, gamma 1): one draft verified every round, drafted as the first
    position of the drafter's full block (the drafter's positions attend to each other)."""
    target, drafter, _ = open_checkpoint(qwen3_ckpt, num_slots=2, max_len=64)
    drafted_with = []
    real_draft = drafter.draft

    def recording(slots, anchors, temperatures, generators, gamma=None):
        drafted_with.append(gamma)
        return real_draft(slots, anchors, temperatures, generators, gamma)

    drafter.draft = recording
    try:
        speculation, gamma = mode_request("mtp1")
        prompt = [5, 6, 7, 8]
        (mtp1,) = generate(target, drafter, [Request(prompt, max_new_tokens=12, speculation=speculation, gamma=gamma)])
        (off,) = generate(target, drafter, [Request(prompt, max_new_tokens=12, speculation="off")])
    finally:
        target.close()
    assert mtp1.verified[:-1] == [1] * (len(mtp1.verified) - 1)  # the last round may have no budget left
    assert all(t in (1, 2) for t in mtp1.taus)
    assert drafted_with and set(drafted_with) == {drafter.block_size}
    assert mtp1.tokens == off.tokens  # greedy: speculation never changes the output
