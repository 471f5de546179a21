"""Serving logic without a server: detokenisation, validation, the orchestrator, repository layouts."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from dspark_trt.builder.repo import build_repo
from dspark_trt.runtime.detok import CONTEXT_TOKENS, IncrementalText, text_delta
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.model_handlers import DraftHandler, VerifyHandler
from dspark_trt.runtime.placement import PlacementError, model_gpus, rank_device, require_visible
from dspark_trt.runtime.serving import Limits, Orchestrator, ParamError, RemoteDrafter, RemoteTarget, parse_request

TEXT = "naïve café — 東京 ✓ 🚀 ok"


@pytest.fixture(scope="module")
def tokenizer(qwen3_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen3_ckpt / "tokenizer" / "tokenizer.json"))


def test_streamed_text_is_exact_across_multibyte_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT).ids
    decode = tokenizer.decode
    # Byte-level BPE splits some characters over several tokens: that is what this test is about.
    assert any("\ufffd" in decode(ids[:k]) for k in range(1, len(ids)))
    for chunk in (1, 2, 3):
        text, sent = "", []
        for start in range(0, len(ids), chunk):
            new = ids[start: start + chunk]
            text += text_delta(decode, sent[-CONTEXT_TOKENS:], new)
            sent += new
        assert text == TEXT, f"chunks of {chunk}"
    incremental = IncrementalText(decode)
    for token in ids:
        incremental.add([token])
    assert incremental.text == TEXT


LIMITS = Limits(max_prompt_tokens=8, max_new_tokens=32, block_size=5, vocab_size=100)


@pytest.mark.parametrize("inputs, message", [
    ({}, "the prompt is empty"),
    ({"INPUT_IDS": np.arange(9)}, "the prompt has 9 tokens; this deployment accepts at most 8"),
    ({"INPUT_IDS": np.array([1, 100])}, "input_ids must lie in [0, 100)"),
    ({"MAX_TOKENS": np.array([33])}, "max_tokens must be in [1, 32], got 33"),
    ({"MAX_TOKENS": np.array([1.5], dtype=np.float32)}, "max_tokens must be an integer"),
    ({"TEMPERATURE": np.array([np.nan], dtype=np.float32)}, "temperature must be in [0, 100]"),
    ({"SPECULATION": np.array([b"maybe"], dtype=object)}, "speculation must be one of auto, off, fixed"),
    ({"GAMMA": np.array([6])}, "gamma must be in [1, 5]"),
    ({"STOP_IDS": np.array([-1])}, "stop_ids must lie in [0, 100)"),
    ({"STOP": np.array([b""], dtype=object)}, "stop strings must not be empty"),
])
def test_bad_parameters_are_named(inputs: dict, message: str) -> None:
    inputs = {"INPUT_IDS": np.array([1, 2, 3]), **inputs} if "INPUT_IDS" in inputs or inputs else inputs
    with pytest.raises(ParamError, match=re.escape(message)):
        parse_request(inputs, LIMITS)


def test_defaults() -> None:
    request = parse_request({"INPUT_IDS": np.array([1, 2])}, LIMITS)
    assert (request.max_new_tokens, request.temperature, request.speculation, request.gamma) == (32, 0.0, "auto", 5)
    assert request.stop_strings == ()


class Collector:
    def __init__(self) -> None:
        self.ids, self.done, self.reason, self.stats, self.errors = [], threading.Event(), None, None, []
        self.chunks = 0

    def send(self, tokens, prefix, finish_reason, stats):
        self.ids += tokens
        self.chunks += 1
        if finish_reason is not None:
            self.reason, self.stats = finish_reason, stats
            self.done.set()

    def error(self, message):
        self.errors.append(message)
        self.done.set()

    def cancelled(self):
        return False


@pytest.fixture(scope="module")
def orchestrator(qwen3_ckpt: Path, tokenizer: Tokenizer):
    handlers = {"dspark_verify": VerifyHandler(qwen3_ckpt, num_slots=4, max_len=128),
                "dspark_draft": DraftHandler(qwen3_ckpt, num_slots=4, max_len=128)}

    def call(model, inputs):
        return handlers[model].handle(inputs)

    orch = Orchestrator(RemoteTarget(call), RemoteDrafter(call, 4, 7, (1, 2, 4)), num_slots=4,
                        decode=tokenizer.decode)
    orch.start()
    yield orch
    orch.stop()


def test_orchestrator_over_the_wire_protocol_equals_generate(qwen3_ckpt: Path, orchestrator) -> None:
    gen = np.random.default_rng(0)
    batch = [gen.integers(0, 1000, size=3 + 4 * i).tolist() for i in range(7)]  # more requests than slots
    sinks = [Collector() for _ in batch]
    for i, (prompt, sink) in enumerate(zip(batch, sinks, strict=True)):
        orchestrator.submit(Request(prompt, max_new_tokens=15, speculation=("auto", "fixed", "off")[i % 3]), sink)
    assert all(s.done.wait(60) for s in sinks)
    target, drafter, _ = open_checkpoint(qwen3_ckpt, num_slots=7, max_len=128)
    expected = generate(target, drafter, [Request(p, max_new_tokens=15, speculation="off") for p in batch])
    assert [s.ids for s in sinks] == [r.tokens for r in expected]
    assert all(s.reason == "length" and s.stats["tokens"] == 15 and s.chunks > 2 for s in sinks)


def test_sampled_and_greedy_requests_share_rounds(orchestrator, qwen3_ckpt: Path) -> None:
    """Distributions cross the wire only when some row samples: greedy rows stay exact beside sampled ones."""
    gen = np.random.default_rng(1)
    batch = [gen.integers(0, 1000, size=5 + 3 * i).tolist() for i in range(4)]
    sinks = [Collector() for _ in batch]
    for i, (prompt, sink) in enumerate(zip(batch, sinks, strict=True)):
        orchestrator.submit(Request(prompt, max_new_tokens=12, temperature=1.0 if i % 2 else 0.0, seed=i,
                                    speculation="fixed"), sink)
    assert all(s.done.wait(60) for s in sinks)
    target, drafter, _ = open_checkpoint(qwen3_ckpt, num_slots=4, max_len=128)
    expected = generate(target, drafter, [Request(p, max_new_tokens=12, speculation="off") for p in batch])
    assert [s.ids for s in sinks[::2]] == [r.tokens for r in expected[::2]]
    assert all(s.reason == "length" and len(s.ids) == 12 for s in sinks)

    handler = DraftHandler(qwen3_ckpt, num_slots=2, max_len=64)
    width = handler.drafter.fc.in_features  # the target features the drafter reads
    inputs = {"SLOTS": np.array([0, 1], np.int32), "CTX_START": np.zeros(2, np.int32),
              "CTX_COUNTS": np.array([3, 2], np.int32), "CTX_FEATURES": np.ones((2, 3, width), np.float32),
              "ANCHORS": np.array([5, 6], np.int32), "SEEDS": np.zeros(2, np.int64), "GAMMA": np.array([4], np.int32)}
    greedy = handler.handle({**inputs, "TEMPERATURES": np.zeros(2, np.float32)})
    mixed = handler.handle({**inputs, "TEMPERATURES": np.array([0.0, 1.0], np.float32)})
    assert greedy["PROBS"].shape == (2, 4, 0) and mixed["PROBS"].shape[:2] == (2, 4) and mixed["PROBS"].shape[2] > 0

    # Logits cross the wire only when asked for (some row samples); the argmax always does.
    verify = VerifyHandler(qwen3_ckpt, num_slots=2, max_len=64)
    call = {"SLOTS": np.array([1, 0], np.int32), "START": np.zeros(2, np.int32),
            "TOKENS": np.array([[5, 6, 7], [8, 9, 0]], np.int32), "COUNTS": np.array([3, 2], np.int32)}
    ids_only = verify.handle({**call, "WANT_LOGITS": np.array([False])})
    with_logits = verify.handle({**call, "WANT_LOGITS": np.array([True])})
    assert ids_only["LOGITS"].shape == (2, 3, 0) and with_logits["LOGITS"].shape[:2] == (2, 3)
    argmax = with_logits["LOGITS"].argmax(-1)
    for out in (ids_only, with_logits):
        assert (out["TOP_IDS"][0] == argmax[0]).all() and (out["TOP_IDS"][1, :2] == argmax[1, :2]).all()
    np.testing.assert_array_equal(ids_only["FEATURES"], with_logits["FEATURES"])


def test_stop_strings_end_after_the_completing_token(orchestrator, tokenizer: Tokenizer) -> None:
    full = Collector()
    orchestrator.submit(Request([11, 12, 13], max_new_tokens=20), full)
    assert full.done.wait(60)
    text = tokenizer.decode(full.ids)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    stopped = Collector()
    orchestrator.submit(Request([11, 12, 13], max_new_tokens=20, stop_strings=(stop,)), stopped)
    assert stopped.done.wait(60)
    assert stopped.reason == "stop" and stop in tokenizer.decode(stopped.ids)
    assert stop not in tokenizer.decode(stopped.ids[:-1]) and full.ids[: len(stopped.ids)] == stopped.ids


def test_cancel_by_request_id_frees_the_slot(orchestrator) -> None:
    sink = Collector()
    orchestrator.submit(Request([1, 2, 3], max_new_tokens=120), sink, request_id="abc")
    while sink.chunks < 2:
        threading.Event().wait(0.01)
    orchestrator.cancel("abc")
    assert sink.done.wait(30) and sink.reason == "cancelled" and len(sink.ids) < 120
    assert orchestrator.active == 0


def _config(repo: Path, model: str) -> str:
    return (repo / model / "config.pbtxt").read_text()


def test_a_failed_prefill_fails_its_requests_and_keeps_the_slots(qwen3_ckpt: Path, tokenizer: Tokenizer) -> None:
    """The verify model answering a prefill with an error (a bug, an out-of-date repository) must reach
    the waiting clients as an error, and leave every slot free for the requests after it."""
    handlers = {"dspark_verify": VerifyHandler(qwen3_ckpt, num_slots=2, max_len=64),
                "dspark_draft": DraftHandler(qwen3_ckpt, num_slots=2, max_len=64)}
    failures = [1]

    def call(model, inputs):
        if model == "dspark_verify" and failures:
            failures.pop()
            raise RuntimeError("dspark_verify: unknown input WANT_LOGITS")
        return handlers[model].handle(inputs)

    orch = Orchestrator(RemoteTarget(call), RemoteDrafter(call, 2, 7, (1, 2, 4)), num_slots=2, decode=tokenizer.decode)
    orch.start()
    try:
        failed = [Collector() for _ in range(2)]
        for sink in failed:
            orch.submit(Request([5, 6, 7], max_new_tokens=4), sink)
        assert all(s.done.wait(30) for s in failed)
        assert all(len(s.errors) == 1 and "unknown input WANT_LOGITS" in s.errors[0] for s in failed)
        later = [Collector() for _ in range(2)]  # both slots again: none was lost
        for sink in later:
            orch.submit(Request([5, 6, 7], max_new_tokens=4), sink)
        assert all(s.done.wait(30) for s in later)
        assert all(not s.errors and s.reason == "length" for s in later)
    finally:
        orch.stop()


def test_bench_balances_the_order_of_the_modes() -> None:
    """Every mode runs once a slice; over the design's orders each mode takes every place and follows
    every other mode equally often (a rotation would give each mode the same predecessor throughout)."""
    from collections import Counter

    from dspark_trt.client.bench import balanced_orders, slice_order

    for n in range(2, 8):
        orders = balanced_orders(n)
        assert len(orders) == (2 * n if n % 2 else n)
        assert all(sorted(order) == list(range(n)) for order in orders)
        follows = Counter((a, b) for order in orders for a, b in zip(order, order[1:], strict=False))
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1
        places = Counter((m, i) for order in orders for i, m in enumerate(order))
        assert len(places) == n * n and len(set(places.values())) == 1
    modes = ["off", "mtp1", "fixed:3", "fixed:5", "auto"]
    order = slice_order(modes, 12)
    assert sorted(order) == sorted((k, m) for k in range(12) for m in modes)
    assert [m for k, m in order if k == 0] == ["off", "mtp1", "auto", "fixed:3", "fixed:5"]
    before_auto = {order[i - 1][1] for i, (k, m) in enumerate(order) if m == "auto" and order[i - 1][0] == k}
    assert before_auto == {"off", "mtp1", "fixed:3", "fixed:5"}


def _model_config(repo: Path, model: str):
    """config.pbtxt parsed by Triton's own model-config protobuf (tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(_config(repo, model), model_config_pb2.ModelConfig())


