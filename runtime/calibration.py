"""Sequential Temperature Scaling (STS) for the DSpark confidence head.

The confidence head gives, per draft position k, c_k ≈ P(position k accepted | k-1 accepted). The
scheduler does not use c_k alone but the survival a_k = c_1·…·c_k ≈ P(positions 1..k all accepted),
so that product is what has to be calibrated. STS fits one temperature per position, in order,
with the earlier ones frozen: the choice of T_k can only fix what a_{k-1} got wrong, never undo it.

Data contract (one row per drafting round, the whole block verified):
    logits   [N, γ] float  raw head logits (pre-sigmoid) for positions 1..γ
    accepted [N, γ] bool   prefix-shaped: accepted[:, k] means positions 1..k were all accepted

Binning used for the calibration error: `bins` equal-width bins on [0, 1]; bin b holds
[b/bins, (b+1)/bins), except the last one, which also holds 1.0 (right edge inclusive).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .atomic import write_text_atomic
from .errors import CheckpointError

FORMAT = "dspark-trt/sts"
FORMAT_VERSION = 1
DEFAULT_BINS = 15
KEY = "sts_temperatures"  # the name TensorRT-LLM uses too, so its files and ours are interchangeable
CALIBRATION_FILE = "sts.json"  # beside a drafter's weights (source checkpoint, converted draft/, repository)

# Exact float ties are common (e.g. when no sample changes bin); differences below this are ties.
_TIE_TOLERANCE = 1e-12
# Upper bound on grid-points × samples evaluated in one go, so large calibration sets stay in memory.
_CHUNK_ELEMENTS = 1 << 24


def default_grid(points: int = 401, low: float = 0.05, high: float = 20.0) -> Tensor:
    """Geometric grid of temperatures from `low` to `high` that always contains exactly 1.0."""
    if not 0 < low <= 1.0 <= high or points < 2:
        raise ValueError(f"need 0 < low <= 1 <= high and points >= 2, got {low=}, {high=}, {points=}")
    grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    # Snap the nearest point to 1.0 instead of inserting one, so the grid stays evenly spaced
    # (with the defaults 1.0 is the exact geometric midpoint anyway).
    grid[(grid.log()).abs().argmin()] = 1.0
    return grid


def apply_sts(logits: Tensor, temperatures: Sequence[float] | Tensor) -> Tensor:
    """Calibrated confidences c_k = σ(logit_k / T_k); temperatures run along the last dimension."""
    temps = torch.as_tensor(temperatures, dtype=logits.dtype, device=logits.device)
    if temps.dim() != 1 or temps.numel() != logits.shape[-1]:
        raise ValueError(f"need one temperature per position ({logits.shape[-1]}), got shape {tuple(temps.shape)}")
    return torch.sigmoid(logits / temps)


def survival(confidences: Tensor) -> Tensor:
    """a_k = Π_{i≤k} c_i along the last dimension: the estimated chance the prefix 1..k is accepted."""
    return torch.cumprod(confidences, dim=-1)


def ece(probabilities: Tensor, outcomes: Tensor, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error Σ_b (n_b / n)·|mean(prob in b) − mean(outcome in b)|.

    Equal-width bins on [0, 1]; bin b holds [b/bins, (b+1)/bins), the last bin also holds 1.0.
    Empty bins contribute nothing. `outcomes` is bool or 0/1, same shape as `probabilities`.
    """
    probs = probabilities.detach().reshape(-1).to(torch.float64)
    hits = outcomes.detach().reshape(-1).to(torch.float64)
    if probs.numel() == 0 or probs.shape != hits.shape:
        shapes = f"{tuple(probabilities.shape)} and {tuple(outcomes.shape)}"
        raise ValueError(f"need matching non-empty inputs, got {shapes}")
    if not bool(((probs >= 0) & (probs <= 1)).all()):  # also rejects NaN
        raise ValueError("probabilities must lie in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return float(_ece_rows(probs.unsqueeze(0), hits, bins)[0])


def _ece_rows(probs: Tensor, hits: Tensor, bins: int) -> Tensor:
    """ECE of every row of `probs` [G, N] against `hits` [N], as float64 [G] (inputs unchecked)."""
    rows, n = probs.shape
    # floor(p·bins) gives left-closed bins; clamping folds p = 1.0 into the last bin.
    index = (probs * bins).floor().clamp_(0, bins - 1).long()
    index += torch.arange(rows, device=probs.device).unsqueeze(1) * bins  # one bin set per row
    # (n_b/n)·|mean p − mean o| = |Σ_b (p − o)| / n, so one signed sum per bin is enough.
    gaps = torch.bincount(index.reshape(-1), weights=(probs - hits).reshape(-1), minlength=rows * bins)
    return gaps.view(rows, bins).abs().sum(dim=1) / n


def _check_data(logits: Tensor, accepted: Tensor) -> None:
    if logits.dim() != 2 or logits.shape != accepted.shape or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"need logits and accepted of the same shape [N, γ] with N, γ >= 1, "
            f"got {tuple(logits.shape)} and {tuple(accepted.shape)}"
        )


