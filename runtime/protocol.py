"""The wire protocol between the orchestrator (model `dspark`) and the two internal models it calls.

Each round of in-flight batching makes at most one call to `dspark_draft` and one to `dspark_verify`,
batched over the B slots that take part. Each message is one dataclass below; its fields declare,
once, every tensor's wire name (the field name upper-cased), numpy dtype and dims. The rest follows
from them:

    runtime/serving.py          RemoteTarget / RemoteDrafter build the requests and read the responses
    runtime/model_handlers.py   VerifyHandler / DraftHandler read the requests and build the responses
    model_repository/dspark*/   the Triton models fetch these tensors by name (execute_batched, bls)
    builder/repo.py             writes the input / output sections of dspark_{draft,verify}/config.pbtxt

Dims: B rows, one per slot of the call; T new tokens per row (padded to the longest, COUNTS says how
many are real); N new context features per row (padded likewise, CTX_COUNTS); F the target-feature
width (hidden size x len(target_layer_ids)); V the vocabulary; G drafted positions (GAMMA). A number
is a fixed size.

`from_numpy` checks what Triton checks against config.pbtxt (every tensor present, its dtype and
rank, fixed sizes), so a call made in-process is refused where the server would refuse it. Values
(ranges, slot state) are the handlers' to check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import torch

from .dspark.base import Draft

# numpy dtype -> Triton's data_type in config.pbtxt
TRITON_TYPES = {np.dtype(np.bool_): "TYPE_BOOL", np.dtype(np.int32): "TYPE_INT32",
                np.dtype(np.int64): "TYPE_INT64", np.dtype(np.float32): "TYPE_FP32"}


class MalformedMessage(ValueError):
    """A message lacks a tensor, or one has the wrong dtype or shape; the message names it."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of a message as it crosses the wire."""

    attribute: str  # the dataclass field
    dtype: np.dtype
    dims: tuple[str | int, ...]  # a letter is a variable size (-1 in config.pbtxt), a number a fixed one

    @property
    def name(self) -> str:
        return self.attribute.upper()

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]

    @property
    def triton_dims(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.dims]

    def config_row(self) -> str:
        """This tensor in an input or output section of config.pbtxt."""
        dims = ", ".join(map(str, self.triton_dims))
        return f'{{ name: "{self.name}" data_type: {self.triton_type} dims: [ {dims} ] }}'

    def __str__(self) -> str:  # e.g. TOKENS int32[B,T]
        return f"{self.name} {self.dtype}[{','.join(map(str, self.dims))}]"


def tensor(dtype: type[np.generic], *dims: str | int) -> Any:
    """Declare a message field: its dtype and dims on the wire."""
    return field(metadata={"dtype": np.dtype(dtype), "dims": dims})


M = TypeVar("M", bound="Message")


class Message:
    """Base of the messages: the declared tensors, and the conversions to and from numpy by name.
    Fields take anything numpy turns into the declared dtype (lists, tensors on the host)."""

    @classmethod
    def tensors(cls) -> tuple[Tensor, ...]:
        return tuple(Tensor(f.name, f.metadata["dtype"], f.metadata["dims"]) for f in fields(cls))

    @classmethod
    def names(cls) -> list[str]:
        return [t.name for t in cls.tensors()]

    def __post_init__(self) -> None:
        for t in self.tensors():
            setattr(self, t.attribute, np.asarray(getattr(self, t.attribute), dtype=t.dtype))

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {t.name: getattr(self, t.attribute) for t in self.tensors()}

    @classmethod
    def from_numpy(cls: type[M], arrays: Mapping[str, Any]) -> M:
        values = {}
        for t in cls.tensors():
            if t.name not in arrays:
                raise MalformedMessage(f"{cls.__name__} lacks {t.name} (it takes {', '.join(cls.names())})")
            array = np.asarray(arrays[t.name])
            fixed = all(d == n for d, n in zip(t.dims, array.shape, strict=False) if isinstance(d, int))
            if array.dtype != t.dtype or array.ndim != len(t.dims) or not fixed:
                raise MalformedMessage(f"{cls.__name__}: {t.name} must be {t.dtype}[{','.join(map(str, t.dims))}], "
                                       f"got {array.dtype}{list(array.shape)}")
            values[t.attribute] = array
        return cls(**values)


