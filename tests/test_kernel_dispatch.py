"""The served path's one dispatch point (plugins.launch.use_kernels): on a GPU the drafter's sequential
heads and the scheduler run as the OpenAI-Triton kernels. Here the kernel path is forced on CPU tensors
(`kernels_on_cpu`, under Triton's interpreter) and compared with the torch path, its oracle."""

from __future__ import annotations

from dspark_trt.plugins.interpret import enable_interpreter

enable_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from dspark_trt.plugins import launch  # noqa: E402
from dspark_trt.runtime.dspark import base as drafter_module  # noqa: E402
from dspark_trt.runtime.dspark.base import sequential_heads  # noqa: E402
from dspark_trt.runtime.heads import ConfidenceHead, MarkovHead  # noqa: E402
from dspark_trt.runtime.scheduler import CostTable, schedule_paper, schedule_production  # noqa: E402


def heads(kind: str, vocab: int = 300, rank: int = 16, dim: int = 24, gamma: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(vocab, rank, generator=g) * 0.3, torch.randn(vocab, rank, generator=g) * 0.3
    proj = {"gated": (rank, dim + rank, rank), "rnn": (3 * rank, 2 * rank + dim, 3 * rank)}.get(kind)
    proj_w = None if proj is None else torch.randn(proj[0], proj[1], generator=g) * 0.1
    proj_b = None if proj is None else torch.randn(proj[2], generator=g) * 0.1
    conf = ConfidenceHead(torch.randn(1, dim + rank, generator=g) * 0.1, torch.randn(1, generator=g), True,
                          [0.5 + 0.2 * k for k in range(gamma)])
    hidden, base = torch.randn(4, gamma, dim, generator=g), torch.randn(4, gamma, vocab, generator=g) * 2
    return MarkovHead(kind, w1, w2, proj_w, proj_b), conf, hidden, base, torch.randint(0, vocab, (4,), generator=g)


def test_the_torch_path_is_taken_on_cpu_and_the_kernels_only_when_forced() -> None:
    t = torch.zeros(2)
    assert not launch.use_kernels(t)
    with launch.kernels_on_cpu():
        assert launch.use_kernels(t)
    assert not launch.use_kernels(t)
    assert not launch.use_kernels(torch.zeros(2, device="meta"))


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_forced_kernel_heads_equal_the_torch_heads_greedy(kind: str, monkeypatch) -> None:
    markov, conf, hidden, base, anchors = heads(kind)
    ref = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * 4, [None] * 4)
    called, real = [], drafter_module.kernel_heads

    def spy(*args, **kwargs):
        called.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(drafter_module, "kernel_heads", spy)
    with launch.kernels_on_cpu():
        out = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * 4, [None] * 4)
    assert called, "the kernel path was not taken"
    assert torch.equal(out.tokens, ref.tokens) and out.tokens.dtype == torch.long
    assert out.probs.shape == (4, 5, 0)
    torch.testing.assert_close(out.conf_logits, ref.conf_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.confidence, ref.confidence, atol=1e-5, rtol=0)


def test_forced_kernel_heads_sample_from_each_rows_own_seed() -> None:
    markov, conf, hidden, base, anchors = heads("vanilla")

    def run(seeds: list[int]):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with launch.kernels_on_cpu():
            return sequential_heads(markov, conf, hidden, base, anchors, [1.0, 1.0, 0.0, 0.7], generators)

    a, b, moved = run([1, 2, 3, 4]), run([1, 2, 3, 4]), run([1, 9, 3, 4])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens[0], moved.tokens[0])
    assert a.probs.shape == (4, 5, 300)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(4, 5), atol=1e-5, rtol=0)
    # The greedy row takes the argmax of its logits: the torch path's tokens for that row.
    ref = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * 4, [None] * 4)
    assert torch.equal(a.tokens[2], ref.tokens[2])


@pytest.mark.parametrize("production", [False, True])
def test_forced_kernel_schedule_equals_the_host_scheduler(production: bool, monkeypatch) -> None:
    table = CostTable(token_counts=[1, 4, 16, 64], step_time_ms=[3.0, 3.1, 3.6, 5.5], fixed_overhead_ms=1.5,
                      batch_sizes=[1, 8], batch_overhead_ms=[0.0, 0.4])
    g = torch.Generator().manual_seed(3)
    schedule = schedule_production if production else schedule_paper
    called, real = [], launch.dspark_schedule

    def spy(*args, **kwargs):
        called.append(kwargs["production"])
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "dspark_schedule", spy)
    for survival in (torch.rand(6, 7, generator=g).pow(0.3).cumprod(1), torch.ones(2, 5), torch.zeros(3, 4)):
        ref = schedule(survival, table)
        with launch.kernels_on_cpu():
            out = schedule(survival, table)
        assert out.dtype == torch.long and torch.equal(out, ref)
    assert called == [production] * 3
