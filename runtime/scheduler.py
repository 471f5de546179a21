"""DSpark's confidence scheduler: how many drafts of each request to verify this round (spec section 4).

With R active requests, survival a_{r,j} = Π_{i≤j} c_{r,i} (the estimated chance that drafts 1..j of
request r are all accepted) and ℓ_r drafts verified for request r:

    B = Σ_r (1 + ℓ_r)                       tokens in the verify step
    τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j})         expected committed tokens (the +1 is the bonus/correction token)
    objective = τ · SPS(R, B)               expected committed tokens per second

SPS comes from a `CostTable` profiled on the actual hardware. Both schedulers rank every (r, j) by
a_{r,j} and consider the plans "admit the first k candidates" for k = 0..R·γ; they differ in which k:

- `schedule_paper` (Algorithm 1): the first k after which the objective stops improving. Because it
  stops early, whether position j is verified depends only on positions before it, which keeps it
  lossless when fed the *current* round's confidences.
- `schedule_production`: the best k overall, and only if it beats verifying the full block by a
  minimum predicted gain. Its callers feed survival from an *earlier* round (the confidences of this
  round are not ready when the plan is needed), so the plan cannot depend on this round's drafts.
- `drafting_pays`: whether any plan pays for this round's drafting at all; `plan_production` answers
  it and makes the production plan from one evaluation of the candidates, before drafting.

Every candidate list is evaluated at once (cumulative sums over the ranked order), so a call costs a
sort plus a few vector operations, independent of Python loops over R·γ. A table whose verify step
pads requests to the longest (`verify_batching = "padded"`, the reference backend) has B = R·(1 + max ℓ);
the candidates are then whole block positions ℓ = 0..γ for every request at once. Served, `ServedCosts`
corrects the profiled table by what rounds actually take.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..plugins import launch
from .atomic import write_text_atomic
from .errors import CheckpointError

FORMAT = "dspark-trt/sps-table"
FORMAT_VERSION = 1
DEFAULT_MIN_GAIN = 0.04  # TensorRT-LLM's default `confidence_min_predicted_gain`

# Survival is a product of probabilities, so it cannot rise along the block; rises smaller than this
# are float noise (e.g. from a reduced-precision cumprod) and are smoothed away instead of rejected.
_SURVIVAL_TOLERANCE = 1e-6
_REQUIRED = ("token_counts", "step_time_ms", "fixed_overhead_ms")


@dataclass
class CostTable:
    """Verify-step cost: step_time(R, B) = fixed_overhead_ms + α(R) + θ(B), in milliseconds.

    θ is linear between the measured `token_counts`, flat below the first one, and continued along the
    last segment's slope above the last one: a batch bigger than anything profiled is assumed to cost
    at least as much per extra token as the largest profiled ones, never less (flat would make huge
    batches look free). α (the overhead of carrying R requests, whatever their tokens) is linear
    between the measured `batch_sizes` and flat outside them. θ is forced non-decreasing on
    construction (running max), since more tokens never make a step cheaper and a dip from noise
    would make the scheduler chase it.
    """

    token_counts: list[int]
    step_time_ms: list[float]
    fixed_overhead_ms: float = 0.0
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    batch_overhead_ms: list[float] = field(default_factory=lambda: [0.0])
    # Optional: one drafting round (new context + the block) for each of `batch_sizes` requests. With it,
    # `auto` skips drafting in rounds where even the best plan would not pay for the draft.
    draft_step_ms: list[float] = field(default_factory=list)
    # How the verify step batches requests of different lengths: "packed" (TensorRT-LLM: a step costs
    # what its B tokens cost) or "padded" (the reference backend: every request is padded to the
    # longest, so a step costs R · (1 + max ℓ) tokens and the best plans give every request one ℓ).
    verify_batching: str = "packed"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self, "<CostTable>")
        self.token_counts = [int(b) for b in self.token_counts]
        self.step_time_ms = _running_max([float(t) for t in self.step_time_ms])
        self.fixed_overhead_ms = float(self.fixed_overhead_ms)
        self.batch_sizes = [int(r) for r in self.batch_sizes]
        self.batch_overhead_ms = [float(t) for t in self.batch_overhead_ms]
        self.draft_step_ms = [float(t) for t in self.draft_step_ms]
        self.meta = dict(self.meta)

    @property
    def padded(self) -> bool:
        return self.verify_batching == "padded"

    @classmethod
    def flat(cls, ms_per_token: float = 0.0, fixed_ms: float = 1.0, meta: dict | None = None) -> CostTable:
        """step_time = fixed_ms + ms_per_token · B for every R and B ≥ 1 (ms_per_token = 0: tokens are free)."""
        # Two points are enough: past the last one θ continues along the same slope.
        return cls(
            token_counts=[1, 2],
            step_time_ms=[ms_per_token, 2 * ms_per_token],
            fixed_overhead_ms=fixed_ms,
            meta={"source": "flat", **(meta or {})},
        )

    def step_ms(self, batch_size: int, tokens: float) -> float:
        """Predicted duration of one verify step with `batch_size` requests carrying `tokens` tokens."""
        return float(self.step_ms_array(batch_size, np.array([float(tokens)]))[0])

    def sps(self, batch_size: int, tokens: float) -> float:
        """Verify steps per second at (R, B)."""
        return 1000.0 / self.step_ms(batch_size, tokens)

    def step_ms_many(self, batch_size: int, tokens: Tensor) -> Tensor:
        """`step_ms` for many token counts at once (float64 tensor of the same shape as `tokens`)."""
        return torch.from_numpy(self.step_ms_array(batch_size, tokens.detach().to("cpu", torch.float64).numpy()))

    def step_ms_array(self, batch_size: int, tokens: np.ndarray) -> np.ndarray:
        """`step_ms` for a float64 array of token counts (what the schedulers use inside)."""
        return self.fixed_overhead_ms + self.alpha_ms(batch_size) + _interp_theta(tokens, self.token_counts,
                                                                                  self.step_time_ms)

    def alpha_ms(self, batch_size: int) -> float:
        """Per-batch overhead α(R): linear between the measured batch sizes, flat outside them."""
        return _interp_flat(self.batch_sizes, self.batch_overhead_ms, batch_size)

    def draft_ms(self, batch_size: int) -> float:
        """One drafting round for `batch_size` requests (0 when the table has no draft costs)."""
        return _interp_flat(self.batch_sizes, self.draft_step_ms, batch_size) if self.draft_step_ms else 0.0

    def corrected(self, verify: tuple[float, float] = (0.0, 0.0), rounds: tuple[float, float] = (0.0, 0.0),
                  draft: tuple[float, float] = (0.0, 0.0)) -> CostTable:
        """This table plus served extras, each a line (ms, ms per unit): `verify` per verify token
        (a + b·B on every step), `rounds` per request (a + b·R on every step: the work between and around
        the model calls) and `draft` per drafted request (on every drafting round). Times never drop below
        zero and θ stays non-decreasing (see `ServedCosts`)."""
        (verify_a, verify_b), (round_a, round_b), (draft_a, draft_b) = verify, rounds, draft
        return replace(self, fixed_overhead_ms=max(self.fixed_overhead_ms + verify_a + round_a, 0.0),
                       step_time_ms=[max(t + verify_b * b, 0.0) for t, b in zip(self.step_time_ms, self.token_counts,
                                                                             strict=True)],
                       batch_overhead_ms=[max(t + round_b * r, 0.0) for t, r in zip(self.batch_overhead_ms,
                                                                                   self.batch_sizes, strict=True)],
                       draft_step_ms=[max(d + draft_a + draft_b * r, 0.0)  # empty: no draft costs known
                                      for d, r in zip(self.draft_step_ms, self.batch_sizes[:len(self.draft_step_ms)],
                                                      strict=True)],
                       meta={**self.meta, "served": {"verify_ms": list(verify), "round_ms": list(rounds),
                                                     "draft_ms": list(draft)}})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "token_counts": list(self.token_counts),
            "step_time_ms": list(self.step_time_ms),
            "fixed_overhead_ms": self.fixed_overhead_ms,
            "batch_sizes": list(self.batch_sizes),
            "batch_overhead_ms": list(self.batch_overhead_ms),
            **({"draft_step_ms": list(self.draft_step_ms)} if self.draft_step_ms else {}),
            "verify_batching": self.verify_batching,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, document: Any, path: str | Path = "<dict>") -> CostTable:
        """Build a table from its JSON object; `path` only names the source in error messages.

        The format tag is checked when present but not required, and `batch_sizes` /
        `batch_overhead_ms` may be left out together (no per-request overhead), so that tables from
        other tools with the same field names read fine.
        """
        if not isinstance(document, dict):
            raise CheckpointError(path, "cost table must be a JSON object", found=type(document).__name__,
                                  expected="an object with keys " + ", ".join(_REQUIRED))
        if "format" in document and document["format"] != FORMAT:
            raise CheckpointError(path, "not an SPS cost table", subject="format", found=document["format"],
                                  expected=FORMAT)
        if document.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise CheckpointError(path, "unsupported cost table format version", subject="format_version",
                                  found=document["format_version"], expected=FORMAT_VERSION)
        for key in _REQUIRED:
            if key not in document:
                raise CheckpointError(path, "missing field", subject=key, found=f"keys {sorted(document)}",
                                      expected=f"fields {', '.join(_REQUIRED)}")
        has_sizes, has_overheads = "batch_sizes" in document, "batch_overhead_ms" in document
        if has_sizes != has_overheads:
            missing = "batch_overhead_ms" if has_sizes else "batch_sizes"
            raise CheckpointError(path, "batch_sizes and batch_overhead_ms come together", subject=missing,
                                  found="missing", expected="both or neither")
        meta = document.get("meta", {})
        if not isinstance(meta, dict):
            raise CheckpointError(path, "meta must be a JSON object", subject="meta", found=type(meta).__name__,
                                  expected="object")
        try:
            return cls(
                token_counts=document["token_counts"],
                step_time_ms=document["step_time_ms"],
                fixed_overhead_ms=document["fixed_overhead_ms"],
                batch_sizes=document.get("batch_sizes", [1]),
                batch_overhead_ms=document.get("batch_overhead_ms", [0.0]),
                draft_step_ms=document.get("draft_step_ms", []),
                verify_batching=document.get("verify_batching", "packed"),
                meta=meta,
            )
        except CheckpointError as exc:  # re-raise naming the real source instead of "<CostTable>"
            raise CheckpointError(path, exc.problem, subject=exc.subject, found=exc.found,
                                  expected=exc.expected) from None

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        """Read and validate a cost table JSON file; every problem raises CheckpointError."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(path, f"cannot read cost table: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(path, f"cost table is not valid JSON: {exc}") from exc
        return cls.from_dict(document, path)

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically: a reader sees the old file or the complete new one, never half."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"  # strict JSON for non-Python readers
        write_text_atomic(path, text)


