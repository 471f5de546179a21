"""DeepSeek-V4 on the reference backend: the target runner against transformers (fresh, incremental and
after rollbacks, > 128 tokens so the compressed branches work), tp/ep 2 and 8 against tp 1, the built-in
`mtp.*` DSpark drafter, lossless greedy speculation, and the served path through tritonserver.

The oracle is transformers' `DeepseekV4ForCausalLM` in float32 loaded (by transformers' own renaming
rules) from a dequantised copy of the fixture, so it sees exactly the weights our runner dequantises.
It runs with `ties_to_earlier`: the lightning indexer keeps the top-k of scores that are sums of ReLUs,
often exactly 0, and torch.topk orders ties arbitrarily (transformers' own full and incremental passes
then disagree by ~0.3 in the logits on this fixture); the runner's documented rule is "ties go to the
earlier entry", and the oracle is given the same rule.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import OracleDrafter  # tests/oracle.py
from safetensors.torch import load_file, save_file

from dspark_trt.builder.convert import convert
from dspark_trt.runtime.deepseek_v4 import DeepseekV4Target, attend, hc_head
from dspark_trt.runtime.dspark.deepseek_v4 import DeepseekV4DSparkDrafter
from dspark_trt.runtime.fp8 import dequantize_fp8_block
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.layers import rms_norm
from dspark_trt.runtime.loader import open_checkpoint
from dspark_trt.runtime.tp import open_target

CAPTURE = (1, 2, 3)  # the fixture's dspark_target_layer_ids
TOL = 1e-4  # fp32 vs transformers; measured ~2e-6 on logits of magnitude ~1.5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors on a shared 2-core machine run much faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def v4_ckpt(v4_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v4ckpt") / "tp1"
    convert(v4_pair / "target", None, out, tp=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def oracle(v4_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    src, dst = v4_pair / "target", tmp_path_factory.mktemp("v4hf")
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        shard = load_file(str(path))
        for name, t in shard.items():
            if name.endswith("_scale_inv") or name.startswith("mtp."):
                continue
            if t.dtype == torch.float8_e4m3fn:
                t = dequantize_fp8_block(t, shard[name + "_scale_inv"], 128, torch.float32)
            weights[name] = t.float()
    save_file(weights, str(dst / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@pytest.fixture
def ties_to_earlier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor.topk with ties broken towards the lower index (only the indexer uses the method form)."""

    def topk(self: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
        values, indices = self.sort(dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    monkeypatch.setattr(torch.Tensor, "topk", topk)


def tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=gen).tolist()  # ordinary tokens (specials are 1020+)


def prompts(count: int = 8, seed: int = 0) -> list[list[int]]:
    """Lengths 1 .. 150: some prompts start past the 128-token window, the HCA rate and many CSA windows."""
    gen = torch.Generator().manual_seed(seed)
    return [tokens(1 + (37 * i) % 151, gen) for i in range(count)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------ target


def test_target_matches_transformers(v4_ckpt: Path, oracle: torch.nn.Module, ties_to_earlier: None) -> None:
    """Logits, and the DSpark features: the mean over the mHC streams of each chosen layer's OUTPUT.

    transformers' `hidden_states[l + 1]` is layer l's output streams [.., hc, D] except for the last
    layer: its entry is replaced by the model's final output (hc_head + norm, [.., D]). The fixture's
    ids (1, 2, 3) include the last layer, as V4-Flash's (40, 41, 42) of 43 do, so the oracle records each
    decoder layer's output with a forward hook.
    """
    target = DeepseekV4Target(v4_ckpt / "target", num_slots=4, max_len=256)
    assert target.target_feature == "layer_output_hc_mean"  # what the converter records for V4
    gen = torch.Generator().manual_seed(0)
    batch = [tokens(n, gen) for n in (200, 37, 140)]
    logits, features = target.forward([2, 0, 1], batch, capture=CAPTURE)  # slots out of order on purpose
    outputs: dict[int, torch.Tensor] = {}
    layers = oracle.model.layers
    hooks = [layers[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out[0]))
             for i in range(len(layers))]
    try:
        with torch.no_grad():
            for i, seq in enumerate(batch):
                ref = oracle(torch.tensor([seq]), output_hidden_states=True)
                assert max_err(logits[i], ref.logits[0]) <= TOL
                assert torch.equal(ref.hidden_states[3][0], outputs[2])  # layer 2's output, as said above
                last = outputs[len(layers) - 1]  # [T, hc, D]
                assert ref.hidden_states[len(layers)][0].shape == (len(seq), last.shape[-1])  # not its streams
                expected = torch.cat([outputs[layer].mean(-2) for layer in CAPTURE], dim=-1)
                assert max_err(features[i], expected) <= TOL
            # The non-default input-side reading: the streams entering layer l (hidden_states[l]).
            inputs = DeepseekV4Target(v4_ckpt / "target", num_slots=1, max_len=64, target_feature="layer_input_hc_mean")
            _, (got,) = inputs.forward([0], [batch[1]], capture=CAPTURE)
            ref = oracle(torch.tensor([batch[1]]), output_hidden_states=True)
            assert max_err(got, torch.cat([ref.hidden_states[layer][0].mean(-2) for layer in CAPTURE], -1)) <= TOL
    finally:
        for hook in hooks:
            hook.remove()


def test_incremental_decoding_with_rollbacks_matches_transformers(v4_ckpt: Path, oracle: torch.nn.Module,
                                                                 ties_to_earlier: None) -> None:
    """Verify-style steps of 1..4 tokens on two slots, with rejected tokens rolled back, across position 128
    (the window, the first HCA entry) and many CSA windows, each step checked against a fresh full forward."""
    target = DeepseekV4Target(v4_ckpt / "target", num_slots=2, max_len=256)
    gen = torch.Generator().manual_seed(1)
    seqs = [tokens(118, gen), tokens(5, gen)]
    target.forward([0, 1], seqs)
    for step in range(14):
        new = [tokens(1 + step % 4, gen), tokens(1 + (3 * step) % 4, gen)]
        logits, _ = target.forward([1, 0], new[::-1])
        for slot in (0, 1):
            seqs[slot] += new[slot]
            with torch.no_grad():
                ref = oracle(torch.tensor([seqs[slot]])).logits[0, -len(new[slot]):]
            assert max_err(logits[1 - slot], ref) <= TOL, f"step {step} slot {slot}"
        keep = len(seqs[0]) - len(new[0]) + 1  # slot 0 accepts only the first of its new tokens
        target.rollback(0, keep)
        seqs[0] = seqs[0][:keep]
    # A rollback from past 128 to before it drops the first HCA entry; what follows must not see it.
    target.rollback(0, 125)
    seqs[0] = seqs[0][:125]
    more = tokens(6, gen)
    logits, _ = target.forward([0], [more])
    with torch.no_grad():
        ref = oracle(torch.tensor([seqs[0] + more])).logits[0, -6:]
    assert max_err(logits[0], ref) <= TOL


def test_tensor_and_expert_parallel_logits_equal_tp1(v4_pair: Path, v4_ckpt: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    batch = [tokens(n, gen) for n in (150, 9, 64)]
    single = DeepseekV4Target(v4_ckpt / "target", num_slots=4, max_len=192)
    ref, ref_features = single.forward([0, 1, 2], batch, capture=CAPTURE)
    single.rollback(0, 140)
    ref_next, _ = single.forward([0, 1], [[3, 4, 5], [6]])
    for tp in (2, 8):
        ckpt = tmp_path / f"tp{tp}"
        convert(v4_pair / "target", None, ckpt, tp=tp, show_progress=False)
        with open_target("deepseek-v4", ckpt / "target", num_slots=4, max_len=192) as target:
            logits, features = target.forward([0, 1, 2], batch, capture=CAPTURE)
            target.rollback(0, 140)
            nxt, _ = target.forward([0, 1], [[3, 4, 5], [6]])
            ids, _ = target.forward([0, 1, 2], batch, start=[0, 0, 0], logits=False)  # greedy: no vocabulary gather
        for a, b in zip(logits + features + nxt, ref + ref_features + ref_next, strict=True):
            assert max_err(a, b) <= TOL, f"tp={tp}"
        assert all(torch.equal(i, row.argmax(dim=-1)) for i, row in zip(ids, logits, strict=True)), f"tp={tp}"
        if tp == 2:  # the drafter reassembles its shards (and the vocabulary-sharded head) into tp-1 weights
            sharded = DeepseekV4DSparkDrafter(ckpt / "draft", num_slots=2, max_len=192)
            plain = DeepseekV4DSparkDrafter(v4_ckpt / "draft", num_slots=2, max_len=192)
            for drafter in (sharded, plain):
                drafter.add_context(0, ref_features[0])
            a, b = (d.draft([0], [7], [1.0], [torch.Generator().manual_seed(0)]) for d in (sharded, plain))
            assert max_err(a.probs, b.probs) <= 1e-5 and torch.equal(a.tokens, b.tokens)


# ----------------------------------------------------------------------------------------- drafter


def test_drafter_batches_slots_and_slides_its_context_window(v4_ckpt: Path) -> None:
    target = DeepseekV4Target(v4_ckpt / "target", num_slots=3, max_len=256)
    drafter = DeepseekV4DSparkDrafter(v4_ckpt / "draft", num_slots=3, max_len=256)
    assert (drafter.block_size, drafter.target_layer_ids, drafter.stages) == (5, CAPTURE, 3)
    assert drafter.confidence.bias is None and drafter.markov.kind == "vanilla"
    gen = torch.Generator().manual_seed(3)
    batch = [tokens(n, gen) for n in (170, 3, 60)]
    _, features = target.forward([0, 1, 2], batch, capture=CAPTURE)
    for slot, f in enumerate(features):
        drafter.add_context(slot, f)
    together = drafter.draft([2, 0, 1], [11, 12, 13], [0.0] * 3, [None] * 3)
    assert together.tokens.shape == (3, 5) and together.probs.shape == (3, 5, 0)  # all greedy: no distributions
    assert bool(((together.confidence > 0) & (together.confidence < 1)).all())
    for row, (slot, anchor) in enumerate(zip([2, 0, 1], [11, 12, 13], strict=True)):
        alone = drafter.draft([slot], [anchor], [0.0], [None])
        assert torch.equal(alone.tokens[0], together.tokens[row])
        assert max_err(alone.conf_logits[0], together.conf_logits[row]) <= 1e-5
    # Slot 0 holds 170 context tokens: the block (positions 170..174) sees context positions 42..169.
    before = drafter.draft([0], [11], [1.0], [torch.Generator().manual_seed(0)])
    changed = features[0].clone()
    changed[:42] += 3.0  # positions 0..41: outside the window
    drafter.reset(0)
    drafter.add_context(0, changed)
    after = drafter.draft([0], [11], [1.0], [torch.Generator().manual_seed(0)])
    assert max_err(before.probs, after.probs) == 0.0
    changed[42] += 3.0  # the oldest position inside the window (a per-query window hid it from every query)
    drafter.reset(0)
    drafter.add_context(0, changed)
    assert max_err(before.probs, drafter.draft([0], [11], [1.0], [torch.Generator().manual_seed(0)]).probs) > 1e-4


def test_every_block_query_sees_the_newest_window_of_context(v4_ckpt: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """DeepSeek's and TensorRT-LLM's `get_dspark_topk_idxs`: every block query attends to the same keys, the
    newest min(128, ctx_len) context positions and the whole block (non-causal), in every stage."""
    from dspark_trt.runtime.dspark import deepseek_v4 as module

    masks: list[torch.Tensor] = []

    def recording_attend(q, kv, allowed, sinks):
        masks.append(allowed.clone())
        return attend(q, kv, allowed, sinks)

    monkeypatch.setattr(module, "attend", recording_attend)
    drafter = DeepseekV4DSparkDrafter(v4_ckpt / "draft", num_slots=2, max_len=256)
    gen = torch.Generator().manual_seed(4)
    lengths = (170, 3)
    for slot, n in enumerate(lengths):
        drafter.add_context(slot, torch.randn(n, 3 * 256, generator=gen))
    drafter.draft([0, 1], [11, 12], [0.0, 0.0], [None, None])
    assert len(masks) == drafter.stages
    for allowed in masks:
        context, block = allowed[..., :170], allowed[..., 170:]  # columns: positions 0..169, then the block
        assert block.shape[-1] == 5 and bool(block.all())
        for row, n in enumerate(lengths):
            for k in range(5):
                assert context[row, k].nonzero()[:, 0].tolist() == list(range(max(0, n - 128), n)), (row, k)


def test_confidence_head_reads_the_pre_norm_head_hidden(v4_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSeek's `forward_head` feeds `cat[hc_head(x), markov_w1[prev]]` to the confidence head, before `norm`."""
    from dspark_trt.runtime.dspark import deepseek_v4 as module

    heads: list[torch.Tensor] = []

    def recording_hc_head(*args):
        heads.append(hc_head(*args))
        return heads[-1]

    monkeypatch.setattr(module, "hc_head", recording_hc_head)
    drafter = DeepseekV4DSparkDrafter(v4_ckpt / "draft", num_slots=1, max_len=64)
    drafter.add_context(0, torch.randn(20, 3 * 256, generator=torch.Generator().manual_seed(5)))
    draft = drafter.draft([0], [5], [0.0], [None])
    (head_hidden,) = heads
    prev = torch.cat([torch.tensor([[5]]), draft.tokens[:, :-1]], dim=1)  # x_{k-1}: the anchor, then the drafts
    markov = F.embedding(prev, drafter.markov.w1)

    def confidence_logits(h: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([h, markov], -1), drafter.confidence.weight)[..., 0]

    assert max_err(draft.conf_logits, confidence_logits(head_hidden)) <= 1e-6
    # The choice matters on this fixture: the normed hidden (TensorRT-LLM's input) gives other logits.
    normed = rms_norm(head_hidden, drafter.w["mtp.2.norm.weight"], drafter.cfg.eps)
    assert max_err(draft.conf_logits, confidence_logits(normed)) > 1e-2


def test_drafter_reads_the_older_markov_names(v4_ckpt: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(v4_ckpt, ckpt)
    path = ckpt / "draft" / "rank0.safetensors"
    weights = load_file(str(path))
    for new, old in (("markov_w1", "embed"), ("markov_w2", "head")):
        weights[f"mtp.2.markov_head.{old}.weight"] = weights.pop(f"mtp.2.markov_head.{new}.weight")
    save_file(weights, str(path))
    features = torch.randn(20, 3 * 256, generator=torch.Generator().manual_seed(0))
    drafts = []
    for directory in (v4_ckpt, ckpt):
        drafter = DeepseekV4DSparkDrafter(directory / "draft", num_slots=1, max_len=64)
        drafter.add_context(0, features)
        drafts.append(drafter.draft([0], [5], [0.0], [None]))
    assert torch.equal(drafts[0].tokens, drafts[1].tokens) and torch.equal(drafts[0].probs, drafts[1].probs)


# ------------------------------------------------------------------------------- lossless decoding


def greedy(target, drafter, batch: list[list[int]], mode: str, **options) -> list:
    requests = [Request(p, max_new_tokens=16 + i % 5, speculation=mode, stop_ids=(7,) if i % 4 == 0 else ())
                for i, p in enumerate(batch)]
    return generate(target, drafter, requests, num_slots=8, **options)


def test_greedy_speculation_is_token_identical(v4_ckpt: Path) -> None:
    target, drafter, manifest = open_checkpoint(v4_ckpt, num_slots=8, max_len=256)
    assert manifest["family"] == "deepseek-v4" and isinstance(target, DeepseekV4Target)
    batch = prompts()
    reference = greedy(target, drafter, batch, "off")
    for mode, options in (("fixed", {}), ("auto", {"scheduler": "paper"})):
        results = greedy(target, drafter, batch, mode, **options)
        for ref, got in zip(reference, results, strict=True):
            assert got.tokens == ref.tokens and got.finish_reason == ref.finish_reason, f"{mode} {options}"
            assert sum(got.taus) == len(got.tokens) - 1
    sequences = [p + r.tokens + [0] * 8 for p, r in zip(batch, reference, strict=True)]
    for mode in ("fixed", "auto"):
        results = greedy(target, OracleDrafter(drafter, sequences), batch, mode,
                         scheduler="paper" if mode == "fixed" else "production", min_gain=0.0)
        assert [r.tokens for r in results] == [r.tokens for r in reference], mode
        taus = [t for r in results for t in r.taus]
        assert sum(taus) / len(taus) > 2.5 and max(taus) == 6  # full blocks of γ = 5 were accepted


VOCAB, PROMPT, SAMPLES = 16, [3, 1, 4], 2000


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A 16-token V4 (CSA, HCA, hash and routed MoE) with peaked distributions and its 3-stage mtp drafter,
    converted. The stages come from a throw-away sliding-window V4 saved by transformers, as in the fixture."""
    from transformers import AutoModelForCausalLM

    from dspark_trt.builder.fixture_deepseek_v4 import BOS, EOS, MASK, PAD, v4_config

    root = tmp_path_factory.mktemp("v4-small-vocab")
    ids = {BOS: 12, EOS: 13, PAD: 14, MASK: 15}
    dims = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=32, q_lora_rank=32, o_groups=2,
                o_lora_rank=16, n_routed_experts=4, moe_intermediate_size=32, index_n_heads=2, index_head_dim=16,
                num_hidden_layers=3, dspark_target_layer_ids=[0, 1, 2], dspark_markov_rank=8)
    config = v4_config(ids, layer_types=["sliding_attention", "compressed_sparse_attention",
                                         "heavily_compressed_attention"], mlp_layer_types=["hash_moe", "moe", "moe"],
                       **dims)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so the test has teeth
        model.lm_head.weight.mul_(60)
        model.model.layers[0].mlp.gate.tid2eid.copy_(torch.stack([torch.arange(VOCAB) % 4,
                                                                  (torch.arange(VOCAB) + 1) % 4], 1))
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "target")
    donor = v4_config(ids, layer_types=["sliding_attention"] * 3, mlp_layer_types=["moe"] * 3, **dims)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(donor, dtype=torch.bfloat16).save_pretrained(root / "donor")
    stages = load_file(str(root / "donor" / "model.safetensors"))
    weights = load_file(str(root / "target" / "model.safetensors"))
    weights.update({"mtp." + n.removeprefix("model.layers."): t for n, t in stages.items()
                    if n.startswith("model.layers.")})
    weights["mtp.2.norm.weight"] = stages["model.norm.weight"]
    weights.update({f"mtp.2.hc_head_{part}": stages[f"model.hc_head.hc_{part}"] for part in ("fn", "base", "scale")})
    gen = torch.Generator().manual_seed(2)
    for name, shape in (("mtp.0.main_proj.weight", (64, 3 * 64)), ("mtp.2.markov_head.markov_w1.weight", (VOCAB, 8)),
                        ("mtp.2.markov_head.markov_w2.weight", (VOCAB, 8)),
                        ("mtp.2.confidence_head.proj.weight", (1, 64 + 8))):
        weights[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    weights["mtp.0.main_norm.weight"] = torch.ones(64)
    save_file(weights, str(root / "target" / "model.safetensors"), metadata={"format": "pt"})
    from test_sampling import write_word_tokenizer  # tests/test_sampling.py

    write_word_tokenizer(root / "target", VOCAB)
    convert(root / "target", None, root / "ckpt", show_progress=False)
    return root / "ckpt", model.float().eval()


def test_speculative_sampling_keeps_the_target_distribution(small_vocab, monkeypatch) -> None:
    """As tests/test_sampling.py for Qwen3: the exact P(2nd, 3rd token) from transformers vs 2000 seeded
    speculative samples (fixed γ, so every round verifies a draft), chi-square p > 1e-3; a verifier that
    accepts every draft is caught (p < 1e-6) with a quarter of the samples."""
    from test_sampling import chi_square_p

    from dspark_trt.runtime import generate as generate_module

    ckpt, model = small_vocab
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1], -1)
        p2 = torch.softmax(model(torch.tensor([PROMPT + [a] for a in range(VOCAB)])).logits[:, -1], -1)
        seqs = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = torch.softmax(model(seqs).logits[:, -1], -1).view(VOCAB, VOCAB, VOCAB)
    exact = torch.einsum("a,ab,abc->bc", p1.double(), p2.double(), p3.double())

    def counts(samples: int) -> tuple[torch.Tensor, float]:
        target, drafter, _ = open_checkpoint(ckpt, num_slots=64, max_len=16)
        results = generate(target, drafter, [Request(PROMPT, max_new_tokens=3, temperature=1.0, seed=s,
                                                     speculation="fixed") for s in range(samples)], num_slots=64)
        table = torch.zeros(VOCAB, VOCAB)
        for r in results:
            table[r.tokens[1], r.tokens[2]] += 1
        return table, sum(sum(r.verified) for r in results) / sum(r.rounds for r in results)

    table, mean_verified = counts(SAMPLES)
    assert chi_square_p(table, exact) > 1e-3 and mean_verified > 0.5

    def accept_everything(drafts, draft_probs, target_logits, temperature, generator):
        probs = torch.softmax(target_logits[len(drafts)].float() / temperature, -1)
        return len(drafts), int(torch.multinomial(probs, 1, generator=generator)[0])

    monkeypatch.setattr(generate_module, "verify_sampling", accept_everything)
    assert chi_square_p(counts(SAMPLES // 4)[0], exact) < 1e-6


# ----------------------------------------------------------------------------------------- serving


def test_served_stream_equals_target_only_greedy(v4_ckpt: Path, tmp_path: Path) -> None:
    """fixture -> convert -> reference engine -> repo -> tritonserver; streamed greedy output equals in-process
    target-only greedy decoding (tp 1: gloo ranks inside Triton are covered by tests/test_serving.py)."""
    from dspark_trt.builder.engine import build_engine
    from dspark_trt.builder.repo import build_repo
    from dspark_trt.builder.serve import start_server
    from dspark_trt.client.stream import complete
    from dspark_trt.runtime.tp import free_port

    batch = prompts(5, seed=5)[2:]  # 75, 112 and 149 tokens
    target, drafter, _ = open_checkpoint(v4_ckpt, num_slots=3, max_len=256)
    expected = [r.tokens for r in generate(target, drafter, [Request(p, max_new_tokens=12, speculation="off")
                                                             for p in batch])]
    build_engine(v4_ckpt, tmp_path / "engine", backend="reference")
    build_repo(tmp_path / "engine", tmp_path / "repo", num_slots=4, max_prompt_tokens=160, max_new_tokens=32)
    ports = [free_port() for _ in range(3)]
    server = start_server(tmp_path / "repo", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                          cache=tmp_path / "cache", timeout=300)
    try:
        for mode in ("auto", "fixed"):
            for prompt, want in zip(batch, expected, strict=True):
                got = complete(server.endpoints["grpc"], prompt, max_tokens=12, speculation=mode)
                assert got.ids == want and got.finish_reason == "length", mode
    finally:
        server.stop()


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_yarn_compress_rope_equals_transformers(field: str) -> None:
    """The compress rope's YaRN frequencies and attention factor are transformers' own, whether the
    config gives them as rope_parameters or as the older rope_scaling (with `type`)."""
    from transformers import DeepseekV4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dspark_trt.runtime.deepseek_v4 import Rope, V4Config

    yarn = {"factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
    yarn |= {"rope_type": "yarn"} if field == "rope_parameters" else {"type": "yarn"}
    base = {k: v for k, v in DeepseekV4Config(max_position_embeddings=65536).to_dict().items()
            if k not in ("rope_parameters", "rope_scaling")}  # a config.json as saved, before normalising
    rope = Rope(V4Config.from_source({**base, field: yarn}))
    hf = DeepseekV4Config(max_position_embeddings=65536, **{field: dict(yarn)})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf, None, layer_type="compress")
    ours, our_scaling = rope.tables["compress"]
    assert our_scaling == pytest.approx(scaling)
    torch.testing.assert_close(ours, inv_freq, rtol=0, atol=0)
    default = Rope(V4Config.from_source(base))
    assert not torch.equal(default.tables["compress"][0], ours)  # the scaling is not silently dropped
