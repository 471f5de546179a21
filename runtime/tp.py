"""Tensor parallelism on CPU: one process per rank, torch.distributed over gloo.

`DistributedTarget` looks like a single target runner. Rank 0 lives in the calling process; ranks
1..N-1 are worker processes that mirror every call rank 0 receives (broadcast over the process
group), so the collectives inside the forward pass line up. This is how the 8-GPU layout is
exercised for real on a machine with no GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_STOP = "__stop__"


def python_executable() -> str:
    """The interpreter for worker processes. Inside Triton's Python backend `sys.executable` is the
    backend stub, not Python; `dspark-build serve` exports DSPARK_PYTHON for that case."""
    exe = os.environ.get("DSPARK_PYTHON") or sys.executable
    if not exe or not Path(exe).name.startswith("python"):
        exe = shutil.which("python3") or shutil.which("python") or exe
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)  # N ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))


def _build(kind: str, path: Path, rank: int, kwargs: dict[str, Any]) -> Any:
    if kind == "qwen3":
        from .qwen3 import Qwen3Target

        return Qwen3Target(path, rank=rank, **kwargs)
    if kind == "deepseek-v4":
        from .deepseek_v4 import DeepseekV4Target

        return DeepseekV4Target(path, rank=rank, **kwargs)
    if kind == "gemma4":
        from .gemma4 import Gemma4Target

        return Gemma4Target(path, rank=rank, **kwargs)
    raise ValueError(f"unknown target kind {kind!r}")


def _worker(rank: int, world: int, port: int, kind: str, path: Path, kwargs: dict[str, Any]) -> None:
    _init(rank, world, port)
    runner = _build(kind, path, rank, kwargs)
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        method, args, kw = message[0]
        if method == _STOP:
            break
        try:
            getattr(runner, method)(*args, **kw)
        except Exception:  # noqa: BLE001 - rank 0 raised the same error on the same call: stay in step
            traceback.print_exc()
    dist.destroy_process_group()


class DistributedTarget:
    """A target runner spread over `tp` processes; call it like the single-process runner."""

    def __init__(self, kind: str, target_dir: Path, tp: int, **kwargs: Any) -> None:
        self.tp = tp
        port = free_port()
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        self.workers = [ctx.Process(target=_worker, args=(r, tp, port, kind, Path(target_dir), kwargs), daemon=True)
                        for r in range(1, tp)]
        for w in self.workers:
            w.start()
        self._threads = torch.get_num_threads()
        _init(0, tp, port)
        self.local = _build(kind, Path(target_dir), 0, kwargs)
        self.config = self.local.config

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        dist.broadcast_object_list([(method, args, kwargs)], src=0)
        return getattr(self.local, method)(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", *args, **kwargs)

    def rollback(self, slot: int, length: int) -> None:
        self._call("rollback", slot, length)

    def reset(self, slot: int) -> None:
        self._call("reset", slot)

    @property
    def lengths(self) -> torch.Tensor:
        return self.local.lengths

    def close(self) -> None:
        if not dist.is_initialized():
            return
        try:
            if all(w.is_alive() for w in self.workers):  # else the group is broken: no one to tell
                dist.broadcast_object_list([(_STOP, (), {})], src=0)
                for w in self.workers:
                    w.join(timeout=30)
        except RuntimeError:  # a worker already died (e.g. the whole process group got SIGTERM)
            pass
        finally:
            for w in self.workers:
                if w.is_alive():
                    w.terminate()
            dist.destroy_process_group()
            torch.set_num_threads(self._threads)

    def __enter__(self) -> DistributedTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_target(kind: str, target_dir: Path, **kwargs: Any) -> Any:
    """The right runner for a converted target: in-process for tp 1, DistributedTarget otherwise."""
    import json

    tp = json.loads((Path(target_dir) / "config.json").read_text())["mapping"]["tp_size"]
    if tp == 1:
        return _build(kind, Path(target_dir), 0, kwargs)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return DistributedTarget(kind, target_dir, tp, **kwargs)
