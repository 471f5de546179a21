"""In-flight batched speculative decoding with DSpark, and the in-process `generate()`.

`SpeculativeDecoder` owns the slots of a target runner and a drafter. Requests are admitted
(prefill + first token), then every `step()` runs one round for all live requests at once:

    draft γ tokens per request            (drafter, one batched call)
    choose verify lengths                  off: 0 · fixed: γ · auto: the confidence scheduler
    verify [x0, d_1..d_l] per request      (target, one batched call, different lengths per slot)
    accept (greedy or rejection sampling), roll back the target cache, feed the accepted tokens'
    features to the drafter's context, commit, finish requests on stop ids, stop strings or
    max_new_tokens.

Choosing the verify lengths is `_plan`: estimate survival from earlier rounds → decide whether drafting
pays (and, for the production scheduler, the lengths) → draft → lengths from this round's survival
where the paper's scheduler asks for them. Served, each round's model calls are timed (`_timed`) and
fed to `ServedCosts`, which corrects the cost table the plans use.

The Triton orchestrator drives the same object; `generate()` is the in-process loop used by tests,
calibration and benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .detok import IncrementalText
from .dspark.base import Draft
from .layers import to_host
from .scheduler import (
    DEFAULT_MIN_GAIN,
    CostTable,
    ServedCosts,
    plan_estimate,
    schedule_paper,
)
from .verify import verify_greedy, verify_sampling

Mode = Literal["off", "fixed", "auto"]
# A request's seed is any int64; the sampler is seeded with it modulo 2**64 (a negative seed is its
# two's-complement bit pattern, -1 -> 2**64 - 1), the full range of torch.Generator.manual_seed.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
EXPLORE_EVERY = 16  # with live costs, one in this many rounds that `auto` would not draft drafts anyway
# Survival estimates are scaled by observed / predicted acceptance per block position: decayed sums
# that start at this many rows of agreement and fade by this factor a round.
ADAPT_PRIOR_ROWS, ADAPT_DECAY = 4.0, 0.98


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    # End after the token that completes one of these (it stays in the output); needs the decoder's `decode`.
    stop_strings: tuple[str, ...] = ()
    speculation: Mode = "auto"
    gamma: int | None = None  # fixed mode's block; default: the drafter's block size


def generator_seed(seed: int) -> int:
    """The torch.Generator seed of a request seed in [SEED_MIN, SEED_MAX]."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an int64, in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    return seed % 2**64


def wire_seed(generator: torch.Generator) -> int:
    """A generator's seed as the int64 the draft model's SEEDS carries (inverse of generator_seed)."""
    seed = generator.initial_seed()
    return seed - 2**64 if seed > SEED_MAX else seed


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # length | stop | error (see `SpeculativeDecoder.errors`)
    taus: list[int] = field(default_factory=list)  # accepted drafts + 1, per round
    verified: list[int] = field(default_factory=list)  # draft tokens verified, per round

    @property
    def rounds(self) -> int:
        return len(self.taus)

    @property
    def mean_tau(self) -> float:
        return sum(self.taus) / len(self.taus) if self.taus else 0.0


@dataclass
class _Live:
    request: Request
    result: Result
    generator: torch.Generator
    anchor: int  # the last committed token: not yet run through the target
    cached: int = 0  # tokens of this request in the target's cache (all committed ones but the anchor)
    stale_survival: np.ndarray | None = None  # last round's (float64 [γ]), for the production scheduler
    text: IncrementalText | None = None  # the output's text so far, when the request has stop strings


