"""Turn verify-step timings into the scheduler's cost table (spec section 4).

`profile_grid` sweeps batch size × verify length with a caller-supplied `measure` (one real verify
step, acceptance pinned by the caller) and keeps the lower quartile of the steady-state steps;
`fit_cost_table` turns those into fixed + α(R) + θ(B).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..runtime.scheduler import CostTable

# Weight of the smoothness rows relative to the data rows. A cell's run-to-run noise is larger than
# what a few more tokens cost at small B, so θ must not follow single cells (or plans change from one
# profile to the next); a real knee, θ's slope changing over several cells, must still show. The
# figures that set it: docs/measurements.md.
_SMOOTHNESS = 3.0


def fit_cost_table(samples: dict[tuple[int, int], float], meta: dict) -> CostTable:
    """Fit step_time(R, B) = fixed + α(R) + θ(B) to typical step times in seconds keyed by (R, B).

    Method (everything in milliseconds):

    1. Separable least squares: one unknown θ_B per distinct token count B, one α_R per distinct batch
       size R (α of the smallest R pinned to 0, since only the sum is observable), minimising the
       *relative* error of every sample so that short steps count as much as long ones.
    2. A profiled grid has B = R·(1 + ℓ), so rows for different R may share no B at all and the split
       between their α and θ is then not determined by the data. Extra equations asking θ's slope to
       change little from one segment to the next settle it, and keep θ from following one noisy
       cell (see _SMOOTHNESS).
    3. A cell slower than both its neighbours in its row by 15 % (a stalled step) is left out.
    4. α is shifted so its minimum is 0 (θ absorbs the shift, the sums are unchanged); θ is made
       non-decreasing by isotonic regression (a spike is averaged with its neighbours, not carried on).
    5. fixed = θ extended to B = 0 along its first segment, kept within [0, θ(first B)], and
       subtracted from θ: the part of a step that no amount of tokens removes.

    Steps 3 and 4 change predictions only where the data are inconsistent with a separable, monotone
    cost. The largest relative error over the samples fitted is recorded in `meta["fit"]`.
    """
    if not samples:
        raise ValueError("need at least one sample")
    for (rows, tokens), seconds in samples.items():
        if rows < 1 or tokens < rows:
            raise ValueError(f"sample ({rows}, {tokens}): need R >= 1 and B >= R (each request has >= 1 token)")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"sample ({rows}, {tokens}): step time must be positive seconds, got {seconds}")

    keys = list(samples)
    spikes = _spikes(samples)
    fitted = [k for k in keys if k not in spikes]  # a spike's token count keeps its θ, set by smoothness
    batch_sizes = sorted({r for r, _ in keys})
    token_counts = sorted({b for _, b in keys})
    times = torch.tensor([samples[k] * 1000.0 for k in fitted], dtype=torch.float64)

    # Unknowns: θ for each token count, then α for each batch size but the smallest.
    n_theta, n_alpha = len(token_counts), len(batch_sizes) - 1
    theta_col = {b: i for i, b in enumerate(token_counts)}
    alpha_col = {r: n_theta + i - 1 for i, r in enumerate(batch_sizes) if i > 0}
    data = torch.zeros(len(fitted), n_theta + n_alpha, dtype=torch.float64)
    for row, (r, b) in enumerate(fitted):
        data[row, theta_col[b]] = 1.0
        if r in alpha_col:
            data[row, alpha_col[r]] = 1.0
    # Dividing each row by its own time turns the squared error into a squared relative error.
    system, target = [data / times[:, None]], [torch.ones(len(fitted), dtype=torch.float64)]

    # Slope change at each inner token count, scaled by the local spacing (so it is in milliseconds)
    # and by a typical step time (so it is relative, like the data rows).
    scale = _SMOOTHNESS / float(times.median())
    for k in range(1, n_theta - 1):
        b0, b1, b2 = token_counts[k - 1: k + 2]
        spacing = (b2 - b0) / 2
        row = torch.zeros(n_theta + n_alpha, dtype=torch.float64)
        row[k - 1] = spacing / (b1 - b0)
        row[k] = -spacing / (b1 - b0) - spacing / (b2 - b1)
        row[k + 1] = spacing / (b2 - b1)
        system.append(scale * row[None])
        target.append(torch.zeros(1, dtype=torch.float64))
    # gelsd (SVD) still answers with the minimum-norm solution if a tiny grid leaves a direction free.
    solution = torch.linalg.lstsq(torch.cat(system), torch.cat(target)[:, None], driver="gelsd").solution[:, 0]

    theta = solution[:n_theta].tolist()
    alpha = [0.0, *solution[n_theta:].tolist()]
    shift = min(alpha)
    alpha = [a - shift for a in alpha]
    theta = [t + shift for t in theta]

    theta = _isotonic(theta)
    if n_theta > 1:
        # θ is non-decreasing by now, so the slope is >= 0 but for float noise.
        slope = max((theta[1] - theta[0]) / (token_counts[1] - token_counts[0]), 0.0)
        fixed = min(max(theta[0] - slope * token_counts[0], 0.0), theta[0])
    else:
        fixed = theta[0]
    theta = [max(t - fixed, 0.0) for t in theta]

    table = CostTable(
        token_counts=token_counts,
        step_time_ms=theta,
        fixed_overhead_ms=fixed,
        batch_sizes=batch_sizes,
        batch_overhead_ms=alpha,
        meta=dict(meta),
    )
    errors = [abs(table.step_ms(r, b) - samples[(r, b)] * 1000.0) / (samples[(r, b)] * 1000.0) for r, b in fitted]
    table.meta["fit"] = {
        "method": "separable least squares (relative error, smooth theta, spikes left out), alpha >= 0, "
                  "theta isotonic",
        "samples": len(keys),
        "outliers": [list(k) for k in keys if k in spikes],
        "max_rel_error": max(errors),  # over the samples kept
    }
    return table


def _spikes(samples: dict[tuple[int, int], float], ratio: float = 1.15) -> set[tuple[int, int]]:
    """Cells slower than both neighbours in their batch-size row by `ratio`: a stalled step, not a cost.

    Such a cell is often the only sample of its token count, so a fit would follow it exactly; it is
    left out instead and the smoothness rows fill its gap.
    """
    spikes = set()
    for rows in {r for r, _ in samples}:
        row = sorted((b, t) for (r, b), t in samples.items() if r == rows)
        for (_, left), (tokens, seconds), (_, right) in zip(row, row[1:], row[2:], strict=False):
            if seconds > ratio * max(left, right):
                spikes.add((rows, tokens))
    return spikes


def _isotonic(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators).

    A running max would carry one high value to every larger token count; pooling averages it with
    its neighbours instead.
    """
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [mean for mean, count in blocks for _ in range(int(count))]


