"""Shared set-up for the serving benchmarks: a converted fixture, a repository, a running server."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench-serve"


def fixture_checkpoint(tp: int = 1, ckpt: Path | None = None) -> Path:
    """The given checkpoint, or the Qwen3 fixture converted with `tp` (built once, cached)."""
    if ckpt is not None:
        return ckpt
    from dspark_trt.builder.convert import convert
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    out = WORK / f"ckpt-tp{tp}"
    if not (out / "manifest.json").is_file():
        if not (WORK / "pair" / "target").is_dir():
            write_qwen3_fixture(WORK / "pair")
        convert(WORK / "pair" / "target", WORK / "pair" / "drafter", out, tp=tp, force=True, show_progress=False)
    return out


def serve(ckpt: Path, *, slots: int, name: str, **repo_options):
    from dspark_trt.builder.repo import build_repo
    from dspark_trt.builder.serve import start_server
    from dspark_trt.runtime.tp import free_port

    repo = WORK / f"repo-{name}"
    build_repo(ckpt, repo, num_slots=slots, force=True, **repo_options)
    ports = [free_port() for _ in range(3)]
    return start_server(repo, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], timeout=600)


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.endpoints["metrics"], timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M))


def group_rss_mb(pid: int) -> float:
    """Resident memory of a process group (the server, its model stubs and their workers), in MB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pid:  # field 5 of /proc/PID/stat: the process group id
                rss = (stat.parent / "statm").read_text().split()[1]
                total += int(rss) * 4096
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e6
