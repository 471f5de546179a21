"""Reference backend: runners match transformers, TP matches TP=1, speculation is lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import OracleDrafter  # tests/oracle.py
from safetensors.torch import load_file, save_file

from dspark_trt.builder.calibrate import encode
from dspark_trt.builder.convert import convert
from dspark_trt.builder.corpus import heldout_prompts
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.qwen3 import Qwen3Target
from dspark_trt.runtime.runner import first_maximum
from dspark_trt.runtime.tp import open_target

CAPTURE = (1, 2, 4)
SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "tiny-qwen3-dspark"


def prompts(count: int = 24, seed: int = 0) -> list[list[int]]:
    """Prompts of varied lengths (1 .. 47 tokens) over the fixture's ordinary tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (1 + (7 * i) % 47,), generator=gen).tolist() for i in range(count)]


def runners(ckpt: Path, slots: int = 8, max_len: int = 256) -> tuple[Qwen3Target, Qwen3DSparkDrafter]:
    return (Qwen3Target(ckpt / "target", num_slots=slots, max_len=max_len),
            Qwen3DSparkDrafter(ckpt / "draft", num_slots=slots, max_len=max_len))


# ------------------------------------------------------------------------------------------ runners


def test_target_matches_transformers(qwen3_pair: Path, qwen3_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen3_pair / "target", dtype=torch.float32).eval()
    target = Qwen3Target(qwen3_ckpt / "target", num_slots=4, max_len=128)
    batch = prompts(3)
    logits, features = target.forward([2, 0, 1], batch, capture=CAPTURE)  # slots out of order on purpose
    with torch.no_grad():
        for i, p in enumerate(batch):
            ref = hf(torch.tensor([p]), output_hidden_states=True)
            assert (logits[i] - ref.logits[0]).abs().max() <= 1e-4
            expected = torch.cat([ref.hidden_states[layer + 1][0] for layer in CAPTURE], dim=-1)
            assert (features[i] - expected).abs().max() <= 1e-4
        # Incremental decoding, then a rollback of two rejected tokens and a different continuation.
        more, _ = target.forward([2, 1], [[5, 6, 7], [9]])
        full = hf(torch.tensor([batch[0] + [5, 6, 7]])).logits[0]
        assert (more[0] - full[-3:]).abs().max() <= 1e-4
        target.rollback(2, len(batch[0]) + 1)
        again, _ = target.forward([2], [[8, 4]])
        full = hf(torch.tensor([batch[0] + [5, 8, 4]])).logits[0]
        assert (again[0] - full[-2:]).abs().max() <= 1e-4


def test_tensor_parallel_logits_equal_tp1(qwen3_pair: Path, qwen3_ckpt: Path, tmp_path: Path) -> None:
    batch = prompts(3, seed=1)
    single = Qwen3Target(qwen3_ckpt / "target", num_slots=4, max_len=64)
    ref, ref_features = single.forward([0, 1, 2], batch, capture=CAPTURE)
    ref_next, _ = single.forward([1], [[3, 4]])
    for tp in (2, 8):
        ckpt = tmp_path / f"tp{tp}"
        convert(qwen3_pair / "target", qwen3_pair / "drafter", ckpt, tp=tp, show_progress=False)
        with open_target("qwen3", ckpt / "target", num_slots=4, max_len=64) as target:
            logits, features = target.forward([0, 1, 2], batch, capture=CAPTURE)
            nxt, _ = target.forward([1], [[3, 4]])
            ids, _ = target.forward([0, 1, 2], batch, start=[0, 0, 0], logits=False)  # greedy: no vocabulary gather
        for a, b in zip(logits + features + nxt, ref + ref_features + ref_next, strict=True):
            assert (a - b).abs().max() <= 1e-4, f"tp={tp}"
        assert all(torch.equal(i, row.argmax(dim=-1)) for i, row in zip(ids, logits, strict=True)), f"tp={tp}"


