"""One-shot GPU check: `make gpu-check`, or `python -m dspark_trt.plugins.gpu_check`.

Made for a machine lent for a few minutes: one NVIDIA GPU, its own torch / OpenAI Triton /
transformers, no network, no `make setup`. It adds nothing but this repository to the import path,
never downloads, and skips (with the reason printed) whatever the machine lacks. It prints one table
and writes one JSON (`--out`); the exit code is 1 when any check fails.

Sections:
- kernels: each DSpark kernel on the GPU against its torch oracle run on the CPU in float32, on
  random and adversarial inputs (ties, huge logits, tiny temperatures, odd sizes, bf16 weights,
  the scheduler's full AOT row count), plus the kernels' time per call against the torch heads'
  on the GPU at real-model shapes.
- targets: the Qwen3 and DeepSeek-V4 fixture targets (written by the project's fixture writers into
  a temporary directory, converted) on the device against the CPU float32 runner: logits and
  features, float32 on both sides (pass/fail), and the device's default bf16 (figures).
- speculative: greedy speculative decoding (fixed and auto) on the device gives the target-only
  output token for token (float32; bf16 reported).
- tp: TP 1 is the targets section; a 2-process world on the same device (NCCL on a GPU, if NCCL
  allows two ranks on one GPU; gloo with --device cpu) against TP 1.
- timing: per round and per token for off / fixed / auto at batch 1, 8 and 32 on a Qwen3 target with
  real-model shapes (8B: hidden 4096, 36 layers, 32/8 heads, vocab 151936; random bf16 weights made on
  the GPU), with the shipped drafter's acceptance (examples/tiny-qwen3-dspark/README.md), eager and
  CUDA-graph verify steps. GPU figures; a --device cpu run uses tiny shapes and labels them CPU.

`--device cpu` runs the same checks on CPU tensors under Triton's interpreter (small sizes): that is
how CI checks this script without a GPU. Figures from such a run are CPU figures and are labelled so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    section: str
    name: str
    status: str  # "pass", "FAIL" or "skip"
    detail: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """A check that cannot run on this machine; the message says why."""


def run_check(section: str, name: str, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> Check:
    start = time.perf_counter()
    try:
        ok, detail, figures = fn()
        status = "pass" if ok else "FAIL"
    except Skip as reason:
        status, detail, figures = "skip", str(reason), {}
    except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check, reported with its error
        status, detail, figures = "FAIL", f"{type(error).__name__}: {error}", {}
    return Check(section, name, status, detail, round(time.perf_counter() - start, 3), figures)


# -- kernels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadsCase:
    name: str
    kind: str
    batch: int
    gamma: int
    vocab: int
    rank: int
    dim: int
    temperature: float = 0.0  # 0: greedy for every row; > 0: every row samples at this temperature
    logit_scale: float = 2.0
    weight_dtype: str = "float32"
    tied_logits: bool = False  # every base logit equal and no Markov bias: argmax must take the first id


def heads_cases(small: bool) -> list[HeadsCase]:
    """Random cases at the kernels' tile boundaries, then adversarial ones. `small` keeps CPU runs short."""
    v, big_v = (1000, 4099) if small else (32_000, 151_936)
    r, d = (64, 48) if small else (256, 4096)
    return [
        HeadsCase("vanilla greedy", "vanilla", 8, 7, big_v, r, d),
        HeadsCase("gated greedy", "gated", 8, 7, v, r, d),
        HeadsCase("rnn greedy", "rnn", 8, 5, v, r, d),
        HeadsCase("vanilla sampled T=1", "vanilla", 4, 7, v, r, d, temperature=1.0),
        HeadsCase("rnn sampled T=0.6", "rnn", 4, 5, v, 48, d, temperature=0.6),
        HeadsCase("gated bf16 weights", "gated", 4, 7, v, r, d, weight_dtype="bfloat16"),
        HeadsCase("tied logits -> first id", "vanilla", 4, 5, v + 1, r, d, tied_logits=True),
        HeadsCase("huge logits (1e4) sampled", "vanilla", 4, 5, v, r, d, temperature=1.0, logit_scale=1e4),
        HeadsCase("tiny temperature 1e-3", "gated", 4, 5, v, r, d, temperature=1e-3),
        HeadsCase("large batch, odd vocab", "vanilla", 16 if small else 64, 7, v + 3, 48, 40),
    ]