def _instances(config) -> int:
    """How many instances Triton starts: a KIND_GPU group's `count` is per listed GPU."""
    return sum(g.count * (len(g.gpus) if g.kind == g.KIND_GPU and g.gpus else 1) for g in config.instance_group)


def test_eight_gpu_layout(qwen3_pair: Path, tmp_path: Path) -> None:
    from dspark_trt.builder.convert import convert

    convert(qwen3_pair / "target", qwen3_pair / "drafter", tmp_path / "ckpt", tp=8, show_progress=False)
    build_repo(tmp_path / "ckpt", tmp_path / "repo", layout="gpu", gpus=8, tp=8)
    verify, _draft = _config(tmp_path / "repo", "dspark_verify"), _config(tmp_path / "repo", "dspark_draft")
    assert re.search(r'key: "tp" value: \{ string_value: "8" \}', verify)
    # one instance owning the 8 ranks, rank r on GPU r; the drafter beside verify's rank 0
    for model, gpus in (("dspark_verify", [0, 1, 2, 3, 4, 5, 6, 7]), ("dspark_draft", [0])):
        config = _model_config(tmp_path / "repo", model)
        assert _instances(config) == 1, model
        assert config.instance_group[0].kind == config.instance_group[0].KIND_MODEL
        assert model_gpus({k: v.string_value for k, v in config.parameters.items()}, model) == gpus
    assert "decoupled: true" in _config(tmp_path / "repo", "dspark")
    for model in ("preprocessing", "postprocessing", "dspark"):
        assert "KIND_CPU" in _config(tmp_path / "repo", model)
    assert not list((tmp_path / "repo").rglob("*.template"))
    with pytest.raises(Exception, match="--tp 2 differs from the checkpoint's tensor parallelism"):
        build_repo(tmp_path / "ckpt", tmp_path / "repo2", layout="gpu", gpus=8, tp=2)
    with pytest.raises(Exception, match="--gpus 4: the one verify instance places its 8 tensor-parallel ranks"):
        build_repo(tmp_path / "ckpt", tmp_path / "repo3", layout="gpu", gpus=4)
    assert 'key: "drafter" value: { string_value: "model" }' in _config(tmp_path / "repo", "dspark")
    with pytest.raises(ValueError, match="the gpu layout places the drafter on verify's rank-0 GPU"):
        build_repo(tmp_path / "ckpt", tmp_path / "repo4", layout="gpu", gpus=8, drafter="orchestrator")
    assert not (tmp_path / "repo4").exists()