def cumulative_ece(
    logits: Tensor,
    accepted: Tensor,
    temperatures: Sequence[float] | Tensor | None = None,
    bins: int = DEFAULT_BINS,
) -> list[float]:
    """Per position k, the ECE of the survival a_k against accepted[:, k] (temperatures default to 1)."""
    _check_data(logits, accepted)
    if temperatures is None:
        temperatures = [1.0] * logits.shape[1]
    alive = survival(apply_sts(logits.detach().to(torch.float64), temperatures))
    return [ece(alive[:, k], accepted[:, k], bins) for k in range(logits.shape[1])]


def fit_sts(logits: Tensor, accepted: Tensor, grid: Tensor | None = None, bins: int = DEFAULT_BINS) -> list[float]:
    """Fit one temperature per position, in order, each minimising the ECE of the survival a_k.

    For k = 1..γ, with T_1..T_{k-1} frozen, every grid temperature T is tried at once:
    a_k(T) = a_{k-1}·σ(logit_k / T) is scored against accepted[:, k]. Ties go to the temperature
    closest to 1 on the log scale (the grid is geometric), so uninformative positions stay unscaled.
    """
    _check_data(logits, accepted)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    device = logits.device
    temps = (default_grid() if grid is None else grid.detach()).to(device=device, dtype=torch.float64).reshape(-1)
    if temps.numel() == 0 or not bool((temps > 0).all()) or not bool(temps.isfinite().all()):
        raise ValueError("grid must hold positive finite temperatures")
    logit = logits.detach().to(torch.float64)
    hits = accepted.detach().to(torch.float64)
    rows, positions = logit.shape
    chunk = max(1, _CHUNK_ELEMENTS // rows)

    alive = torch.ones(rows, dtype=torch.float64, device=device)  # a_0 = 1
    fitted: list[float] = []
    for k in range(positions):
        scores = torch.cat([
            _ece_rows(alive * torch.sigmoid(logit[:, k] / part.unsqueeze(1)), hits[:, k], bins)
            for part in temps.split(chunk)
        ])
        tied = scores <= scores.min() + _TIE_TOLERANCE
        best = torch.where(tied, temps.log().abs(), torch.full_like(temps, math.inf)).argmin()
        fitted.append(float(temps[best]))
        alive = alive * torch.sigmoid(logit[:, k] / temps[best])
    return fitted


def _finite_list(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def write_calibration(
    path: Path,
    temperatures: Sequence[float],
    ece_before: Sequence[float],
    ece_after: Sequence[float],
    samples: int,
    meta: dict,
    *,
    bins: int = DEFAULT_BINS,
) -> None:
    """Write the STS JSON atomically: a reader sees the old file or the complete new one, never half."""
    path = Path(path)
    temps = _finite_list(temperatures, "temperatures")
    if not temps or any(t <= 0 for t in temps):
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temps}")
    before, after = _finite_list(ece_before, "ece_before"), _finite_list(ece_after, "ece_after")
    if len(before) != len(temps) or len(after) != len(temps):
        raise ValueError(f"need one ECE per position ({len(temps)}), got {len(before)} before and {len(after)} after")
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        KEY: temps,
        "block_size": len(temps),
        "ece_before": before,
        "ece_after": after,
        "samples": int(samples),
        "bins": int(bins),
        "meta": dict(meta),
    }
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"  # strict JSON for non-Python readers

    write_text_atomic(path, text)


def read_calibration(path: Path, block_size: int | None = None) -> list[float]:
    """Read and validate the per-position temperatures from an STS JSON file.

    Only `sts_temperatures` is required, so files written by TensorRT-LLM tooling read fine; the
    other fields of our format are checked only when present. Raises CheckpointError on any problem.
    """
    path = Path(path)
    expected = f"a list of {block_size if block_size is not None else 'γ'} positive numbers"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(path, f"cannot read calibration file: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"calibration file is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(path, "calibration file must hold a JSON object", found=type(document).__name__,
                              expected="an object with key " + KEY)
    if document.get("format") == FORMAT and document.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(path, "unsupported calibration format version", subject="format_version",
                              found=document.get("format_version"), expected=FORMAT_VERSION)
    if KEY not in document:
        raise CheckpointError(path, "missing key", subject=KEY, found=f"keys {sorted(document)}", expected=expected)

    values = document[KEY]
    if not isinstance(values, list) or not values:
        raise CheckpointError(path, "temperatures must be a non-empty list", subject=KEY, found=values,
                              expected=expected)
    for i, value in enumerate(values):
        # bool is an int subclass in Python, but `true` is not a temperature.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(path, f"temperature at position {i + 1} is not a positive finite number",
                                  subject=KEY, found=value, expected=expected)
    if block_size is not None and len(values) != block_size:
        raise CheckpointError(path, "wrong number of temperatures for the block size", subject=KEY,
                              found=len(values), expected=block_size)
    stored = document.get("block_size")
    if stored is not None and stored != len(values):
        raise CheckpointError(path, "block_size disagrees with the number of temperatures", subject="block_size",
                              found=stored, expected=len(values))
    return [float(v) for v in values]
