"""Device support of the runners and drafters, checked without a GPU.

- Placement: built on the `meta` device (shapes and dtypes, no storage), every weight, cache and table of
  a runner is on it, in bfloat16 (the default off the CPU), and the slot bookkeeping stays on the host.
- No host round trips: a meta tensor has no values, so `int()` / `.item()` / `.tolist()` / a boolean mask
  on one raises. A forward (Qwen3, Gemma4) and a drafting round (their drafters) that run on `meta`
  therefore read nothing back from the device.
- CPU stays the oracle: outputs on the CPU are checked by every other test file.

Tests that need a GPU are marked `gpu` and skip here with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import convert_pair

from dspark_trt.runtime.deepseek_v4 import DeepseekV4Target
from dspark_trt.runtime.dspark.deepseek_v4 import DeepseekV4DSparkDrafter
from dspark_trt.runtime.dspark.gemma4 import Gemma4DSparkDrafter
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter
from dspark_trt.runtime.gemma4 import Gemma4Target
from dspark_trt.runtime.layers import runner_device, to_host
from dspark_trt.runtime.qwen3 import Qwen3Target

HOST_STATE = ("lengths", "ctx_len")  # per-slot bookkeeping: host tensors by design
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible to torch)")


def device_tensors(obj: object, seen: set[int] | None = None, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor reachable from a runner's attributes (dicts, lists, dataclasses), by path."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("dspark_trt"):
        items = vars(obj).items()
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        if path == "" and key in HOST_STATE:
            continue
        out |= device_tensors(value, seen, f"{path}.{key}" if path else str(key))
    return out


def assert_all_on(runner: object, device: str, dtype: torch.dtype) -> None:
    tensors = device_tensors(runner)
    assert len(tensors) > 10
    elsewhere = {name: t.device for name, t in tensors.items() if t.device != torch.device(device)}
    assert not elsewhere, f"tensors not on {device}: {elsewhere}"
    floats = {name: t.dtype for name, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    # Rotary frequencies and cos / sin tables stay float32 wherever they are (cast where they are applied).
    assert not {n for n in floats if not any(r in n for r in ("inv_freq", "tables", "cos_table", "sin_table"))}, floats
    for name in HOST_STATE:
        if hasattr(runner, name):
            assert getattr(runner, name).device.type == "cpu", name


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    pair = tmp_path_factory.mktemp("device") / "pair"
    write_qwen3_fixture(pair, seed=0, markov_head_type="rnn")  # rnn: the head with a state tensor
    return convert_pair(pair, pair.parent / "ckpt")


@pytest.fixture(scope="module")
def gemma4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dspark_trt.builder.fixture_gemma4 import write_gemma4_fixture

    pair = tmp_path_factory.mktemp("device-gemma4") / "pair"
    write_gemma4_fixture(pair, seed=0, markov_head_type="rnn")
    return convert_pair(pair, pair.parent / "ckpt")


def test_default_dtype_is_float32_on_the_cpu_and_bfloat16_elsewhere() -> None:
    assert runner_device("cpu", None) == (torch.device("cpu"), torch.float32)
    assert runner_device("meta", None) == (torch.device("meta"), torch.bfloat16)
    assert runner_device("cuda:1", torch.float32) == (torch.device("cuda:1"), torch.float32)


def test_to_host_copies_a_list_once_and_keeps_shapes() -> None:
    parts = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.zeros(0, 3)]
    out = to_host(parts)
    assert [t.shape for t in out] == [t.shape for t in parts]
    assert all(torch.equal(a, b) for a, b in zip(out, parts, strict=True))


def test_qwen3_target_on_meta_places_everything_and_reads_nothing_back(qwen3_ckpt: Path) -> None:
    target = Qwen3Target(qwen3_ckpt / "target", num_slots=4, max_len=64, device="meta")
    assert_all_on(target, "meta", torch.bfloat16)
    head, features = target.forward([2, 0], [[5, 6, 7], [8]], capture=(0, 1), start=[0, 0], logits=False)
    assert [h.shape for h in head] == [(3,), (1,)] and all(h.device.type == "meta" for h in head)
    assert features[0].shape[0] == 3 and features[0].device.type == "meta"
    assert target.lengths.tolist() == [1, 0, 3, 0]
    head, _ = target.forward([2], [[1, 2]], start=[2], logits=True)  # a rollback and full logits
    assert head[0].shape == (2, target.config.vocab_size) and target.lengths.tolist() == [1, 0, 4, 0]


def test_qwen3_drafter_on_meta_places_everything_and_drafts_without_reading_back(qwen3_ckpt: Path) -> None:
    drafter = Qwen3DSparkDrafter(qwen3_ckpt / "draft", num_slots=4, max_len=64, device="meta")
    assert_all_on(drafter, "meta", torch.bfloat16)
    width = drafter.fc.in_features
    drafter.add_context_batch([1, 3], [torch.zeros(4, width, device="meta"), torch.zeros(2, width, device="meta")])
    draft = drafter.draft([1, 3], [5, 6], [0.0, 0.0], [None, None])
    assert draft.tokens.shape == (2, drafter.block_size) and draft.tokens.device.type == "meta"
    assert draft.confidence.device.type == "meta" and drafter.ctx_len.tolist() == [0, 4, 0, 2]
    drafter.draft([3], [5], [0.0], [None])  # one slot: the cache-slice path


def test_gemma4_target_on_meta_places_everything_and_reads_nothing_back(gemma4_ckpt: Path) -> None:
    """Built the way the loader and tensor parallelism build a rank (tp._build with tp._on's device)."""
    from dspark_trt.runtime.tp import _build, _on

    target = _build("gemma4", gemma4_ckpt / "target", 0, _on("meta", {"num_slots": 4, "max_len": 64}))
    assert isinstance(target, Gemma4Target)
    assert_all_on(target, "meta", torch.bfloat16)
    capture = (-1, 0, 1)  # -1: the scaled embedding
    head, features = target.forward([2, 0], [[5, 6, 7], [8]], capture=capture, start=[0, 0], logits=False)
    assert [h.shape for h in head] == [(3,), (1,)] and all(h.device.type == "meta" for h in head)
    assert features[0].shape == (3, len(capture) * target.config.hidden_size) and features[0].device.type == "meta"
    assert target.lengths.tolist() == [1, 0, 3, 0]
    head, _ = target.forward([2], [[1, 2]], start=[2], logits=True)  # a rollback and full logits
    assert head[0].shape == (2, target.config.vocab_size) and target.lengths.tolist() == [1, 0, 4, 0]


def test_gemma4_drafter_on_meta_places_everything_and_drafts_without_reading_back(gemma4_ckpt: Path) -> None:
    drafter = Gemma4DSparkDrafter(gemma4_ckpt / "draft", num_slots=4, max_len=64, device="meta")
    assert_all_on(drafter, "meta", torch.bfloat16)
    width = drafter.w["fc.weight"].shape[1]
    drafter.add_context_batch([1, 3], [torch.zeros(4, width, device="meta"), torch.zeros(2, width, device="meta")])
    drafter.add_context(3, torch.zeros(1, width, device="meta"))  # one slot: the cache-slice path
    draft = drafter.draft([1, 3], [5, 6], [0.0, 0.0], [None, None])
    assert draft.tokens.shape == (2, drafter.block_size) and draft.tokens.device.type == "meta"
    assert draft.confidence.device.type == "meta" and drafter.ctx_len.tolist() == [0, 4, 0, 3]


def test_gemma4_drafter_refuses_a_sharded_checkpoint_by_field(gemma4_ckpt: Path, tmp_path: Path) -> None:
    """The load preamble the drafters share (SlotContext._load_unsharded) names the field it refuses."""
    import json
    import shutil

    from dspark_trt.runtime.errors import CheckpointError

    draft = shutil.copytree(gemma4_ckpt / "draft", tmp_path / "draft")
    config = json.loads((draft / "config.json").read_text())
    config["mapping"]["tp_size"] = 2
    (draft / "config.json").write_text(json.dumps(config))
    for runner in (Gemma4DSparkDrafter, Qwen3DSparkDrafter):
        with pytest.raises(CheckpointError, match="mapping.tp_size"):
            runner(draft, device="meta")


def test_v4_runners_on_meta_place_everything(v4_pair: Path, tmp_path: Path) -> None:
    """Placement only: the reference MoE routes tokens with data-dependent indexing (torch.where), which a
    meta tensor cannot answer, so a V4 forward is checked on the GPU (gpu_check) and the CPU (test_deepseek_v4)."""
    from dspark_trt.builder.convert import convert

    ckpt = tmp_path / "ckpt"
    convert(v4_pair / "target", None, ckpt, tp=1, show_progress=False)  # the drafter is the target's mtp.*
    assert_all_on(DeepseekV4Target(ckpt / "target", num_slots=2, max_len=64, device="meta"), "meta", torch.bfloat16)
    drafter = DeepseekV4DSparkDrafter(ckpt / "draft", num_slots=2, max_len=64, device="meta")
    assert_all_on(drafter, "meta", torch.bfloat16)


def test_the_cpu_default_is_unchanged_float32(qwen3_ckpt: Path, gemma4_ckpt: Path) -> None:
    target = Qwen3Target(qwen3_ckpt / "target", num_slots=2, max_len=32)
    assert_all_on(target, "cpu", torch.float32)
    assert_all_on(Gemma4Target(gemma4_ckpt / "target", num_slots=2, max_len=32), "cpu", torch.float32)
    assert_all_on(Gemma4DSparkDrafter(gemma4_ckpt / "draft", num_slots=2, max_len=32), "cpu", torch.float32)


@pytest.mark.gpu
@CUDA
def test_qwen3_on_cuda_matches_the_cpu_runner(qwen3_ckpt: Path) -> None:
    cpu = Qwen3Target(qwen3_ckpt / "target", num_slots=2, max_len=64)
    gpu = Qwen3Target(qwen3_ckpt / "target", num_slots=2, max_len=64, device="cuda:0", dtype=torch.float32)
    args = ([0, 1], [[5, 6, 7], [8]], (0, 1), [0, 0], True)
    (h_cpu, f_cpu), (h_gpu, f_gpu) = cpu.forward(*args), gpu.forward(*args)
    for a, b in zip(h_cpu + f_cpu, h_gpu + f_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@CUDA
def test_gemma4_on_cuda_matches_the_cpu_runners(gemma4_ckpt: Path) -> None:
    f32 = {"num_slots": 2, "max_len": 64, "dtype": torch.float32}
    cpu, gpu = Gemma4Target(gemma4_ckpt / "target", **f32), Gemma4Target(gemma4_ckpt / "target", device="cuda:0", **f32)
    args = ([0, 1], [[5, 6, 7], [8]], (-1, 0, 1), [0, 0], True)
    (h_cpu, f_cpu), (h_gpu, f_gpu) = cpu.forward(*args), gpu.forward(*args)
    for a, b in zip(h_cpu + f_cpu, h_gpu + f_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    drafters = [Gemma4DSparkDrafter(gemma4_ckpt / "draft", device=d, **f32) for d in ("cpu", "cuda:0")]
    width = drafters[0].w["fc.weight"].shape[1]
    features = [torch.randn(3, width, generator=torch.Generator().manual_seed(0)), torch.randn(1, width)]
    drafts = []
    for drafter in drafters:
        drafter.add_context_batch([0, 1], [f.to(drafter.device) for f in features])
        drafts.append(drafter.draft([0, 1], [5, 6], [0.0, 0.0], [None, None]).cpu())
    assert torch.equal(drafts[1].tokens, drafts[0].tokens)
    torch.testing.assert_close(drafts[1].confidence, drafts[0].confidence, atol=1e-4, rtol=1e-4)


def test_nccl_needs_one_gpu_per_rank_and_is_refused_without(qwen3_ckpt: Path) -> None:
    from dspark_trt.runtime.tp import DistributedTarget, rank_devices

    assert rank_devices(2, None) == ["cpu", "cpu"] and rank_devices(2, [3, 1]) == ["cuda:3", "cuda:1"]
    with pytest.raises(ValueError, match="2 GPU ids"):
        rank_devices(2, [0])
    with pytest.raises(ValueError, match="nccl with one GPU per rank"):
        DistributedTarget("qwen3", qwen3_ckpt / "target", 2, backend="nccl")


def test_tensor_parallel_over_the_flagged_backend_equals_tp1(qwen3_ckpt: Path, tmp_path: Path) -> None:
    """tp 2 with the backend chosen by the flag (gloo here, nccl on GPUs): calls on the gloo control
    group, collectives on the default group, as in the GPU layout."""
    from dspark_trt.builder.convert import convert
    from dspark_trt.runtime.tp import DistributedTarget

    pair = qwen3_ckpt.parent / "pair"
    convert(pair / "target", pair / "drafter", tmp_path / "tp2", tp=2, show_progress=False)
    ref, ref_features = Qwen3Target(qwen3_ckpt / "target", num_slots=2, max_len=32).forward(
        [0, 1], [[5, 6, 7], [8]], capture=(0, 1))
    with DistributedTarget("qwen3", tmp_path / "tp2" / "target", 2, backend="gloo", num_slots=2, max_len=32) as tp:
        head, features = tp.forward([0, 1], [[5, 6, 7], [8]], capture=(0, 1))
        ids, _ = tp.forward([0, 1], [[5, 6, 7], [8]], start=[0, 0], logits=False)
    for a, b in zip(head + features, ref + ref_features, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert all(torch.equal(i, r.argmax(-1)) for i, r in zip(ids, ref, strict=True))


def test_a_step_padded_to_its_cuda_graph_bucket_gives_the_same_outputs(qwen3_ckpt: Path) -> None:
    """What a CUDA graph replays (runtime/cuda_graphs.py): the step padded to its bucket, padding rows and
    tokens written to the scratch slot. Run eagerly on the CPU, it equals the unpadded step, and leaves the
    real slots' caches as the unpadded step does."""
    from dspark_trt.runtime.cuda_graphs import GraphedSteps

    plain = Qwen3Target(qwen3_ckpt / "target", num_slots=4, max_len=64)
    padded = Qwen3Target(qwen3_ckpt / "target", num_slots=4, max_len=64)
    graphs = GraphedSteps(padded, max_batch=8, max_tokens=8, key_block=16)
    for runner in (plain, padded):
        runner.forward([0, 1, 2], [[3, 4, 5, 6, 7], [8, 9], [10]], start=[0, 0, 0])  # prefill: eager
    assert graphs.bucket((3, 5, 7)) == (4, 8, 16) and graphs.bucket((9, 1, 7)) is None
    assert graphs.bucket((1, 1, 60)) == (1, 1, 64)  # never past the cache
    slots, tokens = [2, 0, 1], [[1, 2, 3], [4], [5, 6]]  # a decode-shaped verify step
    step = plain.step_inputs(slots, tokens)
    ref_head, ref_features = plain.run(step, (0, 1), True)
    big = graphs.padded(padded.step_inputs(slots, tokens))
    assert big.shape == (4, 4, 16)
    head, features = padded.run(big, (0, 1), True)
    torch.testing.assert_close(head[:3, :3], ref_head, atol=1e-5, rtol=0)
    valid = step.valid
    torch.testing.assert_close(features[:3, :3][valid], ref_features[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.k_cache[:, :4, :, :8], plain.k_cache[:, :4, :, :8], atol=1e-5, rtol=0)


@pytest.mark.gpu
@CUDA
def test_cuda_graph_replays_equal_eager_steps(qwen3_ckpt: Path) -> None:
    f32 = {"num_slots": 4, "max_len": 64, "device": "cuda:0", "dtype": torch.float32}
    eager, graphed = Qwen3Target(qwen3_ckpt / "target", **f32), Qwen3Target(qwen3_ckpt / "target", **f32)
    graphed.use_cuda_graphs(max_batch=4, max_tokens=8, key_block=16)
    for runner in (eager, graphed):
        runner.forward([0, 1], [[3, 4, 5, 6], [8, 9]], start=[0, 0])
    for _ in range(3):  # capture, then replays
        a, _ = eager.forward([0, 1], [[1, 2], [3]])
        b, _ = graphed.forward([0, 1], [[1, 2], [3]])
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=0)
    assert len(graphed.graphs.graphs) == 1
