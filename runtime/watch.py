"""Which processes serve a Triton Python model, and whether they still run (Linux /proc).

Triton's Python backend runs each model instance in a stub process, a child of tritonserver whose
second argument is the model's `model.py`; a tensor-parallel verify model adds worker processes,
children of its stub started by multiprocessing. Triton does not notice when one of them dies (the
model stays READY and every call fails), so the orchestrator watches them with these functions and
reloads a model whose process is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ModelProcess:
    pid: int
    role: str  # "backend stub" | "tensor-parallel worker"
    shm_region: str = ""  # a stub's shared-memory region (/dev/shm/NAME), which it leaves behind if killed


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it does not exist."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def model_processes(server_pid: int, model: str) -> list[ModelProcess]:
    """The live processes of `model` under the tritonserver `server_pid`: stubs, then their workers."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
    suffix = f"/{model}/1/model.py"
    stubs = [pid for pid in children.get(server_pid, []) if len(args := _cmdline(pid)) > 1 and args[1].endswith(suffix)]
    workers = [pid for stub in stubs for pid in children.get(stub, []) if "spawn_main" in " ".join(_cmdline(pid))]
    return [ModelProcess(p, "backend stub", _cmdline(p)[2] if len(_cmdline(p)) > 2 else "") for p in sorted(stubs)] \
        + [ModelProcess(p, "tensor-parallel worker") for p in sorted(workers)]


def first_dead(processes: list[ModelProcess]) -> ModelProcess | None:
    """The first of `processes` that has exited (a zombie counts: it only waits to be collected)."""
    for process in processes:
        stat = _stat(process.pid)
        if stat is None or stat[0] in ("Z", "X"):
            return process
    return None