def test_vocabulary_parallel_argmax_takes_the_first_maximum() -> None:
    """Greedy decoding at tp > 1 compares each shard's (max, id) instead of gathering the logits; ties
    must go where torch.argmax over the whole row sends them: the lowest id."""
    full = torch.tensor([[0.0, 1, 2, 3, 9, 1, 1, 1],   # the maximum in the second shard only
                         [5.0, 0, 0, 0, 0, 5, 0, 0],   # tied across shards: the first shard's id
                         [0.0, 0, 0, 0, 2, 0, 2, 0]])  # tied within a shard: its first
    shards = full.split(4, dim=-1)
    pairs = torch.stack([torch.stack([s.max(dim=-1).values.double(), (s.max(dim=-1).indices + 4 * rank).double()])
                         for rank, s in enumerate(shards)])
    assert first_maximum(pairs).tolist() == full.argmax(dim=-1).tolist() == [4, 0, 4]


# ----------------------------------------------------------------------------------- greedy identity


def greedy(target, drafter, batch, mode: str, **options) -> list:
    requests = [Request(p, max_new_tokens=20 + i % 9, speculation=mode, stop_ids=(7,) if i % 5 == 0 else ())
                for i, p in enumerate(batch)]
    return generate(target, drafter, requests, num_slots=8, **options)


@pytest.mark.parametrize("markov", ["vanilla", "gated", "rnn"])
def test_greedy_speculation_is_token_identical(markov_ckpts: dict[str, Path], markov: str) -> None:
    target, drafter = runners(markov_ckpts[markov])
    batch = prompts()
    reference = greedy(target, drafter, batch, "off")
    assert all(r.mean_tau == 1 for r in reference)
    for mode, options in (("fixed", {}), ("auto", {"scheduler": "paper"}), ("auto", {"scheduler": "production"})):
        results = greedy(target, drafter, batch, mode, **options)
        for ref, got in zip(reference, results, strict=True):
            assert got.tokens == ref.tokens, f"{markov} {mode} {options}"
            assert got.finish_reason == ref.finish_reason
            assert sum(got.taus) == len(got.tokens) - 1  # every token after the first came from a round


def test_greedy_identity_when_drafts_are_often_right(qwen3_ckpt: Path) -> None:
    target, drafter = runners(qwen3_ckpt)
    batch = prompts()
    reference = greedy(target, drafter, batch, "off")
    sequences = [p + r.tokens + [0] * 16 for p, r in zip(batch, reference, strict=True)]
    for mode in ("fixed", "auto"):
        results = greedy(target, OracleDrafter(drafter, sequences), batch, mode,
                         scheduler="paper" if mode == "fixed" else "production", min_gain=0.0)
        assert [r.tokens for r in results] == [r.tokens for r in reference]
        taus = [t for r in results for t in r.taus]
        assert sum(taus) / len(taus) > 2.5 and max(taus) == 8  # full blocks were accepted


def test_stop_ids_and_token_budget(qwen3_ckpt: Path) -> None:
    target, drafter = runners(qwen3_ckpt)
    [plain] = generate(target, drafter, [Request(prompts(1)[0], max_new_tokens=30, speculation="off")])
    stop = plain.tokens[6]
    first = plain.tokens.index(stop)
    for mode in ("off", "fixed", "auto"):
        [stopped] = generate(target, drafter, [Request(prompts(1)[0], max_new_tokens=30, speculation=mode,
                                                       stop_ids=(stop,))])
        assert stopped.tokens == plain.tokens[: first + 1] and stopped.finish_reason == "stop"
        [short] = generate(target, drafter, [Request(prompts(1)[0], max_new_tokens=11, speculation=mode)])
        assert short.tokens == plain.tokens[:11] and short.finish_reason == "length"