class DecayedLine:
    """y ≈ a + b·x by least squares over observations whose weights fade by `fade` per new one.

    Before the observations, `prior` pseudo-observations of y = 0 (the profile was right) at the
    observations' mean x; they fade like the rest, so one odd first call cannot overturn the profile
    but a steady difference soon does. The slope has a prior too: b ~ N(0, `slope_scale`²), so it is
    the posterior mean cov / (var + σ² / (n · slope_scale²)), σ² the residual variance of the fit. A
    slope the data barely show (x varied little, or y is noisy) stays near 0: served times drift by
    milliseconds from one minute to the next, and where x changes with what is running (verify
    tokens: `off`, then `fixed:5`) a least-squares slope would turn the drift into a cost per unit of
    x that is not there. A slope shown over a wide range of x (tokens at concurrency 32) is kept.
    """

    def __init__(self, fade: float, slope_scale: float, prior: float = 2.0) -> None:
        self.fade, self.slope_scale, self.prior = fade, slope_scale, prior
        self.n = self.sx = self.sy = self.sxx = self.sxy = self.syy = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - self.fade
        self.prior *= keep
        self.n, self.sx, self.sy = keep * self.n + 1.0, keep * self.sx + x, keep * self.sy + y
        self.sxx, self.sxy, self.syy = keep * self.sxx + x * x, keep * self.sxy + x * y, keep * self.syy + y * y

    def line(self) -> tuple[float, float]:
        """(a, b); (0, 0) before any observation."""
        if not self.n:
            return 0.0, 0.0
        mx, my = self.sx / self.n, self.sy / self.n
        variance, covariance = max(self.sxx / self.n - mx * mx, 0.0), self.sxy / self.n - mx * my
        y_variance = max(self.syy / self.n - my * my, 0.0)
        residual = max(y_variance - covariance**2 / variance, 0.0) if variance > 0 else y_variance
        ridge = residual / (self.n * self.slope_scale**2)
        slope = covariance / (variance + ridge) if variance + ridge > 0 else 0.0
        trust = self.n / (self.n + self.prior)  # the prior's y = 0 at mean x pulls the whole line toward 0
        return trust * (my - slope * mx), trust * slope

    def at(self, x: float) -> float:
        a, b = self.line()
        return a + b * x


