"""Server side of the dspark_verify / dspark_draft wire protocol (see runtime/serving.py).

Each handler owns a runner and its per-slot state and turns one batched request (numpy arrays by
name) into one batched response. The Triton models are thin wrappers around these, and in-process
tests call them directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .loader import FAMILIES, resolve_checkpoint
from .manifest import read_manifest
from .tp import open_target


class OutOfSync(RuntimeError):
    """The orchestrator's idea of a slot's state differs from the model's (a bug, reported loudly)."""


class VerifyHandler:
    def __init__(self, engine_dir: Path, *, num_slots: int, max_len: int) -> None:
        ckpt = resolve_checkpoint(engine_dir)
        manifest = read_manifest(ckpt, "checkpoint")
        kind = FAMILIES[manifest["family"]][0]
        self.capture = tuple(manifest["dspark"]["target_layer_ids"])
        self.target = open_target(kind, ckpt / "target", num_slots=num_slots, max_len=max_len)

    def handle(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slots = inputs["SLOTS"].astype(np.int64).tolist()
        starts, counts = inputs["START"].tolist(), inputs["COUNTS"].tolist()
        for slot, start in zip(slots, starts, strict=True):
            held = int(self.target.lengths[slot])
            if start > held:
                raise OutOfSync(f"slot {slot}: asked to continue at {start} but the cache holds {held} tokens")
        tokens = [row[:n].tolist() for row, n in zip(inputs["TOKENS"], counts, strict=True)]
        want_logits = bool(inputs["WANT_LOGITS"].reshape(-1)[0])
        head, features = self.target.forward(slots, tokens, capture=self.capture, start=starts, logits=want_logits)
        width = max(counts)
        top_ids = np.zeros((len(slots), width), dtype=np.int32)
        out_logits = np.zeros((len(slots), width, head[0].shape[-1] if want_logits else 0), dtype=np.float32)
        out_features = np.zeros((len(slots), width, features[0].shape[-1]), dtype=np.float32)
        for b, n in enumerate(counts):
            top_ids[b, :n] = (head[b].argmax(dim=-1) if want_logits else head[b]).numpy()
            if want_logits:
                out_logits[b, :n] = head[b].numpy()
            out_features[b, :n] = features[b].float().numpy()
        return {"TOP_IDS": top_ids, "LOGITS": out_logits, "FEATURES": out_features}

    def close(self) -> None:
        self.target.close()


class DraftHandler:
    def __init__(self, engine_dir: Path, *, num_slots: int, max_len: int, threads: int | None = None) -> None:
        from importlib import import_module

        if threads:  # torch threads of this process (the model's own: Triton runs each in a process)
            torch.set_num_threads(threads)
        ckpt = resolve_checkpoint(engine_dir)
        manifest = read_manifest(ckpt, "checkpoint")
        module, name = FAMILIES[manifest["family"]][1].split(":")
        self.drafter = getattr(import_module(module), name)(ckpt / "draft", num_slots=num_slots, max_len=max_len)
        self.generators = [torch.Generator() for _ in range(num_slots)]

    def handle(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slots = inputs["SLOTS"].astype(np.int64).tolist()
        for i, slot in enumerate(slots):
            start = int(inputs["CTX_START"][i])
            if start == 0:
                self.drafter.reset(slot)
                self.generators[slot].manual_seed(int(inputs["SEEDS"][i]))
            elif start != int(self.drafter.ctx_len[slot]):
                raise OutOfSync(f"slot {slot}: context starts at {start} but the drafter holds "
                                f"{int(self.drafter.ctx_len[slot])}")
        features = torch.from_numpy(inputs["CTX_FEATURES"])
        self.drafter.add_context_batch(slots, [features[i, :n] for i, n in enumerate(inputs["CTX_COUNTS"].tolist())])
        temperatures = inputs["TEMPERATURES"].astype(float).tolist()
        draft = self.drafter.draft(slots, inputs["ANCHORS"].astype(np.int64).tolist(), temperatures,
                                   [self.generators[s] for s in slots], int(inputs["GAMMA"][0]))
        return {"TOKENS": draft.tokens.numpy().astype(np.int32), "PROBS": draft.probs.numpy().astype(np.float32),
                "CONF_LOGITS": draft.conf_logits.numpy().astype(np.float32),
                "CONFIDENCE": draft.confidence.numpy().astype(np.float32)}


def execute_batched(handler: VerifyHandler | DraftHandler, requests: list, input_names: tuple[str, ...],
                    pb_utils: object, model: str) -> list:
    """The `execute` of the dspark_verify / dspark_draft Triton models (pb_utils is passed in because
    it only exists inside Triton's Python backend). A failure answers its request, the model stays up."""
    responses = []
    for request in requests:
        try:
            inputs = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in input_names}
            outputs = handler.handle(inputs)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model}: {e}")))
    return responses
