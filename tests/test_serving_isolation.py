"""One request's data fails that request only; the internal models check every field they receive.

In process, over the same wire protocol the served models speak (runtime/model_handlers.py)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_pair
from tokenizers import Tokenizer

from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.model_handlers import (
    KEY_PARAMETER,
    BadCall,
    DraftHandler,
    OutOfSync,
    VerifyHandler,
    from_orchestrator,
)
from dspark_trt.runtime.serving import Limits, Orchestrator, ParamError, RemoteDrafter, RemoteTarget, parse_request

LIMITS = Limits(max_prompt_tokens=8, max_new_tokens=32, block_size=5, vocab_size=100)


class Collector:
    def __init__(self, fail_after: int | None = None) -> None:
        self.ids, self.errors, self.reason, self.done = [], [], None, threading.Event()
        self.fail_after = fail_after  # raise from send() like a response sender whose client is gone

    def send(self, tokens, prefix, finish_reason, stats):
        if self.fail_after is not None and len(self.ids) >= self.fail_after:
            raise RuntimeError("the response sender is closed")
        self.ids += tokens
        if finish_reason is not None:
            self.reason = finish_reason
            self.done.set()

    def error(self, message):
        self.errors.append(message)
        self.done.set()

    def cancelled(self):
        return False


@pytest.fixture(scope="module")
def tokenizer(qwen3_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen3_ckpt / "tokenizer" / "tokenizer.json"))


def _orchestrator(ckpt: Path, tokenizer: Tokenizer, slots: int) -> Orchestrator:
    handlers = {"dspark_verify": VerifyHandler(ckpt, num_slots=slots, max_len=96),
                "dspark_draft": DraftHandler(ckpt, num_slots=slots, max_len=96)}
    call = lambda model, inputs: handlers[model].handle(inputs)  # noqa: E731
    return Orchestrator(RemoteTarget(call), RemoteDrafter(call, slots, 7, (1, 2, 4)), num_slots=slots,
                        decode=tokenizer.decode)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def expected(qwen3_ckpt: Path) -> list[list[int]]:
    target, drafter, _ = open_checkpoint(qwen3_ckpt, num_slots=len(PROMPTS), max_len=96)
    return [r.tokens for r in generate(target, drafter, [Request(p, max_new_tokens=12, speculation="off")
                                                         for p in PROMPTS])]


def _run(orch: Orchestrator, requests: list[Request], sinks: list[Collector]) -> None:
    for request, sink in zip(requests, sinks, strict=True):  # queued before the loop starts: one batch
        orch.submit(request, sink)
    orch.start()
    try:
        assert all(s.done.wait(60) for s in sinks)
    finally:
        orch.stop()


def test_a_bad_seed_in_a_batch_fails_that_request_only(qwen3_ckpt, tokenizer, expected) -> None:
    """A seed out of the generator's range, admitted in one batch with good requests: before, the
    whole prefill failed (every request in it); now only that request does, the others are unchanged."""
    requests = [Request(p, max_new_tokens=12, speculation="fixed") for p in PROMPTS]
    requests[1] = Request(PROMPTS[1], max_new_tokens=12, temperature=0.7, seed=2**70)
    sinks = [Collector() for _ in requests]
    _run(_orchestrator(qwen3_ckpt, tokenizer, 4), requests, sinks)
    assert len(sinks[1].errors) == 1 and "seed must be an int64" in sinks[1].errors[0]
    for i in (0, 2, 3):
        assert not sinks[i].errors and sinks[i].reason == "length" and sinks[i].ids == expected[i]


def test_negative_seeds_sample_beside_greedy_requests(qwen3_ckpt, tokenizer, expected) -> None:
    """A negative seed (any int64 is accepted) used to overflow the draft call's SEEDS tensor and fail
    the round of every request in it."""
    requests = [Request(p, max_new_tokens=12, speculation="fixed") for p in PROMPTS]
    requests[0] = Request(PROMPTS[0], max_new_tokens=12, temperature=0.8, seed=-1, speculation="fixed")
    requests[3] = Request(PROMPTS[3], max_new_tokens=12, temperature=0.8, seed=-(2**63), speculation="auto")
    sinks = [Collector() for _ in requests]
    _run(_orchestrator(qwen3_ckpt, tokenizer, 4), requests, sinks)
    assert all(not s.errors and s.reason == "length" and len(s.ids) == 12 for s in sinks)
    assert [sinks[1].ids, sinks[2].ids] == expected[1:3]


def test_a_failing_response_sender_fails_its_stream_only(qwen3_ckpt, tokenizer, expected) -> None:
    requests = [Request(p, max_new_tokens=12, speculation="auto") for p in PROMPTS]
    sinks = [Collector(fail_after=3 if i == 2 else None) for i in range(len(requests))]
    _run(_orchestrator(qwen3_ckpt, tokenizer, 4), requests, sinks)
    assert len(sinks[2].errors) == 1 and "the response sender is closed" in sinks[2].errors[0]
    assert [sinks[i].ids for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


@pytest.mark.parametrize("seed, message", [
    (np.array([2**63], dtype=np.uint64), "seed must be an int64, in [-9223372036854775808, 9223372036854775807]"),
    (np.array([0.5], dtype=np.float32), "seed must be an integer"),
])
def test_seeds_are_checked_at_admission(seed, message) -> None:
    with pytest.raises(ParamError, match=re.escape(message)):
        parse_request({"INPUT_IDS": np.array([1, 2]), "SEED": seed}, LIMITS)
    request = parse_request({"INPUT_IDS": np.array([1, 2]), "SEED": np.array([-7], dtype=np.int64)}, LIMITS)
    assert request.seed == -7


def _verify_call(**fields) -> dict[str, np.ndarray]:
    call = {"SLOTS": np.array([0], np.int32), "START": np.zeros(1, np.int32), "TOKENS": np.array([[5, 6, 7]], np.int32),
            "COUNTS": np.array([3], np.int32), "WANT_LOGITS": np.array([False])}
    return {**call, **fields}


@pytest.mark.parametrize("fields, error, message", [
    ({"SLOTS": np.array([-1], np.int32)}, BadCall, "SLOTS must lie in [0, 1], got -1..-1"),
    ({"SLOTS": np.array([2], np.int32)}, BadCall, "SLOTS must lie in [0, 1], got 2..2"),
    ({"SLOTS": np.array([0, 0], np.int32), "START": np.zeros(2, np.int32), "COUNTS": np.array([1, 1], np.int32),
      "TOKENS": np.array([[5], [6]], np.int32)}, BadCall, "SLOTS must not repeat a slot"),
    ({"TOKENS": np.array([[5, 10**6, 7]], np.int32)}, BadCall, "TOKENS of slot 0 must lie in [0, "),
    ({"TOKENS": np.array([[5, -3, 7]], np.int32)}, BadCall, "TOKENS of slot 0 must lie in [0, "),
    ({"COUNTS": np.array([4], np.int32)}, BadCall, "COUNTS must lie in [1, 3], got 4..4"),
    ({"COUNTS": np.array([3, 3], np.int32)}, BadCall, "COUNTS must have shape [1] (one value per slot), got [2]"),
    ({"START": np.array([-1], np.int32)}, BadCall, "START must lie in [0, 64], got -1..-1"),
    ({"START": np.array([9], np.int32)}, OutOfSync, "slot 0: asked to continue at 9 but the cache holds 3 tokens"),
    ({"TOKENS": np.zeros((1, 0), np.int32)}, BadCall, "TOKENS must have shape [1, T] with T >= 1, got [1, 0]"),
])
def test_verify_refuses_malformed_calls_and_changes_nothing(qwen3_ckpt, fields, error, message) -> None:
    verify = VerifyHandler(qwen3_ckpt, num_slots=2, max_len=64)
    good = verify.handle(_verify_call())
    with pytest.raises(error, match=re.escape(message)):
        verify.handle(_verify_call(**fields))
    assert verify.target.lengths.tolist() == [3, 0]
    np.testing.assert_array_equal(verify.handle(_verify_call())["TOP_IDS"], good["TOP_IDS"])


def test_a_bad_call_never_reaches_a_tensor_parallel_worker(qwen3_pair: Path, tmp_path: Path) -> None:
    """A token id out of range used to raise inside the second rank's forward and kill that process:
    every later call then failed. Now it is refused before anything is sent to the ranks."""
    verify = VerifyHandler(convert_pair(qwen3_pair, tmp_path / "tp2", tp=2), num_slots=2, max_len=64)
    try:
        with pytest.raises(BadCall, match="TOKENS of slot 1 must lie in"):
            verify.handle(_verify_call(SLOTS=np.array([1], np.int32), TOKENS=np.array([[5, 10**6, 7]], np.int32)))
        assert all(w.is_alive() for w in verify.target.workers)
        assert verify.handle(_verify_call())["TOP_IDS"].shape == (1, 3)
    finally:
        verify.close()


def _draft_call(width: int, **fields) -> dict[str, np.ndarray]:
    call = {"SLOTS": np.array([0], np.int32), "CTX_START": np.zeros(1, np.int32), "CTX_COUNTS": np.array([2], np.int32),
            "CTX_FEATURES": np.ones((1, 2, width), np.float32), "ANCHORS": np.array([5], np.int32),
            "TEMPERATURES": np.zeros(1, np.float32), "SEEDS": np.zeros(1, np.int64), "GAMMA": np.array([4], np.int32)}
    return {**call, **fields}


@pytest.mark.parametrize("fields, message", [
    ({"SLOTS": np.array([-1], np.int32)}, "SLOTS must lie in [0, 1], got -1..-1"),
    ({"ANCHORS": np.array([10**6], np.int32)}, "ANCHORS must lie in [0, "),
    ({"CTX_COUNTS": np.array([3], np.int32)}, "CTX_COUNTS must lie in [0, 2], got 3..3"),
    ({"CTX_START": np.array([5], np.int32)}, "slot 0: context starts at 5 but the drafter holds 2"),
    ({"GAMMA": np.array([0], np.int32)}, "GAMMA must lie in [1, 7], got 0..0"),
    ({"TEMPERATURES": np.array([np.inf], np.float32)}, "TEMPERATURES must lie in [0, 100]"),
    ({"CTX_FEATURES": np.ones((1, 2, 3), np.float32)}, "CTX_FEATURES must have shape [1, N, "),
    ({"CTX_FEATURES": np.full((1, 2, 0), np.nan, np.float32)}, "CTX_FEATURES must have shape"),
])
def test_draft_refuses_malformed_calls_and_changes_nothing(qwen3_ckpt, fields, message) -> None:
    draft = DraftHandler(qwen3_ckpt, num_slots=2, max_len=64)
    width = draft.feature_width
    draft.handle(_draft_call(width))
    with pytest.raises((BadCall, OutOfSync), match=re.escape(message)):
        draft.handle(_draft_call(width, **{k: v for k, v in fields.items()}))
    assert draft.drafter.ctx_len.tolist() == [2, 0]
    nan = _draft_call(width, CTX_START=np.array([2], np.int32), CTX_FEATURES=np.full((1, 2, width), np.nan, np.float32))
    with pytest.raises(BadCall, match="CTX_FEATURES must be finite"):
        draft.handle(nan)
    assert draft.drafter.ctx_len.tolist() == [2, 0]


def test_only_the_orchestrators_key_opens_the_internal_models() -> None:
    key = "k" * 32
    assert from_orchestrator(f'{{"{KEY_PARAMETER}": "{key}"}}', key)
    wrong = (f'{{"{KEY_PARAMETER}": "{key[:-1]}x"}}', f'{{"{KEY_PARAMETER}": 5}}')
    for parameters in ("", "{}", *wrong, "[1]", "not json"):
        assert not from_orchestrator(parameters, key), parameters
