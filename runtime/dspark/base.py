"""What every family's DSpark drafter shares: the draft it returns, the per-slot context bookkeeping,
loading the heads, and the sequential heads that turn a backbone's output into a draft.

A family's drafter (runtime/dspark/<family>.py) subclasses `SlotContext` and writes two things of its
own: `_write_context` (target features -> each draft layer's cached keys / values) and `backbone`
(the parallel part of a round: hidden states and base logits for the whole block). `SlotContext.draft`
then runs `sequential_heads`: the Markov head, sampling and the confidence head (runtime/heads.py),
left to right over the block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...plugins import launch
from ..calibration import CALIBRATION_FILE, read_calibration, survival
from ..errors import CheckpointError
from ..heads import ConfidenceHead, MarkovHead, sample
from ..layers import runner_device
from ..safetensors_io import SafetensorsCheckpoint


@dataclass
class Draft:
    """One round's proposals for a batch: tokens [B, γ], the distributions they came from [B, γ, V]
    ([B, γ, 0] when every row is greedy), raw confidence logits and calibrated confidences [B, γ],
    survival = cumprod(confidence)."""

    tokens: torch.Tensor
    probs: torch.Tensor
    conf_logits: torch.Tensor
    confidence: torch.Tensor

    @property
    def survival(self) -> torch.Tensor:
        return survival(self.confidence)

    def cpu(self) -> Draft:
        """This draft on the host (what the wire protocol sends; a no-op for a CPU drafter)."""
        return Draft(self.tokens.cpu(), self.probs.cpu(), self.conf_logits.cpu(), self.confidence.cpu())


def load_heads(weights: dict[str, torch.Tensor], draft_dir: Path, block_size: int, markov_kind: str,
               with_markov: bool, prefix: str = "", source: Path | None = None) -> tuple[MarkovHead, ConfidenceHead]:
    """The Markov and confidence heads a drafter holds under `prefix` (DeepSpec's names), the confidence
    head STS-calibrated from `draft_dir`/sts.json when that file exists. `source` names the weights in
    errors (default: `draft_dir`/rank0.safetensors)."""
    source = draft_dir / "rank0.safetensors" if source is None else source
    markov = MarkovHead.from_weights(markov_kind, weights, prefix, source=source)
    calibration = draft_dir / CALIBRATION_FILE
    temperatures = read_calibration(calibration, block_size) if calibration.is_file() else None
    return markov, ConfidenceHead.from_weights(weights, with_markov, prefix, temperatures)


class SlotContext:
    """What every drafter does with its per-slot context: the target features of committed tokens,
    turned into each draft layer's keys / values by `_write_context`, for many slots in one pass."""

    ctx_len: torch.Tensor  # [num_slots] tokens of context each slot holds (on the host: bookkeeping)
    max_len: int
    device = torch.device("cpu")  # where the drafter's weights and caches live

    @torch.inference_mode()
    def draft(self, slots: list[int], anchors: list[int], temperatures: list[float],
              generators: list[torch.Generator | None], gamma: int | None = None) -> Draft:
        """One round: the family's parallel `backbone` (hidden [B, γ, d], base logits [B, γ, V]), then the
        shared sequential heads. A family whose heads read something else overrides this (DeepSeek-V4)."""
        hidden, base_logits = self.backbone(slots, anchors, gamma)
        return sequential_heads(self.markov, self.confidence, hidden, base_logits,
                                torch.tensor(anchors, device=self.device), temperatures, generators)

    def backbone(self, slots: list[int], anchors: list[int], gamma: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _block(self, slots: list[int], anchors: list[int], gamma: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A round's block for `backbone`: ids [B, γ] (each anchor, then mask tokens), the slots [B] and the
        positions [B, γ] just past each slot's context, on the device; and ctx_len [B] on the host. Index
        tensors are made on the host (ctx_len is host bookkeeping) and copied to the device once."""
        ctx_len = self.ctx_len[slots]
        ids = torch.full((len(slots), gamma), self.mask_token_id, dtype=torch.long)
        ids[:, 0] = torch.tensor(anchors)
        positions = ctx_len[:, None] + torch.arange(gamma)
        return ids.to(self.device), torch.tensor(slots, device=self.device), positions.to(self.device), ctx_len

    def reset(self, slot: int) -> None:
        self.ctx_len[slot] = 0

    def add_context(self, slot: int, features: torch.Tensor) -> None:
        """Append target features [n, len(target_layer_ids) * hidden] of newly committed tokens."""
        self.add_context_batch([slot], [features])

    @torch.inference_mode()
    def add_context_batch(self, slots: list[int], features: list[torch.Tensor]) -> None:
        """`add_context` for several slots at once: one pass over the draft layers, not one per slot."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one context update: {slots}")
        kept = [(slot, f) for slot, f in zip(slots, features, strict=True) if f.shape[0]]
        if not kept:
            return
        kept_slots = [slot for slot, _ in kept]
        starts = self.ctx_len[kept_slots].tolist()
        ends = [start + f.shape[0] for (_, f), start in zip(kept, starts, strict=True)]
        for slot, end in zip(kept_slots, ends, strict=True):
            if end > self.max_len:
                raise ValueError(f"slot {slot}: context would exceed {self.max_len} tokens")
        if len(kept) == 1:  # one slot's new tokens are a slice of its positions: no index tensors
            self._write_context(kept_slots[0], slice(starts[0], ends[0]), kept[0][1])
        else:  # token t of the concatenation goes to slot slot_of[t], position positions[t]
            slot_of = torch.tensor([slot for slot, f in kept for _ in range(f.shape[0])], device=self.device)
            positions = torch.tensor([p for start, end in zip(starts, ends, strict=True) for p in range(start, end)],
                                     device=self.device)
            self._write_context(slot_of, positions, torch.cat([f for _, f in kept]))
        self.ctx_len[kept_slots] = torch.tensor(ends)

    def _write_context(self, slot_of: torch.Tensor | int, positions: torch.Tensor | slice,
                       features: torch.Tensor) -> None:
        raise NotImplementedError

    def _load_unsharded(self, draft_dir: Path, device: str | torch.device, dtype: torch.dtype | None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.dtype]:
        """What every drafter converted as one unsharded file set loads first: its config.json (refused
        unless tp 1), rank0.safetensors on `device` in the runner's dtype (layers.runner_device), the
        DSpark fields (block size, mask token, target layers) and the Markov / confidence heads.
        Sets those attributes and returns (config, weights, dtype) for the family's own layers."""
        self.device, dtype = runner_device(device, dtype)
        self.config = c = json.loads((draft_dir / "config.json").read_text())
        if c["mapping"]["tp_size"] != 1:
            raise CheckpointError(draft_dir / "config.json", "the reference drafter runs unsharded",
                                  subject="mapping.tp_size", found=c["mapping"]["tp_size"], expected=1)
        dspark = c["dspark"]
        ckpt = SafetensorsCheckpoint(draft_dir / "rank0.safetensors")
        self.w = w = {name: ckpt.get(name).to(device=self.device, dtype=dtype) for name in ckpt.tensors}
        self.block_size, self.mask_token_id = dspark["block_size"], dspark["mask_token_id"]
        self.target_layer_ids = tuple(dspark["target_layer_ids"])
        self.markov, self.confidence = load_heads(w, draft_dir, self.block_size, dspark["markov_head_type"],
                                                  dspark["confidence_head_with_markov"])
        return c, w, dtype


def sequential_heads(markov: MarkovHead, confidence: ConfidenceHead, hidden: torch.Tensor, base_logits: torch.Tensor,
                     anchors: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None],
                     confidence_hidden: torch.Tensor | None = None) -> Draft:
    """The cheap left-to-right part of a DSpark round, shared by every family's drafter.

    `confidence_hidden` is the confidence head's input where a family feeds it something other than
    `hidden` (DeepSeek-V4: the hidden before the final norm).

    An all-greedy batch returns probs [B, γ, 0]: greedy drafts are verified by argmax, so their
    (one-hot) distributions would carry nothing.

    On a GPU these steps run as the MarkovSample and DSparkConfidence kernels (plugins/kernels.py; the
    dispatch is `launch.use_kernels`); this torch code is the CPU path and their oracle.
    """
    if markov.kind in KERNEL_MARKOV_KINDS and launch.use_kernels(base_logits):
        return kernel_heads(markov, confidence, hidden, base_logits, anchors, temperatures, generators,
                            confidence_hidden)
    batch, gamma, _ = base_logits.shape
    greedy = all(t <= 0 for t in temperatures)
    tokens, probs, markov_embeddings = [], [], []
    prev, state = anchors, markov.initial_state(batch)
    for base, h in zip(base_logits.unbind(1), hidden.unbind(1), strict=True):
        bias, e, state = markov.step(prev, h, state)
        logits = base if bias is None else base + bias.float()
        if greedy:
            prev = logits.argmax(dim=-1)
        else:
            prev, p = sample(logits, temperatures, generators)
            probs.append(p)
        tokens.append(prev)
        markov_embeddings.append(e)
    # Confidence needs nothing drawn later, so all positions go in one call once the tokens exist.
    e = None if markov_embeddings[0] is None else torch.stack(markov_embeddings, dim=1)
    conf_logits = confidence.logit(hidden if confidence_hidden is None else confidence_hidden, e).float()
    return Draft(torch.stack(tokens, dim=1), torch.stack(probs, dim=1) if probs else base_logits[..., :0],
                 conf_logits, confidence.calibrated(conf_logits))


KERNEL_MARKOV_KINDS = ("vanilla", "gated", "rnn")  # MarkovSample's heads (kernels.KIND_IDS)


def kernel_heads(markov: MarkovHead, confidence: ConfidenceHead, hidden: torch.Tensor, base_logits: torch.Tensor,
                 anchors: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None],
                 confidence_hidden: torch.Tensor | None = None) -> Draft:
    """`sequential_heads` as the MarkovSample + DSparkConfidence kernels: greedy rows take the argmax (the
    same tokens as the torch path up to float ties); sampled rows draw from Philox with one seed per row,
    taken from the row's generator, so a request's drafts follow its own seed (not the torch path's draws)."""
    device = base_logits.device
    seeds = [0 if t <= 0 else int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for t, g in
             zip(temperatures, generators, strict=True)]
    out = launch.markov_sample(base_logits, hidden, anchors, torch.tensor(temperatures, device=device),
                               torch.tensor(seeds, dtype=torch.int32, device=device), markov.w1, markov.w2,
                               markov.proj_weight, markov.proj_bias, kind=markov.kind)
    sts = None if confidence.temperatures is None else torch.tensor(confidence.temperatures, device=device)
    conf = launch.dspark_confidence(hidden if confidence_hidden is None else confidence_hidden, out.markov_emb,
                                    confidence.weight, confidence.bias, sts)
    greedy = all(t <= 0 for t in temperatures)
    return Draft(out.tokens.long(), base_logits[..., :0] if greedy else out.probs, conf.logits, conf.confidence)
