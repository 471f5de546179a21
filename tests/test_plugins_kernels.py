"""The Triton kernels, run on CPU by Triton's interpreter, against the torch reference (runtime/).

Tolerances: greedy tokens and their one-hot distributions are compared exactly, sampled tokens too
(Gumbel-max on the same uniforms); float outputs computed by both sides (softmax probabilities,
confidence logits, calibrated confidences, survival) within 1e-5 absolute, float32 vs float32 with
a different summation order. Scheduler lengths exactly.
"""

from __future__ import annotations

from dspark_trt.plugins.interpret import enable_interpreter

enable_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from dspark_trt.plugins import launch  # noqa: E402
from dspark_trt.plugins.reference import gumbel_argmax, gumbel_sequential_heads  # noqa: E402
from dspark_trt.runtime.dspark.base import sequential_heads  # noqa: E402
from dspark_trt.runtime.heads import ConfidenceHead, MarkovHead  # noqa: E402
from dspark_trt.runtime.scheduler import CostTable, schedule_paper, schedule_production  # noqa: E402

ATOL = 1e-5


def make_heads(kind: str, vocab: int, rank: int, dim: int, gamma: int, seed: int = 0, *, with_markov: bool = True,
               sts: bool = True, bias: bool = True) -> tuple[MarkovHead, ConfidenceHead]:
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(vocab, rank, generator=g) * 0.3, torch.randn(vocab, rank, generator=g) * 0.3
    proj_w = proj_b = None
    if kind == "gated":
        proj_w, proj_b = torch.randn(rank, dim + rank, generator=g) * 0.1, torch.randn(rank, generator=g) * 0.1
    elif kind == "rnn":
        proj_w, proj_b = torch.randn(3 * rank, 2 * rank + dim, generator=g) * 0.1, torch.randn(3 * rank, generator=g)
    conf = ConfidenceHead(torch.randn(1, dim + (rank if with_markov else 0), generator=g) * 0.1,
                          torch.randn(1, generator=g) if bias else None, with_markov,
                          [0.5 + 0.2 * k for k in range(gamma)] if sts else None)
    return MarkovHead(kind, w1, w2, proj_w, proj_b), conf


def make_inputs(batch: int, gamma: int, vocab: int, dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, gamma, dim, generator=g), torch.randn(batch, gamma, vocab, generator=g) * 2,
            torch.randint(0, vocab, (batch,), generator=g))


def run_kernels(markov: MarkovHead, conf: ConfidenceHead, hidden, base, anchors, temperatures, noise, *,
                weight_dtype: torch.dtype = torch.float32):
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(weight_dtype)

    out = launch.markov_sample(base, hidden, anchors, temperatures, noise, cast(markov.w1), cast(markov.w2),
                               cast(markov.proj_weight), cast(markov.proj_bias), kind=markov.kind)
    sts = None if conf.temperatures is None else torch.tensor(conf.temperatures)
    return out, launch.dspark_confidence(hidden, out.markov_emb, conf.weight, conf.bias, sts)