def _heads_inputs(case: HeadsCase, seed: int = 0):
    import torch

    from ..runtime.heads import ConfidenceHead, MarkovHead

    g = torch.Generator().manual_seed(seed)
    b, k, v, r, d = case.batch, case.gamma, case.vocab, case.rank, case.dim
    w1, w2 = torch.randn(v, r, generator=g) * 0.3, torch.randn(v, r, generator=g) * 0.3
    if case.tied_logits:
        w2 = torch.zeros_like(w2)
    proj_w = proj_b = None
    if case.kind == "gated":
        proj_w, proj_b = torch.randn(r, d + r, generator=g) * 0.1, torch.randn(r, generator=g) * 0.1
    elif case.kind == "rnn":
        proj_w, proj_b = torch.randn(3 * r, 2 * r + d, generator=g) * 0.1, torch.randn(3 * r, generator=g)
    weight_dtype = getattr(torch, case.weight_dtype)
    # The oracle sees exactly the weights the kernel reads (bf16 rounded, then float32 arithmetic).
    w1, w2, proj_w, proj_b = (None if t is None else t.to(weight_dtype) for t in (w1, w2, proj_w, proj_b))
    markov = MarkovHead(case.kind, *(None if t is None else t.float() for t in (w1, w2, proj_w, proj_b)))
    confidence = ConfidenceHead(torch.randn(1, d + r, generator=g) * 0.1, torch.randn(1, generator=g), True,
                                [0.5 + 0.2 * i for i in range(k)])
    hidden = torch.randn(b, k, d, generator=g)
    base = torch.zeros(b, k, v) if case.tied_logits else torch.randn(b, k, v, generator=g) * case.logit_scale
    anchors = torch.randint(0, v, (b,), generator=g)
    temperatures = torch.full((b,), case.temperature)
    uniforms = torch.rand(b, k, v, generator=g)
    return markov, confidence, (w1, w2, proj_w, proj_b), hidden, base, anchors, temperatures, uniforms


def check_heads(case: HeadsCase, device: str) -> tuple[bool, str, dict[str, Any]]:
    """MarkovSample + DSparkConfidence on `device` against the Gumbel-max oracle on CPU float32.

    Tokens must be equal up to a row's first disagreement, and a disagreement is allowed only at a
    near tie of the oracle's scores (another summation order may break it the other way); every later
    position of that row depends on the token drawn, so it is not compared.
    """
    import torch

    from ..plugins import launch
    from ..plugins.reference import gumbel_sequential_heads

    markov, confidence, weights, hidden, base, anchors, temperatures, uniforms = _heads_inputs(case)
    ref, ref_emb = gumbel_sequential_heads(markov, confidence, hidden, base, anchors, temperatures, uniforms)

    def dev(t):
        return None if t is None else t.to(device)

    out = launch.markov_sample(dev(base), dev(hidden), dev(anchors), dev(temperatures), dev(uniforms),
                               *(dev(t) for t in weights), kind=case.kind)
    conf = launch.dspark_confidence(dev(hidden), out.markov_emb, dev(confidence.weight), dev(confidence.bias),
                                    torch.tensor(confidence.temperatures, device=device))
    tokens = out.tokens.long().cpu()
    near_ties, compared = 0, torch.ones_like(tokens, dtype=torch.bool)
    for row in range(case.batch):
        differs = (tokens[row] != ref.tokens[row]).nonzero()
        if len(differs):
            k = int(differs[0])
            compared[row, k + 1:] = False
            scores = _oracle_scores(markov, hidden, base, anchors, temperatures, uniforms, ref.tokens, row, k)
            gap = float(scores[ref.tokens[row, k]] - scores[tokens[row, k]])
            if gap > 1e-3 * max(1.0, float(scores.abs().max())):
                return False, f"row {row} position {k}: token {int(tokens[row, k])}, oracle " \
                              f"{int(ref.tokens[row, k])} (score gap {gap:.3g}: not a tie)", {}
            near_ties += 1
    emb_err = float((out.markov_emb.cpu() - ref_emb)[compared].abs().max())
    conf_err = float((conf.logits.cpu() - ref.conf_logits)[compared].abs().max())
    surv_err = float((conf.survival.cpu() - ref.survival)[compared].abs().max())
    prob_err = 0.0
    if case.temperature > 0:
        prob_err = float((out.probs.cpu() - ref.probs)[compared].abs().max())
    worst = max(emb_err, conf_err, surv_err, prob_err)
    ok = worst <= 1e-4 and (not case.tied_logits or bool((tokens == 0).all()))
    detail = f"tokens equal ({near_ties} near-tie rows), max |err| {worst:.1e}"
    return ok, detail, {"near_tie_rows": near_ties, "markov_emb_err": emb_err, "confidence_logit_err": conf_err,
                        "survival_err": surv_err, "probs_err": prob_err}


