"""Train the tiny Qwen3 target + DSpark drafter pair that the project ships, on CPU, from scratch.

    python -m dspark_trt.builder.train OUT [--seed 0] [--target-minutes 20 | --target-steps N]
                                           [--drafter-minutes 20 | --drafter-steps N] [--ablation DIR]

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

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..runtime.atomic import atomic_directory
from .corpus import HELD_OUT_PERCENT, corpus_texts, heldout_prompts, token_stream
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
    from .calibrate import calibrate, encode
    from .convert import convert

    with tempfile.TemporaryDirectory(prefix="dspark-calibrate-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        convert(target_dir, drafter_dir, ckpt, tp=1, show_progress=False)
        prompts = encode(ckpt, heldout_prompts(CALIBRATION_PROMPTS, part=0, seed=seed))
        report = calibrate(ckpt, prompts, drafter_dir / "sts.json", max_new_tokens=CALIBRATION_NEW_TOKENS)
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    console.print(f"STS for {drafter_dir.name}: ECE {mean(report['ece_before'])} -> {mean(report['ece_after'])}")
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
    steps_drafter: int | None = None,
    ablation: Path | None = None,
    target_recipe: TargetRecipe | None = None,
    drafter_recipe: DrafterRecipe | None = None,
    reuse_target: Path | None = None,
    threads: int = 2,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and write OUT/{target,drafter,training.json} (+ the no-Markov ablation drafter at `ablation`).

    Step counts, when given, override the minutes. `reuse_target` takes the tokenizer and target of an
    earlier run's OUT instead of training them (for iterating on the drafter). OUT appears whole or not
    at all; so does `ablation`.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is enough
    target_recipe, drafter_recipe = target_recipe or TargetRecipe(), drafter_recipe or DrafterRecipe()
    set_determinism(seed, threads)
    record: dict[str, Any] = {"seed": seed, "threads": threads, "vocab_size": VOCAB_SIZE,
                              "corpus": f"Python {_python_version()} standard library, {HELD_OUT_PERCENT}% of files "
                                        "held out by path hash"}
    with atomic_directory(out, force=force) as tmp:
        target_dir, drafter_dir = tmp / "target", tmp / "drafter"
        if reuse_target is not None:
            shutil.copytree(Path(reuse_target) / "target", target_dir)
            previous = Path(reuse_target) / "training.json"
            record["target"] = json.loads(previous.read_text())["target"] if previous.is_file() else {}
        else:
            train_tokenizer(target_dir, VOCAB_SIZE, QWEN3_SPECIAL_TOKENS, seed=seed, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", model_max_length=2048, corpus=corpus_texts("train"))
        tokenizer_path = target_dir / "tokenizer.json"
        token_ids = special_token_ids(tokenizer_path, QWEN3_SPECIAL_TOKENS)
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        train_stream, heldout_stream = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
        if reuse_target is None:
            config = target_config(tokenizer.get_vocab_size(), token_ids, target_recipe)
            record["target"] = train_target(target_dir, config, train_stream, heldout_stream, seed=seed,
                                            recipe=target_recipe, steps=steps_target, minutes=minutes_target,
                                            quiet=quiet)

        target = load_target(target_dir)
        target_cfg = json.loads((target_dir / "config.json").read_text())
        drafters = [("drafter", drafter_dir, drafter_recipe)]
        if ablation is not None:
            drafters.append(("ablation", tmp / "ablation", replace(drafter_recipe, markov_rank=0)))
        for name, directory, recipe in drafters:
            config = drafter_config(target_cfg, token_ids[MASK_TOKEN], recipe)
            directory.mkdir()
            for file in TOKENIZER_FILES:
                shutil.copyfile(target_dir / file, directory / file)
            record[name] = train_drafter(directory, target, config, train_stream, heldout_stream,
                                         seed=seed + _DRAFTER_SEED_OFFSET, recipe=recipe, steps=steps_drafter,
                                         minutes=minutes_drafter, quiet=quiet, name=name)
            torch.manual_seed(seed)  # so that the next stage does not depend on how much this one drew
            record[name]["sts"] = calibrate_drafter(target_dir, directory, seed=seed)

        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        if ablation is not None:
            with atomic_directory(ablation, force=True) as ablation_tmp:
                shutil.rmtree(ablation_tmp)
                shutil.move(tmp / "ablation", ablation_tmp)
    console.print(f"[green]✓[/] wrote {out}" + (f" and {ablation}" if ablation else ""))
    return record


def _python_version() -> str:
    import platform

    return platform.python_version()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dspark_trt.builder.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory (target/, drafter/, training.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-minutes", type=float, default=20.0, help="wall-clock budget for the target")
    parser.add_argument("--drafter-minutes", type=float, default=20.0, help="wall-clock budget per drafter")
    parser.add_argument("--target-steps", type=int, help="exact optimiser steps (overrides --target-minutes)")
    parser.add_argument("--drafter-steps", type=int, help="exact optimiser steps (overrides --drafter-minutes)")
    parser.add_argument("--ablation", type=Path, help="also train the no-Markov (markov_rank 0) drafter here")
    parser.add_argument("--draft-layers", type=int, default=DrafterRecipe.layers)
    parser.add_argument("--markov-rank", type=int, default=DrafterRecipe.markov_rank)
    parser.add_argument("--reuse-target", type=Path, help="take tokenizer + target from this earlier OUT")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (part of the determinism recipe)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    train_pair(args.out, seed=args.seed, minutes_target=args.target_minutes, minutes_drafter=args.drafter_minutes,
               steps_target=args.target_steps, steps_drafter=args.drafter_steps, ablation=args.ablation,
               drafter_recipe=DrafterRecipe(layers=args.draft_layers, markov_rank=args.markov_rank),
               reuse_target=args.reuse_target, threads=args.threads, force=args.force, quiet=args.quiet)


if __name__ == "__main__":
    main()
