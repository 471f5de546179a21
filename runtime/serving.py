"""The serving core: request validation, remote runners, and the in-flight batching orchestrator.

Kept free of Triton imports so that it can be tested in-process; model_repository/dspark/1/model.py
plugs in Triton's BLS calls, response senders and metrics.

The orchestrator calls two endpoints, dspark_verify (the target, a KV cache per slot) and dspark_draft
(the drafter, a context per slot), once each per round with batched tensors: RemoteTarget and
RemoteDrafter below. Their messages are defined in runtime/protocol.py; how a message travels is the
`call` each is given (a BLS call to a model, or the drafter's handler in the orchestrator's process).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .detok import CONTEXT_TOKENS
from .dspark.base import Draft
from .generate import SEED_MAX, SEED_MIN, Request, SpeculativeDecoder, wire_seed
from .protocol import DRAFT, VERIFY, DraftRequest, DraftResponse, VerifyRequest, VerifyResponse

Call = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
SPECULATION_MODES = ("auto", "off", "fixed")
# What a request may carry, as the ensemble names its inputs.
PUBLIC_INPUTS = ("text_input", "input_ids", "max_tokens", "temperature", "seed", "stop", "stop_ids", "speculation",
                 "gamma")


class ParamError(ValueError):
    """A request parameter is missing, malformed or out of range; the message says which and why."""


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    block_size: int
    vocab_size: int


def _scalar(inputs: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = inputs.get(name)
    if value is None:
        return default
    array = np.asarray(value).reshape(-1)
    public = name.lower()  # the ensemble's input name, which is what users send
    if array.size != 1:
        raise ParamError(f"{public} must hold one value, got {array.size}")
    item = array[0]
    if kind is str:
        return item.decode() if isinstance(item, bytes) else str(item)
    if kind is int and not np.issubdtype(array.dtype, np.integer):
        raise ParamError(f"{public} must be an integer, got {array.dtype}")
    return kind(item)


def parse_request(inputs: dict[str, Any], limits: Limits,
                  parameters: dict[str, Any] | None = None) -> Request:
    """Validate one request's tensors; returns the decoding request (stop strings included).

    `parameters` are the request's Triton parameters. None are used: an unknown JSON field of an HTTP
    generate request arrives as one (e.g. `top_p`), and is refused like an unknown gRPC input."""
    for name in sorted(parameters or {}):
        raise ParamError(f"unexpected inference input '{name}' for model 'ensemble': it takes "
                         f"{', '.join(PUBLIC_INPUTS)}")
    ids = inputs.get("INPUT_IDS")
    if ids is None or np.asarray(ids).size == 0:
        raise ParamError("the prompt is empty: send text_input or input_ids")
    prompt = np.asarray(ids).reshape(-1).astype(np.int64)
    if prompt.size > limits.max_prompt_tokens:
        raise ParamError(f"the prompt has {prompt.size} tokens; this deployment accepts at most "
                         f"{limits.max_prompt_tokens} (parameter max_prompt_tokens of model dspark)")
    if prompt.min() < 0 or prompt.max() >= limits.vocab_size:
        raise ParamError(f"input_ids must lie in [0, {limits.vocab_size}), got {prompt.min()}..{prompt.max()}")
    max_tokens = _scalar(inputs, "MAX_TOKENS", int, min(64, limits.max_new_tokens))
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise ParamError(f"max_tokens must be in [1, {limits.max_new_tokens}], got {max_tokens}")
    temperature = _scalar(inputs, "TEMPERATURE", float, 0.0)
    if not (math.isfinite(temperature) and 0 <= temperature <= 100):
        raise ParamError(f"temperature must be in [0, 100] (0 = greedy), got {temperature}")
    speculation = _scalar(inputs, "SPECULATION", str, "auto")
    if speculation not in SPECULATION_MODES:
        raise ParamError(f"speculation must be one of {', '.join(SPECULATION_MODES)}, got {speculation!r}")
    gamma = _scalar(inputs, "GAMMA", int, limits.block_size)
    if not 1 <= gamma <= limits.block_size:
        raise ParamError(f"gamma must be in [1, {limits.block_size}] (the drafter's block size), got {gamma}")
    stop_ids = tuple(int(i) for i in np.asarray(inputs.get("STOP_IDS", []), dtype=np.int64).reshape(-1))
    if any(not 0 <= i < limits.vocab_size for i in stop_ids):
        raise ParamError(f"stop_ids must lie in [0, {limits.vocab_size})")
    stops = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(inputs.get("STOP", [])).reshape(-1)]
    if any(not s for s in stops):
        raise ParamError("stop strings must not be empty")
    seed = _scalar(inputs, "SEED", int, 0)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ParamError(f"seed must be an int64, in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    return Request(prompt.tolist(), max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                   stop_ids=stop_ids, stop_strings=tuple(stops), speculation=speculation, gamma=gamma)


# ---------------------------------------------------------------------------------------------
# Runners that live in other Triton models


def _pad(rows: Sequence[Sequence[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows))), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class RemoteTarget:
    """The target runner as seen from the orchestrator; the caches live in dspark_verify."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def forward(self, slots: list[int], tokens: list[list[int]], capture: tuple[int, ...] = (),
                start: list[int] | None = None, logits: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """As a target runner's forward: per slot its logits, or with `logits` False its argmax ids."""
        if start is None:
            raise ValueError("the remote target needs each slot's start position")
        counts = [len(t) for t in tokens]
        request = VerifyRequest(slots=slots, start=start, tokens=_pad(tokens), counts=counts, want_logits=[logits])
        out = VerifyResponse.from_numpy(self.call(VERIFY.model, request.to_numpy()))
        head = torch.from_numpy(out.logits) if logits else torch.from_numpy(out.top_ids).long()
        features = torch.from_numpy(out.features)
        return [head[b, :n] for b, n in enumerate(counts)], [features[b, :n] for b, n in enumerate(counts)]

    def close(self) -> None:
        pass