def test_stop_strings_end_after_the_completing_token_in_process(qwen3_ckpt: Path) -> None:
    """Stop strings live in the decoder (as stop ids do), so `generate()` honours them as the server does."""
    target, drafter = runners(qwen3_ckpt)

    def decode(ids) -> str:  # two characters a token, so a stop string can end inside a token's text
        return "".join(f"{chr(97 + i % 26)}{chr(65 + i // 26 % 26)}" for i in ids)

    prompt = prompts(1)[0]
    [plain] = generate(target, drafter, [Request(prompt, max_new_tokens=30, speculation="off")])
    text = decode(plain.tokens)
    stop = text[13:16]  # ends inside the text of token 7
    end = (text.index(stop) + len(stop) - 1) // 2  # the token whose text completes the first occurrence
    for mode in ("off", "fixed", "auto"):
        [stopped] = generate(target, drafter, [Request(prompt, max_new_tokens=30, speculation=mode,
                                                       stop_strings=(stop, "never in the text"))], decode=decode)
        assert stopped.tokens == plain.tokens[: end + 1] and stopped.finish_reason == "stop", mode
    with pytest.raises(ValueError, match="decode="):
        generate(target, drafter, [Request(prompt, stop_strings=(stop,))])
    with pytest.raises(ValueError, match="empty"):
        generate(target, drafter, [Request(prompt, stop_strings=("",))], decode=decode)


def test_confidence_head_without_markov_embedding(qwen3_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt, ckpt)
    weights = load_file(str(ckpt / "draft" / "rank0.safetensors"))
    hidden = weights["norm.weight"].shape[0]
    weights["confidence_head.proj.weight"] = weights["confidence_head.proj.weight"][:, :hidden].contiguous()
    save_file(weights, str(ckpt / "draft" / "rank0.safetensors"))
    config = json.loads((ckpt / "draft" / "config.json").read_text())
    config["dspark"]["confidence_head_with_markov"] = False
    (ckpt / "draft" / "config.json").write_text(json.dumps(config))
    target, drafter = runners(ckpt)
    assert drafter.confidence.weight.shape[1] == hidden
    reference = greedy(target, drafter, prompts(6), "off")
    results = greedy(target, drafter, prompts(6), "auto")
    assert [r.tokens for r in results] == [r.tokens for r in reference]


def test_auto_skips_drafting_when_the_cost_table_says_it_cannot_pay(qwen3_ckpt: Path) -> None:
    from dspark_trt.runtime.scheduler import CostTable

    target, drafter = runners(qwen3_ckpt)
    calls = []

    class Counting:  # the drafter, counting its draft calls
        def __getattr__(self, name):
            return getattr(drafter, name)

        def draft(self, *args, **kwargs):
            calls.append(1)
            return drafter.draft(*args, **kwargs)

    batch = prompts(8)
    reference = greedy(target, drafter, batch, "off")
    for draft_ms, drafts in ((0.0, True), (1000.0, False)):
        calls.clear()
        table = CostTable([1, 64], [1.0, 2.0], 5.0, [1, 8], [0.0, 0.0], draft_step_ms=[draft_ms, draft_ms])
        results = greedy(target, Counting(), batch, "auto", cost_table=table)
        assert [r.tokens for r in results] == [r.tokens for r in reference]
        assert bool(calls) == drafts


