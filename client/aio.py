"""asyncio streaming client: many concurrent streams from one event loop (used by `dspark-client bench`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import tritonclient.grpc.aio as grpcaio

from .stream import Chunk, Completion, RequestError, chunk_of, request_inputs


async def astream(client: grpcaio.InferenceServerClient, prompt: str | list[int], *, model: str = "ensemble",
                  **params: Any) -> AsyncIterator[Chunk]:
    """Stream one completion; each request gets its own gRPC stream so it can end independently."""

    async def one_request():
        yield {"model_name": model, "inputs": request_inputs(prompt, **params), "request_id": uuid.uuid4().hex,
               "enable_empty_final_response": True}

    async for result, error in client.stream_infer(one_request()):
        if error is not None:
            raise RequestError(str(error))
        if result.as_numpy("output_ids") is not None:
            yield chunk_of(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            return


async def acomplete(client: grpcaio.InferenceServerClient, prompt: str | list[int], **params: Any) -> Completion:
    out = Completion(start=time.perf_counter())
    async for chunk in astream(client, prompt, **params):
        out.add(chunk)
    return out