def check_confidence(c, ref) -> None:
    torch.testing.assert_close(c.logits, ref.conf_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(c.confidence, ref.confidence, atol=ATOL, rtol=0)
    torch.testing.assert_close(c.survival, ref.survival, atol=ATOL, rtol=0)


GREEDY_CASES = [  # kind, batch, γ, vocab, rank, hidden
    ("vanilla", 1, 7, 4099, 256, 64),
    ("vanilla", 64, 5, 1000, 64, 32),
    ("gated", 3, 7, 1000, 64, 48),
    ("gated", 2, 5, 4099, 256, 32),
    ("rnn", 3, 5, 4099, 64, 40),
    ("rnn", 2, 7, 1000, 256, 24),
]


@pytest.mark.parametrize(("kind", "batch", "gamma", "vocab", "rank", "dim"), GREEDY_CASES)
def test_markov_sample_greedy_matches_reference(kind, batch, gamma, vocab, rank, dim):
    markov, conf = make_heads(kind, vocab, rank, dim, gamma)
    hidden, base, anchors = make_inputs(batch, gamma, vocab, dim)
    ref = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * batch, [None] * batch)
    seeds = torch.arange(batch, dtype=torch.int32)
    out, c = run_kernels(markov, conf, hidden, base, anchors, torch.zeros(batch), seeds)
    assert torch.equal(out.tokens.long(), ref.tokens)
    # The kernel writes one-hot rows; the reference returns none for an all-greedy batch.
    assert ref.probs.shape[-1] == 0
    assert torch.equal(out.probs, torch.nn.functional.one_hot(ref.tokens, vocab).to(out.probs.dtype))
    prev = torch.cat([anchors[:, None], ref.tokens[:, :-1]], dim=1)
    assert torch.equal(out.markov_emb, markov.w1[prev])
    check_confidence(c, ref)


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_markov_sample_sampled_matches_gumbel_reference(kind):
    batch, gamma, vocab, rank, dim = 4, 7, 1000, 64, 32
    markov, conf = make_heads(kind, vocab, rank, dim, gamma, seed=3)
    hidden, base, anchors = make_inputs(batch, gamma, vocab, dim, seed=4)
    temperatures = torch.tensor([0.0, 0.6, 1.7, 0.0])
    uniforms = torch.rand(batch, gamma, vocab, generator=torch.Generator().manual_seed(5))
    ref, embs = gumbel_sequential_heads(markov, conf, hidden, base, anchors, temperatures, uniforms)
    out, c = run_kernels(markov, conf, hidden, base, anchors, temperatures, uniforms)
    assert torch.equal(out.tokens.long(), ref.tokens)
    torch.testing.assert_close(out.probs, ref.probs, atol=ATOL, rtol=1e-5)
    assert torch.equal(out.markov_emb, embs)
    check_confidence(c, ref)
    # Greedy rows ignore the noise and agree with the plain reference.
    greedy = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * batch, [None] * batch)
    assert torch.equal(out.tokens[[0, 3]].long(), greedy.tokens[[0, 3]])


def test_bf16_weights_compute_in_float32():
    batch, gamma, vocab, rank, dim = 4, 5, 1000, 64, 32
    markov, conf = make_heads("gated", vocab, rank, dim, gamma, seed=7)
    as_bf16 = MarkovHead("gated", *(t.to(torch.bfloat16).float() for t in
                                    (markov.w1, markov.w2, markov.proj_weight, markov.proj_bias)))
    hidden, base, anchors = make_inputs(batch, gamma, vocab, dim, seed=8)
    ref = sequential_heads(as_bf16, conf, hidden, base, anchors, [0.0] * batch, [None] * batch)
    out, c = run_kernels(markov, conf, hidden, base, anchors, torch.zeros(batch), torch.zeros(batch, dtype=torch.int32),
                         weight_dtype=torch.bfloat16)
    assert torch.equal(out.tokens.long(), ref.tokens)
    check_confidence(c, ref)


def test_philox_draws_are_the_materialised_uniforms():
    batch, gamma, vocab, rank, dim = 3, 5, 1000, 64, 16
    markov, conf = make_heads("vanilla", vocab, rank, dim, gamma, seed=9)
    hidden, base, anchors = make_inputs(batch, gamma, vocab, dim, seed=10)
    temperatures = torch.full((batch,), 0.8)
    seeds = torch.tensor([11, 12, 13], dtype=torch.int32)
    uniforms = launch.philox_uniforms(seeds, gamma, vocab)
    assert 0.0 <= float(uniforms.min()) and float(uniforms.max()) < 1.0
    seeded, _ = run_kernels(markov, conf, hidden, base, anchors, temperatures, seeds)
    explicit, _ = run_kernels(markov, conf, hidden, base, anchors, temperatures, uniforms)
    ref, _ = gumbel_sequential_heads(markov, conf, hidden, base, anchors, temperatures, uniforms)
    assert torch.equal(seeded.tokens, explicit.tokens)
    assert torch.equal(seeded.tokens.long(), ref.tokens)
    # Reproducible, and a request's draws depend only on its own seed.
    again, _ = run_kernels(markov, conf, hidden, base, anchors, temperatures, seeds)
    assert torch.equal(again.tokens, seeded.tokens)
    other = seeds.clone()
    other[1:] += 100
    moved, _ = run_kernels(markov, conf, hidden, base, anchors, temperatures, other)
    assert torch.equal(moved.tokens[0], seeded.tokens[0])


