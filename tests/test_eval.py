"""`dspark-build eval`: DeepSpec's τ accounting, datasets, prompt encoding, domains and the command."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dspark_trt.builder.cli import main
from dspark_trt.builder.evaluate import (
    DatasetError,
    Round,
    decode_pairs,
    deepspec_rounds,
    drafter_label,
    encode_prompt,
    load_tokenizer,
    read_dataset,
    served_rounds,
    stop_ids,
    summarise,
)
from dspark_trt.runtime.generate import Request, Result, generate
from dspark_trt.runtime.loader import open_checkpoint


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- accounting on hand-made rounds ----------------------------------------------------------------


def test_always_right_deepspec_counts_full_blocks_to_the_end_served_caps_them() -> None:
    # γ = 5, max_new_tokens 20. The DeepSpec run (budget 20 + γ + 1 = 26) produced 1, 7, 13, 19, 25, 26
    # tokens; DeepSpec runs a round while at most 20 are produced: 4 rounds of 6, output trimmed to 20.
    deepspec = Result(tokens=list(range(100, 126)), taus=[6, 6, 6, 6, 1], verified=[5, 5, 5, 5, 0])
    rounds, tokens = deepspec_rounds(deepspec, max_new_tokens=20, stop_ids=(), gamma=5)
    assert rounds == [Round(5, 5, 6)] * 4 and tokens == 20
    assert summarise([(rounds, tokens)], 5)["tau"] == 6.0
    # The served run (budget 20) capped nothing until 19 tokens, then verified no draft: τ 19 / 4.
    served = Result(tokens=list(range(100, 120)), taus=[6, 6, 6, 1], verified=[5, 5, 5, 0])
    s = summarise([served_rounds(served)], 5)
    assert s["tau"] == 19 / 4 and s["rounds"] == 4 and s["tokens"] == 20


def test_never_right_counts_one_token_a_round() -> None:
    result = Result(tokens=list(range(10)), taus=[1] * 9, verified=[5] * 9)
    rounds, tokens = deepspec_rounds(result, max_new_tokens=6, stop_ids=(), gamma=5)
    assert len(rounds) == 6 and tokens == 6  # produced 1..6 before each round: 6 rounds
    s = summarise([(rounds, tokens)], 5)
    assert s["tau"] == 1.0 and s["conditional"] == [0.0, None, None, None, None] and s["survival"] == [0.0] * 5


def test_stop_id_among_accepted_drafts_ends_the_round_there_without_a_bonus() -> None:
    # Drafts 2, 3, 99(stop), ... all accepted: DeepSpec counts 3 tokens, 3 proposed, 3 accepted.
    result = Result(tokens=[1, 2, 3, 99], taus=[6], verified=[5], finish_reason="stop")
    assert deepspec_rounds(result, max_new_tokens=50, stop_ids=(99,), gamma=5) == ([Round(3, 3, 3)], 4)
    # The bonus token is the stop id: a normal round.
    result = Result(tokens=[1, 2, 3, 99], taus=[3], verified=[5], finish_reason="stop")
    assert deepspec_rounds(result, max_new_tokens=50, stop_ids=(99,), gamma=5) == ([Round(5, 2, 3)], 4)
    # The prefill's token is the stop id: no round at all.
    assert deepspec_rounds(Result(tokens=[99]), max_new_tokens=50, stop_ids=(99,), gamma=5) == ([], 1)


def test_a_capped_round_inside_deepspecs_range_is_refused() -> None:
    result = Result(tokens=list(range(10)), taus=[3, 2], verified=[5, 2])
    with pytest.raises(RuntimeError, match="headroom"):
        deepspec_rounds(result, max_new_tokens=8, stop_ids=(), gamma=5)


def _deepspec_loop(sequence: list[int], accept: list[int], max_new: int, gamma: int, stops: set[int]
                   ) -> tuple[list[int], list[int], int]:
    """DeepSpec's `generate_decoding_sample` loop, greedy, in generated-token coordinates: `sequence` is
    the target's greedy output, `accept[i]` how many drafts a round starting at token i gets accepted.
    Returns (acceptance_lengths, proposal_lengths, output tokens)."""
    if sequence[0] in stops:
        return [], [], 1
    start, acceptance, proposals = 0, [], []
    while start < max_new:
        accepted, proposed = accept[start], gamma
        hits = [j for j, t in enumerate(sequence[start + 1: start + 1 + accepted]) if t in stops]
        if hits:
            accepted = proposed = hits[0] + 1
            acceptance.append(accepted)
            proposals.append(proposed)
            start += accepted
            break
        new = sequence[start + 1: start + accepted + 2]
        acceptance.append(accepted + 1)
        proposals.append(proposed)
        start += accepted + 1
        if any(t in stops for t in new):
            break
    output = sequence[: min(start + 1, max_new)]
    stop_at = next((i for i, t in enumerate(output) if t in stops), None)
    return acceptance, proposals, len(output) if stop_at is None else stop_at + 1


def _our_decoder(sequence: list[int], accept: list[int], budget: int, gamma: int, stops: set[int]) -> Result:
    """What SpeculativeDecoder records for the same world in fixed mode with `budget` max_new_tokens."""
    result = Result(tokens=[sequence[0]])
    while result.tokens[-1] not in stops and len(result.tokens) < budget:
        produced = len(result.tokens)
        verified = max(0, min(gamma, budget - produced - 1))
        accepted = min(accept[produced - 1], verified)
        result.taus.append(accepted + 1)
        result.verified.append(verified)
        for token in sequence[produced: produced + accepted + 1]:
            result.tokens.append(token)
            if token in stops or len(result.tokens) >= budget:
                break
    return result


def test_replay_matches_deepspecs_loop_on_random_worlds() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        gamma, max_new = rng.randint(1, 6), rng.randint(1, 30)
        length = max_new + 3 * gamma + 3
        sequence = [rng.choice(range(10)) for _ in range(length)]  # 9 is the stop id, often present
        accept = [rng.choice([0, 0, 1, 2, gamma, gamma]) for _ in range(length)]
        accept = [min(a, gamma) for a in accept]
        acceptance, proposals, output = _deepspec_loop(sequence, accept, max_new, gamma, {9})
        result = _our_decoder(sequence, accept, max_new + gamma + 1, gamma, {9})
        rounds, tokens = deepspec_rounds(result, max_new_tokens=max_new, stop_ids=(9,), gamma=gamma)
        assert [r.tau for r in rounds] == acceptance and [r.proposed for r in rounds] == proposals
        assert tokens == output


def test_conditional_acceptance_and_survival_by_position() -> None:
    rounds = [Round(5, 2, 3), Round(5, 0, 1), Round(5, 5, 6)]
    s = summarise([(rounds, 10)], 5)
    assert s["conditional"] == [2 / 3, 1.0, 0.5, 1.0, 1.0]
    assert s["survival"] == [2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3]
    assert s["tau"] == 10 / 3 and s["mean_proposed"] == 5.0


# -- decoding with drafters that are always / never right -------------------------------------------


class ScriptedDrafter:
    """The real drafter's call, its tokens replaced by the target's greedy continuation (right) or by
    that continuation + 1 (wrong). Requests are admitted in order; `sequences` follow that order."""

    def __init__(self, drafter, sequences: list[list[int]], right: bool) -> None:
        self.inner, self.sequences, self.right, self.admitted = drafter, sequences, right, 0
        self.slot_sequence: dict[int, list[int]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reset(self, slot: int) -> None:
        self.slot_sequence[slot] = self.sequences[self.admitted]
        self.admitted += 1
        self.inner.reset(slot)

    def draft(self, slots, anchors, temperatures, generators, gamma=None):
        draft = self.inner.draft(slots, anchors, temperatures, generators, gamma)
        draft.tokens = draft.tokens.clone()
        for row, slot in enumerate(slots):
            pos = int(self.inner.ctx_len[slot])  # the anchor's index in prompt + output
            truth = torch.tensor(self.slot_sequence[slot][pos + 1: pos + 1 + draft.tokens.shape[1]])
            draft.tokens[row, : len(truth)] = truth if self.right else (truth + 1) % 1000
        return draft


@pytest.mark.parametrize("right", [True, False])
def test_decode_pairs_with_scripted_drafters(qwen3_ckpt: Path, right: bool) -> None:
    prompts, max_new = [[5, 6, 7, 8], [9, 10, 11]], 20
    target, drafter, _ = open_checkpoint(qwen3_ckpt, num_slots=4, max_len=64)
    try:
        gamma = drafter.block_size
        greedy = generate(target, drafter, [Request(p, max_new_tokens=max_new + 2 * gamma + 2, speculation="off")
                                            for p in prompts])
        sequences = [p + r.tokens for p, r in zip(prompts, greedy, strict=True) for _ in range(2)]
        pairs = decode_pairs(target, ScriptedDrafter(drafter, sequences, right), prompts, max_new_tokens=max_new,
                             temperature=0.0, stop_ids=(), seed=0, slots=4)
    finally:
        target.close()
    assert gamma == 7  # the fixture's block
    for (deepspec, served), truth in zip(pairs, greedy, strict=True):
        rounds, tokens = deepspec_rounds(deepspec, max_new_tokens=max_new, stop_ids=(), gamma=gamma)
        assert deepspec.tokens[:max_new] == served.tokens == truth.tokens[:max_new]
        if right:  # 1, 9, 17 produced before a round: 3 full rounds of 8; served caps the third at 2 drafts
            assert [r.tau for r in rounds] == [8, 8, 8] and tokens == 20
            assert served.taus == [8, 8, 3] and served.verified == [7, 7, 2]
        else:  # a round per token while at most 20 are produced; served stops one round earlier
            assert [r.tau for r in rounds] == [1] * 20 and tokens == 20
            assert served.taus == [1] * 19 and served.verified[-2:] == [1, 0]


# -- datasets, prompts, stop ids ---------------------------------------------------------------------


def test_bad_lines_name_the_file_and_line(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "a.jsonl", [{"turns": ["x"]}, "{not json", {"turns": ["y"]}])
    with pytest.raises(DatasetError, match=r"a\.jsonl:2: not a JSON object"):
        read_dataset(bad)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"turns": ["x"]}, "", {"question": "y"}])
    with pytest.raises(DatasetError, match=r"b\.jsonl:3: field `turns` must be a non-empty list of strings, "
                                           "found no such field"):
        read_dataset(bad)
    bad = write_jsonl(tmp_path / "c.jsonl", [{"turns": []}])
    with pytest.raises(DatasetError, match=r"c\.jsonl:1: field `turns`.*found \[\]"):
        read_dataset(bad)
    bad = write_jsonl(tmp_path / "d.jsonl", [{"turns": ["a"], "domain": "math"}, {"turns": ["b"], "domain": "code"}])
    with pytest.raises(DatasetError, match="several domains"):
        read_dataset(bad)


def test_dataset_domains_and_deepspec_subsampling(tmp_path: Path) -> None:
    rows = [{"turns": [f"q{i}", "second turn"]} for i in range(40)]
    d = read_dataset(write_jsonl(tmp_path / "aime25.jsonl", rows))
    expected = list(rows)
    random.Random(980406).shuffle(expected)
    assert d.domain == "math" and d.prompts == [r["turns"][0] for r in expected[:30]]  # DeepSpec's count for aime25
    d = read_dataset(write_jsonl(tmp_path / "mine.jsonl", [{"turns": ["x"], "domain": "chat"}]))
    assert (d.name, d.domain, d.prompts) == ("mine", "chat", ["x"])
    assert read_dataset(tmp_path / "mine.jsonl", domain="code").domain == "code"
    assert read_dataset(write_jsonl(tmp_path / "other.jsonl", [{"turns": ["x"]}])).domain == "other"


def test_chat_template_when_the_tokenizer_has_one_else_raw_text(qwen3_ckpt: Path, tmp_path: Path) -> None:
    raw = load_tokenizer(qwen3_ckpt)
    assert not raw.chat_template
    text = "def add(a, b):"
    plain = raw(text, add_special_tokens=False).input_ids
    assert encode_prompt(raw, text) == plain
    templated_ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt / "tokenizer", templated_ckpt / "tokenizer")
    config = templated_ckpt / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config.write_text(json.dumps(settings))
    templated = load_tokenizer(templated_ckpt)
    ids = encode_prompt(templated, text)
    start, end = templated.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(start) == 2 and end in ids
    assert templated.decode(ids) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_stop_ids_follow_the_generation_config(qwen3_ckpt: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(qwen3_ckpt)
    eos = json.loads((qwen3_ckpt / "tokenizer" / "generation_config.json").read_text())["eos_token_id"]
    assert stop_ids(qwen3_ckpt, tokenizer) == ((eos,) if isinstance(eos, int) else tuple(eos))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt / "tokenizer", ckpt / "tokenizer")
    (ckpt / "tokenizer" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3, 7]}))
    assert stop_ids(ckpt, tokenizer) == (7, 3)


# -- the command ---------------------------------------------------------------------------------------


def test_eval_command_per_file_per_domain_and_compare(qwen3_ckpt: Path, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"turns": ["def f(x):"]}, {"turns": ["import os\n"]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"turns": ["class A:"]}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"turns": ["for i in range(3):"]}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", str(qwen3_ckpt), "--data", str(a), "--data", str(b), "--data", str(c),
                                       "--domain", "math", "--domain", "math", "--domain", "code",
                                       "--max-new-tokens", "12", "--temperature", "0", "--compare", str(qwen3_ckpt),
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 0
    assert report["accounting"] == "deepspec" and "DeepSpec accounting" in result.output
    files = {f["dataset"]: f for f in report["files"]}
    assert [files[n]["samples"] for n in "abc"] == [2, 1, 1]
    assert all(f["tokens"] == 12 * f["samples"] for f in files.values())  # a random target never stops early
    assert report["domains"]["math"]["tau"] == pytest.approx((files["a"]["tau"] + files["b"]["tau"]) / 2)
    assert report["domains"]["code"]["tau"] == pytest.approx(files["c"]["tau"])
    # The same pair compared with itself, greedy: identical τ, zero gain.
    assert all(f["compare"]["tau"] == f["tau"] and f["gain"] == 0 for f in files.values())
    assert report["domains"]["math"]["gain"] == 0
    # Tables name a pair by its drafter's source folder; two pairs that share it by their paths.
    assert drafter_label(qwen3_ckpt).endswith("/drafter")
    assert report["settings"]["drafters"] == [str(qwen3_ckpt)] * 2


def test_eval_command_reports_a_bad_line_and_writes_nothing(qwen3_ckpt: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"turns": ["x"]}, {"turns": "not a list"}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", str(qwen3_ckpt), "--data", str(bad), "-o", str(out)])
    assert result.exit_code == 1
    assert f"{bad}:2: field `turns` must be a non-empty list of strings" in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, ["eval", str(qwen3_ckpt), "--data", str(bad), "--domain", "a", "--domain", "b"])
    assert result.exit_code == 2 and "one --domain per --data" in result.output


def test_eval_compare_needs_the_same_target(qwen3_ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((qwen3_ckpt / "manifest.json").read_text())
    manifest["sources"]["target"]["files"] = {"model.safetensors": "0" * 64}
    (other / "manifest.json").write_text(json.dumps(manifest))
    data = write_jsonl(tmp_path / "x.jsonl", [{"turns": ["def f(x):"]}])
    result = CliRunner().invoke(main, ["eval", str(qwen3_ckpt), "--data", str(data), "--compare", str(other),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "--compare pair has another target" in result.output and "sources.target.files" in result.output


def test_eval_greedy_below_deepspecs_threshold_and_bfloat16(qwen3_ckpt: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "x.jsonl", [{"turns": ["def f(x):"]}])
    outs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = CliRunner().invoke(main, ["eval", str(qwen3_ckpt), "--data", str(data), "--max-new-tokens", "6",
                                           "--temperature", "1e-6", "--dtype", dtype, "-o", str(out)])
        assert result.exit_code == 0, result.output
        outs[dtype] = json.loads((out / "eval.json").read_text())
        assert outs[dtype]["settings"]["temperature"] == 0.0 and outs[dtype]["settings"]["dtype"] == dtype
    assert outs["bfloat16"]["files"][0]["tokens"] == outs["float32"]["files"][0]["tokens"] == 6


@pytest.mark.slow
def test_eval_runs_on_deepseek_v4(v4_pair: Path, tmp_path: Path) -> None:
    from dspark_trt.builder.convert import convert

    ckpt = tmp_path / "ckpt"
    convert(v4_pair / "target", None, ckpt, tp=1, show_progress=False)  # the drafter is built in
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [{"turns": ["1 + 1 ="]}])
    result = CliRunner().invoke(main, ["eval", str(ckpt), "--data", str(data), "--max-new-tokens", "6",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["domains"]["math"]["datasets"] == 1 and report["files"][0]["rounds"] >= 1