def test_auto_stops_drafting_what_its_confidences_overrate(qwen3_ckpt: Path) -> None:
    """The random fixture's drafts are almost never accepted. With its confidences forced to 0.95 they
    promise τ ≈ 5; scaled by the acceptance each block position actually gets, `auto` soon finds that
    drafting does not pay and stops, where trusting the confidences it drafts every round."""
    from dataclasses import replace

    from dspark_trt.runtime.scheduler import CostTable

    target, drafter = runners(qwen3_ckpt)
    calls = []

    class Overconfident:  # the drafter, sure of every draft, counting its draft calls
        def __getattr__(self, name):
            return getattr(drafter, name)

        def draft(self, *args, **kwargs):
            calls.append(1)
            draft = drafter.draft(*args, **kwargs)
            return replace(draft, confidence=torch.full_like(draft.confidence, 0.95))

    batch = prompts(8)
    reference = greedy(target, drafter, batch, "off")
    table = CostTable([1, 64], [1.0, 2.0], 5.0, [1, 8], [0.0, 0.0], draft_step_ms=[4.0, 4.0])
    counts = {}
    for adapt in (False, True):
        calls.clear()
        results = greedy(target, Overconfident(), batch, "auto", cost_table=table, adapt_survival=adapt)
        assert [r.tokens for r in results] == [r.tokens for r in reference]
        counts[adapt] = (len(calls), max(r.rounds for r in results))
    (trusting, steps), (adapted, _) = counts[False], counts[True]
    assert trusting >= steps - 1  # a draft call in every step but the last (the longest request took `steps`)
    assert adapted * 4 <= trusting


