"""`dspark-build profile`: measure the SPS cost table the confidence scheduler plans with.

Times real verify steps of the target on this machine: for each batch size R and verify length l,
R slots that each hold `context` tokens run a forward of 1 + l tokens (the step the scheduler
sizes), then roll back. Warm-up steps are discarded and the lower quartile of the steady ones kept; the
grid is fitted to fixed + α(R) + θ(B) with θ forced monotone (builder/profile_table.py). The
drafter's round (context update + one block) is timed per R too, so `auto` can tell when drafting
costs more than it brings.
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..runtime.loader import open_checkpoint
from ..runtime.scheduler import CostTable
from .profile_table import fit_cost_table, profile_grid, steady_time

_NEW_CONTEXT = 3  # features a drafting round adds per request (τ ≈ 3 tokens committed per round)


def profile_checkpoint(ckpt: Path, *, batch_sizes: list[int], verify_lengths: list[int] | None = None,
                       context: int = 64, warmup: int = 2, steps: int = 15, progress: bool = True) -> CostTable:
    max_tokens = 1 + max(verify_lengths or [16])
    target, drafter, manifest = open_checkpoint(ckpt, num_slots=max(batch_sizes), max_len=context + max_tokens + 1)
    try:
        gamma = manifest["dspark"]["block_size"]
        verify_lengths = verify_lengths if verify_lengths is not None else list(range(gamma + 1))
        gen = torch.Generator().manual_seed(0)
        slots = list(range(max(batch_sizes)))
        vocab = target.config.vocab_size
        prompts = [torch.randint(0, vocab, (context,), generator=gen).tolist() for _ in slots]
        _, features = target.forward(slots, prompts, capture=drafter.target_layer_ids, logits=False)
        drafter.add_context_batch(slots, [f[:-_NEW_CONTEXT] for f in features])

        def measure(batch: int, tokens: int) -> float:
            # Every step continues from the same `context` cached tokens, and returns what greedy rounds
            # ask for (argmax ids; sampled rounds also fetch logits, which live costs account for).
            begin = time.perf_counter()
            target.forward(slots[:batch], [[1] * tokens] * batch, capture=drafter.target_layer_ids,
                           start=[context] * batch, logits=False)
            return time.perf_counter() - begin

        def measure_draft(batch: int) -> float:
            # A round's drafting: the last verify's features join each context, then one block per request.
            begin = time.perf_counter()
            drafter.add_context_batch(slots[:batch], [f[-_NEW_CONTEXT:] for f in features[:batch]])
            drafter.draft(slots[:batch], [1] * batch, [0.0] * batch, [None] * batch, gamma)
            seconds = time.perf_counter() - begin
            drafter.ctx_len[:batch] -= _NEW_CONTEXT  # the context slots 0..batch-1 held before
            return seconds

        samples = profile_grid(measure, batch_sizes, verify_lengths, warmup=warmup, steps=steps, progress=progress)
        for _ in range(warmup):
            measure_draft(max(batch_sizes))
        draft_ms = [1000 * steady_time([measure_draft(r) for _ in range(steps)]) for r in batch_sizes]
    finally:
        target.close()
    meta = {"backend": "reference", "family": manifest["family"], "tp": manifest["tp"], "context_tokens": context,
            "torch_threads": torch.get_num_threads(), "host": platform.node(), "machine": platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checkpoint": str(Path(ckpt).absolute()),
            "warmup_steps": warmup, "measured_steps": steps}
    # The reference target pads every request of a verify step to the longest.
    return replace(fit_cost_table(samples, meta), draft_step_ms=draft_ms, verify_batching="padded")
