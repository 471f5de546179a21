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
    from ..runtime.drafter import sequential_heads
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
    args = parser.parse_args(argv)
    small = args.device == "cpu"
    if small:
        from .interpret import enable_interpreter

        enable_interpreter()
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"no CUDA device visible to torch {torch.__version__}; run with --device cpu for the "
                  "interpreter check", file=sys.stderr)
            return 2
    env = environment(args.device)
    checks = kernel_checks(args.device, small)
    print_table(checks, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