class RemoteDrafter:
    """The drafter as seen from the orchestrator: committed features wait here until the next draft call."""

    def __init__(self, call: Call, num_slots: int, block_size: int, target_layer_ids: Sequence[int]) -> None:
        self.call, self.block_size, self.target_layer_ids = call, block_size, tuple(target_layer_ids)
        self.ctx_len = torch.zeros(num_slots, dtype=torch.long)  # context the draft model holds
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.fresh: set[int] = set()

    def reset(self, slot: int) -> None:
        self.ctx_len[slot] = 0
        self.pending[slot] = []
        self.fresh.add(slot)

    def add_context_batch(self, slots: list[int], features: list[torch.Tensor]) -> None:
        for slot, f in zip(slots, features, strict=True):
            self.pending.setdefault(slot, []).append(f)

    def draft(self, slots: list[int], anchors: list[int], temperatures: list[float],
              generators: list[torch.Generator | None], gamma: int | None = None) -> Draft:
        new = [torch.cat(self.pending.get(s) or [torch.zeros(0, 0)]) for s in slots]
        width = max(1, max(f.shape[0] for f in new))
        feature_dim = max(f.shape[1] for f in new)
        ctx = np.zeros((len(slots), width, feature_dim), dtype=np.float32)
        for i, f in enumerate(new):
            ctx[i, : f.shape[0]] = f.float().numpy()
        request = DraftRequest(
            slots=slots, ctx_start=[0 if s in self.fresh else int(self.ctx_len[s]) for s in slots],
            ctx_counts=[f.shape[0] for f in new], ctx_features=ctx, anchors=anchors, temperatures=temperatures,
            seeds=[wire_seed(g) if g is not None else 0 for g in generators], gamma=[gamma or self.block_size])
        out = DraftResponse.from_numpy(self.call(DRAFT.model, request.to_numpy()))
        for i, s in enumerate(slots):
            self.ctx_len[s] += new[i].shape[0]
            self.pending[s] = []
            self.fresh.discard(s)
        return out.to_draft()


# ---------------------------------------------------------------------------------------------
# The orchestrator


