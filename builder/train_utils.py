"""What the target and drafter trainers share: determinism, the step budget, the LR schedule, progress."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)


def set_determinism(seed: int, threads: int) -> None:
    """Same seed, same step counts, same thread count -> the same weights, bit for bit.

    The thread count is part of the recipe because a matmul split over a different number of
    threads may add its partial sums in a different order.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


class StepBudget:
    """How many optimiser steps to run: given outright, or estimated from a wall-clock budget.

    With `minutes`, the first `probe` steps are timed and the total is fixed from their speed, once.
    The learning-rate warm-up is longer than the probe, so those steps do not depend on the total;
    rerunning with `steps=<the total reported>` therefore reproduces the run exactly.
    """

    def __init__(self, steps: int | None, minutes: float | None, probe: int = 10) -> None:
        if steps is None and minutes is None:
            raise ValueError("give steps or minutes")
        self.total, self.minutes, self.probe = steps, minutes, probe
        self.started = time.monotonic()

    def after_step(self, done: int) -> None:
        if self.total is None and done == self.probe:
            per_step = (time.monotonic() - self.started) / done
            self.total = max(done + 1, int(self.minutes * 60 / per_step))

    def running(self, done: int) -> bool:
        return self.total is None or done < self.total

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.started) / 60


def learning_rate(step: int, total: int | None, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor` x peak at `total`."""
    if step < warmup or total is None:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only: norms and biases are scales, not capacity."""
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Reporter:
    """A rich progress bar on a terminal; in a log file (no terminal), one line every `every` steps."""

    def __init__(self, progress: Progress, description: str, every: int = 100) -> None:
        self.progress, self.description, self.every = progress, description, every
        self.task = progress.add_task(description, total=None, status="")

    def update(self, step: int, total: int | None, status: str) -> None:
        self.progress.update(self.task, completed=step, total=total, status=status)
        logging = not self.progress.disable and not self.progress.console.is_terminal
        if logging and (step % self.every == 0 or step == total):
            self.progress.console.print(f"{self.description} {step}/{total or '?'} {status}")


@contextmanager
def progress_bar(description: str, quiet: bool = False) -> Iterator[Reporter]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        yield Reporter(progress, description)