class SpeculativeDecoder:
    """DSpark decoding over the slots of `target` (a target runner) and `drafter`."""

    def __init__(self, target: Any, drafter: Any, *, num_slots: int, cost_table: CostTable | None = None,
                 scheduler: Literal["paper", "production"] = "paper", min_gain: float = DEFAULT_MIN_GAIN,
                 record_calibration: bool = False, measure_costs: bool = False, adapt_survival: bool = True,
                 decode: Callable[[Sequence[int]], str] | None = None) -> None:
        self.target, self.drafter = target, drafter
        self.decode = decode  # token ids -> text, for stop strings
        self.cost_table = cost_table or CostTable.flat()
        # Served: plan with the table corrected by each round's measured times (see ServedCosts).
        self.served = ServedCosts(self.cost_table) if measure_costs else None
        self._round_end: float | None = None  # when the last round ended, unless a prefill ran since
        self._times: dict[str, float] = {}  # this round's model calls, in ms (see `_timed`)
        self._drafted_rows = 0
        self._skipped = 0  # rounds in which `auto` decided not to draft
        self.scheduler, self.min_gain = scheduler, min_gain
        self.free = list(range(num_slots))[::-1]
        # Mean survival of recent drafts: the estimate for a request that has not drafted yet.
        self.prior_survival = np.ones(drafter.block_size)
        # Acceptance each block position actually got against the survival predicted for it. A confidence
        # head drifts from its calibration (another workload, an untrained drafter); plans scale their
        # estimates by the ratio, so `auto` stops verifying (or drafting) blocks that are not accepted.
        self.adapt_survival = adapt_survival
        # Host arrays, like the estimates: the plans read them between two model calls every round.
        self._predicted = np.full(drafter.block_size, ADAPT_PRIOR_ROWS)
        self._observed = self._predicted.copy()
        self.live: dict[int, _Live] = {}
        # Slots whose own per-request work raised, with the reason: that request fails, its round
        # goes on for the others (their finish_reason is "error").
        self.errors: dict[int, str] = {}
        # (raw confidence logits, accepted flags) of every round that verified a full block, for STS.
        self.calibration_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record_calibration else None

    # -- admission -------------------------------------------------------------------------------

    def admit(self, requests: list[Request]) -> list[int]:
        """Prefill the prompts in one batch, draw each first token from the target; returns the slots."""
        if len(requests) > len(self.free):
            raise RuntimeError(f"{len(requests)} requests but only {len(self.free)} free slots")
        if any(not r.prompt for r in requests):
            raise ValueError("empty prompt")
        if any(r.stop_strings for r in requests) and self.decode is None:
            raise ValueError("stop strings need the tokenizer's decode: pass decode= to the decoder")
        if any(not stop for r in requests for stop in r.stop_strings):
            raise ValueError("stop strings must not be empty")
        slots = [self.free.pop() for _ in requests]
        self._round_end = None  # the prefill's time is not a round's overhead
        try:
            for slot in slots:
                self.drafter.reset(slot)
            # Logits only where a request samples: greedy ones need the target's argmax, which a
            # tensor-parallel target finds without gathering its vocabulary.
            head, features = self.target.forward(slots, [r.prompt for r in requests],
                                                 capture=self.drafter.target_layer_ids, start=[0] * len(slots),
                                                 logits=any(r.temperature > 0 for r in requests))
            self.drafter.add_context_batch(slots, features)
            head = to_host(head)
        except BaseException:
            self.free.extend(slots[::-1])  # the requests were never admitted: their slots are free again
            raise
        for i, (slot, request) in enumerate(zip(slots, requests, strict=True)):
            live = _Live(request, Result(), torch.Generator(), anchor=-1, cached=len(request.prompt),
                         text=IncrementalText(self.decode) if request.stop_strings else None)
            self.live[slot] = live
            with self._isolated(slot):
                live.generator.manual_seed(generator_seed(request.seed))
                self._commit(slot, [self._sample(head[i][-1], live)])
        return slots

    @contextmanager
    def _isolated(self, slot: int) -> Iterator[None]:
        """Run one request's own work: if it raises, that request ends with an error, nobody else does."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported to that request's client
            self.errors[slot] = f"{type(e).__name__}: {e}"
            self.live[slot].result.finish_reason = "error"

    def release(self, slot: int) -> Result:
        live = self.live.pop(slot)
        self.errors.pop(slot, None)
        self.free.append(slot)
        return live.result

    # -- one round -------------------------------------------------------------------------------

    def step(self) -> dict[int, list[int]]:
        """One decoding round for every live request; returns the tokens each slot committed."""
        slots = [s for s, live in self.live.items() if live.result.finish_reason is None]
        if not slots:
            return {}
        self._times, self._drafted_rows = {}, 0
        lengths, draft = self._plan(slots)
        verify_tokens = [[self.live[s].anchor] + draft.tokens[i, : lengths[i]].tolist() if lengths[i] else
                         [self.live[s].anchor] for i, s in enumerate(slots)]
        sampled = any(self.live[s].request.temperature > 0 for s in slots)
        with self._timed("verify"):
            head, features = self.target.forward(slots, verify_tokens, capture=self.drafter.target_layer_ids,
                                                 start=[self.live[s].cached for s in slots], logits=sampled)
            head = to_host(head)  # acceptance runs on the host; the features stay where the drafter reads them
        committed: dict[int, list[int]] = {}
        context: list[torch.Tensor] = []
        accepted_counts = []
        for i, slot in enumerate(slots):
            live, n = self.live[slot], lengths[i]
            accepted = 0
            with self._isolated(slot):
                if n:
                    drafts = draft.tokens[i, :n]
                    if live.request.temperature <= 0:
                        accepted, nxt = verify_greedy(drafts, head[i].argmax(dim=-1) if sampled else head[i])
                    else:
                        accepted, nxt = verify_sampling(drafts, draft.probs[i, :n], head[i],
                                                        live.request.temperature, live.generator)
                    new = drafts[:accepted].tolist() + [nxt]
                    if self.calibration_rows is not None and n == draft.tokens.shape[1]:
                        self.calibration_rows.append((draft.conf_logits[i], torch.arange(n) < accepted))
                else:
                    new = [self._sample(head[i][0], live)]
                committed[slot] = self._commit(slot, new)
            # x0 and the accepted drafts stay cached (the rest is rolled back by the next call's
            # `start`); their features join the drafter's context (a failed request's too: it is
            # released before the next round, and the batch keeps one row per slot).
            live.cached += 1 + accepted
            context.append(features[i][: 1 + accepted])
            live.result.taus.append(accepted + 1)
            live.result.verified.append(n)
            accepted_counts.append(accepted)
        if draft is not None and self.adapt_survival:
            positions = np.arange(draft.tokens.shape[1])
            verified_mask = positions < np.array(lengths)[:, None]
            accepted_mask = positions < np.array(accepted_counts)[:, None]
            survival = draft.survival.double().numpy()
            self._predicted = ADAPT_DECAY * (self._predicted + (survival * verified_mask).sum(0))
            self._observed = ADAPT_DECAY * (self._observed + accepted_mask.sum(0))
        self.drafter.add_context_batch(slots, context)
        if self.served is not None:
            self._observe_costs(len(slots), lengths)
        return committed

    @contextmanager
    def _timed(self, call: str) -> Iterator[None]:
        """Time one model call of this round into `_times` (what `ServedCosts` learns from)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._times[call] = self._times.get(call, 0.0) + (time.perf_counter() - began) * 1000

    def _observe_costs(self, rows: int, lengths: list[int]) -> None:
        """Report this round to `ServedCosts`: its model calls, and everything else since the last round
        ended (planning, accepting, and whatever the caller did with the tokens, e.g. sending them)."""
        end = time.perf_counter()
        verify_ms, draft_ms = self._times.get("verify", 0.0), self._times.get("draft", 0.0)
        other = None if self._round_end is None else (end - self._round_end) * 1000 - verify_ms - draft_ms
        tokens = rows * (1 + max(lengths)) if self.cost_table.padded else rows + sum(lengths)
        self.served.observe(rows, tokens, verify_ms, self._drafted_rows, draft_ms, other)
        self._round_end = end

    @property
    def table(self) -> CostTable:
        """The cost table plans are made with: the profiled one, corrected by served rounds if measured."""
        return self.cost_table if self.served is None else self.served.table

    def _plan(self, slots: list[int]) -> tuple[list[int], Draft | None]:
        """Estimate → decide → draft → verify lengths, for the requests of one round (rows as in `slots`)."""
        lives = [self.live[s] for s in slots]
        budget = [live.request.max_new_tokens - len(live.result.tokens) - 1 for live in lives]
        speculating = [i for i, live in enumerate(lives) if live.request.speculation != "off" and budget[i] > 0]
        if not speculating:
            return [0] * len(slots), None
        drafts, planned = self._decide(lives, speculating)
        if not drafts:
            return [0] * len(slots), None
        with self._timed("draft"):
            on_device = self.drafter.draft([slots[i] for i in speculating], [lives[i].anchor for i in speculating],
                                           [lives[i].request.temperature for i in speculating],
                                           [lives[i].generator for i in speculating], self.drafter.block_size)
            # The scheduler reads survival where the drafter made it (on a GPU: the DSparkSchedule kernel);
            # the rest of the round works on the host copy, as the served path does with what the draft
            # model sends.
            draft = on_device.cpu()
        self._drafted_rows = len(speculating)
        lengths = self._verify_lengths(lives, speculating, planned, on_device, budget)
        # Only now, after planning: the production scheduler must plan with an EARLIER round's survival.
        survival = draft.survival.double().numpy()  # a cumulative product, computed on each access
        for row, i in enumerate(speculating):
            lives[i].stale_survival = survival[row]
        self.prior_survival = 0.9 * self.prior_survival + 0.1 * survival.mean(0)
        return lengths, _spread(draft, speculating, len(slots))

    def _decide(self, lives: list[_Live], speculating: list[int]) -> tuple[bool, list[int] | None]:
        """Before drafting: whether to draft this round, and the verify lengths when they can be decided
        now (the production scheduler with every request on `auto`), both from estimated survival."""
        if not all(lives[i].request.speculation == "auto" for i in speculating):
            return True, None
        estimate = self._estimate(lives, speculating)
        planned = None
        if self.scheduler == "production" and len(speculating) == len(lives):
            # The production plan reads earlier rounds' survival only, so one evaluation decides both.
            pays, lengths = plan_estimate(estimate, self.table, self.min_gain, len(speculating))
            planned = lengths.tolist()
        else:  # whether drafting pays (`drafting_pays`)
            pays = plan_estimate(estimate, self.table, drafting_rows=len(speculating))[0]
        if not pays:
            # Live costs and survival only change in rounds that draft: without an occasional one, a
            # draft cost measured while the machine was busy (or a cold first call) would never be
            # revised and `auto` would never draft again.
            self._skipped += 1
            pays = self.served is not None and self._skipped % EXPLORE_EVERY == 0
        return pays, planned

    def _verify_lengths(self, lives: list[_Live], speculating: list[int], planned: list[int] | None,
                        draft: Draft, budget: list[int]) -> list[int]:
        """Drafts each row verifies: `fixed` its γ, `auto` the plan (decided before drafting, or now by the
        scheduler: the paper's from this round's survival), all capped at the row's token budget."""
        gamma = self.drafter.block_size
        lengths = list(planned) if planned is not None else [0] * len(lives)
        auto = [i for i in speculating if lives[i].request.speculation == "auto"]
        if planned is None and auto:
            if self.scheduler == "paper":  # this round's confidences, early stop
                chosen = schedule_paper(draft.survival[[speculating.index(i) for i in auto]], self.table)
            else:  # earlier rounds' confidences: `schedule_production` on the host estimate, as in `_decide`
                chosen = plan_estimate(self._estimate(lives, speculating)[auto], self.table, self.min_gain)[1]
            for i, n in zip(auto, chosen.tolist(), strict=True):
                lengths[i] = n
        for i in speculating:
            request = lives[i].request
            if request.speculation == "fixed":
                lengths[i] = min(request.gamma or gamma, gamma)
            lengths[i] = min(lengths[i], budget[i])
        return lengths

    def _estimate(self, lives: list[_Live], speculating: list[int]) -> np.ndarray:
        """Survival [R, γ] known before drafting: each request's last round (the recent mean for a fresh
        one), zeros for requests that do not speculate. In numpy on the host: served, this and the plan
        run between two model calls every round, where each torch op costs several times its numpy
        twin (docs/measurements.md)."""
        estimate = np.zeros((len(lives), self.drafter.block_size))
        for i in speculating:
            stale = lives[i].stale_survival
            estimate[i] = stale if stale is not None else self.prior_survival
        if self.adapt_survival:  # scaled by observed / predicted acceptance, kept a survival curve
            estimate = np.minimum.accumulate(np.clip(estimate * (self._observed / self._predicted), 0.0, 1.0), axis=1)
        return estimate

    # -- helpers ---------------------------------------------------------------------------------

    def _sample(self, head: torch.Tensor, live: _Live) -> int:
        """The next token from one position of the target's output: its logits [V], or (in a batch
        where nobody samples) its argmax id."""
        if live.request.temperature <= 0:
            return int(head) if head.dim() == 0 else int(head.argmax())
        probs = torch.softmax(head.float() / live.request.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=live.generator)[0])

    def _commit(self, slot: int, tokens: list[int]) -> list[int]:
        """Append tokens to the result, stopping at a stop id or the token budget."""
        live = self.live[slot]
        request, result = live.request, live.result
        kept = []
        for token in tokens:
            kept.append(token)
            result.tokens.append(token)
            if token in request.stop_ids or self._completes_stop_string(live, token):
                result.finish_reason = "stop"
                break
            if len(result.tokens) >= request.max_new_tokens:
                result.finish_reason = "length"
                break
        live.anchor = kept[-1]
        return kept

    @staticmethod
    def _completes_stop_string(live: _Live, token: int) -> bool:
        """Whether `token` completes one of the request's stop strings (its text is tracked incrementally)."""
        if live.text is None:
            return False
        new = live.text.add([token])
        # A stop string that this token completes ends inside its text.
        tail = live.text.text[-(len(new) + max(map(len, live.request.stop_strings)) - 1):] if new else ""
        return any(stop in tail for stop in live.request.stop_strings)