class ServedCosts:
    """The profiled table, corrected by what served rounds actually take.

    `dspark-build profile` times bare verify steps and drafting rounds inside one process. Served, every
    round also pays for the calls between models, for copying tensors in and out and for sending each
    request's tokens back (docs/measurements.md), which no profile of the models alone can see and which
    changes what pays: more per call makes drafting pay sooner (fewer rounds per token), more per verify
    token makes long blocks dearer at high concurrency. So the decoder reports each round's measured times
    and plans with the profile plus three fitted lines (`DecayedLine`):

        verify(R, B) + (a_v + b_v·B)          what a verify call took beyond the profile, per token B
                     + (a_r + b_r·R)          the rest of the round (planning, accepting, sending), per request R
        [+ draft(R) + (a_d + b_d·R)]          a drafting round beyond the profile, per drafted request

    Variety in B comes from the requests coming and going and from other modes' rounds (`off`, `fixed:G`).
    A slope counts only as far as B varied widely enough for it to stand out of the drift between those
    rounds (each line's prior, `DecayedLine`); otherwise the correction is per call. The corrected table is
    rebuilt every `refresh` rounds. Timings never depend on what was drafted, so plans stay lossless.
    """

    def __init__(self, profiled: CostTable, fade: float = 0.05, refresh: int = 8) -> None:
        self.profiled, self.table = profiled, profiled
        self.refresh = refresh
        # The slopes' prior scales: a served extra of about 0.05 ms per verify token (copying features out)
        # and 0.5 ms per request (sending its tokens, a drafted row's inputs) is plausible; more must be shown.
        self.verify = DecayedLine(fade, slope_scale=0.05)
        self.rounds_extra, self.draft = DecayedLine(fade, slope_scale=0.5), DecayedLine(fade, slope_scale=0.5)
        self.rounds = 0

    def observe(self, rows: int, tokens: int, verify_ms: float, drafted_rows: int, draft_ms: float,
                other_ms: float | None) -> None:
        """One served round: R requests carrying B verify tokens (padded tables: R · the longest), the
        verify call's and the drafting's times, and the rest of the round (None when unknown: a prefill
        ran in between)."""
        # One stalled call moves a fit by at most one profiled step, not by the stall.
        cap = self.profiled.step_ms(rows, tokens)
        self.verify.add(tokens, min(verify_ms - cap, cap))
        if drafted_rows:
            self.draft.add(drafted_rows, min(draft_ms - self.profiled.draft_ms(drafted_rows), cap))
        if other_ms is not None:
            self.rounds_extra.add(rows, max(other_ms, 0.0))
        self.rounds += 1
        if self.rounds % self.refresh == 0:
            self.table = self.profiled.corrected(self.verify.line(), self.rounds_extra.line(), self.draft.line())


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python, but `true` is not a time.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_counts(path: str, name: str, values: object) -> None:
    expected = "a non-empty list of strictly increasing positive integers"
    if not isinstance(values, list) or not values:
        raise CheckpointError(path, "must be a non-empty list", subject=name, found=values, expected=expected)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(path, f"entry {i} is not a positive integer", subject=name, found=value,
                                  expected=expected)
        if i > 0 and value <= values[i - 1]:
            raise CheckpointError(path, f"entry {i} does not increase", subject=name,
                                  found=f"{values[i - 1]} then {value}", expected=expected)