def profile_grid(
    measure: Callable[[int, int], float],
    batch_sizes: list[int],
    verify_lengths: list[int],
    warmup: int = 2,
    steps: int = 15,
    progress: bool = True,
) -> dict[tuple[int, int], float]:
    """Typical verify-step time in seconds (`steady_time`) for every batch size R × verify length ℓ, keyed by (R, B).

    `measure(R, tokens_per_request)` runs ONE verify step of R requests with 1 + ℓ tokens each and
    returns its duration in seconds; B = R·(1 + ℓ). The grid is swept `warmup` times unmeasured
    (allocator, autotuning and cache effects), then `steps` times; each cell keeps `steady_time`.
    """
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got {warmup=}, {steps=}")
    if any(r < 1 for r in batch_sizes) or any(ell < 0 for ell in verify_lengths):
        raise ValueError(f"need batch sizes >= 1 and verify lengths >= 0, got {batch_sizes}, {verify_lengths}")
    cells = [(rows, 1 + length) for rows in batch_sizes for length in verify_lengths]
    timings: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("profile", total=(warmup + steps) * len(cells))
        # Pass after pass over the whole grid, not cell after cell: a burst of load from elsewhere on
        # the machine then spoils one sample of many cells (which the quartile drops), not one cell.
        # Each pass in its own order: a cell always measured right after the biggest one would always
        # start with cold caches.
        order = random.Random(0)
        for sweep in range(warmup + steps):
            bar.update(task, description=f"profile pass {sweep + 1}/{warmup + steps}")
            for rows, tokens in order.sample(cells, len(cells)):
                seconds = measure(rows, tokens)
                if sweep >= warmup:
                    timings[(rows, tokens)].append(seconds)
                bar.advance(task)
    return {(rows, rows * tokens): steady_time(times) for (rows, tokens), times in timings.items()}


def steady_time(samples: list[float]) -> float:
    """The lower quartile of repeated timings of one step.

    Interference from the rest of a shared machine only ever adds time, and adds it whatever the step's
    size; what the scheduler needs is how step sizes *differ*. The lower quartile tracks the step's own
    cost with far less spread than the median, which can invent a step between two token counts that
    cost the same (docs/measurements.md).
    """
    if len(samples) < 4:
        return statistics.median(samples)
    return statistics.quantiles(samples, n=4, method="inclusive")[0]