def _spread(draft: Draft, rows: list[int], total: int) -> Draft:
    """`draft`'s rows placed at `rows` of a draft of `total` rows (zeros for the rows that did not draft)."""
    if len(rows) == total:
        return draft
    gamma = draft.tokens.shape[1]
    full = Draft(torch.zeros(total, gamma, dtype=torch.long), torch.zeros(total, gamma, draft.probs.shape[-1]),
                 torch.zeros(total, gamma), torch.zeros(total, gamma))
    for row, i in enumerate(rows):
        full.tokens[i], full.probs[i] = draft.tokens[row], draft.probs[row]
        full.conf_logits[i], full.confidence[i] = draft.conf_logits[row], draft.confidence[row]
    return full


def run(decoder: SpeculativeDecoder, requests: list[Request]) -> list[Result]:
    """Decode all `requests` with in-flight batching over the decoder's slots; results in request order."""
    pending = list(enumerate(requests))[::-1]
    results: dict[int, Result] = {}
    owner: dict[int, int] = {}
    while pending or decoder.live:
        batch = [pending.pop() for _ in range(min(len(pending), len(decoder.free)))]
        if batch:
            for (index, _), slot in zip(batch, decoder.admit([r for _, r in batch]), strict=True):
                owner[slot] = index
        decoder.step()
        for slot in [s for s, live in decoder.live.items() if live.result.finish_reason is not None]:
            results[owner.pop(slot)] = decoder.release(slot)
    return [results[i] for i in range(len(requests))]


def generate(target: Any, drafter: Any, requests: list[Request], *, num_slots: int | None = None,
             **decoder_options: Any) -> list[Result]:
    """In-process DSpark decoding of `requests` (the yardstick the served path is measured against)."""
    decoder = SpeculativeDecoder(target, drafter, num_slots=num_slots or len(requests), **decoder_options)
    return run(decoder, requests)
