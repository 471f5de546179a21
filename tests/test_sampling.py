"""Speculative sampling keeps the target's distribution (a statistical test on a 16-token vocabulary).

The target's exact distribution over the 2nd and 3rd generated tokens is enumerated with
transformers (an independent implementation); 2000 seeded requests are decoded per mode and a
chi-square goodness-of-fit test compares the counts with it. Threshold: p > 1e-3 passes. Seeds are
fixed, so the test is deterministic; the same test rejects a deliberately broken verifier that
accepts every draft (p < 1e-6), which shows it has the power to catch a biased sampler.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dspark_trt.builder.convert import convert
from dspark_trt.runtime import generate as generate_module
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter
from dspark_trt.runtime.generate import Request, generate
from dspark_trt.runtime.qwen3 import Qwen3Target

VOCAB, PROMPT, SAMPLES, TEMPERATURE = 16, [3, 1, 4], 2000, 1.0


def write_word_tokenizer(target: Path, vocab: int) -> None:
    """One word per id: the tokenizer.json that convert requires beside a target (the server loads it)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).save(str(target / "tokenizer.json"))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A 16-token Qwen3 target with peaked distributions, its DeepSpec drafter, converted."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dspark_trt.builder.fixture_qwen3 import drafter_config, drafter_tensors

    root = tmp_path_factory.mktemp("small-vocab")
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so the test has teeth
        model.lm_head.weight.mul_(60)
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "target")
    write_word_tokenizer(root / "target", VOCAB)
    draft_config = drafter_config(json.loads((root / "target" / "config.json").read_text()), VOCAB - 1, "vanilla")
    (root / "drafter").mkdir()
    (root / "drafter" / "config.json").write_text(json.dumps(draft_config))
    tensors = drafter_tensors(draft_config, model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach(),
                              torch.Generator().manual_seed(1))
    save_file(tensors, str(root / "drafter" / "model.safetensors"))
    convert(root / "target", root / "drafter", root / "ckpt", show_progress=False)
    return root / "ckpt", model.float().eval()


def exact_distribution(model: torch.nn.Module) -> torch.Tensor:
    """P(2nd token, 3rd token) of target-only sampling at TEMPERATURE, [VOCAB, VOCAB]."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1] / TEMPERATURE, -1)
        seqs = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2 = torch.softmax(model(seqs).logits[:, -1] / TEMPERATURE, -1)  # [t1, t2]
        seqs = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = torch.softmax(model(seqs).logits[:, -1] / TEMPERATURE, -1).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", p1.double(), p2.double(), p3.double())


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit; cells expected to hold fewer than `min_expected` samples are pooled."""
    counts, expected = counts.flatten().double(), probs.flatten() * counts.sum()
    small = expected < min_expected
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected.clamp_min(1e-12)).sum()
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


def sample_counts(ckpt: Path, mode: str, **options) -> tuple[torch.Tensor, float]:
    target = Qwen3Target(ckpt / "target", num_slots=64, max_len=32)
    drafter = Qwen3DSparkDrafter(ckpt / "draft", num_slots=64, max_len=32)
    requests = [Request(PROMPT, max_new_tokens=3, temperature=TEMPERATURE, seed=s, speculation=mode)
                for s in range(SAMPLES)]
    results = generate(target, drafter, requests, num_slots=64, **options)
    counts = torch.zeros(VOCAB, VOCAB)
    for r in results:
        counts[r.tokens[1], r.tokens[2]] += 1
    verified = sum(sum(r.verified) for r in results)
    return counts, verified / max(1, sum(r.rounds for r in results))


@pytest.mark.parametrize("mode, options", [("off", {}), ("fixed", {}), ("auto", {"scheduler": "paper"}),
                                           ("auto", {"scheduler": "production"})])
def test_speculative_sampling_keeps_the_target_distribution(small_vocab, mode: str, options: dict) -> None:
    ckpt, model = small_vocab
    counts, mean_verified = sample_counts(ckpt, mode, **options)
    p = chi_square_p(counts, exact_distribution(model))
    assert p > 1e-3, f"{mode} {options}: chi-square p = {p:.2e}"
    if mode != "off":
        assert mean_verified > 0.5  # drafts really were verified, the test is not vacuous


def test_the_statistical_test_catches_a_biased_verifier(small_vocab, monkeypatch) -> None:
    ckpt, model = small_vocab

    def accept_everything(drafts, draft_probs, target_logits, temperature, generator):
        probs = torch.softmax(target_logits[len(drafts)].float() / temperature, -1)
        return len(drafts), int(torch.multinomial(probs, 1, generator=generator)[0])

    monkeypatch.setattr(generate_module, "verify_sampling", accept_everything)
    counts, _ = sample_counts(ckpt, "fixed")
    assert chi_square_p(counts, exact_distribution(model)) < 1e-6