def _oracle_scores(markov, hidden, base, anchors, temperatures, uniforms, tokens, row: int, k: int):
    """The oracle's draw scores of `row` at position `k`, given its tokens before k."""
    import torch

    state = markov.initial_state(1)
    prev = anchors[row: row + 1]
    for j in range(k + 1):
        bias, _, state = markov.step(prev, hidden[row: row + 1, j], state)
        logits = base[row, j] + (0 if bias is None else bias[0].float())
        prev = tokens[row: row + 1, j]
    t = float(temperatures[row])
    return logits if t <= 0 else logits / t - torch.log(-torch.log(uniforms[row, k]))


def check_schedule(device: str, small: bool) -> tuple[bool, str, dict[str, Any]]:
    """DSparkSchedule (paper and production) against runtime.scheduler on random and edge survivals."""
    import torch

    from ..plugins import launch
    from ..runtime.scheduler import CostTable, schedule_paper, schedule_production

    g = torch.Generator().manual_seed(7)
    table = CostTable(token_counts=[1, 4, 16, 64, 256], step_time_ms=[3.0, 3.1, 3.6, 5.5, 14.0],
                      fixed_overhead_ms=1.5, batch_sizes=[1, 8, 64], batch_overhead_ms=[0.0, 0.4, 2.5])
    rows_max = launch.SCHEDULE_MAX_ROWS
    cases = [torch.rand(r, gamma, generator=g).pow(0.3).cumprod(1) for r, gamma in ((1, 7), (7, 5), (64, 7))]
    cases += [torch.ones(4, 7), torch.zeros(3, 5), torch.full((5, 7), 0.5).cumprod(1),
              torch.rand(rows_max if not small else 32, 7, generator=g).cumprod(1)]
    tensors = launch.cost_table_tensors(table, device)
    mismatches = 0
    for survival in cases:
        for production, reference in ((False, schedule_paper), (True, schedule_production)):
            lengths = launch.dspark_schedule(survival.to(device), **tensors, fixed_overhead_ms=table.fixed_overhead_ms,
                                             production=production, max_rows=rows_max)
            mismatches += int((lengths.long().cpu() != reference(survival, table)).sum())
    return mismatches == 0, f"{len(cases) * 2} schedules, {mismatches} lengths differ", {"mismatches": mismatches}


def check_philox(device: str) -> tuple[bool, str, dict[str, Any]]:
    """Philox draws are reproducible, in [0, 1), and one row's draws depend on its own seed only."""
    import torch

    from ..plugins import launch

    seeds = torch.tensor([1, 2, 3], dtype=torch.int32, device=device)
    a, b = launch.philox_uniforms(seeds, 5, 1000), launch.philox_uniforms(seeds, 5, 1000)
    moved = launch.philox_uniforms(torch.tensor([1, 9, 9], dtype=torch.int32, device=device), 5, 1000)
    ok = torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) < 1 and torch.equal(a[0], moved[0])
    ok = ok and not torch.equal(a[1], moved[1])
    mean = float(a.mean())
    return ok and abs(mean - 0.5) < 0.01, f"reproducible, mean {mean:.4f}", {"mean": mean}


def time_heads(device: str, small: bool) -> tuple[bool, str, dict[str, Any]]:
    """Time per call of the kernels (MarkovSample + DSparkConfidence) and of the torch heads on the same
    device, at batch 1, 8 and 32 with real-model shapes."""
    if device == "cpu":
        raise Skip("timings are taken on the GPU only (the interpreter's times mean nothing)")
    figures = {f"batch {batch}": _time_heads_at(batch, device) for batch in (1, 8, 32)}
    text = ", ".join(f"{k}: {v['kernels_us']:.0f} vs {v['torch_heads_us']:.0f} us" for k, v in figures.items())
    return True, f"kernels vs torch heads per call ({text})", figures


