"""A test drafter that is often right: it proves the decoding loop, not the drafter."""

from __future__ import annotations

import torch

from dspark_trt.runtime.dspark.base import Draft


class OracleDrafter:
    """Wraps the real drafter but proposes the target's own greedy continuation, with one token in
    three blocks corrupted, so that long acceptances, partial acceptances and rollbacks all happen."""

    def __init__(self, drafter, sequences: list[list[int]]) -> None:
        self.inner, self.sequences, self.admitted = drafter, sequences, 0
        self.slot_sequence: dict[int, list[int]] = {}
        self.gen = torch.Generator().manual_seed(0)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reset(self, slot: int) -> None:  # generate() admits requests in order
        self.slot_sequence[slot] = self.sequences[self.admitted]
        self.admitted += 1
        self.inner.reset(slot)

    def draft(self, slots, anchors, temperatures, generators, gamma=None) -> Draft:
        draft = self.inner.draft(slots, anchors, temperatures, generators, gamma)
        draft.tokens = draft.tokens.clone()  # an inference tensor; edits need a normal one
        for row, slot in enumerate(slots):
            pos = int(self.inner.ctx_len[slot])  # index of the anchor in prompt + output
            truth = self.slot_sequence[slot][pos + 1: pos + 1 + draft.tokens.shape[1]]
            draft.tokens[row, : len(truth)] = torch.tensor(truth, dtype=torch.long)
            if torch.rand((), generator=self.gen) < 1 / 3:
                k = int(torch.randint(0, draft.tokens.shape[1], (), generator=self.gen))
                draft.tokens[row, k] = (draft.tokens[row, k] + 1) % 1000
        return draft
