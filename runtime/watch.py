"""Which processes serve a Triton Python model, and whether they still run (Linux /proc).

Triton's Python backend runs each model instance in a stub process, a child of tritonserver whose
second argument is the model's `model.py`; a tensor-parallel verify model adds worker processes,
children of its stub started by multiprocessing. Triton does not notice when one of them dies (the
model stays READY and every call fails), so the orchestrator watches them with these functions and
reloads a model whose process is gone.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC = Path("/proc")
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class ModelProcess:
    pid: int
    role: str  # "backend stub" | "tensor-parallel worker"
    shm_region: str = ""  # a stub's shared-memory region (/dev/shm/NAME), which it leaves behind if killed


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie is dead, it only waits for its parent to collect it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _stat(pid)
    return state is None or state[0] != "Z"


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


@dataclass(frozen=True)
class ProcessTree:
    """One look at /proc: every live process's children (zombies left out)."""

    children: dict[int, list[int]]

    @classmethod
    def scan(cls) -> ProcessTree:
        children: dict[int, list[int]] = {}
        for entry in PROC.iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
                children.setdefault(stat[1], []).append(int(entry.name))
        return cls(children)


def model_processes(server_pid: int, model: str, tree: ProcessTree | None = None) -> list[ModelProcess]:
    """The live processes of `model` under the tritonserver `server_pid`: stubs, then their workers
    (`tree`: a scan of /proc to read them from, shared by several models; default a fresh one)."""
    children = (tree or ProcessTree.scan()).children
    suffix = f"/{model}/1/model.py"
    # An instance's stub is given its name, MODEL_GROUP_INDEX; the short-lived stub that only reads the
    # model's config at load time is not an instance.
    instance = re.compile(rf"{re.escape(model)}_\d+_\d+")
    stubs = [pid for pid in children.get(server_pid, []) if len(args := _cmdline(pid)) > 2
             and args[1].endswith(suffix) and any(instance.fullmatch(a) for a in args[2:])]
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


class ModelWatch:
    """Reloads a model whose process died, from inside another Triton Python model.

    A thread looks at the known processes of `models` every `interval` s (and at once after `wake`): a
    few reads of /proc/PID/stat. Finding them takes a scan of all of /proc, which costs milliseconds of a
    core the models need, so it runs once for all models: every look for `rescan` s after the processes
    last changed (start-up, when tensor-parallel workers appear after their stub; a reload), then every
    `rescan` s. When one has died it calls `on_dead(model, reason)` (which may fail requests), unloads
    the model and loads it again (the server must run with explicit model control), removes the
    shared-memory region the killed stub left, and calls `on_reloaded(model)`. While that runs the model
    is not ready, so neither is the server (strict readiness). `pb_utils` is passed in: it only exists
    inside Triton. `ipc` must be held by every other message this process sends to the server:
    model-loading calls beside them aborted tritonserver 2.51 (boost::interprocess::lock_exception in
    the Python backend).
    """

    def __init__(self, pb_utils: Any, models: tuple[str, ...], ipc: threading.Lock,
                 on_dead: Callable[[str, str], None] = lambda model, reason: None,
                 on_reloaded: Callable[[str], None] = lambda model: None, interval: float = 0.5,
                 rescan: float = 10.0) -> None:
        self.pb_utils, self.models, self.ipc, self.interval, self.rescan = pb_utils, models, ipc, interval, rescan
        self.on_dead, self.on_reloaded = on_dead, on_reloaded
        self.server = os.getppid()  # a Python model's stub is a child of tritonserver
        self.processes: dict[str, list[ModelProcess]] = {}  # as last seen alive
        self.scanned = -float("inf")  # when /proc was last scanned (time.monotonic)
        self.changed = time.monotonic()  # when a scan last found a process not known before
        self.stopped, self.wake = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="dspark-model-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def diagnose(self) -> str | None:
        """Which watched process died, if one did (and look again now)."""
        for model, processes in list(self.processes.items()):
            dead = first_dead(processes)
            if dead is not None:
                self.wake.set()
                return f"the {model} model's {dead.role} (pid {dead.pid}) died"
        return None

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            tree, now = None, time.monotonic()
            if now - self.changed < self.rescan or now - self.scanned >= self.rescan:
                tree, self.scanned = ProcessTree.scan(), now
            for model in self.models:
                try:
                    self._check(model, tree)
                except Exception as e:  # noqa: BLE001 - keep watching; the next look retries, not at once
                    _log(f"watching {model}: {type(e).__name__}: {e}")
                    self.stopped.wait(5)

    def _check(self, model: str, tree: ProcessTree | None) -> None:
        known = self.processes.get(model, [])
        dead = first_dead(known)
        if dead is None:
            if tree is not None:  # also picks up processes started since (tensor-parallel workers at start-up)
                found = sorted(set(known) | set(model_processes(self.server, model, tree)), key=lambda p: p.pid)
                if found != known:
                    self.processes[model], self.changed = found, time.monotonic()
            return
        reason = f"the {model} model's {dead.role} (pid {dead.pid}) died"
        _log(f"{reason}; reloading {model}")
        self.on_dead(model, reason)
        # Unload first: a reload in place would keep the dead instance "ready" until the new one is,
        # and leave its shared memory behind. load_model returns once the model is ready.
        with self.ipc:
            self.pb_utils.unload_model(model)
        while not self.stopped.is_set():
            try:
                with self.ipc:
                    self.pb_utils.load_model(model)
                break
            except Exception as e:  # noqa: BLE001 - stays not ready (truthfully) and retries
                _log(f"reloading {model} failed: {e}; retrying")
            time.sleep(2)
        self.processes[model], self.changed = model_processes(self.server, model), time.monotonic()
        for process in known:  # what the killed stubs left in /dev/shm (unloading frees the rest)
            if process.shm_region and "/" not in process.shm_region:
                (SHM / process.shm_region).unlink(missing_ok=True)
        self.on_reloaded(model)
        _log(f"{model} reloaded")


def _log(message: str) -> None:
    print(f"dspark: {message}", file=sys.stderr, flush=True)
