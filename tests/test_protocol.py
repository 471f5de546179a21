"""The orchestrator <-> dspark_draft / dspark_verify messages (runtime/protocol.py): one definition that the
generated config.pbtxt, the handlers and the orchestrator all follow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_trt.builder.repo import build_repo
from dspark_trt.runtime.dspark.base import Draft
from dspark_trt.runtime.model_handlers import DraftHandler, VerifyHandler
from dspark_trt.runtime.protocol import (
    DRAFT,
    ENDPOINTS,
    VERIFY,
    DraftRequest,
    DraftResponse,
    MalformedMessage,
    VerifyRequest,
    VerifyResponse,
)


def test_generated_config_agrees_with_the_messages_field_by_field(qwen3_ckpt: Path, tmp_path: Path) -> None:
    """Parsed by Triton's own model-config protobuf, so a typo in the generator cannot hide."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    build_repo(qwen3_ckpt, tmp_path / "repo", num_slots=2, max_prompt_tokens=16, max_new_tokens=8, drafter="model")
    config_type = model_config_pb2.ModelConfig
    for endpoint in ENDPOINTS.values():
        config = text_format.Parse((tmp_path / "repo" / endpoint.model / "config.pbtxt").read_text(), config_type())
        assert config.name == endpoint.model
        for sections, message in ((config.input, endpoint.request), (config.output, endpoint.response)):
            declared = [(t.name, t.triton_type, t.triton_dims) for t in message.tensors()]
            parsed = [(s.name, model_config_pb2.DataType.Name(s.data_type), list(s.dims)) for s in sections]
            assert parsed == declared, endpoint.model


def test_the_messages_cover_what_the_wire_carried() -> None:
    """The tensor names, dtypes and ranks the five former spellings agreed on."""
    assert [str(t) for t in VERIFY.request.tensors()] == [
        "SLOTS int32[B]", "START int32[B]", "TOKENS int32[B,T]", "COUNTS int32[B]", "WANT_LOGITS bool[1]"]
    assert VERIFY.response.names() == ["TOP_IDS", "LOGITS", "FEATURES"]
    assert [str(t) for t in DRAFT.request.tensors()] == [
        "SLOTS int32[B]", "CTX_START int32[B]", "CTX_COUNTS int32[B]", "CTX_FEATURES float32[B,N,F]",
        "ANCHORS int32[B]", "TEMPERATURES float32[B]", "SEEDS int64[B]", "GAMMA int32[1]"]
    assert DRAFT.response.names() == ["TOKENS", "PROBS", "CONF_LOGITS", "CONFIDENCE"]


def test_to_numpy_and_back() -> None:
    request = DraftRequest(slots=[1, 0], ctx_start=[0, 3], ctx_counts=[2, 1], ctx_features=np.ones((2, 2, 6)),
                           anchors=[5, 6], temperatures=[0.0, 1.0], seeds=[-7, 2**62], gamma=[4])
    arrays = request.to_numpy()
    assert list(arrays) == DRAFT.request.names()
    assert arrays["CTX_FEATURES"].dtype == np.float32 and arrays["SEEDS"].dtype == np.int64
    assert arrays["SEEDS"].tolist() == [-7, 2**62]
    back = DraftRequest.from_numpy(arrays)
    for name, value in back.to_numpy().items():
        np.testing.assert_array_equal(value, arrays[name])
        assert value.dtype == arrays[name].dtype


@pytest.mark.parametrize("change, message", [
    ({"COUNTS": None}, "VerifyRequest lacks COUNTS (it takes SLOTS, START, TOKENS, COUNTS, WANT_LOGITS)"),
    ({"TOKENS": np.zeros((1, 3), np.int64)}, "VerifyRequest: TOKENS must be int32[B,T], got int64[1, 3]"),
    ({"SLOTS": np.zeros((1, 1), np.int32)}, "VerifyRequest: SLOTS must be int32[B], got int32[1, 1]"),
    ({"WANT_LOGITS": np.array([True, False])}, "VerifyRequest: WANT_LOGITS must be bool[1], got bool[2]"),
])
def test_from_numpy_refuses_what_triton_would(change, message) -> None:
    arrays = VerifyRequest(slots=[0], start=[0], tokens=[[5, 6, 7]], counts=[3], want_logits=[False]).to_numpy()
    for name, value in change.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    with pytest.raises(MalformedMessage, match=re.escape(message)):
        VerifyRequest.from_numpy(arrays)


def test_a_draft_crosses_the_wire_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    draft = Draft(torch.randint(0, 100, (2, 4), generator=gen), torch.rand(2, 4, 100, generator=gen),
                  torch.randn(2, 4, generator=gen), torch.rand(2, 4, generator=gen))
    wire = DraftResponse.from_numpy(DraftResponse.from_draft(draft).to_numpy())
    back = wire.to_draft()
    assert back.tokens.dtype == torch.long
    for a, b in zip((draft.tokens, draft.probs, draft.conf_logits, draft.confidence),
                    (back.tokens, back.probs, back.conf_logits, back.confidence), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(back.survival, draft.survival)


def test_handlers_answer_with_the_declared_messages(qwen3_ckpt: Path) -> None:
    """What the handlers return is what the orchestrator's from_numpy accepts (as it arrives through Triton)."""
    verify = VerifyHandler(qwen3_ckpt, num_slots=2, max_len=64)
    request = VerifyRequest(slots=[1, 0], start=[0, 0], tokens=[[5, 6, 7], [8, 9, 0]], counts=[3, 2],
                            want_logits=[False])
    out = VerifyResponse.from_numpy(verify.handle(request.to_numpy()))
    assert out.top_ids.shape == (2, 3) and out.logits.shape == (2, 3, 0)
    draft = DraftHandler(qwen3_ckpt, num_slots=2, max_len=64)
    request = DraftRequest(slots=[0], ctx_start=[0], ctx_counts=[3], ctx_features=out.features[:1], anchors=[7],
                           temperatures=[0.0], seeds=[0], gamma=[4])
    proposed = DraftResponse.from_numpy(draft.handle(request.to_numpy())).to_draft()
    assert proposed.tokens.shape == (1, 4) and proposed.probs.shape == (1, 4, 0)
