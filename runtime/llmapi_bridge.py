"""The TensorRT-LLM route's request translation (used by model_repository/llmapi/dspark_llmapi).

A client request of our ensemble becomes the inputs of tensorrtllm_backend's llmapi model
(`text_input`, `streaming`, `sampling_param_*`, `return_finish_reason`), and that model's streamed
`text_output` becomes our responses. Kept free of Triton so that it is tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_TOKENS = 64  # as the reference orchestrator


class BridgeError(ValueError):
    """A request this route cannot serve as asked; the message names the field and why."""


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    value = inputs.get(name)
    if value is None:
        return None
    value = np.asarray(value).reshape(-1)
    if value.size != 1:
        raise BridgeError(f"{name} must hold one value, got {value.size}")
    item = value[0]
    return item.decode() if isinstance(item, bytes) else item.item() if hasattr(item, "item") else item


def llmapi_inputs(inputs: dict[str, np.ndarray], prompt: str, *, max_prompt_tokens: int,
                  max_new_tokens: int) -> dict[str, np.ndarray]:
    """The llmapi model's input tensors for one of our requests (`inputs`: our dspark-style names)."""
    prompt_tokens = int(np.asarray(inputs["INPUT_IDS"]).size)
    if prompt_tokens == 0 or prompt_tokens > max_prompt_tokens:
        raise BridgeError(f"INPUT_IDS: the prompt has {prompt_tokens} tokens, expected 1..{max_prompt_tokens}")
    speculation = _scalar(inputs, "SPECULATION") or "auto"
    if speculation != "auto":
        raise BridgeError(f"SPECULATION {speculation!r}: the TensorRT-LLM route serves only 'auto' (its DSpark "
                          "speculation is configured per server in tensorrt_llm/1/model.yaml)")
    if _scalar(inputs, "GAMMA") is not None:
        raise BridgeError("GAMMA: the TensorRT-LLM route has no per-request block length (max_draft_len in model.yaml)")
    if inputs.get("STOP_IDS") is not None and np.asarray(inputs["STOP_IDS"]).size:
        raise BridgeError("STOP_IDS: tensorrtllm_backend's llmapi model takes stop strings only (use STOP)")
    max_tokens = _scalar(inputs, "MAX_TOKENS")
    max_tokens = min(DEFAULT_MAX_TOKENS, max_new_tokens) if max_tokens is None else int(max_tokens)
    if not 1 <= max_tokens <= max_new_tokens:
        raise BridgeError(f"MAX_TOKENS must be in 1..{max_new_tokens}, got {max_tokens}")
    temperature = _scalar(inputs, "TEMPERATURE")
    temperature = 0.0 if temperature is None else float(temperature)
    if not (np.isfinite(temperature) and temperature >= 0):
        raise BridgeError(f"TEMPERATURE must be a finite number >= 0, got {temperature}")
    out = {"text_input": np.asarray([prompt.encode()], dtype=np.object_),
           "streaming": np.asarray([True]),
           "sampling_param_max_tokens": np.asarray([max_tokens], dtype=np.int32),
           "sampling_param_exclude_input_from_output": np.asarray([True]),
           "return_finish_reason": np.asarray([True])}
    if temperature == 0:  # greedy, as the reference: keep only the most likely token
        out["sampling_param_top_k"] = np.asarray([1], dtype=np.int32)
    else:
        out["sampling_param_temperature"] = np.asarray([temperature], dtype=np.float32)
    seed = _scalar(inputs, "SEED")
    if seed is not None:
        if int(seed) < 0:
            raise BridgeError(f"SEED must be >= 0, got {seed}")
        out["sampling_param_seed"] = np.asarray([int(seed)], dtype=np.uint64)
    stop = inputs.get("STOP")
    if stop is not None and np.asarray(stop).size:
        out["sampling_param_stop"] = np.asarray(stop, dtype=np.object_).reshape(-1)
    return out


@dataclass
class TextStream:
    """Turns the llmapi model's streamed `text_output` into new text and token ids per response.

    TensorRT-LLM's `CompletionOutput.text` is the whole completion so far, so each response's new
    text is what follows the previous one. The ids are the completion re-tokenised (the llmapi model
    returns text only): their count is what clients see as tokens, which may differ slightly from the
    tokens TensorRT-LLM generated where a re-tokenisation merges differently.
    """

    tokenizer: Any
    text: str = ""
    ids: list[int] = field(default_factory=list)

    def update(self, completion: str) -> tuple[str, list[int]]:
        new = completion[len(self.text):] if completion.startswith(self.text) else completion
        self.text = completion if completion.startswith(self.text) else self.text + completion
        ids = self.tokenizer.encode(self.text, add_special_tokens=False).ids
        fresh = ids[len(self.ids):] if ids[:len(self.ids)] == self.ids else ids[min(len(self.ids), len(ids)):]
        self.ids = ids
        return new, fresh

    def stats(self) -> dict[str, Any]:
        return {"tokens": len(self.ids), "route": "tensorrt-llm"}