@dataclass
class VerifyRequest(Message):
    """The target's forward over each slot's new tokens. START is the slot's cache length before them:
    a smaller value rolls back rejected drafts, 0 starts a new request."""

    slots: np.ndarray = tensor(np.int32, "B")
    start: np.ndarray = tensor(np.int32, "B")
    tokens: np.ndarray = tensor(np.int32, "B", "T")
    counts: np.ndarray = tensor(np.int32, "B")
    want_logits: np.ndarray = tensor(np.bool_, 1)


@dataclass
class VerifyResponse(Message):
    """Each position's argmax (TOP_IDS); its logits when WANT_LOGITS was set, else LOGITS is [B, T, 0]
    (greedy decoding needs no more, and a tensor-parallel target then never gathers its vocabulary
    shards); and the target features the drafter reads (FEATURES)."""

    top_ids: np.ndarray = tensor(np.int32, "B", "T")
    logits: np.ndarray = tensor(np.float32, "B", "T", "V")
    features: np.ndarray = tensor(np.float32, "B", "T", "F")


@dataclass
class DraftRequest(Message):
    """Append each slot's new context (the target features of its newly committed tokens), then draft
    GAMMA tokens after each ANCHOR. CTX_START is the context the slot holds; 0 starts it afresh, its
    sampler seeded from SEEDS."""

    slots: np.ndarray = tensor(np.int32, "B")
    ctx_start: np.ndarray = tensor(np.int32, "B")
    ctx_counts: np.ndarray = tensor(np.int32, "B")
    ctx_features: np.ndarray = tensor(np.float32, "B", "N", "F")
    anchors: np.ndarray = tensor(np.int32, "B")
    temperatures: np.ndarray = tensor(np.float32, "B")
    seeds: np.ndarray = tensor(np.int64, "B")
    gamma: np.ndarray = tensor(np.int32, 1)


@dataclass
class DraftResponse(Message):
    """A `Draft` on the wire. PROBS is [B, G, 0] when every row is greedy: verification then needs no
    distribution."""

    tokens: np.ndarray = tensor(np.int32, "B", "G")
    probs: np.ndarray = tensor(np.float32, "B", "G", "V")
    conf_logits: np.ndarray = tensor(np.float32, "B", "G")
    confidence: np.ndarray = tensor(np.float32, "B", "G")

    @classmethod
    def from_draft(cls, draft: Draft) -> DraftResponse:
        draft = draft.cpu()
        return cls(draft.tokens.numpy(), draft.probs.numpy(), draft.conf_logits.numpy(), draft.confidence.numpy())

    def to_draft(self) -> Draft:
        return Draft(torch.from_numpy(self.tokens).long(), torch.from_numpy(self.probs),
                     torch.from_numpy(self.conf_logits), torch.from_numpy(self.confidence))


@dataclass(frozen=True)
class Endpoint:
    """An internal model and the messages it takes and returns."""

    model: str
    request: type[Message]
    response: type[Message]

    def config_io(self) -> str:
        """The input and output sections of the model's config.pbtxt."""
        def section(kind: str, message: type[Message]) -> str:
            return f"{kind} [\n" + ",\n".join("  " + t.config_row() for t in message.tensors()) + "\n]"
        return section("input", self.request) + "\n" + section("output", self.response)


VERIFY = Endpoint("dspark_verify", VerifyRequest, VerifyResponse)
DRAFT = Endpoint("dspark_draft", DraftRequest, DraftResponse)
ENDPOINTS: dict[str, Endpoint] = {e.model: e for e in (VERIFY, DRAFT)}
