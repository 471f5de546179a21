"""`dspark-build inspect`: what a checkpoint is, and whether target and drafter fit together."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .families import Pair, Report
from .families.common import Source


def _params(source: Source, drafter_only: bool | None = None) -> tuple[int, Counter]:
    count, by_dtype = 0, Counter()
    for name, info in source.by_name.items():
        if drafter_only is not None and name.startswith("mtp.") != drafter_only:
            continue
        if name.endswith("_scale_inv"):
            continue
        count += info.numel
        by_dtype[info.dtype] += info.numel
    return count, by_dtype


def _quantization(source: Source, by_dtype: Counter) -> str:
    q = source.config.get("quantization_config")
    if q:
        block = q.get("weight_block_size")
        return f"{q.get('quant_method', '?')} {q.get('fmt', '')}".strip() + (f", {block[0]}x{block[1]} block scales"
                                                                            if block else "")
    return "none"


def describe(pair: Pair, report: Report) -> dict[str, Any]:
    """A JSON-ready description of the pair and its validation result."""
    fam = pair.model_family
    out: dict[str, Any] = {"family": pair.family, "ok": report.ok,
                           "problems": [p.describe() for p in report.problems], "warnings": report.warnings}
    inside = pair.drafter_inside_target
    if pair.target is not None:
        n, dtypes = _params(pair.target, drafter_only=False if inside else None)
        out["target"] = {"path": str(pair.target.path), "architecture": _arch(pair.target),
                         "parameters": n, "dtypes": _shares(dtypes),
                         "quantization": _quantization(pair.target, dtypes), **_safe(fam.summary, pair.target)}
    if pair.drafter is not None:
        n, dtypes = _params(pair.drafter, drafter_only=True if inside else None)
        out["drafter"] = {"path": str(pair.drafter.path) + (" (mtp.* inside the target)" if inside else ""),
                          "architecture": "DSpark (mtp stages)" if inside else _arch(pair.drafter),
                          "parameters": n, "dtypes": _shares(dtypes), **_safe(fam.dspark_fields, pair.drafter),
                          "calibration": str(pair.calibration) if pair.calibration else None}
    return out


def _arch(source: Source) -> str:
    return ",".join(source.config.get("architectures") or [source.config.get("model_type", "?")])


def _shares(by_dtype: Counter) -> dict[str, float]:
    total = sum(by_dtype.values()) or 1
    return {k: round(v / total, 4) for k, v in by_dtype.most_common()}


def _safe(fn, source: Source) -> dict[str, Any]:
    """Summaries must not hide validation problems behind a crash: a bad field shows as '?'."""
    try:
        return fn(source)
    except Exception as e:  # noqa: BLE001 - the problem itself is reported by validation
        return {"unreadable": str(e)}


def render(info: dict[str, Any], console: Console) -> None:
    for role in ("target", "drafter"):
        if role not in info:
            continue
        table = Table(title=f"{role}: {info['family']}", show_header=False, title_justify="left")
        table.add_column(style="bold cyan")
        table.add_column()
        for key, value in info[role].items():
            if key == "parameters":
                value = f"{value:,} ({value / 1e6:.2f} M)"
            elif key == "dtypes":
                value = ", ".join(f"{k} {v:.0%}" for k, v in value.items())
            elif key == "calibration":
                value = value or "none (fit one with `dspark-build calibrate`)"
            table.add_row(key.replace("_", " "), escape(str(value)))
        console.print(table)
    for warning in info["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if info["ok"]:
        console.print("[green]✓ valid[/]" + (": target and drafter are consistent"
                                             if "target" in info and "drafter" in info else ""))
    else:
        console.print(f"[red]✗ {len(info['problems'])} problem(s):[/]")
        for problem in info["problems"]:
            console.print(f"  [red]•[/] {escape(problem)}")
