"""`dspark-build eval`: offline acceptance measured the way DeepSpec's evaluator measures it.

DeepSpec (`deepspec/eval/base_evaluator.py`) decodes one prompt at a time with chain drafting and a
full block verified every round, and counts per round

    τ = accepted drafts + 1 (the bonus token)      or, when an accepted draft is an end-of-sequence
                                                    id, its index + 1 (no bonus: decoding ends there)

It keeps verifying full blocks while the tokens produced (the prefill's first token included) are at
most max_new_tokens and trims only the output. The served decoder instead caps the last rounds'
verify lengths at the remaining budget and counts those (even zero-draft) rounds; both accountings
are reported, DeepSpec's as the headline.

One decode gives DeepSpec's rounds: each prompt runs in fixed mode with γ + 1 tokens of headroom
beyond max_new_tokens, so no round DeepSpec counts is ever capped, and `deepspec_rounds` replays the
round list with DeepSpec's stopping rule (the extra rounds after it are dropped). A second request per
prompt, with max_new_tokens exactly, gives the served accounting (`served_rounds`).

Datasets are DeepSpec's format: one JSON object a line with a non-empty string list `turns` whose
first turn is the prompt. The prompt goes through the tokenizer's chat template when it has one
(generation prompt added, thinking off, as DeepSpec), else it is the raw text; special tokens are
never added by the tokenizer. Decoding stops at the end-of-sequence ids DeepSpec uses: the
generation config's `eos_token_id` (an id or a list), else the tokenizer's.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..runtime.generate import Result

# DeepSpec's eval.py: its tasks with their default sample counts, and the paper's domains.
KNOWN_TASKS: dict[str, tuple[str, int]] = {
    "gsm8k": ("math", 500), "math500": ("math", 500), "aime25": ("math", 30),
    "humaneval": ("code", 164), "mbpp": ("code", 256), "livecodebench": ("code", 500),
    "mt-bench": ("chat", 80), "alpaca": ("chat", 500), "arena-hard-v2": ("chat", 500),
}
DEEPSPEC_SEED = 980406  # eval.py's default: picks the same subsample when a file has more rows
GREEDY_BELOW = 1e-5  # DeepSpec's logits_to_probs: temperatures under this decode greedily


class DatasetError(ValueError):
    """A dataset file is not in DeepSpec's format; the message names the file and line."""


@dataclass
class Dataset:
    name: str  # the file's stem, as DeepSpec names a task
    path: Path
    domain: str
    prompts: list[str]


