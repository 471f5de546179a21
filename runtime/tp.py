"""Tensor parallelism: one process per rank, torch.distributed over gloo (CPU) or NCCL (one GPU per rank).

`DistributedTarget` looks like a single target runner. Rank 0 lives in the calling process; ranks
1..N-1 are worker processes that mirror every call rank 0 receives (broadcast over a gloo control
group, on the host whatever the devices), so the collectives inside the forward pass line up. The
runners' own collectives (all_reduce, all_gather) use the default group: NCCL when the ranks are on
GPUs, gloo otherwise, chosen by the `backend` flag. The same code runs on CPU with gloo, which is how
the 8-GPU layout is exercised for real on a machine with no GPU.
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


BACKENDS = ("gloo", "nccl")
_control: Any = None  # the gloo group that carries rank 0's calls to the workers


def rank_devices(tp: int, gpus: list[int] | None) -> list[str]:
    """The device of each rank: cuda:<gpus[r]>, or the CPU for every rank without GPUs."""
    if not gpus:
        return ["cpu"] * tp
    if len(gpus) != tp:
        raise ValueError(f"tp={tp} ranks need {tp} GPU ids, got gpus={gpus}")
    return [f"cuda:{g}" for g in gpus]


def _on(device: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A runner's keyword arguments with its device (left out for the CPU, every runner's default)."""
    return kwargs if device == "cpu" else {**kwargs, "device": device}


def _init(rank: int, world: int, port: int, backend: str = "gloo", device: str = "cpu") -> None:
    global _control
    torch.set_num_threads(1)  # N ranks share the machine's cores
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    # Calls travel as pickled objects on the host: their own gloo group, whichever backend the collectives use
    # (so CPU runs take the GPU layout's code path).
    _control = dist.new_group(backend="gloo")


def _build(kind: str, path: Path, rank: int, kwargs: dict[str, Any]) -> Any:
    """Rank `rank` of family `kind`'s target runner."""
    from ..builder.families import family

    return family(kind, path).target_class()(path, rank=rank, **kwargs)


def _worker(rank: int, world: int, port: int, kind: str, path: Path, kwargs: dict[str, Any],
            backend: str = "gloo") -> None:
    _init(rank, world, port, backend, kwargs.get("device", "cpu"))
    runner = _build(kind, path, rank, kwargs)
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=_control)
        method, args, kw = message[0]
        if method == _STOP:
            break
        try:
            getattr(runner, method)(*args, **kw)
        except Exception:  # noqa: BLE001 - rank 0 raised the same error on the same call: stay in step
            traceback.print_exc()
    dist.destroy_process_group()


class DistributedTarget:
    """A target runner spread over `tp` processes; call it like the single-process runner.

    `gpus`: rank r runs on cuda:<gpus[r]> (none: every rank on the CPU). `backend`: the collectives'
    backend, NCCL with GPUs and gloo without by default."""

    def __init__(self, kind: str, target_dir: Path, tp: int, *, gpus: list[int] | None = None,
                 backend: str | None = None, **kwargs: Any) -> None:
        self.tp = tp
        devices = rank_devices(tp, gpus)
        backend = backend or ("nccl" if gpus else "gloo")
        if backend not in BACKENDS or (backend == "nccl" and not gpus):
            raise ValueError(f"backend {backend!r}: use gloo, or nccl with one GPU per rank (gpus=[...])")
        port = free_port()
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        self.workers = [ctx.Process(target=_worker, args=(r, tp, port, kind, Path(target_dir),
                                                          _on(devices[r], kwargs), backend), daemon=True)
                        for r in range(1, tp)]
        for w in self.workers:
            w.start()
        self._threads = torch.get_num_threads()
        _init(0, tp, port, backend, devices[0])
        self.local = _build(kind, Path(target_dir), 0, _on(devices[0], kwargs))
        self.config = self.local.config

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        dist.broadcast_object_list([(method, args, kwargs)], src=0, group=_control)
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
                dist.broadcast_object_list([(_STOP, (), {})], src=0, group=_control)
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


def open_target(kind: str, target_dir: Path, *, gpus: list[int] | None = None, **kwargs: Any) -> Any:
    """The right runner for a converted target: in-process for tp 1, DistributedTarget otherwise; rank r
    on cuda:<gpus[r]> when `gpus` is given, else on the CPU."""
    import json

    tp = json.loads((Path(target_dir) / "config.json").read_text())["mapping"]["tp_size"]
    if tp == 1:
        return _build(kind, Path(target_dir), 0, _on(rank_devices(1, gpus)[0], kwargs))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return DistributedTarget(kind, target_dir, tp, gpus=gpus, **kwargs)
