"""Server side of the dspark_verify / dspark_draft wire protocol (the messages: runtime/protocol.py).

Each handler owns a runner and its per-slot state and turns one batched request (numpy arrays by
name, read into the endpoint's request message) into one batched response message. The Triton
models are thin wrappers around these, and in-process tests call them directly.

Both models hold per-slot state (caches, drafter context, samplers), so only the orchestrator may
call them: `dspark-build serve` gives every model process a key in the environment
(DSPARK_INTERNAL_KEY), the orchestrator sends it as a request parameter on each call, and a call
without it is refused. Every field is still validated as if it came from outside before any state
changes: a malformed call fails alone and cannot reach a tensor-parallel worker.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

import numpy as np
import torch

from .generate import generator_seed
from .layers import to_host
from .loader import checkpoint_family, open_drafter, open_target
from .protocol import DRAFT, VERIFY, DraftRequest, DraftResponse, Endpoint, VerifyRequest, VerifyResponse

KEY_ENV = "DSPARK_INTERNAL_KEY"  # set by `dspark-build serve`, inherited by every model process
KEY_PARAMETER = "dspark_internal_key"  # the request parameter the orchestrator sends it in


class OutOfSync(RuntimeError):
    """The orchestrator's idea of a slot's state differs from the model's (a bug, reported loudly)."""


class BadCall(ValueError):
    """A field of a call to an internal model is malformed or out of range; the message names it."""


def internal_key() -> str:
    """The key shared by the orchestrator and the internal models of this server process."""
    key = os.environ.get(KEY_ENV, "")
    if len(key) < 16:
        raise RuntimeError(f"environment variable {KEY_ENV} is {'too short' if key else 'not set'}: the internal "
                           "models only serve the orchestrator, which proves itself with this key. Start the server "
                           "with `dspark-build serve`, or export a random value of at least 16 characters "
                           "(e.g. `export DSPARK_INTERNAL_KEY=$(openssl rand -hex 16)`) before `tritonserver`")
    return key


def _vector(value: np.ndarray, name: str, rows: int, low: float, high: float) -> np.ndarray:
    """Field `name` as a vector of `rows` values in [low, high]."""
    if value.ndim != 1 or value.shape[0] != rows:
        raise BadCall(f"{name} must have shape [{rows}] (one value per slot), got {list(value.shape)}")
    if value.size and (not np.isfinite(value).all() or value.min() < low or value.max() > high):
        raise BadCall(f"{name} must lie in [{low:g}, {high:g}], got {value.min()}..{value.max()}")
    return value


def _slots(slots: np.ndarray, num_slots: int) -> list[int]:
    if slots.ndim != 1 or slots.size == 0:
        raise BadCall(f"SLOTS must have shape [B] with B >= 1, got {list(slots.shape)}")
    _vector(slots, "SLOTS", slots.size, 0, num_slots - 1)
    if len(set(slots.tolist())) != slots.size:
        raise BadCall(f"SLOTS must not repeat a slot, got {slots.tolist()}")
    return slots.astype(np.int64).tolist()