class Sink(Protocol):
    """Where one request's responses go (a Triton response sender in production)."""

    def send(self, tokens: list[int], prefix: list[int], finish_reason: str | None, stats: dict | None) -> None: ...
    def error(self, message: str) -> None: ...
    def cancelled(self) -> bool: ...


class Metrics(Protocol):
    def round(self, verified: int, accepted: int) -> None: ...
    def load(self, active: int, queued: int) -> None: ...


@dataclass
class _Stream:
    request: Request
    sink: Sink
    request_id: str = ""
    sent: list[int] = field(default_factory=list)


class Orchestrator:
    """In-flight batching over all live requests: one background thread runs admit/draft/verify rounds.

    Failures stay as small as their cause: a request whose own work raises fails alone (the round goes
    on for the others); a failed model call fails the requests of that call; a dead model process
    (`dependency_failed`, from the process watch) fails every live and queued request once, and
    new requests are refused with the reason until `dependency_recovered`.
    """

    def __init__(self, target: Any, drafter: Any, *, num_slots: int, decode: Callable[[Sequence[int]], str],
                 metrics: Metrics | None = None, diagnose: Callable[[], str | None] | None = None,
                 **decoder_options: Any) -> None:
        self.decoder = SpeculativeDecoder(target, drafter, num_slots=num_slots, decode=decode, **decoder_options)
        self.metrics = metrics
        # Names a dead model process, if any: a failed model call is then reported as that.
        self.diagnose = diagnose or (lambda: None)
        self.queue: queue.Queue[_Stream] = queue.Queue()
        self.streams: dict[int, _Stream] = {}
        self._stop = threading.Event()
        self._cancelled_ids: set[str] = set()
        self._lock = threading.Lock()
        self.unavailable: str | None = None  # why requests are refused now (a model is being reloaded)
        self._fault: str | None = None  # a dead dependency the loop has not acted on yet
        self._fault_handled = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dspark-orchestrator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request, sink: Sink, request_id: str = "") -> None:
        with self._lock:
            refused = self.unavailable
            if refused is None:
                self.queue.put(_Stream(request, sink, request_id))
        if refused is not None:
            _error(sink, refused)

    def dependency_failed(self, reason: str) -> None:
        """A model process the rounds depend on died: its state (caches, contexts) is gone. Every live
        and queued request fails once with `reason`; new ones are refused until `dependency_recovered`."""
        with self._lock:
            self.unavailable = f"the server is recovering: {reason}; retry in a few seconds"
            self._fault = f"this request was stopped: {reason}. The server reloads the model by itself; retry " \
                          "in a few seconds"
            self._fault_handled.clear()

    def wait_fault_handled(self, timeout: float) -> bool:
        """Wait until the loop has failed the requests a `dependency_failed` concerned."""
        return self._fault_handled.wait(timeout)

    def dependency_recovered(self) -> None:
        with self._lock:
            self.unavailable = None

    def cancel(self, request_id: str) -> None:
        """Stop every live or queued request with this id (how a cancelled ensemble stream is noticed:
        Triton cancels the ensemble's next postprocessing step, which calls here)."""
        if request_id:
            with self._lock:
                self._cancelled_ids.add(request_id)

    def _is_cancelled(self, stream: _Stream) -> bool:
        with self._lock:
            return stream.sink.cancelled() or stream.request_id in self._cancelled_ids

    @property
    def active(self) -> int:
        return len(self.streams)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._fail_on_fault()
            try:
                self._admit()
                if not self.streams:
                    continue
                self._drop_cancelled()
                self._publish(self.decoder.step(), after_round=True)
            except Exception as e:  # noqa: BLE001 - a failed model call fails its round, not the server
                message = self._call_failed("a decoding round", e)
                for slot in list(self.streams):
                    self._finish(slot, error=message)
            if self.metrics:
                self.metrics.load(self.active, self.queue.qsize())

    def _call_failed(self, what: str, error: Exception) -> str:
        """The message for the requests of a failed batched call: a dead model process if that is the
        cause, else the error (its traceback goes to the server log)."""
        traceback.print_exc()
        dead = self.diagnose()
        if dead is not None:
            return f"this request was stopped: {dead}. The server reloads the model by itself; retry in a few seconds"
        return f"internal error in {what}: {type(error).__name__}: {error}"

    def _fail_on_fault(self) -> None:
        with self._lock:
            fault, self._fault = self._fault, None
        if fault is None:
            return
        for slot in list(self.streams):
            self._finish(slot, error=fault)
        while True:
            try:
                _error(self.queue.get_nowait().sink, fault)
            except queue.Empty:
                break
        self._fault_handled.set()

    def _admit(self) -> None:
        waiting: list[_Stream] = []
        block = not self.streams  # idle: wait for work instead of spinning
        while len(waiting) < len(self.decoder.free):
            try:
                stream = self.queue.get(timeout=0.05) if block and not waiting else self.queue.get_nowait()
            except queue.Empty:
                break
            if not self._is_cancelled(stream):
                waiting.append(stream)
        if not waiting:
            return
        try:
            slots = self.decoder.admit([s.request for s in waiting])
        except Exception as e:  # noqa: BLE001 - the prefill failed: these requests fail, the server stays up
            message = self._call_failed("the prefill that starts the request", e)
            for stream in waiting:
                _error(stream.sink, message)
            return
        for slot, stream in zip(slots, waiting, strict=True):
            self.streams[slot] = stream
            self._publish({slot: list(self.decoder.live[slot].result.tokens)}, after_round=False)

    def _drop_cancelled(self) -> None:
        for slot, stream in list(self.streams.items()):
            if self._is_cancelled(stream):
                self.decoder.release(slot)
                del self.streams[slot]
                try:
                    stream.sink.send([], [], "cancelled", None)
                except Exception:  # noqa: BLE001 - the client is gone either way
                    traceback.print_exc()
        with self._lock:
            live = {s.request_id for s in self.streams.values()}
            self._cancelled_ids &= live | {s.request_id for s in list(self.queue.queue)}

    def _publish(self, committed: dict[int, list[int]], after_round: bool) -> None:
        for slot, reason in list(self.decoder.errors.items()):
            if slot in self.streams:
                self._finish(slot, error=f"this request failed: {reason}")
        for slot, tokens in committed.items():
            if slot not in self.streams:
                continue
            try:  # one stream's response must not fail the others
                self._publish_one(slot, tokens, after_round)
            except Exception as e:  # noqa: BLE001 - reported to that request's client
                traceback.print_exc()
                if slot in self.streams:
                    self._finish(slot, error=f"this request failed: {type(e).__name__}: {e}")

    def _publish_one(self, slot: int, tokens: list[int], after_round: bool) -> None:
        stream, live = self.streams[slot], self.decoder.live[slot]
        if self.metrics and after_round:
            self.metrics.round(live.result.verified[-1], live.result.taus[-1] - 1)
        prefix = stream.sent[-CONTEXT_TOKENS:]
        stream.sent.extend(tokens)
        stream.sink.send(tokens, prefix, None, None)
        if live.result.finish_reason is not None:
            self._finish(slot)

    def _finish(self, slot: int, error: str | None = None) -> None:
        stream = self.streams.pop(slot)
        result = self.decoder.release(slot)
        if error is not None:
            _error(stream.sink, error)
            return
        stats = {"tokens": len(result.tokens), "rounds": result.rounds, "mean_tau": round(result.mean_tau, 4),
                 "verified_tokens": sum(result.verified), "accepted_tokens": sum(result.taus) - result.rounds,
                 "finish_reason": result.finish_reason}
        stream.sink.send([], stream.sent[-CONTEXT_TOKENS:], result.finish_reason, stats)


def _error(sink: Sink, message: str) -> None:
    """Answer a request with an error; a client that is already gone is no one else's problem."""
    try:
        sink.error(message)
    except Exception:  # noqa: BLE001 - nothing more can be told to this client
        traceback.print_exc()


def stats_json(stats: dict | None) -> str:
    return json.dumps(stats, sort_keys=True) if stats else ""
