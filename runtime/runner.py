"""What every target runner shares: per-slot cache lengths, rollback, and the context-manager shape
that lets `runtime.tp.DistributedTarget` stand in for a runner."""

from __future__ import annotations

import torch


class SlotRunner:
    """Base of the target runners. Subclasses set `self.lengths` (cached tokens per slot)."""

    lengths: torch.Tensor

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