def test_gumbel_max_samples_the_softmax():
    """The sampling rule itself: Gumbel-max on i.i.d. uniforms draws from softmax(logits / T).

    Checked on the torch oracle with many draws (cheap); the kernel equals the oracle draw for draw.
    """
    draws, temperature = 200_000, 0.7
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    uniforms = torch.rand(draws, logits.numel(), generator=torch.Generator().manual_seed(6))
    tokens = gumbel_argmax(logits.expand(draws, -1), torch.full((draws,), temperature), uniforms)
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / draws
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert float((freq - expected).abs().max()) < 4e-3  # ~4 standard errors at the largest p


def test_confidence_head_without_markov_input_bias_or_calibration():
    batch, gamma, vocab, rank, dim = 3, 7, 1000, 64, 48
    markov, conf = make_heads("vanilla", vocab, rank, dim, gamma, with_markov=False, sts=False, bias=False)
    hidden, base, anchors = make_inputs(batch, gamma, vocab, dim)
    ref = sequential_heads(markov, conf, hidden, base, anchors, [0.0] * batch, [None] * batch)
    c = launch.dspark_confidence(hidden, None, conf.weight, None, None)
    check_confidence(c, ref)


def random_table(seed: int) -> CostTable:
    g = torch.Generator().manual_seed(seed)
    counts = [1, 4, 16, 64, 256]
    steps = torch.cumsum(torch.rand(5, generator=g) * 4, 0).tolist()
    return CostTable(token_counts=counts, step_time_ms=steps, fixed_overhead_ms=float(torch.rand(1, generator=g)) * 3,
                     batch_sizes=[1, 8, 64], batch_overhead_ms=[0.0, 0.4, 2.5])


@pytest.mark.parametrize("gamma", [5, 7])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_schedule_matches_reference(rows, gamma):
    for seed in range(2):
        g = torch.Generator().manual_seed(100 * rows + 10 * gamma + seed)
        survival = torch.cumprod(torch.rand(rows, gamma, generator=g) ** 0.3, dim=1)
        table = random_table(seed)
        tensors = launch.cost_table_tensors(table)
        for production, reference in ((False, schedule_paper), (True, schedule_production)):
            lengths = launch.dspark_schedule(survival, **tensors, fixed_overhead_ms=table.fixed_overhead_ms,
                                             production=production)
            assert torch.equal(lengths.long(), reference(survival, table)), (production, seed)


def test_schedule_edge_cases_match_reference():
    # Ties everywhere (c = 1) with free tokens; a one-point table; rising noise; the AOT row padding.
    cases = [(torch.ones(4, 7), CostTable.flat(0.0)),
             (torch.full((3, 5), 0.5).cumprod(1), CostTable(token_counts=[8], step_time_ms=[3.0], fixed_overhead_ms=1)),
             (torch.tensor([[0.9, 0.9 + 1e-7, 0.5, 0.2, 0.1]]), CostTable.flat(0.5)),
             (torch.rand(20, 7).cumprod(1), random_table(1))]
    for survival, table in cases:
        tensors = launch.cost_table_tensors(table)
        for production, reference in ((False, schedule_paper), (True, schedule_production)):
            for max_rows in (None, launch.SCHEDULE_MAX_ROWS):
                lengths = launch.dspark_schedule(survival, **tensors, fixed_overhead_ms=table.fixed_overhead_ms,
                                                 production=production, max_rows=max_rows)
                assert torch.equal(lengths.long(), reference(survival, table))