def read_dataset(path: Path, *, domain: str | None = None, max_samples: int | None = None,
                 seed: int = DEEPSPEC_SEED) -> Dataset:
    """Read a DeepSpec eval file; subsample as DeepSpec does (shuffle with `seed`, keep the first N).

    Without `max_samples`, a file named like one of DeepSpec's tasks keeps that task's default count.
    The domain is `domain`, else the rows' common `domain` field, else the task's, else "other".
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
            turns = row.get("turns")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise DatasetError(f"{path}:{number}: field `turns` must be a non-empty list of strings, "
                                   f"found {json.dumps(turns)[:80] if 'turns' in row else 'no such field'}")
            if not turns[0]:
                raise DatasetError(f"{path}:{number}: the first turn (the prompt) is empty")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no rows (expected one JSON object a line with a `turns` list)")
    name = path.stem
    known = KNOWN_TASKS.get(name)
    count = max_samples if max_samples is not None else (known[1] if known else None)
    if count is not None and len(rows) > count:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
        rows = rows[:count]
    if domain is None:
        tagged = {row["domain"] for row in rows if isinstance(row.get("domain"), str)}
        if len(tagged) > 1:
            raise DatasetError(f"{path}: rows name several domains ({', '.join(sorted(tagged))}); "
                               "split the file or pass --domain")
        domain = tagged.pop() if tagged else (known[0] if known else "other")
    return Dataset(name, path, domain, [row["turns"][0] for row in rows])


# -- prompts and stop ids -------------------------------------------------------------------------


def load_tokenizer(ckpt: Path) -> Any:
    """The checkpoint's tokenizer as transformers loads it (the chat template comes with it)."""
    from transformers import AutoTokenizer

    from ..runtime.loader import resolve_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(ckpt) / "tokenizer"))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """DeepSpec's encoding: the chat template (one user turn, generation prompt, thinking off) when the
    tokenizer has one, else the raw text; no special tokens added by the tokenizer either way."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def stop_ids(ckpt: Path, tokenizer: Any) -> tuple[int, ...]:
    """DeepSpec's stop ids: generation_config.json's eos_token_id (one id or a list), else the target
    config's, else the tokenizer's end-of-sequence id."""
    from ..runtime.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt)
    eos = None
    for config in (ckpt / "tokenizer" / "generation_config.json", ckpt / "target" / "config.json"):
        if eos is None and config.is_file():
            eos = json.loads(config.read_text()).get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(dict.fromkeys(int(i) for i in ([eos] if isinstance(eos, int) else eos)))


# -- accounting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    proposed: int  # drafts verified (DeepSpec's proposal length)
    accepted: int  # drafts accepted
    tau: int  # tokens the round counts


def deepspec_rounds(result: Result, *, max_new_tokens: int, stop_ids: Sequence[int], gamma: int
                    ) -> tuple[list[Round], int]:
    """DeepSpec's rounds and output length, replayed from a fixed-mode decode with headroom.

    A round runs while the tokens produced so far (the prefill's first one included) number at most
    `max_new_tokens`. An end-of-sequence id among the accepted drafts ends the round there: it counts
    index + 1 tokens and as many proposed and accepted drafts. The output is trimmed to max_new_tokens.
    """
    stops = set(stop_ids)
    produced = 1  # the first token, drawn from the prefill
    rounds: list[Round] = []
    if result.tokens and result.tokens[0] in stops:
        return rounds, 1
    for tau, verified in zip(result.taus, result.verified, strict=True):
        if produced > max_new_tokens:
            break
        if verified != gamma:
            raise RuntimeError(f"a counted round verified {verified} drafts, not the full block of {gamma}: "
                               "the decode lacked headroom")
        accepted = tau - 1
        new = result.tokens[produced: produced + tau]
        stop_at = next((j for j, token in enumerate(new) if token in stops), None)
        if stop_at is not None and stop_at < accepted:  # a stop id among the accepted drafts
            rounds.append(Round(stop_at + 1, stop_at + 1, stop_at + 1))
            produced += stop_at + 1
            break
        rounds.append(Round(verified, accepted, tau))
        produced += tau
        if stop_at is not None:  # the bonus token was the stop id
            break
    return rounds, min(produced, max_new_tokens)


def served_rounds(result: Result) -> tuple[list[Round], int]:
    """The served decoder's own accounting: every round as recorded, capped and zero-draft ones too."""
    rounds = [Round(v, t - 1, t) for t, v in zip(result.taus, result.verified, strict=True)]
    return rounds, len(result.tokens)


def summarise(samples: Sequence[tuple[list[Round], int]], gamma: int) -> dict[str, Any]:
    """τ, rounds, tokens and acceptance by block position over all rounds of `samples`.

    conditional[k-1]: of the rounds that verified position k with drafts 1..k-1 accepted, the share
    that accepted draft k. survival[k-1]: of the rounds that verified position k, the share that
    accepted drafts 1..k (DeepSpec's accept_rate@(k-1)).
    """
    rounds = [r for sample_rounds, _ in samples for r in sample_rounds]
    reached, cond_hit, verified, survived = ([0] * gamma for _ in range(4))
    for r in rounds:
        for k in range(min(r.proposed, gamma)):
            verified[k] += 1
            survived[k] += r.accepted > k
            if r.accepted >= k:
                reached[k] += 1
                cond_hit[k] += r.accepted > k
    share = lambda hit, total: [h / t if t else None for h, t in zip(hit, total, strict=True)]  # noqa: E731
    return {
        "samples": len(samples), "rounds": len(rounds), "tokens": sum(tokens for _, tokens in samples),
        "tau": sum(r.tau for r in rounds) / len(rounds) if rounds else 0.0,
        "mean_proposed": sum(r.proposed for r in rounds) / len(rounds) if rounds else 0.0,
        "conditional": share(cond_hit, reached), "survival": share(survived, verified),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def macro(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over datasets (the paper's domain averages): of τ and of each position's rates."""
    out: dict[str, Any] = {"datasets": len(rows)}
    for key in ("tau", "tau_served"):
        out[key] = _mean([r[key] for r in rows])
    for key in ("conditional", "survival"):
        out[key] = [_mean(column) for column in zip(*(r[key] for r in rows), strict=True)]
    return out


# -- decoding -------------------------------------------------------------------------------------


def decode_pairs(target: Any, drafter: Any, prompts: Sequence[list[int]], *, max_new_tokens: int,
                 temperature: float, stop_ids: Sequence[int], seed: int, slots: int,
                 on_release: Callable[[], None] = lambda: None) -> list[tuple[Result, Result]]:
    """(DeepSpec-run result, served-run result) per prompt, decoded with in-flight batching.

    Both runs of a prompt verify full blocks with the same seed; the DeepSpec run gets γ + 1 tokens of
    headroom so that its counted rounds are never capped by the budget.
    """
    from ..runtime.generate import Request, SpeculativeDecoder, run

    class Ticking(SpeculativeDecoder):  # calls `on_release` for each finished request: a progress tick
        def release(self, slot: int) -> Result:
            result = super().release(slot)
            on_release()
            return result

    gamma = drafter.block_size
    requests = []
    for i, prompt in enumerate(prompts):
        for budget in (max_new_tokens + gamma + 1, max_new_tokens):
            requests.append(Request(prompt, max_new_tokens=budget, temperature=temperature, seed=seed + i,
                                    stop_ids=tuple(stop_ids), speculation="fixed"))
    results = run(Ticking(target, drafter, num_slots=slots), requests)
    return list(zip(results[0::2], results[1::2], strict=True))


def evaluate_checkpoint(ckpt: Path, datasets: Sequence[Dataset], *, max_new_tokens: int, temperature: float,
                        seed: int, slots: int, dtype: str = "float32", on_release: Callable[[], None] = lambda: None
                        ) -> dict[str, dict[str, Any]]:
    """Per dataset name: DeepSpec and served accountings of `ckpt`'s pair on the dataset's prompts."""
    import torch

    from ..runtime.loader import open_checkpoint

    tokenizer = load_tokenizer(ckpt)
    stops = stop_ids(ckpt, tokenizer)
    encoded = {d.name: [encode_prompt(tokenizer, p) for p in d.prompts] for d in datasets}
    longest = max(len(p) for prompts in encoded.values() for p in prompts)
    target, drafter, _ = open_checkpoint(ckpt, num_slots=slots, max_len=longest + max_new_tokens + 64,
                                         dtype=getattr(torch, dtype))
    try:
        gamma = drafter.block_size
        rows = {}
        for d in datasets:
            pairs = decode_pairs(target, drafter, encoded[d.name], max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop_ids=stops, seed=seed, slots=slots,
                                 on_release=on_release)
            deepspec = summarise([deepspec_rounds(a, max_new_tokens=max_new_tokens, stop_ids=stops, gamma=gamma)
                                  for a, _ in pairs], gamma)
            served = summarise([served_rounds(b) for _, b in pairs], gamma)
            rows[d.name] = deepspec | {"tau_served": served["tau"], "rounds_served": served["rounds"],
                                       "tokens_served": served["tokens"], "conditional_served": served["conditional"],
                                       "survival_served": served["survival"], "gamma": gamma,
                                       "stop_ids": list(stops)}
    finally:
        target.close()
    return rows


def drafter_label(ckpt: Path) -> str:
    """A short name for a pair in tables and plots: its drafter's source folder as `parent/name` (the
    target's for a family whose drafter is built in)."""
    from ..runtime.loader import resolve_checkpoint

    sources = json.loads((resolve_checkpoint(ckpt) / "manifest.json").read_text()).get("sources", {})
    source = sources.get("drafter") or sources.get("target")
    if not source or "path" not in source:
        return Path(ckpt).name
    path = Path(source["path"])
    return f"{path.parent.name}/{path.name}"


def _gain(a: float | None, b: float | None) -> float | None:
    return a / b - 1 if a is not None and b else None


def build_report(datasets: Sequence[Dataset], main: dict[str, dict[str, Any]],
                 compare: dict[str, dict[str, Any]] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """Per-file rows and per-domain macro averages, with the compared drafter and the relative gain."""
    files, domains = [], {}
    for d in datasets:
        row = {"dataset": d.name, "file": str(d.path), "domain": d.domain, **main[d.name]}
        if compare is not None:
            row["compare"] = compare[d.name]
            row["gain"] = _gain(row["tau"], compare[d.name]["tau"])
        files.append(row)
    for domain in dict.fromkeys(d.domain for d in datasets):
        members = [r for r in files if r["domain"] == domain]
        entry = macro(members)
        if compare is not None:
            entry["compare"] = macro([r["compare"] for r in members])
            entry["gain"] = _gain(entry["tau"], entry["compare"]["tau"])
        domains[domain] = entry
    return {"accounting": "deepspec", "settings": settings, "files": files, "domains": domains}


def plot(report: dict[str, Any], path: Path) -> Path:
    """In the style of the paper's Fig. 2: conditional acceptance by draft position, one panel per
    domain, one line per drafter (prefix survival dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = report["domains"]
    names = report["settings"]["drafters"]
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.6), squeeze=False)
    for ax, (domain, entry) in zip(axes[0], domains.items(), strict=True):
        drafters = [(names[0], entry)] + ([(names[1], entry["compare"])] if "compare" in entry else [])
        for (label, values), color in zip(drafters, ("C0", "C1"), strict=False):
            k = range(1, len(values["conditional"]) + 1)
            ax.plot(k, [v if v is not None else float("nan") for v in values["conditional"]], marker="o",
                    color=color, label=f"{label} (τ {values['tau']:.2f})")
            ax.plot(k, [v if v is not None else float("nan") for v in values["survival"]], linestyle="--",
                    color=color, alpha=0.6)
        ax.set_title(f"{domain} ({entry['datasets']} dataset{'s' if entry['datasets'] != 1 else ''})")
        ax.set_xlabel("draft position k")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("acceptance at k (solid: given 1..k-1 accepted;\ndashed: prefix survival)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command --------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s = report["settings"]
    compared = s["drafters"][1] if len(s["drafters"]) > 1 else None
    columns = ["dataset", "domain", "samples", "rounds", "tokens", "τ DeepSpec", "τ served"]
    columns += [f"τ {compared}", "gain"] if compared else []
    table = Table(*columns, "acceptance at k = 1..γ, given 1..k-1 accepted",
                  title=f"{s['drafters'][0]}: τ = accepted drafts + 1 per round, DeepSpec accounting (full blocks, "
                        f"T = {s['temperature']:g}, max_new_tokens {s['max_new_tokens']})")
    for r in report["files"]:
        extra = [_fmt(r["compare"]["tau"]), _fmt(r["gain"], "+.1%")] if compared else []
        table.add_row(r["dataset"], r["domain"], str(r["samples"]), str(r["rounds"]), str(r["tokens"]),
                      _fmt(r["tau"]), _fmt(r["tau_served"]), *extra, " ".join(_fmt(v) for v in r["conditional"]))
    for domain, e in report["domains"].items():
        extra = [_fmt(e["compare"]["tau"]), _fmt(e["gain"], "+.1%")] if compared else []
        table.add_row(f"[bold]{domain} (macro)[/]", domain, "", "", "", f"[bold]{_fmt(e['tau'])}[/]",
                      _fmt(e["tau_served"]), *extra, " ".join(_fmt(v) for v in e["conditional"]))
    console.print(table)


@click.command("eval")
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A DeepSpec eval file (JSONL with a `turns` list a line); repeat for several.")
@click.option("--domain", "domains", multiple=True,
              help="Domain of each --data file, in order (default: the rows' `domain` field, else the domain "
                   "of DeepSpec's task of that name, else 'other').")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Under 1e-5: greedy (as DeepSpec); else rejection sampling (DeepSpec's default is 1.0).")
@click.option("--max-new-tokens", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option("--max-samples", type=click.IntRange(min=1),
              help="Samples per file (default: DeepSpec's count for its task names, else all rows).")
@click.option("--compare", "compare_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A second converted pair with the same target (e.g. the no-Markov ablation).")
@click.option("--seed", default=DEEPSPEC_SEED, show_default=True, help="Subsampling and per-sample seeds.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Weights and activations of both models (DeepSpec's evaluator runs in bfloat16).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=2),
              help="Requests decoded together (each prompt runs twice: DeepSpec and served accounting).")
@click.option("-o", "--output", "out_dir", default=Path("build/eval"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory for eval.json and eval.png.")
def eval_cmd(engine_dir: Path, data: tuple[Path, ...], domains: tuple[str, ...], temperature: float,
             max_new_tokens: int, max_samples: int | None, compare_dir: Path | None, seed: int, dtype: str,
             batch: int, out_dir: Path) -> None:
    """Acceptance length τ of ENGINE_DIR's pair on DeepSpec-format datasets, as DeepSpec measures it.

    \b
    Per file and per domain (macro average over files): τ with DeepSpec's accounting (full blocks
    verified every round, the bonus token counted; the headline) and with the served decoder's
    (the last rounds capped at the token budget), rounds, tokens, acceptance by draft position
    (conditional and prefix survival), and with --compare the second pair's τ and the relative gain.
    Writes OUT/eval.json and OUT/eval.png (acceptance by position per domain).
    """
    from rich.console import Console
    from rich.progress import Progress

    from ..runtime.errors import CheckpointError
    from ..runtime.loader import resolve_checkpoint
    from .cli_common import err, reports_errors

    temperature = 0.0 if temperature < GREEDY_BELOW else temperature
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: wide enough that the table's rows stay one line each
        console = Console(highlight=False, width=160)
    if domains and len(domains) != len(data):
        raise click.BadParameter(f"give one --domain per --data file ({len(data)}), or none; got {len(domains)}",
                                 param_hint="--domain")
    try:
        datasets = [read_dataset(p, domain=domains[i] if domains else None, max_samples=max_samples, seed=seed)
                    for i, p in enumerate(data)]
    except (DatasetError, UnicodeDecodeError) as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(1)
    for source in (engine_dir, compare_dir, *data):
        if source is not None and out_dir.resolve().is_relative_to(source.resolve()):
            raise click.BadParameter(f"{out_dir} lies inside the input {source}: write the results elsewhere",
                                     param_hint="-o")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two --data files share a name: {', '.join(names)}", param_hint="--data")

    @reports_errors
    def measure() -> dict[str, Any]:
        if compare_dir is not None:
            ours, theirs = (json.loads((resolve_checkpoint(p) / "manifest.json").read_text()) for p in
                            (engine_dir, compare_dir))
            if ours["sources"]["target"]["files"] != theirs["sources"]["target"]["files"]:
                raise CheckpointError(resolve_checkpoint(compare_dir) / "manifest.json",
                                      "--compare pair has another target", subject="sources.target.files",
                                      expected=f"the target of {engine_dir}")
        pairs = [engine_dir] + ([compare_dir] if compare_dir else [])
        total = 2 * len(pairs) * sum(len(d.prompts) for d in datasets)
        results = []
        with Progress(console=err, transient=False) as bar:
            task = bar.add_task("eval", total=total)
            for path in pairs:
                bar.update(task, description=f"eval {path.name}")
                results.append(evaluate_checkpoint(path, datasets, max_new_tokens=max_new_tokens,
                                                   temperature=temperature, seed=seed, slots=batch, dtype=dtype,
                                                   on_release=lambda: bar.advance(task)))
        labels = [drafter_label(p) for p in pairs]
        settings = {"drafters": labels if len(set(labels)) == len(labels) else [str(p) for p in pairs],
                    "engine_dirs": [str(p) for p in pairs],
                    "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed, "dtype": dtype,
                    "max_samples": max_samples}
        return build_report(datasets, results[0], results[1] if len(results) > 1 else None, settings)

    report = measure()
    print_report(report, console)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / "eval.png")
    console.print(f"[green]✓[/] wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}")