def test_production_scheduler_plans_with_the_previous_rounds_survival(qwen3_ckpt: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from dspark_trt.runtime import generate as generate_module
    from dspark_trt.runtime.generate import SpeculativeDecoder

    target, drafter = runners(qwen3_ckpt)
    seen, drafted = [], []
    real_draft, real_plan = drafter.draft, generate_module.plan_estimate

    def draft(*args, **kwargs):
        assert len(seen) == len(drafted) + 1  # planned before this round's drafts exist
        drafted.append(real_draft(*args, **kwargs))
        return drafted[-1]

    def plan(estimate, *args, **kwargs):
        seen.append(estimate.copy())
        return real_plan(estimate, *args, **kwargs)

    monkeypatch.setattr(drafter, "draft", draft)
    monkeypatch.setattr(generate_module, "plan_estimate", plan)
    decoder = SpeculativeDecoder(target, drafter, num_slots=1, scheduler="production", adapt_survival=False)
    decoder.admit([Request(prompts(1)[0], max_new_tokens=30)])
    for _ in range(3):
        decoder.step()
    assert (seen[0] == 1).all()  # a fresh request, before any draft: the prior, ones
    for round_ in (1, 2):
        assert (seen[round_][0] == drafted[round_ - 1].survival[0].double().numpy()).all()


def test_context_for_many_slots_in_one_pass_equals_one_slot_at_a_time(qwen3_ckpt: Path) -> None:
    """The served drafter takes every slot's new context in one batched pass (different lengths, some
    empty); its caches must hold exactly what slot-by-slot updates write."""
    gen = torch.Generator().manual_seed(0)
    one, many = Qwen3DSparkDrafter(qwen3_ckpt / "draft"), Qwen3DSparkDrafter(qwen3_ckpt / "draft")
    width = one.w["fc.weight"].shape[1]
    for counts in ([5, 0, 3, 1], [2, 4, 0, 7]):
        features = [torch.randn(n, width, generator=gen) for n in counts]
        slots = [3, 0, 6, 1]
        for slot, f in zip(slots, features, strict=True):
            one.add_context(slot, f)
        many.add_context_batch(slots, features)
    assert torch.equal(one.ctx_len, many.ctx_len) and one.ctx_len.tolist()[:4] == [4, 8, 0, 7]
    assert torch.allclose(one.k_ctx, many.k_ctx, atol=1e-6) and torch.allclose(one.v_ctx, many.v_ctx, atol=1e-6)
    with pytest.raises(ValueError, match="twice"):
        many.add_context_batch([1, 1], features[:2])
    with pytest.raises(ValueError, match="slot 0: context would exceed"):
        many.add_context_batch([0], [torch.zeros(many.max_len, width)])


def test_drafting_slots_together_equals_one_at_a_time(qwen3_ckpt: Path) -> None:
    """A batched round masks each slot's shorter context; each round writes its block's keys just past
    the slot's context, so drafting must leave nothing that a later round (after more context) sees."""
    gen = torch.Generator().manual_seed(1)
    together, alone, never = (Qwen3DSparkDrafter(qwen3_ckpt / "draft", num_slots=4, max_len=64) for _ in range(3))
    width = together.w["fc.weight"].shape[1]
    first = [torch.randn(n, width, generator=gen) for n in (9, 2, 5)]
    more = [torch.randn(n, width, generator=gen) for n in (1, 3, 2)]
    for drafter in (together, alone, never):
        drafter.add_context_batch([0, 1, 2], first)
    slots, anchors = [2, 0, 1], [11, 12, 13]
    batch = together.draft(slots, anchors, [0.0] * 3, [None] * 3)
    for row, (slot, anchor) in enumerate(zip(slots, anchors, strict=True)):
        single = alone.draft([slot], [anchor], [0.0], [None])
        assert torch.equal(single.tokens[0], batch.tokens[row])
        torch.testing.assert_close(single.conf_logits[0], batch.conf_logits[row], atol=1e-5, rtol=0)
    for drafter in (together, alone, never):
        drafter.add_context_batch([0, 1, 2], more)
    later = [d.draft(slots, anchors, [0.0] * 3, [None] * 3) for d in (together, alone, never)]
    for draft in later[:2]:
        assert torch.equal(draft.tokens, later[2].tokens)
        torch.testing.assert_close(draft.conf_logits, later[2].conf_logits, atol=1e-5, rtol=0)


def test_measured_round_overhead_makes_drafting_pay(qwen3_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Served, each round also pays for what happens between rounds (sending responses). The profiled
    table says a 150 ms draft never pays against a 20 ms verify; with 5 s measured between rounds it
    does (fewer rounds per token), and the decoder must find that out from its own clock."""
    from dspark_trt.runtime import generate as generate_module
    from dspark_trt.runtime.generate import SpeculativeDecoder
    from dspark_trt.runtime.scheduler import CostTable

    now = [0.0]
    monkeypatch.setattr(generate_module.time, "perf_counter", lambda: now[0])
    target, drafter = runners(qwen3_ckpt)
    calls = []

    class Timed:  # the runners, taking a fixed time on the fake clock
        def __init__(self, inner, method: str, seconds: float) -> None:
            self.inner, self.method, self.seconds = inner, method, seconds

        def __getattr__(self, name):
            if name != self.method:
                return getattr(self.inner, name)

            def timed(*args, **kwargs):
                now[0] += self.seconds
                calls.append(self.method)
                return getattr(self.inner, name)(*args, **kwargs)
            return timed

    table = CostTable([1, 64], [0.0, 0.1], 20.0, [1, 8], [0.0, 0.0], draft_step_ms=[150.0, 150.0])
    prompt = prompts(1)[0]
    reference = generate(target, drafter, [Request(prompt, max_new_tokens=24, speculation="off")])[0].tokens
    for measure, drafts in ((False, False), (True, True)):
        calls.clear()
        decoder = SpeculativeDecoder(Timed(target, "forward", 0.020), Timed(drafter, "draft", 0.150), num_slots=1,
                                     cost_table=table, measure_costs=measure)
        slot = decoder.admit([Request(prompt, max_new_tokens=24, speculation="auto")])[0]
        while decoder.live[slot].result.finish_reason is None:
            decoder.step()
            now[0] += 5.0  # responses, between rounds
        assert decoder.release(slot).tokens == reference
        # Measured, it drafts in most rounds (not just the one in EXPLORE_EVERY that keeps estimates fresh).
        assert (calls.count("draft") > calls.count("forward") // 2) == drafts
    assert abs(decoder.served.verify.at(6)) < 0.1 and abs(decoder.served.draft.at(1)) < 0.1  # as profiled
    assert decoder.served.rounds_extra.at(1) > 2500


def test_live_costs_draft_now_and_then_when_drafting_does_not_pay(qwen3_ckpt: Path) -> None:
    """Estimates only change in rounds that draft: served `auto` drafts in one of EXPLORE_EVERY rounds
    it would skip, so one slow draft call cannot stop drafting for good."""
    from dspark_trt.runtime.generate import EXPLORE_EVERY, SpeculativeDecoder
    from dspark_trt.runtime.scheduler import CostTable

    target, drafter = runners(qwen3_ckpt)
    drafts = []

    class Counting:
        def __getattr__(self, name):
            return getattr(drafter, name)

        def draft(self, *args, **kwargs):
            drafts.append(1)
            return drafter.draft(*args, **kwargs)

    table = CostTable([1, 64], [1.0, 2.0], 5.0, [1, 8], [0.0, 0.0], draft_step_ms=[1e6, 1e6])
    decoder = SpeculativeDecoder(target, Counting(), num_slots=1, cost_table=table, measure_costs=True)
    slot = decoder.admit([Request(prompts(1)[0], max_new_tokens=40, speculation="auto")])[0]
    rounds = 0
    while decoder.live[slot].result.finish_reason is None:
        decoder.step()
        rounds += 1
    assert 1 <= len(drafts) <= rounds // EXPLORE_EVERY + 1


def test_bf16_products_keep_the_trained_drafters_acceptance(tmp_path: Path) -> None:
    """The shipped trained drafter with its large projections in bf16 (layers.Projection; the served
    default on CPUs with native bf16, emulated elsewhere): each product is ~0.4 % off, which must leave
    its proposals what float32 proposes and the output the target's own. Of the fixture's weights only
    the lm_head is large enough for the bf16 path."""
    ckpt = tmp_path / "ckpt"
    convert(SHIPPED / "target", SHIPPED / "drafter", ckpt, tp=1, show_progress=False)
    prompts = encode(ckpt, heldout_prompts(16, part=1, seed=0))
    slots, max_len = list(range(len(prompts))), max(map(len, prompts)) + 40
    target = Qwen3Target(ckpt / "target", num_slots=len(slots), max_len=max_len)
    fast, exact = (Qwen3DSparkDrafter(ckpt / "draft", num_slots=len(slots), max_len=max_len, bf16_products=bf16)
                   for bf16 in (True, False))
    assert fast.weights.lm_head.bf16 and fast.weights.gate_up[0].bf16
    assert not fast.weights.o[0].bf16  # o_proj: 256 x 256, too small
    assert not exact.weights.lm_head.bf16

    # One round on real context: (measured) every token the same, confidence logits within 0.006.
    _, features = target.forward(slots, prompts, capture=exact.target_layer_ids, start=[0] * len(slots))
    for drafter in (fast, exact):
        drafter.add_context_batch(slots, [f[:-1] for f in features])
    one_round = [d.draft(slots, [p[-1] for p in prompts], [0.0] * len(slots), [None] * len(slots))
                 for d in (fast, exact)]
    assert (one_round[0].tokens == one_round[1].tokens).float().mean() >= 0.95
    torch.testing.assert_close(one_round[0].conf_logits, one_round[1].conf_logits, atol=0.05, rtol=0)

    for drafter in (fast, exact):
        for slot in slots:
            drafter.reset(slot)
    requests = [Request(p, max_new_tokens=32, speculation="fixed") for p in prompts[:8]]
    plain = generate(target, exact, [Request(p, max_new_tokens=32, speculation="off") for p in prompts[:8]])
    with_fast, with_exact = (generate(target, drafter, requests) for drafter in (fast, exact))
    assert [r.tokens for r in with_fast] == [r.tokens for r in plain] == [r.tokens for r in with_exact]
    tau = [sum(r.mean_tau for r in results) / len(results) for results in (with_fast, with_exact)]
    assert tau[1] > 2.0, "the trained drafter's acceptance (float32)"
    assert abs(tau[0] - tau[1]) <= 0.1, f"τ with bf16 products {tau[0]:.3f}, float32 {tau[1]:.3f}"