def _check_times(path: str, name: str, values: object, length: int, length_of: str) -> None:
    expected = f"a list of {length} non-negative numbers (one per entry of {length_of})"
    if not isinstance(values, list):
        raise CheckpointError(path, "must be a list", subject=name, found=values, expected=expected)
    if len(values) != length:
        raise CheckpointError(path, f"length differs from {length_of}", subject=name, found=len(values),
                              expected=length)
    for i, value in enumerate(values):
        if not _is_number(value) or value < 0:
            raise CheckpointError(path, f"entry {i} is not a non-negative finite number", subject=name,
                                  found=value, expected=expected)


def _validate(table: CostTable, path: str) -> None:
    _check_counts(path, "token_counts", table.token_counts)
    _check_times(path, "step_time_ms", table.step_time_ms, len(table.token_counts), "token_counts")
    if not _is_number(table.fixed_overhead_ms) or table.fixed_overhead_ms < 0:
        raise CheckpointError(path, "not a non-negative finite number", subject="fixed_overhead_ms",
                              found=table.fixed_overhead_ms, expected="a number >= 0")
    _check_counts(path, "batch_sizes", table.batch_sizes)
    _check_times(path, "batch_overhead_ms", table.batch_overhead_ms, len(table.batch_sizes), "batch_sizes")
    if table.draft_step_ms:
        _check_times(path, "draft_step_ms", table.draft_step_ms, len(table.batch_sizes), "batch_sizes")
    if table.verify_batching not in ("packed", "padded"):
        raise CheckpointError(path, "unknown verify batching", subject="verify_batching", found=table.verify_batching,
                              expected="packed | padded")
    if not isinstance(table.meta, dict):
        raise CheckpointError(path, "meta must be a dict", subject="meta", found=type(table.meta).__name__,
                              expected="dict")
    # θ only grows and α is never negative, so this is the cheapest step the table can predict;
    # zero would mean infinitely many steps per second.
    cheapest = table.fixed_overhead_ms + table.step_time_ms[0] + min(table.batch_overhead_ms)
    if cheapest <= 0:
        raise CheckpointError(path, "every step would take zero time", subject="fixed_overhead_ms",
                              found=table.fixed_overhead_ms, expected="a positive step time somewhere")


