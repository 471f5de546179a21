"""Streaming generation against the dspark ensemble over gRPC (tritonclient)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


class RequestError(RuntimeError):
    """The server answered a request with an error."""


@dataclass
class Chunk:
    """One streamed response: new token ids and their text; the last one has finish_reason and stats."""

    ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None
    time: float = 0.0


@dataclass
class Completion:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each chunk with tokens
    chunk_sizes: list[int] = field(default_factory=list)  # tokens in each of those chunks
    start: float = 0.0

    def add(self, chunk: Chunk) -> None:
        self.ids += chunk.ids
        self.text += chunk.text
        if chunk.ids:
            self.chunk_times.append(chunk.time)
            self.chunk_sizes.append(len(chunk.ids))
        if chunk.finish_reason:
            self.finish_reason, self.stats = chunk.finish_reason, chunk.stats or {}


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    dtype = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}.get(
        value.dtype, "BYTES")
    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def request_inputs(prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                   seed: int | None = None, stop: list[str] | None = None, stop_ids: list[int] | None = None,
                   speculation: str | None = None, gamma: int | None = None,
                   extra: dict[str, np.ndarray] | None = None) -> list[grpcclient.InferInput]:
    """The ensemble's input tensors; parameters left as None take the server's defaults."""
    if isinstance(prompt, str):
        inputs = [_input("text_input", np.asarray([prompt.encode()], dtype=np.object_))]
    else:
        inputs = [_input("input_ids", np.asarray(prompt, dtype=np.int32))]
    scalars = {"max_tokens": (max_tokens, np.int32), "temperature": (temperature, np.float32),
               "seed": (seed, np.int64), "gamma": (gamma, np.int32)}
    for name, (value, dtype) in scalars.items():
        if value is not None:
            inputs.append(_input(name, np.asarray([value], dtype=dtype)))
    if speculation is not None:
        inputs.append(_input("speculation", np.asarray([speculation.encode()], dtype=np.object_)))
    if stop:
        inputs.append(_input("stop", np.asarray([s.encode() for s in stop], dtype=np.object_)))
    if stop_ids:
        inputs.append(_input("stop_ids", np.asarray(stop_ids, dtype=np.int32)))
    for name, value in (extra or {}).items():
        inputs.append(_input(name, value))
    return inputs


def chunk_of(result: Any) -> Chunk:
    """A streamed ensemble response as a Chunk."""
    ids = result.as_numpy("output_ids")
    text = result.as_numpy("text_output")
    reason = result.as_numpy("finish_reason")
    stats = result.as_numpy("stats")
    decode = lambda a: a.reshape(-1)[0].decode() if a is not None and a.size else ""  # noqa: E731
    return Chunk([] if ids is None else ids.reshape(-1).tolist(), decode(text), decode(reason) or None,
                 json.loads(decode(stats)) if decode(stats) else None, time.perf_counter())


def stream(url: str, prompt: str | list[int], *, model: str = "ensemble", timeout: float = 120,
           client: grpcclient.InferenceServerClient | None = None, **params: Any) -> Iterator[Chunk]:
    """Stream one completion chunk by chunk. Raises RequestError if the server rejects the request."""
    own = client is None
    client = client or grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, request_inputs(prompt, **params), request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise RequestError(error.message() if hasattr(error, "message") else str(error))
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("output_ids") is not None:
                yield chunk_of(result)
            if final:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        if own:
            client.close()


def complete(url: str, prompt: str | list[int], **params: Any) -> Completion:
    """Run one streamed completion to the end and gather it."""
    out = Completion(start=time.perf_counter())
    for chunk in stream(url, prompt, **params):
        out.add(chunk)
    return out


def complete_http(url: str, prompt: str | list[int], *, model: str = "ensemble", timeout: float = 120,
                  **params: Any) -> Completion:
    """One-shot completion over HTTP (Triton's generate_stream endpoint), gathered from its events."""
    import urllib.error
    import urllib.request

    body: dict[str, Any] = {"text_input": prompt} if isinstance(prompt, str) else {"input_ids": list(prompt)}
    body.update({k: v for k, v in params.items() if v is not None})
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    out = Completion(start=time.perf_counter())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RequestError(event["error"])
                ids = event.get("output_ids", [])
                out.add(Chunk(ids if isinstance(ids, list) else [ids], event.get("text_output", ""),
                              event.get("finish_reason") or None,
                              json.loads(event["stats"]) if event.get("stats") else None, time.perf_counter()))
    except urllib.error.HTTPError as e:
        raise RequestError(http_error_message(e.read().decode(errors="replace"))) from None
    return out


def http_error_message(body: str) -> str:
    """The server's message in an HTTP error body (`{"error": ...}`, possibly as a server-sent event)."""
    text = body.strip().removeprefix("data:").strip()
    try:
        message = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return body.strip()
    return message if isinstance(message, str) else body.strip()