def _time_heads_at(batch: int, device: str) -> dict[str, float]:
    import torch

    from ..plugins import launch
    from ..runtime.dspark.base import sequential_heads
    from ..runtime.heads import ConfidenceHead, MarkovHead

    case = HeadsCase("timing", "vanilla", batch, 7, 151_936, 256, 4096)
    _, confidence, weights, hidden, base, anchors, temperatures, _ = _heads_inputs(case)
    hidden, base, anchors, temperatures = (t.to(device) for t in (hidden, base, anchors, temperatures))
    w1, w2 = (t.to(device) for t in weights[:2])
    markov = MarkovHead("vanilla", w1, w2)
    conf = ConfidenceHead(confidence.weight.to(device), confidence.bias.to(device), True, None)
    sts = torch.tensor(confidence.temperatures, device=device)
    seeds = torch.arange(batch, dtype=torch.int32, device=device)

    def kernels() -> None:
        out = launch.markov_sample(base, hidden, anchors, temperatures, seeds, w1, w2)
        launch.dspark_confidence(hidden, out.markov_emb, conf.weight, conf.bias, sts)

    def torch_heads() -> None:
        sequential_heads(markov, conf, hidden, base, anchors, [0.0] * batch, [None] * batch)

    return {"kernels_us": _time_us(kernels), "torch_heads_us": _time_us(torch_heads)}