def _interp_flat(sizes: list[int], times: list[float], x: int) -> float:
    """Linear between the points, flat outside them (one scalar: plain Python beats tensor ops here)."""
    if x <= sizes[0]:
        return times[0]
    if x >= sizes[-1]:
        return times[-1]
    hi = bisect.bisect_right(sizes, x)
    t = (x - sizes[hi - 1]) / (sizes[hi] - sizes[hi - 1])
    return times[hi - 1] + t * (times[hi] - times[hi - 1])


def _running_max(values: list[float]) -> list[float]:
    out, best = [], -math.inf
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def _interp_theta(points: np.ndarray, xs: list[int], ys: list[float]) -> np.ndarray:
    """Piecewise-linear y(x) through (xs, ys): flat left of xs[0], along the last segment right of xs[-1]."""
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
    return np.interp(points, xs, ys) + slope * np.maximum(points - xs[-1], 0.0)  # np.interp alone is flat


# The scheduler runs every round for a handful of numbers, so it works in numpy: torch's per-op dispatch
# costs more than these small operations themselves, and its search goes multi-threaded on larger
# inputs, which stalls under CPU contention (figures: docs/measurements.md). Tensors come in and go
# out; arrays stay inside.


def _check_survival(survival: Tensor) -> np.ndarray:
    """Validated float64 copy of survival [R, γ], made exactly non-increasing along the block."""
    if not isinstance(survival, Tensor) or survival.dim() != 2 or not survival.is_floating_point():
        shape = tuple(survival.shape) if isinstance(survival, Tensor) else type(survival).__name__
        raise ValueError(f"survival must be a float tensor [R, γ], got {shape}")
    a = survival.detach().to("cpu", torch.float64).numpy()
    if not ((a >= -_SURVIVAL_TOLERANCE) & (a <= 1 + _SURVIVAL_TOLERANCE)).all():  # also rejects NaN
        raise ValueError("survival must lie in [0, 1]")
    if a.shape[1] > 1 and (a[:, 1:] > a[:, :-1] + _SURVIVAL_TOLERANCE).any():
        raise ValueError("survival must be non-increasing along the block "
                         "(pass the cumulative product of the confidences, not the confidences)")
    # The running minimum turns the tolerated noise into exact monotonicity, which the ranking relies on.
    return np.minimum.accumulate(np.clip(a, 0.0, 1.0), axis=1)