def test_the_cpu_layout_drafts_in_the_orchestrator_unless_told(qwen3_ckpt: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dspark_trt.builder.cli import main as build

    build_repo(qwen3_ckpt, tmp_path / "repo", num_slots=2)
    assert not (tmp_path / "repo" / "dspark_draft").exists()
    orchestrator = _model_config(tmp_path / "repo", "dspark").parameters
    assert orchestrator["drafter"].string_value == "orchestrator"
    assert int(orchestrator["max_len"].string_value) > 1024 and orchestrator["draft_threads"].string_value == "1"
    build_repo(qwen3_ckpt, tmp_path / "repo2", num_slots=2, drafter="model")
    assert (tmp_path / "repo2" / "dspark_draft" / "1" / "model.py").is_file()
    assert _model_config(tmp_path / "repo2", "dspark").parameters["drafter"].string_value == "model"
    result = CliRunner().invoke(build, ["repo", str(qwen3_ckpt), "-o", str(tmp_path / "repo3"), "--layout", "gpu",
                                        "--drafter", "orchestrator"])
    assert result.exit_code == 2 and "--drafter" in result.output and not (tmp_path / "repo3").exists()


def test_models_read_their_gpus_from_their_config() -> None:
    assert model_gpus({"gpus": ""}, "dspark_verify", 2) == []  # the CPU layout
    assert model_gpus({"gpus": "0,1"}, "dspark_verify", 2) == [0, 1]
    for bad in ("0,0", "0", "0,x", "-1,0"):
        with pytest.raises(PlacementError, match=f"dspark_verify: parameter gpus='{bad}'"):
            model_gpus({"gpus": bad}, "dspark_verify", 2)
    # The reference runners serve GPUs: a placement is refused only on GPUs this process cannot see.
    require_visible([], "dspark_verify", visible=0)
    require_visible([0, 1], "dspark_verify", visible=2)
    with pytest.raises(PlacementError, match=r"GPUs \[0, 1\], but this process sees 1 CUDA device"):
        require_visible([0, 1], "dspark_verify", visible=1)
    assert rank_device([]) == "cpu" and rank_device([3]) == "cuda:3"
