"""What every target runner shares: per-slot cache lengths, rollback, and the context-manager shape
that lets `runtime.tp.DistributedTarget` stand in for a runner."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class SlotRunner:
    """Base of the target runners. Subclasses set `self.lengths` (cached tokens per slot) and
    `self.config` (with `tp`, the number of tensor-parallel ranks)."""

    lengths: torch.Tensor
    config: Any

    def close(self) -> None:
        """Nothing to release in-process (DistributedTarget stops its workers here)."""

    def __enter__(self) -> SlotRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def rollback(self, slot: int, length: int) -> None:
        """Keep the first `length` cached tokens of `slot` (drops rejected draft tokens)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot}: cannot roll back to {length}, it holds {int(self.lengths[slot])}")
        self.lengths[slot] = length

    def continue_from(self, slots: list[int], start: list[int] | None) -> None:
        """Apply a forward's `start` argument: each slot continues from that many cached tokens."""
        if start is not None:
            for slot, length in zip(slots, start, strict=True):
                self.rollback(slot, length)

    # Tensor parallelism: where TensorRT-LLM communicates, so do the reference runners.

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial outputs of a row-parallel layer over the ranks."""
        if self.config.tp > 1:
            dist.all_reduce(x)
        return x

    def _head(self, logits: torch.Tensor, full: bool) -> torch.Tensor:
        """From this rank's vocabulary shard of the logits [..., V / tp]: all the logits (the shards
        concatenated), or with `full` False only each row's argmax over the whole vocabulary, for which
        the ranks exchange one (max, id) pair per row instead of their shards."""
        tp = self.config.tp
        if full:
            if tp == 1:
                return logits
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous())
            return torch.cat(parts, dim=-1)
        value, index = logits.max(dim=-1)
        if tp == 1:
            return index
        rank = dist.get_rank()
        pairs = torch.stack([value.double(), (index + rank * logits.shape[-1]).double()])
        parts = [torch.empty_like(pairs) for _ in range(tp)]
        dist.all_gather(parts, pairs)
        return first_maximum(torch.stack(parts))


def first_maximum(pairs: torch.Tensor) -> torch.Tensor:
    """pairs [ranks, 2, ...]: each vocabulary shard's (max value, global id), shards in vocabulary
    order. The id of the largest value, taken from the first shard that has it: torch.argmax's rule
    (first occurrence) over the whole row."""
    winner = pairs[:, 0].argmax(dim=0)
    return pairs[:, 1].gather(0, winner[None])[0].long()
