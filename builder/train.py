"""Train the tiny Qwen3 target + DSpark drafter pair that the project ships, on CPU, from scratch.

    dspark-build train OUT [--seed 0] [--target-minutes 20 | --target-steps N]
                           [--drafter-minutes 20 | --drafter-steps N] [--ablation DIR]  (--help: every knob)

Stages, each seeded (same seed, step counts and thread count -> same weights):
  1. tokenizer: byte-level BPE trained on the TRAIN split of the stdlib corpus (builder/corpus.py);
  2. target:    Qwen3ForCausalLM trained on that split (builder/train_target.py) -> OUT/target;
  3. drafter:   DeepSpec Qwen3DSparkModel trained against the frozen target (builder/train_drafter.py)
                -> OUT/drafter; with --ablation, the same recipe with markov_rank 0 -> DIR;
  4. STS:       convert the pair, decode held-out prompts with `builder.calibrate` (what
                `dspark-build calibrate` runs) -> OUT/drafter/sts.json (and DIR/sts.json).
A record of everything (steps, minutes, losses, ECE) goes to OUT/training.json.

With a wall-clock budget the step count is estimated from the first steps' speed and recorded; pass
it back as --target-steps / --drafter-steps to reproduce a run exactly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..runtime.atomic import atomic_directory, check_output, write_text_atomic
from .corpus import HELD_OUT_PERCENT, corpus_texts, heldout_prompts, stdlib_root, token_stream
from .tokenizer import QWEN3_SPECIAL_TOKENS, TOKENIZER_FILES, special_token_ids, train_tokenizer
from .train_drafter import DrafterRecipe, drafter_config, train_drafter
from .train_target import TargetRecipe, load_target, target_config, train_target
from .train_utils import console, set_determinism

VOCAB_SIZE = 4096
MASK_TOKEN = "<|mask|>"
CALIBRATION_PROMPTS = 36
CALIBRATION_NEW_TOKENS = 48
# The drafter's random draws are offset from the target's so they never share a stream.
_DRAFTER_SEED_OFFSET = 1_000_003


def calibrate_drafter(target_dir: Path, drafter_dir: Path, *, seed: int) -> dict[str, Any]:
    """Fit STS on held-out prompts (part 0; the τ benchmark uses part 1) and write drafter_dir/sts.json."""
    from ..runtime.calibration import CALIBRATION_FILE
    from .calibrate import calibrate, encode
    from .convert import convert

    with tempfile.TemporaryDirectory(prefix="dspark-calibrate-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        convert(target_dir, drafter_dir, ckpt, tp=1, show_progress=False)
        prompts = encode(ckpt, heldout_prompts(CALIBRATION_PROMPTS, part=0, seed=seed))
        report = calibrate(ckpt, prompts, drafter_dir / CALIBRATION_FILE, max_new_tokens=CALIBRATION_NEW_TOKENS)
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    console.print(f"STS: ECE {mean(report['ece_before'])} -> {mean(report['ece_after'])}")
    return {"temperatures": [round(t, 4) for t in report["temperatures"]], "rounds": report["rounds"],
            "acceptance_t0": [round(a, 4) for a in report["acceptance"]],
            "ece_before": [round(e, 4) for e in report["ece_before"]],
            "ece_after": [round(e, 4) for e in report["ece_after"]],
            "mean_ece_before": mean(report["ece_before"]), "mean_ece_after": mean(report["ece_after"])}


def train_pair(
    out: Path,
    *,
    seed: int = 0,
    minutes_target: float | None = 20.0,
    minutes_drafter: float | None = 20.0,
    steps_target: int | None = None,
    steps_drafter: int | list[int] | None = None,
    ablation: Path | None = None,
    target_recipe: TargetRecipe | None = None,
    drafter_recipe: DrafterRecipe | None = None,
    target_threads: int = 2,
    drafter_threads: int = 1,
    force: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and write OUT/{target,drafter,training.json} (+ the no-Markov ablation drafter at `ablation`).

    Step counts, when given, override the minutes. Each stage's directory appears whole or not at all
    and OUT/training.json is updated after each stage, so an interrupted run loses one stage at most:
    `resume` keeps the finished stages of an earlier run with the same seed and recipes (it is also how
    to retrain only the drafter: delete OUT/drafter and resume).
    """
    from tokenizers import Tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is enough
    target_recipe, drafter_recipe = target_recipe or TargetRecipe(), drafter_recipe or DrafterRecipe()
    out, record_path = Path(out), Path(out) / "training.json"
    corpus = [stdlib_root()]
    check_output(out, inputs=corpus, force=force or resume)
    if ablation is not None:  # replaced whole when retrained, so it must stay clear of OUT as well
        check_output(ablation, inputs=[*corpus, out], force=True)
    if out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record and record.get("seed") != seed:
        raise ValueError(f"{record_path}: seed {record.get('seed')} differs from {seed}; cannot resume")
    record.update(seed=seed, vocab_size=VOCAB_SIZE,
                  corpus=f"Python {_python_version()} standard library, {HELD_OUT_PERCENT}% of files held out "
                         "by path hash")

    def done(name: str, directory: Path, recipe: Any) -> bool:
        same_recipe = record.get(name, {}).get("recipe") == json.loads(json.dumps(asdict(recipe)))
        finished = directory.is_dir() and same_recipe
        if finished:
            console.print(f"{name}: kept from the earlier run ({directory})")
        return finished

    def save_record() -> None:
        write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")

    target_dir = out / "target"
    if not done("target", target_dir, target_recipe):
        set_determinism(seed, target_threads)
        with atomic_directory(target_dir, force=True, inputs=corpus) as tmp:
            train_tokenizer(tmp, VOCAB_SIZE, QWEN3_SPECIAL_TOKENS, seed=seed, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", model_max_length=2048, corpus=corpus_texts("train"))
            tokenizer = Tokenizer.from_file(str(tmp / "tokenizer.json"))
            config = target_config(tokenizer.get_vocab_size(), special_token_ids(tmp / "tokenizer.json",
                                                                                 QWEN3_SPECIAL_TOKENS), target_recipe)
            record["target"] = train_target(tmp, config, token_stream(tokenizer, "train"),
                                            token_stream(tokenizer, "heldout"), seed=seed, recipe=target_recipe,
                                            steps=steps_target, minutes=minutes_target, quiet=quiet)
            record["target"]["threads"] = target_threads
        save_record()

    drafters = [("drafter", out / "drafter", drafter_recipe)]
    if ablation is not None:
        drafters.append(("ablation", Path(ablation), replace(drafter_recipe, markov_rank=0)))
    drafters = [(name, directory, recipe) for name, directory, recipe in drafters if not done(name, directory, recipe)]
    if drafters:  # tokenising the corpus and loading the target only when a drafter still needs them
        tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
        mask_id = special_token_ids(target_dir / "tokenizer.json", [MASK_TOKEN])[MASK_TOKEN]
        train_stream, heldout_stream = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
        target = load_target(target_dir)
        target_cfg = json.loads((target_dir / "config.json").read_text())
    for name, directory, recipe in drafters:
        set_determinism(seed, drafter_threads)
        with atomic_directory(directory, force=True, inputs=[*corpus, target_dir]) as tmp:
            for file in TOKENIZER_FILES:
                shutil.copyfile(target_dir / file, tmp / file)
            config = drafter_config(target_cfg, mask_id, recipe)
            record[name] = train_drafter(tmp, target, config, train_stream, heldout_stream,
                                         seed=seed + _DRAFTER_SEED_OFFSET, recipe=recipe, steps=steps_drafter,
                                         minutes=minutes_drafter, quiet=quiet, name=name)
            record[name]["threads"] = drafter_threads
            record[name]["sts"] = calibrate_drafter(target_dir, tmp, seed=seed)
        save_record()
    console.print(f"[green]✓[/] wrote {out}" + (f" and {ablation}" if ablation else ""))
    return record


def _python_version() -> str:
    import platform

    return platform.python_version()