def _check_lengths(lengths: Tensor, rows: int, gamma: int) -> np.ndarray:
    lengths = torch.as_tensor(lengths).detach().to("cpu", torch.int64).numpy()
    if lengths.shape != (rows,):
        raise ValueError(f"lengths must have shape ({rows},), got {tuple(lengths.shape)}")
    if ((lengths < 0) | (lengths > gamma)).any():
        raise ValueError(f"lengths must lie in [0, {gamma}], got {lengths.tolist()}")
    return lengths


def expected_tokens(survival: Tensor, lengths: Tensor) -> float:
    """τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}): expected tokens committed when request r verifies ℓ_r drafts."""
    a = _check_survival(survival)
    lengths = _check_lengths(lengths, a.shape[0], a.shape[1])
    verified = np.arange(a.shape[1]) < lengths[:, None]
    return float(a.shape[0] + (a * verified).sum())


def objective(survival: Tensor, lengths: Tensor, table: CostTable) -> float:
    """τ · SPS(R, B): expected committed tokens per second for this plan."""
    lengths = torch.as_tensor(lengths)
    rows = survival.shape[0]
    tokens = rows + int(lengths.sum())
    return expected_tokens(survival, lengths) * table.sps(rows, tokens)


def _ranked(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Survival of every candidate (r, j), best first, and each candidate's request r."""
    rows = a.shape[0]
    # Flattened position-major, so the stable sort breaks ties by smaller j first (then smaller r): a
    # request's positions then enter in order even where survival stays flat (c = 1).
    flat = a.T.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    return flat[order], order % rows


def _plans(a: np.ndarray, table: CostTable) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every candidate plan for survival `a` [R, γ], cheapest first (plan 0 verifies no draft): its
    expected tokens τ, its verify tokens B and, for ranked plans, the request each admitted candidate
    belongs to (plan k admits the first k; None for padded batches, where plan ℓ gives every request ℓ).

    Padded, a step costs R · (1 + max ℓ) tokens whatever the shorter requests carry, so any plan is
    beaten or matched by giving every request its longest ℓ: the γ + 1 uniform plans are all there is.
    """
    rows, gamma = a.shape
    if table.padded:
        tau = rows + np.concatenate([[0.0], np.cumsum(a.sum(0))])
        return tau, rows * (1 + np.arange(gamma + 1, dtype=np.float64)), None
    values, requests = _ranked(a)
    tau = rows + np.concatenate([[0.0], np.cumsum(values)])
    return tau, rows + np.arange(values.size + 1, dtype=np.float64), requests


def _lengths(requests: np.ndarray | None, plan: int, rows: int) -> np.ndarray:
    if requests is None:  # padded: plan ℓ verifies ℓ drafts of every request
        return np.full(rows, plan, dtype=np.int64)
    # Each request's admitted candidates are its positions 1..ℓ_r (ranking above), so counting suffices.
    return np.bincount(requests[:plan], minlength=rows).astype(np.int64)


def schedule_paper(survival: Tensor, table: CostTable) -> Tensor:
    """Algorithm 1: verify lengths ℓ_r ∈ [0, γ] (int64 [R], on the CPU) for survival [R, γ].

    Starting from ℓ = 0 everywhere, candidates (r, j) are admitted best survival first while each one
    strictly improves τ·SPS; the first that does not ends the scan. The early stop makes the decision
    for position j depend only on positions before it, so this is the scheduler to use with the
    current round's confidences (lossless verification). With padded batches the candidates are whole
    block positions (ℓ = 0, 1, .. for every request at once).
    """
    if launch.use_kernels(survival) and not table.padded:
        return _kernel_schedule(survival, table, DEFAULT_MIN_GAIN, production=False)
    a = _check_survival(survival)
    tau, tokens, requests = _plans(a, table)
    objectives = tau * (1000.0 / table.step_ms_array(a.shape[0], tokens))
    improves = objectives[1:] > objectives[:-1]
    # The number of leading improvements is where the sequential scan would have stopped.
    return torch.from_numpy(_lengths(requests, int(np.cumprod(improves).sum()), a.shape[0]))


def plan_production(survival: Tensor, table: CostTable, min_gain: float = DEFAULT_MIN_GAIN,
                    drafting_rows: int = 0) -> tuple[bool, Tensor]:
    """`drafting_pays` and `schedule_production` from one evaluation of the plans: (does drafting pay
    for `drafting_rows` rows, verify lengths [R]). Both read survival from earlier rounds, so a decoder
    can decide both before drafting, once a round."""
    pays, lengths = plan_estimate(_check_survival(survival), table, min_gain, drafting_rows)
    return pays, torch.from_numpy(lengths)


def plan_estimate(a: np.ndarray, table: CostTable, min_gain: float = DEFAULT_MIN_GAIN,
                  drafting_rows: int = 0) -> tuple[bool, np.ndarray]:
    """`plan_production` for an estimate kept as a decoder keeps it: float64 [R, γ] in [0, 1],
    non-increasing along the block, unchecked; lengths int64 [R]. Served, the plan sits between two model
    calls every round, where the checks and tensor conversions cost more than the plan itself."""
    if not (math.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain}")
    rows, gamma = a.shape
    tau, tokens, requests = _plans(a, table)
    step = table.step_ms_array(rows, tokens)
    objectives = tau * (1000.0 / step)
    pays = bool(drafting_rows)
    if pays and table.draft_step_ms:  # without draft costs drafting always "pays" (the paper's setting)
        # Plan 0 (no draft verified) is also what not drafting at all costs.
        pays = bool((tau[1:] * (1000.0 / (step[1:] + table.draft_ms(drafting_rows)))).max() > objectives[0])
    best = int(np.argmax(objectives))  # first maximum: the fewest tokens among equally good plans
    if objectives[best] > objectives[-1] * (1 + min_gain):
        return pays, _lengths(requests, best, rows)
    return pays, np.full(rows, gamma, dtype=np.int64)


def schedule_production(survival: Tensor, table: CostTable, min_gain: float = DEFAULT_MIN_GAIN) -> Tensor:
    """Production variant: verify lengths ℓ_r ∈ [0, γ] (int64 [R], on the CPU) for survival [R, γ].

    Same ranking as Algorithm 1, but the best of *all* prefixes wins (no early stop), and even that plan
    is used only if its objective beats verifying the full block (ℓ_r = γ for all r) by more than
    `min_gain` (relative); otherwise the full block is kept, so model error cannot shrink the verify
    batch for a marginal predicted gain.

    Callers pass survival from an EARLIER round (stale confidences, available before this round's
    drafts exist): the plan then cannot depend on the drafts it verifies, which is what keeps this
    lossless despite the global search. With the current round's confidences use `schedule_paper`.
    """
    if launch.use_kernels(survival) and not table.padded:
        return _kernel_schedule(survival, table, min_gain, production=True)
    return plan_production(survival, table, min_gain)[1]


def _kernel_schedule(survival: Tensor, table: CostTable, min_gain: float, production: bool) -> Tensor:
    """`schedule_paper` / `schedule_production` as the DSparkSchedule kernel, for survival on a GPU: lengths
    int64 [R] on survival's device, nothing read back. The survival comes from the drafter's own
    confidence kernel, so it is not re-validated on the host (that would wait for the device)."""
    lengths = launch.dspark_schedule(survival, **launch.cost_table_tensors(table, survival.device),
                                     fixed_overhead_ms=table.fixed_overhead_ms, min_gain=min_gain,
                                     production=production)
    return lengths.long()


def drafting_pays(survival: Tensor, table: CostTable, drafting_rows: int) -> bool:
    """Whether this round should draft at all: the best plan's τ / (draft + verify) beats R / verify(R).

    survival [R, γ] is an estimate made *before* drafting (earlier rounds' confidences; zeros for
    requests that do not speculate). Without draft costs in the table drafting always "pays", which is
    the paper's setting (the drafter's cost is taken as fixed).
    """
    return plan_production(survival, table, drafting_rows=drafting_rows)[0]