class VerifyHandler:
    endpoint = VERIFY  # the messages it takes and returns (runtime/protocol.py)

    def __init__(self, engine_dir: Path, *, num_slots: int, max_len: int, gpus: list[int] | None = None) -> None:
        """`gpus`: rank r of the target on cuda:<gpus[r]> (NCCL between ranks; Qwen3 verify steps replayed
        from CUDA graphs); none: on the CPU."""
        ckpt, manifest, fam = checkpoint_family(engine_dir)
        self.capture = tuple(manifest["dspark"]["target_layer_ids"])
        self.num_slots, self.max_len = num_slots, max_len
        graphs = {"cuda_graphs": True} if gpus and fam.cuda_graphs else {}
        self.target = open_target(ckpt, num_slots=num_slots, max_len=max_len, gpus=gpus, **graphs)
        self.vocab_size = self.target.config.vocab_size

    def validate(self, request: VerifyRequest) -> tuple[list[int], list[int], list[list[int]], bool]:
        """(slots, starts, tokens per slot, want_logits), or BadCall / OutOfSync naming the field."""
        slots = _slots(request.slots, self.num_slots)
        rows = len(slots)
        tokens = request.tokens
        if tokens.ndim != 2 or tokens.shape[0] != rows or tokens.shape[1] == 0:
            raise BadCall(f"TOKENS must have shape [{rows}, T] with T >= 1, got {list(tokens.shape)}")
        counts = _vector(request.counts, "COUNTS", rows, 1, tokens.shape[1]).astype(np.int64).tolist()
        starts = _vector(request.start, "START", rows, 0, self.max_len).astype(np.int64).tolist()
        rows_tokens = [row[:n].astype(np.int64).tolist() for row, n in zip(tokens, counts, strict=True)]
        for slot, start, row in zip(slots, starts, rows_tokens, strict=True):
            held = int(self.target.lengths[slot])
            if start > held:
                raise OutOfSync(f"slot {slot}: asked to continue at {start} but the cache holds {held} tokens")
            if start + len(row) > self.max_len:
                raise BadCall(f"slot {slot}: START {start} + COUNTS {len(row)} exceeds the cache length {self.max_len}")
            if min(row) < 0 or max(row) >= self.vocab_size:
                raise BadCall(f"TOKENS of slot {slot} must lie in [0, {self.vocab_size}), got {min(row)}..{max(row)}")
        return slots, starts, rows_tokens, bool(request.want_logits[0])

    def handle(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call as Triton carries it: tensors by name in, tensors by name out."""
        return self.respond(VerifyRequest.from_numpy(inputs)).to_numpy()

    def respond(self, request: VerifyRequest) -> VerifyResponse:
        slots, starts, tokens, want_logits = self.validate(request)
        counts = [len(t) for t in tokens]
        head, features = self.target.forward(slots, tokens, capture=self.capture, start=starts, logits=want_logits)
        head, features = to_host(head), to_host(features)  # one copy each off a GPU
        width = max(counts)
        top_ids = np.zeros((len(slots), width), dtype=np.int32)
        out_logits = np.zeros((len(slots), width, head[0].shape[-1] if want_logits else 0), dtype=np.float32)
        out_features = np.zeros((len(slots), width, features[0].shape[-1]), dtype=np.float32)
        for b, n in enumerate(counts):
            top_ids[b, :n] = (head[b].argmax(dim=-1) if want_logits else head[b]).numpy()
            if want_logits:
                out_logits[b, :n] = head[b].numpy()
            out_features[b, :n] = features[b].float().numpy()
        return VerifyResponse(top_ids=top_ids, logits=out_logits, features=out_features)

    def close(self) -> None:
        self.target.close()


class DraftHandler:
    endpoint = DRAFT  # the messages it takes and returns (runtime/protocol.py)

    def __init__(self, engine_dir: Path, *, num_slots: int, max_len: int, threads: int | None = None,
                 device: str = "cpu") -> None:
        if threads:  # torch threads of this process (the model's own: Triton runs each in a process)
            torch.set_num_threads(threads)
        ckpt, manifest, _ = checkpoint_family(engine_dir)
        on = {} if device == "cpu" else {"device": device}  # the drafter on verify's rank-0 GPU in the gpu layout
        self.drafter = open_drafter(ckpt, num_slots=num_slots, max_len=max_len, **on)
        self.generators = [torch.Generator() for _ in range(num_slots)]
        self.num_slots, self.max_len = num_slots, max_len
        self.vocab_size = json.loads((ckpt / "target" / "config.json").read_text())["vocab_size"]
        fc = getattr(self.drafter, "fc", None)
        self.feature_width = getattr(fc, "in_features", None)  # what the drafter reads, where it says

    def validate(self, request: DraftRequest) -> list[int]:
        """The slots of a well-formed call, or BadCall / OutOfSync naming the field; changes nothing."""
        slots = _slots(request.slots, self.num_slots)
        rows = len(slots)
        features = request.ctx_features
        width = self.feature_width
        if features.ndim != 3 or features.shape[0] != rows or (width is not None and features.shape[2] != width):
            raise BadCall(f"CTX_FEATURES must have shape [{rows}, N, {width or 'F'}], got {list(features.shape)}")
        if not np.isfinite(features).all():
            raise BadCall("CTX_FEATURES must be finite")
        counts = _vector(request.ctx_counts, "CTX_COUNTS", rows, 0, features.shape[1])
        starts = _vector(request.ctx_start, "CTX_START", rows, 0, self.max_len)
        for slot, start, count in zip(slots, starts.tolist(), counts.tolist(), strict=True):
            held = int(self.drafter.ctx_len[slot])
            if start not in (0, held):
                raise OutOfSync(f"slot {slot}: context starts at {start} but the drafter holds {held}")
            if start + count > self.max_len:
                raise BadCall(f"slot {slot}: CTX_START {start} + CTX_COUNTS {count} exceeds the context length "
                              f"{self.max_len}")
        _vector(request.anchors, "ANCHORS", rows, 0, self.vocab_size - 1)
        _vector(request.temperatures, "TEMPERATURES", rows, 0, 100)
        _vector(request.seeds, "SEEDS", rows, -(2**63), 2**63 - 1)
        _vector(request.gamma, "GAMMA", 1, 1, self.drafter.block_size)
        return slots

    def handle(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call as Triton carries it: tensors by name in, tensors by name out."""
        return self.respond(DraftRequest.from_numpy(inputs)).to_numpy()

    def respond(self, request: DraftRequest) -> DraftResponse:
        slots = self.validate(request)
        for i, slot in enumerate(slots):
            if int(request.ctx_start[i]) == 0:
                self.drafter.reset(slot)
                self.generators[slot].manual_seed(generator_seed(int(request.seeds[i])))
        features = torch.from_numpy(request.ctx_features)
        self.drafter.add_context_batch(slots, [features[i, :n] for i, n in enumerate(request.ctx_counts.tolist())])
        draft = self.drafter.draft(slots, request.anchors.astype(np.int64).tolist(),
                                   request.temperatures.astype(float).tolist(), [self.generators[s] for s in slots],
                                   int(request.gamma[0]))
        return DraftResponse.from_draft(draft)


def from_orchestrator(parameters: str, key: str) -> bool:
    """Whether a request's parameters (Triton's JSON) carry this server's internal key."""
    try:
        sent = json.loads(parameters or "{}").get(KEY_PARAMETER, "")
    except (ValueError, AttributeError):
        return False
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), key.encode())


def execute_batched(handler: VerifyHandler | DraftHandler, requests: list, pb_utils: object, key: str) -> list:
    """The `execute` of the dspark_verify / dspark_draft Triton models (pb_utils is passed in because
    it only exists inside Triton's Python backend). A failure answers its request, the model stays up."""
    endpoint: Endpoint = handler.endpoint
    responses = []
    for request in requests:
        if not from_orchestrator(request.parameters(), key):
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{endpoint.model} is internal to the dspark orchestrator and serves no clients: send requests "
                "to the `ensemble` model")))
            continue
        try:
            inputs = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in endpoint.request.names()}
            outputs = handler.handle(inputs)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{endpoint.model}: {e}")))
    return responses
