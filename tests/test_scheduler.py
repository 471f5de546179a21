"""The confidence scheduler, its cost table and the profiling helpers that produce the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_trt.builder.profile_table import fit_cost_table, profile_grid
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.scheduler import (
    FORMAT,
    CostTable,
    expected_tokens,
    objective,
    schedule_paper,
    schedule_production,
)


def table_from_sps(sps: list[float]) -> CostTable:
    """One request, no fixed or batch overhead: SPS(B) = sps[B - 1] exactly."""
    return CostTable(token_counts=list(range(1, len(sps) + 1)), step_time_ms=[1000.0 / s for s in sps])


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def random_survival(generator: torch.Generator, rows: int, gamma: int) -> torch.Tensor:
    confidences = torch.rand(rows, gamma, generator=generator, dtype=torch.float64)
    return torch.cumprod(confidences, dim=1)


def sorted_prefix_plans(survival: torch.Tensor) -> list[torch.Tensor]:
    """Brute force, deliberately loop-based: the plan after admitting each prefix of the ranking."""
    rows, gamma = survival.shape
    candidates = sorted((-float(survival[r, j]), j, r) for r in range(rows) for j in range(gamma))
    plans, current = [torch.zeros(rows, dtype=torch.int64)], torch.zeros(rows, dtype=torch.int64)
    for _, j, r in candidates:
        assert current[r] == j  # positions of one request enter in order
        current = current.clone()
        current[r] += 1
        plans.append(current)
    return plans


# --- hand-computed cases -------------------------------------------------------------------------


def test_paper_counterexample_early_stop_versus_global_best() -> None:
    table = table_from_sps([1.0, 0.5, 0.45])
    survival = torch.tensor([[0.8, 0.8]])  # c1 = 0.8, c2 = 1.0
    assert table.sps(1, 1) == pytest.approx(1.0)
    assert table.sps(1, 2) == pytest.approx(0.5)
    assert table.sps(1, 3) == pytest.approx(0.45)

    # Algorithm 1: admitting position 1 gives 1.8·0.5 = 0.9 < 1·1 = 1, so it stops at once.
    assert schedule_paper(survival, table).tolist() == [0]
    assert objective(survival, lengths(0), table) == pytest.approx(1.0)
    assert objective(survival, lengths(1), table) == pytest.approx(0.9)
    # The global best is both positions: 2.6·0.45 = 1.17 (and that is the full block, so min_gain is moot).
    assert objective(survival, lengths(2), table) == pytest.approx(1.17)
    assert schedule_production(survival, table).tolist() == [2]
    assert schedule_production(survival, table, min_gain=0.0).tolist() == [2]


def test_confident_request_gets_the_tokens() -> None:
    # Each draft adds 1 ms to the step, which pays off only if its survival beats τ / step_ms (~0.3 here).
    table = CostTable.flat(ms_per_token=1.0, fixed_ms=10.0)
    survival = torch.tensor([[0.95, 0.9, 0.85], [0.1, 0.01, 0.001]])
    assert schedule_paper(survival, table).tolist() == [3, 0]
    assert schedule_production(survival, table, min_gain=0.0).tolist() == [3, 0]
    # τ = (1 + 0.95 + 0.9 + 0.85) + 1 = 4.7 over B = 5 tokens: 4.7 · 1000 / 15.
    assert expected_tokens(survival, lengths(3, 0)) == pytest.approx(4.7)
    assert objective(survival, lengths(3, 0), table) == pytest.approx(4.7 * 1000 / 15)


def test_min_gain_keeps_full_block_unless_clearly_better() -> None:
    table = CostTable.flat(ms_per_token=1.0, fixed_ms=10.0)
    # One request, γ = 2. Full block: τ = 1 + 0.9 + a2 at 13 ms; ℓ = 1: τ = 1.9 at 12 ms.
    full_obj = lambda a2: (1.9 + a2) / 13  # noqa: E731
    one_obj = 1.9 / 12
    # a2 chosen so that ℓ = 1 is better than the full block by 2 % (full kept) or by 6 % (switch).
    slightly = one_obj / 1.02 * 13 - 1.9
    clearly = one_obj / 1.06 * 13 - 1.9
    assert 0 < clearly < slightly < 0.9
    assert one_obj / full_obj(slightly) == pytest.approx(1.02)
    assert one_obj > 1 / 11  # and verifying nothing is worse than either
    for a2, expected in ((slightly, 2), (clearly, 1)):
        survival = torch.tensor([[0.9, a2]], dtype=torch.float64)
        assert schedule_production(survival, table, min_gain=0.04).tolist() == [expected]
        assert schedule_production(survival, table, min_gain=0.0).tolist() == [1]


def test_zero_survival_verifies_nothing_under_algorithm_1() -> None:
    table = CostTable.flat(ms_per_token=0.5, fixed_ms=10.0)
    survival = torch.zeros(4, 5)
    assert schedule_paper(survival, table).tolist() == [0, 0, 0, 0]


def test_free_tokens_verify_everything() -> None:
    table = CostTable.flat(ms_per_token=0.0, fixed_ms=10.0)
    survival = torch.cumprod(torch.full((3, 4), 0.3), dim=1)
    assert schedule_paper(survival, table).tolist() == [4, 4, 4]
    assert schedule_production(survival, table, min_gain=0.0).tolist() == [4, 4, 4]
    assert schedule_production(survival, table).tolist() == [4, 4, 4]


def test_flat_survival_admits_positions_in_order() -> None:
    # c = 1 after the first position: all equal survival, ties must go to the smaller position first.
    table = CostTable.flat(ms_per_token=1.0, fixed_ms=10.0)
    survival = torch.full((2, 6), 0.5)
    out = schedule_paper(survival, table)
    assert (out >= 0).all() and (out <= 6).all()
    assert int(out.max() - out.min()) <= 1  # interleaved ranking: equal requests share the budget


def test_bad_survival_rejected() -> None:
    table = CostTable.flat()
    with pytest.raises(ValueError, match="non-increasing"):
        schedule_paper(torch.tensor([[0.2, 0.9]]), table)  # confidences, not their cumulative product
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule_paper(torch.tensor([[float("nan"), 0.1]]), table)
    with pytest.raises(ValueError, match="float tensor"):
        schedule_production(torch.ones(3), table)
    with pytest.raises(ValueError, match="min_gain"):
        schedule_production(torch.ones(1, 1), table, min_gain=-0.1)


def test_empty_inputs() -> None:
    table = CostTable.flat()
    assert schedule_paper(torch.zeros(0, 5), table).shape == (0,)
    assert schedule_production(torch.zeros(3, 0), table).tolist() == [0, 0, 0]


# --- properties on random inputs -----------------------------------------------------------------


def steep_table() -> CostTable:
    """Flat until 32 tokens (memory-bound), then 0.5 ms per token (compute-bound), 5 ms fixed."""
    return CostTable(token_counts=[1, 32, 64], step_time_ms=[10.0, 10.0, 26.0], fixed_overhead_ms=5.0,
                     batch_sizes=[1, 64], batch_overhead_ms=[0.0, 3.0])


def test_random_properties() -> None:
    generator = torch.Generator().manual_seed(0)
    table = steep_table()
    for _ in range(50):
        rows = int(torch.randint(1, 6, (1,), generator=generator))
        gamma = int(torch.randint(1, 6, (1,), generator=generator))
        survival = random_survival(generator, rows, gamma)
        paper = schedule_paper(survival, table)
        best = schedule_production(survival, table, min_gain=0.0)
        default = schedule_production(survival, table)
        for plan in (paper, best, default):
            assert plan.dtype == torch.int64 and plan.shape == (rows,)
            assert bool(((plan >= 0) & (plan <= gamma)).all())
        brute = max(objective(survival, plan, table) for plan in sorted_prefix_plans(survival))
        assert objective(survival, best, table) == pytest.approx(brute, rel=1e-12)
        assert objective(survival, paper, table) <= brute * (1 + 1e-12)
        # The default either keeps the full block or returns the global best.
        assert default.tolist() == [gamma] * rows or default.tolist() == best.tolist()


def test_fewer_drafts_per_request_under_load() -> None:
    table = steep_table()
    profile = torch.cumprod(torch.tensor([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]), dim=0)
    means = {}
    for rows in (1, 4, 16, 64):
        survival = profile.expand(rows, -1)
        means[rows] = (schedule_paper(survival, table).double().mean().item(),
                       schedule_production(survival, table, min_gain=0.0).double().mean().item())
    for scheduler in (0, 1):
        series = [means[rows][scheduler] for rows in (1, 4, 16, 64)]
        assert all(a >= b for a, b in zip(series, series[1:], strict=False)), series
        assert series[0] > series[-1]  # and it actually falls


def test_fast_enough() -> None:
    import time

    generator = torch.Generator().manual_seed(1)
    table = steep_table()
    survival = random_survival(generator, 64, 16)
    schedule_production(survival, table)
    start = time.perf_counter()
    for _ in range(20):
        schedule_paper(survival, table)
        schedule_production(survival, table)
    per_call = (time.perf_counter() - start) / 40
    assert per_call < 5e-3  # generous for a loaded CI machine; typically well under a millisecond
    assert schedule_production(random_survival(generator, 256, 16), table).shape == (256,)


# --- cost table ----------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    table = CostTable(token_counts=[1, 8, 64], step_time_ms=[1.0, 2.0, 9.0], fixed_overhead_ms=3.0,
                      batch_sizes=[1, 8], batch_overhead_ms=[0.0, 0.5], meta={"device": "cpu", "backend": "torch"})
    path = tmp_path / "sub" / "sps.json"
    table.save(path)
    document = json.loads(path.read_text())
    assert document["format"] == FORMAT and document["format_version"] == 1
    assert CostTable.load(path) == table
    assert CostTable.from_dict(table.to_dict()) == table


def test_interpolation_clamping_and_extrapolation() -> None:
    table = CostTable(token_counts=[4, 8, 16], step_time_ms=[2.0, 4.0, 6.0], fixed_overhead_ms=1.0,
                      batch_sizes=[1, 5], batch_overhead_ms=[0.0, 4.0])
    assert table.step_ms(1, 8) == pytest.approx(1 + 0 + 4)  # at a point
    assert table.step_ms(1, 6) == pytest.approx(1 + 0 + 3)  # between points
    assert table.step_ms(1, 12) == pytest.approx(1 + 0 + 5)
    assert table.step_ms(1, 1) == pytest.approx(1 + 0 + 2)  # below: clamped
    assert table.step_ms(1, 24) == pytest.approx(1 + 0 + 8)  # above: last slope 0.25 ms/token continues
    assert table.step_ms(3, 8) == pytest.approx(1 + 2 + 4)  # α interpolated
    assert table.step_ms(50, 8) == pytest.approx(1 + 4 + 4)  # α clamped above
    assert table.sps(1, 8) == pytest.approx(200.0)
    many = table.step_ms_many(1, torch.tensor([1, 6, 24]))
    assert many.tolist() == pytest.approx([3.0, 4.0, 9.0])


def test_theta_forced_monotone() -> None:
    table = CostTable(token_counts=[1, 2, 3, 4], step_time_ms=[5.0, 4.0, 6.0, 5.5])
    assert table.step_time_ms == [5.0, 5.0, 6.0, 6.0]
    # The last segment is flat after the fix, so extrapolation stays flat rather than falling.
    assert table.step_ms(1, 100) == pytest.approx(6.0)


def good_document() -> dict:
    return CostTable(token_counts=[1, 2], step_time_ms=[1.0, 2.0], fixed_overhead_ms=1.0).to_dict()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("token_counts"), "token_counts"),
        (lambda d: d.pop("step_time_ms"), "step_time_ms"),
        (lambda d: d.pop("fixed_overhead_ms"), "fixed_overhead_ms"),
        (lambda d: d.pop("batch_overhead_ms"), "batch_overhead_ms"),
        (lambda d: d.update(step_time_ms=[1.0]), "step_time_ms"),
        (lambda d: d.update(token_counts=[2, 2]), "token_counts"),
        (lambda d: d.update(token_counts=[3, 1]), "token_counts"),
        (lambda d: d.update(token_counts=[0, 1]), "token_counts"),
        (lambda d: d.update(token_counts=[1.5, 2]), "token_counts"),
        (lambda d: d.update(step_time_ms=[-1.0, 2.0]), "step_time_ms"),
        (lambda d: d.update(step_time_ms=[1.0, "2"]), "step_time_ms"),
        (lambda d: d.update(fixed_overhead_ms=-0.5), "fixed_overhead_ms"),
        (lambda d: d.update(batch_sizes=[1, 4], batch_overhead_ms=[0.0]), "batch_overhead_ms"),
        (lambda d: d.update(batch_sizes=[4, 1], batch_overhead_ms=[0.0, 0.0]), "batch_sizes"),
        (lambda d: d.update(batch_overhead_ms=[-1.0]), "batch_overhead_ms"),
        (lambda d: d.update(fixed_overhead_ms=0.0, step_time_ms=[0.0, 0.0]), "fixed_overhead_ms"),
        (lambda d: d.update(format="dspark-trt/sts"), "format"),
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d.update(meta=[1]), "meta"),
    ],
)
def test_bad_tables_name_the_field(tmp_path: Path, change, field: str) -> None:
    document = good_document()
    change(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError) as info:
        CostTable.load(path)
    assert info.value.subject == field
    assert info.value.path == str(path)
    assert field in str(info.value)


def test_unreadable_tables(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        CostTable.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CostTable.load(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object"):
        CostTable.load(tmp_path / "list.json")


def test_foreign_table_without_tag_or_batch_overhead() -> None:
    table = CostTable.from_dict({"token_counts": [1, 64], "step_time_ms": [10.0, 20.0], "fixed_overhead_ms": 2.0})
    assert table.batch_sizes == [1] and table.batch_overhead_ms == [0.0]
    assert table.step_ms(32, 64) == pytest.approx(22.0)


# --- profiling -----------------------------------------------------------------------------------


def true_step_seconds(rows: int, tokens: int) -> float:
    """A separable ground truth: 4 ms fixed, α growing with R, θ flat then linear in B."""
    alpha = 0.05 * rows ** 0.5
    theta = 3.0 + 0.02 * max(tokens - 48, 0)
    return (4.0 + alpha + theta) / 1000.0


@pytest.mark.parametrize("batch_sizes", [[1, 2, 4, 8, 16, 32], [1, 3, 7, 64]])
def test_fit_reproduces_separable_data(batch_sizes: list[int]) -> None:
    verify_lengths = list(range(8))
    samples = {(r, r * (1 + ell)): true_step_seconds(r, r * (1 + ell)) for r in batch_sizes for ell in verify_lengths}
    table = fit_cost_table(samples, {"device": "synthetic"})
    assert table.meta["device"] == "synthetic" and table.meta["fit"]["samples"] == len(samples)
    assert table.meta["fit"]["max_rel_error"] < 0.05
    for (rows, tokens), seconds in samples.items():
        assert table.step_ms(rows, tokens) == pytest.approx(seconds * 1000.0, rel=0.05)
    assert all(a >= 0 for a in table.batch_overhead_ms) and table.fixed_overhead_ms >= 0
    assert table.step_time_ms == sorted(table.step_time_ms)
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_fit_on_noisy_data_stays_monotone_and_close() -> None:
    generator = torch.Generator().manual_seed(0)
    batch_sizes, verify_lengths = [1, 2, 4, 8, 16, 32, 64], list(range(8))
    samples = {}
    for r in batch_sizes:
        for ell in verify_lengths:
            noise = 1 + 0.02 * (float(torch.rand(1, generator=generator)) - 0.5)  # ±1 %
            samples[(r, r * (1 + ell))] = true_step_seconds(r, r * (1 + ell)) * noise
    table = fit_cost_table(samples, {})
    assert table.step_time_ms == sorted(table.step_time_ms)
    assert min(table.batch_overhead_ms) == 0.0 and table.fixed_overhead_ms >= 0
    assert table.meta["fit"]["max_rel_error"] < 0.05


@pytest.mark.parametrize("seed", range(6))
def test_machine_noise_does_not_change_the_single_request_plan(seed: int) -> None:
    """±10 % per cell (a shared CPU) must not invent a step among the few tokens of one request."""
    generator = torch.Generator().manual_seed(seed)
    batch_sizes, verify_lengths = [1, 4, 16, 32], list(range(6))
    samples = {}
    for r in batch_sizes:
        for ell in verify_lengths:
            noise = 1 + 0.2 * (float(torch.rand(1, generator=generator)) - 0.5)
            samples[(r, r * (1 + ell))] = true_step_seconds(r, r * (1 + ell)) * noise
    table = fit_cost_table(samples, {})
    survival = torch.tensor([[0.74, 0.39, 0.25, 0.14, 0.08]])  # the trained pair's, served at c = 1
    assert schedule_paper(survival, table).tolist() == [5]  # 1..6 tokens cost the same in the truth


def test_one_stalled_cell_does_not_raise_the_cost_of_every_longer_step() -> None:
    """A single slow sample (a stall from elsewhere on the machine) is dropped, not carried on by θ."""
    batch_sizes, verify_lengths = [1, 4, 16, 32], list(range(6))
    samples = {(r, r * (1 + ell)): true_step_seconds(r, r * (1 + ell)) for r in batch_sizes for ell in verify_lengths}
    samples[(1, 2)] *= 1.5
    table = fit_cost_table(samples, {})
    assert table.meta["fit"]["outliers"] == [[1, 2]]
    for tokens in range(1, 7):
        assert table.step_ms(1, tokens) == pytest.approx(true_step_seconds(1, tokens) * 1000.0, rel=0.05)


def test_fit_rejects_bad_samples() -> None:
    with pytest.raises(ValueError):
        fit_cost_table({}, {})
    with pytest.raises(ValueError):
        fit_cost_table({(4, 2): 0.01}, {})
    with pytest.raises(ValueError):
        fit_cost_table({(1, 2): math.nan}, {})


def test_profile_grid_calls_and_lower_quartiles() -> None:
    calls: dict[tuple[int, int], int] = {}

    def measure(rows: int, tokens: int) -> float:
        count = calls.get((rows, tokens), 0)
        calls[(rows, tokens)] = count + 1
        # Warm-up calls are slow; the timed ones cycle around a deterministic centre.
        if count < 2:
            return 1.0
        return rows * 0.01 + tokens * 0.001 + (count % 3 - 1) * 1e-4

    samples = profile_grid(measure, [1, 4], [0, 2, 5], warmup=2, steps=5, progress=False)
    assert set(samples) == {(r, r * (1 + ell)) for r in (1, 4) for ell in (0, 2, 5)}
    assert set(calls) == {(r, 1 + ell) for r in (1, 4) for ell in (0, 2, 5)}
    assert all(count == 7 for count in calls.values())
    for (rows, tokens), seconds in samples.items():
        # The five timed values are centre + (1, -1, 0, 1, -1)e-4: lower quartile centre - 1e-4.
        assert seconds == pytest.approx(rows * 0.01 + (tokens // rows) * 0.001 - 1e-4)


def test_steady_time_ignores_the_slow_tail() -> None:
    from dspark_trt.builder.profile_table import steady_time

    assert steady_time([0.010] * 12 + [0.050, 0.090, 0.200]) == pytest.approx(0.010)
    assert steady_time([0.012, 0.010]) == pytest.approx(0.011)  # too few for quartiles: the median


def test_drafting_pays_only_when_the_best_plan_covers_the_draft() -> None:
    from dspark_trt.runtime.scheduler import drafting_pays

    survival = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    flat = CostTable([1, 2], [0.0, 0.0], 10.0)  # verify costs 10 ms whatever the tokens
    assert drafting_pays(survival, flat, 1)  # no draft cost known: the paper's setting
    # Best plan: all 4 drafts, τ = 4.0 per 10 ms + draft; not drafting: 1 token per 10 ms.
    assert drafting_pays(survival, CostTable([1, 2], [0.0, 0.0], 10.0, draft_step_ms=[29.0]), 1)
    assert not drafting_pays(survival, CostTable([1, 2], [0.0, 0.0], 10.0, draft_step_ms=[31.0]), 1)
    assert not drafting_pays(survival, flat, 0)
    table = CostTable([1, 2], [0.0, 0.0], 10.0, draft_step_ms=[3.0])
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_decayed_line_fits_a_slope_only_where_x_varied() -> None:
    from dspark_trt.runtime.scheduler import DecayedLine

    line = DecayedLine(fade=0.05, slope_scale=0.05)
    assert line.line() == (0.0, 0.0)
    line.add(10.0, 9.0)  # one odd call moves the fit toward it, not onto it: the profile counts too
    assert 0.0 < line.at(10.0) < 4.5
    rng = np.random.default_rng(0)
    for _ in range(400):
        x = float(rng.integers(8, 200))
        line.add(x, 3.0 + 0.25 * x + rng.normal(0, 0.5))
    a, b = line.line()
    assert abs(a - 3.0) < 1.0 and abs(b - 0.25) < 0.02
    flat = DecayedLine(fade=0.05, slope_scale=0.05)
    for _ in range(400):  # one x only: noise must not become a slope
        flat.add(48.0, 7.0 + rng.normal(0, 2.0))
    a, b = flat.line()
    assert abs(b) < 0.01 and abs(flat.at(48.0) - 7.0) < 1.0
    for _ in range(200):  # old observations fade: the fit follows a change
        flat.add(48.0, 20.0)
    assert flat.at(48.0) == pytest.approx(20.0, abs=0.01)


def test_decayed_line_does_not_turn_drift_between_modes_into_a_slope() -> None:
    """Concurrency 1 with modes interleaved in slices (the bench; mixed traffic): verify tokens B are 1
    in an `off` slice, 2 in `mtp1`, 4 in `fixed:3`, 6 in `fixed:5`, and the machine drifts by a few ms
    from slice to slice. The served extra is flat (3 ms); a least-squares line read a cost per token
    into the drift (0.4 ms a token from 2 ms over 5 tokens) and made `auto` verify shorter blocks at
    concurrency 1, where they save nothing."""
    from dspark_trt.runtime.scheduler import DecayedLine

    rng = np.random.default_rng(1)
    line = DecayedLine(fade=0.05, slope_scale=0.05)
    slopes = []
    for _ in range(60):
        tokens, drift = int(rng.choice([1, 2, 4, 6])), rng.normal(0, 2.0)
        for _ in range(60):
            line.add(tokens, 3.0 + drift + rng.normal(0, 1.5))
            slopes.append(line.line()[1])
    assert np.percentile(np.abs(slopes[200:]), 95) < 0.1


def test_served_costs_add_what_served_rounds_take_beyond_the_profile() -> None:
    from dspark_trt.runtime.scheduler import ServedCosts

    profiled = CostTable([1, 64, 256], [0.0, 7.0, 30.0], 10.0, [1, 4, 32], [0.0, 2.0, 4.0],
                         draft_step_ms=[5.0, 8.0, 12.0])
    served = ServedCosts(profiled, fade=0.1, refresh=2)
    served.observe(1, 8, verify_ms=profiled.step_ms(1, 8) + 6.0, drafted_rows=1, draft_ms=9.0, other_ms=None)
    assert served.table is profiled  # rebuilt every 2 rounds only
    # Served, a verify call costs 2 ms + 0.05 ms a token more than profiled, the rest of a round 1 ms +
    # 0.5 ms a request, a drafting round 3 ms + 0.1 ms a request more; B and R vary as requests come and go.
    served = ServedCosts(profiled, fade=0.1, refresh=2)
    for rows in [1, 2, 4, 8, 16, 32, 24, 12, 6, 3] * 6:
        tokens = rows * 6
        served.observe(rows, tokens, verify_ms=profiled.step_ms(rows, tokens) + 2.0 + 0.05 * tokens,
                       drafted_rows=rows, draft_ms=profiled.draft_ms(rows) + 3.0 + 0.1 * rows,
                       other_ms=1.0 + 0.5 * rows)
    table = served.table
    for rows, tokens in ((1, 6), (8, 48), (32, 192), (32, 32)):
        assert table.step_ms(rows, tokens) == pytest.approx(
            profiled.step_ms(rows, tokens) + 3.0 + 0.05 * tokens + 0.5 * rows, abs=0.2)
    assert table.draft_ms(16) == pytest.approx(profiled.draft_ms(16) + 3.0 + 0.1 * 16, abs=0.1)
    assert ServedCosts(CostTable([1, 2], [0.0, 1.0], 5.0)).profiled.corrected((1.0, 0.1)).draft_step_ms == []
    before = served.verify.at(48)
    served.observe(8, 48, verify_ms=1e6, drafted_rows=0, draft_ms=0.0, other_ms=None)  # a stalled call
    cap = profiled.step_ms(8, 48)  # counted as one profiled step more than profiled, not as the stall
    assert served.verify.at(48) < before + 0.1 * (cap - before) + 1.0


def test_padded_batches_give_every_request_the_same_length() -> None:
    """Padded, the short request's tokens are free once the long one sets the width: plans are uniform."""
    from dspark_trt.runtime.scheduler import drafting_pays

    survival = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.2, 0.04, 0.01, 0.0]])
    packed = CostTable([2, 4, 8, 10], [0.0, 4.0, 12.0, 16.0], 10.0)  # 2 ms a token above 2 tokens
    padded = CostTable.from_dict({**packed.to_dict(), "verify_batching": "padded"})
    assert padded.padded and not packed.padded
    # Packed: row 0's drafts (0.9, 0.8, 0.7, 0.6) each pay for their 2 ms; row 1's 0.2 does not.
    assert schedule_paper(survival, packed).tolist() == [4, 0]
    # Padded, every ℓ costs both rows' tokens: ℓ = 1 gives τ 3.1 in 14 ms (0.221 a ms) against 2 in 10 ms,
    # ℓ = 2 gives 3.94 in 18 ms (0.219): the scan stops at 1, which is also the best of all ℓ.
    assert schedule_paper(survival, padded).tolist() == [1, 1]
    assert schedule_production(survival, padded, min_gain=0.0).tolist() == [1, 1]
    assert drafting_pays(survival, CostTable.from_dict({**padded.to_dict(), "draft_step_ms": [0.5]}), 2)
    assert not drafting_pays(survival, CostTable.from_dict({**padded.to_dict(), "draft_step_ms": [2.0]}), 2)
    with pytest.raises(CheckpointError, match="verify_batching"):
        CostTable.from_dict({**packed.to_dict(), "verify_batching": "ragged"})
