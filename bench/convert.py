"""Convert throughput and memory on a synthetic checkpoint of at least 2 GB.

    python bench/convert.py [--gb 2.0] [--tp 8] [--repeats 2]

Builds (once, cached under build/bench-convert/) a Qwen3 fixture scaled to the requested size,
then in the same run times a plain copy of the same files and `dspark-build convert --tp N`,
alternating them so both see the same machine state. Prints throughput in GB/s, the
convert / copy throughput ratio and the peak RSS of the convert process, and writes
bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench-convert"
console = Console()


def fixture_for(gb: float) -> Path:
    """A Qwen3 pair of about `gb` GB: 24 layers, widths scaled until the weights reach the size."""
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    layers = 24
    # Per layer about 9 H^2 bf16 parameters (attention 3 H^2, gated MLP with I = 2H 6 H^2); H = 128 * scale.
    scale = 1
    while 2 * 9 * (128 * scale) ** 2 * layers < gb * 1e9:
        scale += 1
    out = WORK / f"qwen3-scale{scale}-layers{layers}"
    if not (out / "target" / "config.json").is_file():
        console.print(f"building a {gb:.1f} GB fixture (scale {scale}, {layers} layers) in {out} ...")
        shutil.rmtree(out, ignore_errors=True)
        write_qwen3_fixture(out, seed=0, scale=scale, layers=layers)
    return out


def weight_files(pair: Path) -> list[Path]:
    return sorted((pair / "target").glob("*.safetensors")) + sorted((pair / "drafter").glob("*.safetensors"))


def plain_copy(files: list[Path], dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f"{f.parent.name}-{f.name}")
    elapsed = time.perf_counter() - start
    shutil.rmtree(dst)
    return elapsed


def timed_convert(pair: Path, out: Path, tp: int) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one convert process."""
    cmd = [sys.executable, "-m", "dspark_trt.builder.cli", "convert", "--target", str(pair / "target"),
           "--drafter", str(pair / "drafter"), "--tp", str(tp), "-o", str(out), "--force", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"convert failed with exit code {os.waitstatus_to_exitcode(status)}")
    shutil.rmtree(out)
    return elapsed, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size to build (default 2.0)")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    pair = fixture_for(args.gb)
    files = weight_files(pair)
    size = sum(f.stat().st_size for f in files)
    for f in files:  # read once so that copy and convert both start from a warm page cache
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    copies, converts, rss = [], [], []
    for i in range(args.repeats):
        console.print(f"round {i + 1}/{args.repeats}: copy, then convert --tp {args.tp}")
        copies.append(plain_copy(files, WORK / "copy"))
        seconds, peak = timed_convert(pair, WORK / "ckpt", args.tp)
        converts.append(seconds)
        rss.append(peak)
    copy_s, convert_s = min(copies), min(converts)
    result = {
        "checkpoint_gb": size / 1e9, "tp": args.tp, "repeats": args.repeats,
        "copy_seconds": copies, "convert_seconds": converts,
        "copy_gb_per_s": size / 1e9 / copy_s, "convert_gb_per_s": size / 1e9 / convert_s,
        "throughput_ratio_convert_to_copy": copy_s / convert_s, "peak_rss_gb": max(rss),
    }
    table = Table(title=f"convert --tp {args.tp} on a {size / 1e9:.2f} GB checkpoint (best of {args.repeats})")
    for column in ("plain copy GB/s", "convert GB/s", "convert / copy", "convert peak RSS"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['copy_gb_per_s']:.2f}", f"{result['convert_gb_per_s']:.2f}",
                  f"{result['throughput_ratio_convert_to_copy']:.2f}x", f"{result['peak_rss_gb']:.2f} GB")
    console.print(table)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {results / 'convert.json'}")


if __name__ == "__main__":
    main()
