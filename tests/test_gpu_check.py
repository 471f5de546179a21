"""The one-shot GPU check (`make gpu-check`), run here on CPU tensors under Triton's interpreter.

On a GPU host the same script compares the kernels on the GPU with the CPU oracle; here it proves
that the script runs from a bare checkout (nothing installed, only the checkout on the path), that
its checks pass on correct kernels and fail on a wrong one.
"""

from __future__ import annotations

from dspark_trt.plugins.interpret import enable_interpreter

enable_interpreter()  # before anything imports triton

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dspark_trt.plugins import gpu_check, launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_runs_from_a_bare_checkout_and_writes_its_table(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    for part in ("dspark_trt", "runtime", "plugins", "builder", "examples/tiny-qwen3-dspark"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout)
    out = tmp_path / "gpu-check.json"
    done = subprocess.run([sys.executable, "-m", "dspark_trt.plugins.gpu_check", "--device", "cpu", "--out", str(out)],
                          cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    # The checkout's own modules ran, not the installed package.
    assert result["environment"]["dspark_trt"] == str(checkout.resolve())
    statuses = [c["status"] for c in result["checks"]]
    assert statuses.count("pass") >= 18 and "FAIL" not in statuses
    assert "passed, 0 failed" in done.stdout
    checks = {c["name"]: c for c in result["checks"]}
    # The model sections ran (on CPU tensors, fixture checkpoints written into a temporary directory).
    for section in ("targets", "specul", "tp", "timing"):
        assert any(c["section"] == section and c["status"] == "pass" for c in result["checks"]), section
    speculative = checks["Qwen3 greedy speculative == target-only on cpu"]["figures"]["float32"]
    assert speculative["fixed"]["equal_to_target_only"] and speculative["fixed"]["mean_tau"] > 1.5  # trained pair
    timing = checks["off / fixed / auto per round and per token, batch 1 8 32"]["figures"]
    assert timing["acceptance_P_ge_k"] == [0.71, 0.45, 0.30, 0.20, 0.11] and "CPU" in timing["model"]
    assert {"off", "fixed", "auto"} <= set(timing["batch 32"])


def test_a_wrong_kernel_output_fails_its_check(monkeypatch) -> None:
    case = gpu_check.heads_cases(small=True)[1]
    ok, _, _ = gpu_check.check_heads(case, "cpu")
    assert ok
    real = launch.dspark_confidence

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[:, -1] += 1e-3
        return out

    monkeypatch.setattr(launch, "dspark_confidence", off_by_a_little)
    ok, detail, _ = gpu_check.check_heads(case, "cpu")
    assert not ok, detail


def test_a_device_runner_that_differs_from_the_cpu_oracle_fails_its_check(tmp_path: Path, monkeypatch) -> None:
    from dspark_trt.runtime.qwen3 import Qwen3Target

    fixtures = gpu_check.Fixtures(tmp_path)
    ok, _, _ = gpu_check.check_target("qwen3", "cpu", fixtures)
    assert ok
    real_init, real_run = Qwen3Target.__init__, Qwen3Target.run

    def init(self, *args, **kwargs):  # the runner made for the device (it names one), not the oracle
        real_init(self, *args, **kwargs)
        self.perturbed = "device" in kwargs

    def run(self, step, capture, logits):
        head, features = real_run(self, step, capture, logits)
        return (head + 1e-2 if self.perturbed else head), features

    monkeypatch.setattr(Qwen3Target, "__init__", init)
    monkeypatch.setattr(Qwen3Target, "run", run)
    ok, detail, _ = gpu_check.check_target("qwen3", "cpu", fixtures)
    assert not ok, detail


def test_a_crashing_check_is_a_failure_and_a_skip_says_why() -> None:
    def crash():
        raise RuntimeError("boom")

    def skip():
        raise gpu_check.Skip("needs TensorRT")

    assert gpu_check.run_check("s", "crash", crash).status == "FAIL"
    skipped = gpu_check.run_check("s", "skip", skip)
    assert skipped.status == "skip" and skipped.detail == "needs TensorRT"