def _time_us(fn: Callable[[], None], repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e6


def kernel_checks(device: str, small: bool) -> list[Check]:
    checks = [run_check("kernels", f"MarkovSample+Confidence: {c.name}", lambda c=c: check_heads(c, device))
              for c in heads_cases(small)]
    checks.append(run_check("kernels", "DSparkSchedule vs scheduler", lambda: check_schedule(device, small)))
    checks.append(run_check("kernels", "Philox uniforms", lambda: check_philox(device)))
    checks.append(run_check("kernels", "time per call (vanilla, V 151936, r 256, d 4096)",
                            lambda: time_heads(device, small)))
    return checks


# -- models on the device -------------------------------------------------------------------------


class Fixtures:
    """The fixture checkpoints, written and converted on first use into `root` (a temporary directory).
    What cannot be written with this machine's packages is a Skip naming the reason."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, {}

    def get(self, name: str) -> Path:
        if name not in self.made:
            try:
                self.made[name] = self._write(name)
            except Exception as error:  # noqa: BLE001 - a fixture writer that fails here is reported, not fatal
                self.made[name] = Skip(f"cannot write the {name} fixture with this machine's packages "
                                       f"(transformers {_version('transformers')}): {type(error).__name__}: {error}")
        made = self.made[name]
        if isinstance(made, Skip):
            raise made
        return made

    def _write(self, name: str) -> Path:
        from ..builder.convert import convert

        if name == "qwen3-shipped":  # the trained tiny pair of examples/: drafts that get accepted
            pair = Path(__file__).resolve().parents[1] / "examples" / "tiny-qwen3-dspark"
            convert(pair / "target", pair / "drafter", self.root / name, tp=1, show_progress=False)
            return self.root / name
        # A family's random pair ("qwen3", "qwen3-tp2": the same pair at tp 2; "deepseek-v4"), from the registry.
        from ..builder.families import FAMILIES
        from ..builder.families.family import resolve

        family = FAMILIES["qwen3" if name.startswith("qwen3") else name]
        pair = self.root / f"{family.name}-pair"
        if not pair.exists():
            resolve(family.fixture)(pair, seed=0)
        drafter = pair / "drafter" if (pair / "drafter").is_dir() else None
        convert(pair / "target", drafter, self.root / name, tp=2 if name == "qwen3-tp2" else 1, show_progress=False)
        return self.root / name


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def _runner_classes(family: str):
    from ..builder.families import FAMILIES

    return FAMILIES[family].target_class(), FAMILIES[family].drafter_class()


def _capture(ckpt: Path) -> tuple[int, ...]:
    return tuple(json.loads((ckpt / "manifest.json").read_text())["dspark"]["target_layer_ids"])


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def check_target(family: str, device: str, fixtures: Fixtures) -> tuple[bool, str, dict[str, Any]]:
    """The fixture target on `device` against the CPU float32 runner: a batched prefill of two prompts,
    then a step with a rollback (logits and captured features of every new token)."""

    ckpt = fixtures.get(family)
    target_cls, _ = _runner_classes(family)
    capture = _capture(ckpt)
    vocab = json.loads((ckpt / "target" / "config.json").read_text())["vocab_size"]
    prompt, step = _prompts(vocab, (40, 17), 1), _prompts(vocab, (3, 1), 2)

    def outputs(runner) -> list:
        head, feats = runner.forward([0, 1], prompt, capture=capture, start=[0, 0])
        head2, feats2 = runner.forward([1, 0], step, capture=capture, start=[15, 40])
        return [t.float().cpu() for t in head + feats + head2 + feats2]

    ref = outputs(target_cls(ckpt / "target", num_slots=2, max_len=96))
    figures = {}
    for name, dtype in _dtypes(device):
        got = outputs(target_cls(ckpt / "target", num_slots=2, max_len=96, device=device, dtype=dtype))
        scale = max(float(r.abs().max()) for r in ref)
        err = max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True))
        logits = [(g, r) for g, r in zip(got, ref, strict=True) if g.shape[-1] == vocab]
        agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in logits)
        figures[name] = {"max_abs_err": err, "relative_to_max": err / scale,
                         "argmax_agreement": agree / sum(r.shape[0] for _, r in logits)}
    ok = figures["float32"]["relative_to_max"] <= 1e-4
    detail = f"float32 max |err| {figures['float32']['max_abs_err']:.1e}"
    if "bfloat16" in figures:
        bf16 = figures["bfloat16"]
        detail += f"; bf16 max |err| {bf16['max_abs_err']:.1e}, argmax agreement {bf16['argmax_agreement']:.3f}"
    return ok, detail, figures


def _dtypes(device: str) -> list[tuple[str, Any]]:
    """float32 (checked against the CPU oracle), and the device's default bf16 (reported) off the CPU."""
    import torch

    return [("float32", torch.float32)] + ([] if device == "cpu" else [("bfloat16", None)])


def check_speculative(family: str, device: str, fixtures: Fixtures) -> tuple[bool, str, dict[str, Any]]:
    """Greedy decoding on `device`: fixed and auto speculation give the target-only tokens (float32);
    the same in bf16 is reported. Qwen3 uses the shipped trained pair (examples/), whose drafts get accepted."""
    from ..runtime.generate import Request, generate

    ckpt = fixtures.get("qwen3-shipped" if family == "qwen3" else family)
    target_cls, drafter_cls = _runner_classes(family)
    vocab = json.loads((ckpt / "target" / "config.json").read_text())["vocab_size"]
    prompts = _prompts(vocab, (12, 5, 9), 3)
    figures: dict[str, Any] = {}
    for name, dtype in _dtypes(device):
        kw = {"num_slots": 3, "max_len": 96, "device": device, "dtype": dtype}
        target, drafter = target_cls(ckpt / "target", **kw), drafter_cls(ckpt / "draft", **kw)
        runs = {mode: generate(target, drafter, [Request(p, max_new_tokens=16, speculation=mode) for p in prompts])
                for mode in ("off", "fixed", "auto")}
        off = [r.tokens for r in runs["off"]]
        figures[name] = {mode: {"equal_to_target_only": [r.tokens for r in res] == off,
                                "mean_tau": sum(r.mean_tau for r in res) / len(res)}
                         for mode, res in runs.items() if mode != "off"}
    ok = all(v["equal_to_target_only"] for v in figures["float32"].values())
    detail = ", ".join(f"{name} {mode}: {'equal' if v['equal_to_target_only'] else 'DIFFERS'} (tau {v['mean_tau']:.2f})"
                       for name, modes in figures.items() for mode, v in modes.items())
    return ok, detail, figures


def check_tp2(device: str, fixtures: Fixtures, timeout_s: float = 180.0) -> tuple[bool, str, dict[str, Any]]:
    """A 2-rank world on one device (NCCL on a GPU, gloo on the CPU) against TP 1, in a child process with a
    time limit: NCCL may refuse two ranks on one GPU, or hang on it."""
    import subprocess

    tp1, tp2 = fixtures.get("qwen3"), fixtures.get("qwen3-tp2")
    try:
        done = subprocess.run([sys.executable, "-m", "dspark_trt.plugins.gpu_check", "--tp-child", str(tp1), str(tp2),
                               "--device", device], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise Skip(f"2-rank world on {device} did not finish in {timeout_s:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if device.startswith("cuda"):
            raise Skip(f"NCCL refused a 2-rank world on one GPU: {last}")
        return False, f"2-rank gloo world failed: {last}", {}
    result = json.loads(lines[-1])
    return result["max_abs_err"] <= 1e-4, f"{result['backend']}: max |err| vs TP 1 {result['max_abs_err']:.1e}", result


def _tp_child(tp1: Path, tp2: Path, device: str) -> None:
    import torch

    from ..runtime.qwen3 import Qwen3Target
    from ..runtime.tp import DistributedTarget

    cuda = device.startswith("cuda")
    index = torch.device(device).index or 0 if cuda else None
    backend = "nccl" if cuda else "gloo"
    prompt = _prompts(1024, (20, 7), 4)
    capture = _capture(tp1)
    ref = Qwen3Target(tp1 / "target", num_slots=2, max_len=64, device=device, dtype=torch.float32)
    expected = ref.forward([0, 1], prompt, capture=capture)
    with DistributedTarget("qwen3", tp2 / "target", 2, gpus=[index, index] if cuda else None, backend=backend,
                           num_slots=2, max_len=64, dtype=torch.float32) as target:
        got = target.forward([0, 1], prompt, capture=capture)
    err = max(float((g - e).abs().max()) for g, e in zip(got[0] + got[1], expected[0] + expected[1], strict=True))
    print(json.dumps({"backend": backend, "max_abs_err": err}))


# -- timings ----------------------------------------------------------------------------------------

QWEN3_8B = {"vocab_size": 151_936, "hidden_size": 4096, "num_layers": 36, "num_heads": 32, "num_kv_heads": 8,
            "head_dim": 128, "intermediate_size": 12_288}
QWEN3_TINY = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 16, "intermediate_size": 128}
ACCEPTANCE_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "tiny-qwen3-dspark" / "README.md"


def shipped_acceptance(readme: Path = ACCEPTANCE_SOURCE) -> list[float]:
    """P(≥k accepted drafts), k = 1..γ, of the shipped drafter at T = 0, from its README's τ table (the CPU
    measurement of bench/tau.py): the survival a round's block has on average."""
    for line in readme.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == "DSpark (Markov head)" and cells[1] == "0":
            return [float(c) for c in cells[3:]]
    raise Skip(f"{readme}: no 'DSpark (Markov head)' row at T = 0 in its τ table")


def time_rounds(device: str, small: bool) -> tuple[bool, str, dict[str, Any]]:
    """Per round and per token for off / fixed / auto at batch 1, 8, 32: verify steps timed on a Qwen3 target
    of real-model shapes (random weights made on the device; tiny shapes with --device cpu), the draft
    taken as the DSpark heads' kernels (there is no drafter of these shapes here, so its backbone is not
    in the figures), and acceptance from the shipped drafter's CPU τ table."""
    import torch

    from ..runtime.qwen3 import Qwen3Config, Qwen3Target
    from ..runtime.scheduler import CostTable, plan_production

    survival = shipped_acceptance()
    gamma, cuda = len(survival), device.startswith("cuda")
    shapes = QWEN3_TINY if small else QWEN3_8B
    cfg = Qwen3Config(**shapes, norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      max_positions=40_960, tp=1)
    context, batches = (16, (1, 8, 32)) if small else (512, (1, 8, 32))
    target = Qwen3Target.with_random_weights(cfg, num_slots=max(batches), max_len=context + 2 * gamma + 2,
                                             device=device, cuda_graphs=cuda)
    graphs = target.graphs
    slots = list(range(max(batches)))
    for first in range(0, len(slots), 8):  # the contexts, 8 requests per prefill
        chunk = slots[first: first + 8]
        target.forward(chunk, _prompts(cfg.vocab_size, (context,) * len(chunk), 5), start=[0] * len(chunk),
                       logits=False)

    def verify_ms(batch: int, tokens: int, use_graphs: bool, repeats: int = 3 if small else 10) -> float:
        target.graphs = graphs if use_graphs else None
        args = (slots[:batch], [[7] * tokens] * batch)
        target.forward(*args, start=[context] * batch, logits=False)  # warm-up (and graph capture)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            target.forward(*args, start=[context] * batch, logits=False)
        _sync(device)
        return (time.perf_counter() - start) / repeats * 1000

    figures: dict[str, Any] = {"device": device, "model": "Qwen3-8B shapes, random bf16 weights" if not small else
                               "tiny Qwen3 shapes (CPU run: not GPU figures)", "gamma": gamma,
                               "acceptance_P_ge_k": survival, "acceptance_source": str(ACCEPTANCE_SOURCE.name),
                               "draft": "DSpark heads kernels only (no drafter backbone of these shapes)"}
    for batch in batches:
        steps = {t: verify_ms(batch, t, cuda) for t in range(1, gamma + 2)}
        heads_ms = _time_heads_at(batch, device)["kernels_us"] / 1000 if cuda else 0.0
        table = CostTable(token_counts=[batch * t for t in steps], step_time_ms=list(steps.values()),
                          batch_sizes=[batch], batch_overhead_ms=[0.0], draft_step_ms=[heads_ms],
                          verify_batching="padded")
        pays, lengths = plan_production(torch.tensor([survival] * batch), table, drafting_rows=batch)
        auto_len = int(lengths[0]) if pays else 0

        def mode(verified: int, steps: dict[int, float] = steps, heads_ms: float = heads_ms) -> dict[str, float]:
            round_ms = steps[1 + verified] + (heads_ms if verified else 0.0)
            tokens = 1 + sum(survival[:verified])
            return {"verify_len": verified, "round_ms": round_ms, "tokens_per_round": tokens,
                    "ms_per_token": round_ms / tokens}

        figures[f"batch {batch}"] = {"off": mode(0), "fixed": mode(gamma), "auto": mode(auto_len),
                                     "verify_ms_by_tokens": steps,
                                     "eager_verify_ms_full_block": verify_ms(batch, gamma + 1, False)}
    target.graphs = graphs
    text = "; ".join(f"{k}: off {v['off']['ms_per_token']:.2f}, fixed {v['fixed']['ms_per_token']:.2f}, auto "
                     f"{v['auto']['ms_per_token']:.2f} ms/token" for k, v in figures.items() if k.startswith("batch"))
    return True, ("GPU " if cuda else "CPU (tiny shapes) ") + text, figures


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def model_checks(device: str, small: bool, workdir: Path) -> list[Check]:
    fixtures = Fixtures(workdir)
    checks = []
    for family in ("qwen3", "deepseek-v4"):
        label = "Qwen3" if family == "qwen3" else "DeepSeek-V4"
        checks.append(run_check("targets", f"{label} fixture target on {device} vs CPU float32",
                                lambda f=family: check_target(f, device, fixtures)))
        checks.append(run_check("specul", f"{label} greedy speculative == target-only on {device}",
                                lambda f=family: check_speculative(f, device, fixtures)))
    checks.append(run_check("tp", f"TP 2 (two ranks on {device}) vs TP 1", lambda: check_tp2(device, fixtures)))
    checks.append(run_check("timing", "off / fixed / auto per round and per token, batch 1 8 32",
                            lambda: time_rounds(device, small)))
    return checks


# -- driver --------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "device": device,
                            "dspark_trt": str(Path(__file__).resolve().parents[1])}
    for name in ("torch", "triton", "transformers", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(checks: list[Check], env: dict[str, Any]) -> None:
    where = env.get("gpu") or "CPU (Triton interpreter)"
    print(f"dspark-trt gpu-check on {where}; torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}, numpy {env['numpy']}, python {env['python']}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.section:<8} {c.name:<{width}}  {c.status:<4}  {c.seconds:7.2f}s  {c.detail}")
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "FAIL", "skip")}
    print(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_trt.plugins.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="cuda:N (default cuda:0), or cpu for the interpreter")
    parser.add_argument("--out", type=Path, default=Path("build/gpu-check.json"), help="the JSON of results")
    parser.add_argument("--tp-child", nargs=2, type=Path, metavar=("TP1", "TP2"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_child:  # the child process of check_tp2
        _tp_child(*args.tp_child, args.device)
        return 0
    small = args.device == "cpu"
    if small:
        import torch

        from .interpret import enable_interpreter

        enable_interpreter()
        # Tiny shapes: one thread does them in microseconds, while a thread pool on a busy shared machine
        # waits for cores (a 256-wide product took 20 ms with 2 threads under load, 0.1 ms with one).
        torch.set_num_threads(1)
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"no CUDA device visible to torch {torch.__version__}; run with --device cpu for the "
                  "interpreter check", file=sys.stderr)
            return 2
    env = environment(args.device)
    import tempfile

    checks = kernel_checks(args.device, small)
    with tempfile.TemporaryDirectory(prefix="dspark-gpu-check-") as workdir:
        checks += model_checks(args.device, small, Path(workdir))
    print_table(checks, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
