"""Ahead-of-time compilation (no GPU needed) and the TensorRT registration boundary."""

from __future__ import annotations

from dspark_trt.plugins.interpret import enable_interpreter

enable_interpreter()  # compilation must then happen in a child process: that path is tested here

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from dspark_trt.builder.cli_engine import plugins  # noqa: E402
from dspark_trt.plugins import aot  # noqa: E402
from dspark_trt.plugins.deps import MissingDependencyError, has_module  # noqa: E402


@pytest.fixture(scope="module")
def compiled(qwen3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aot") / "plugins"
    result = CliRunner().invoke(plugins, ["--ckpt", str(qwen3_ckpt), "--arch", "sm_90,sm_100", "--dtype", "fp32",
                                          "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_cubins_for_sm90_and_sm100(compiled: Path, tmp_path: Path):
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["format"] == "dspark-trt/plugins"
    entries = manifest["kernels"]
    # fixture drafter: vanilla head, rank 32, γ 7 -> MarkovSample (Philox), confidence, 2 schedulers
    for arch, target in (("sm_90", "sm_90a"), ("sm_100", "sm_100a")):
        mine = [e for e in entries if e["arch"] == arch]
        assert {e["plugin"] for e in mine} == {"MarkovSample", "DSparkConfidence", "DSparkSchedule"}
        assert len(mine) == 4
        for entry in mine:
            cubin = (compiled / entry["cubin"]).read_bytes()
            assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
            ptx = (compiled / entry["ptx"]).read_text()
            assert f".target {target}" in ptx
            assert f".entry {entry['kernel_name']}(" in ptx
            # Triton's entry: the declared runtime arguments, then its two hidden scratch pointers; the entry
            # TensorRT gets declares only what TensorRT's AOT launch passes, and still assembles.
            param = rf"\.param \S+(?: \.ptr \.global \.align \d+)? {entry['kernel_name']}_param_\d+"
            assert len(re.findall(param, ptx)) == len(entry["signature"]) + 2
            trt_ptx = compiled / entry["tensorrt_ptx"]
            assert len(re.findall(param, trt_ptx.read_text())) == len(entry["signature"])
            ptxas = get_ptxas(int(arch[3:])).path
            done = subprocess.run([ptxas, f"-arch={target}", str(trt_ptx), "-o", str(tmp_path / "check.cubin")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr


def test_variants_are_named_by_their_specialisation(compiled: Path):
    manifest = json.loads((compiled / "manifest.json").read_text())
    variants = {e["variant"] for e in manifest["kernels"]}
    assert "markov_sample_vanilla_philox_r32_fp32_fp32" in variants
    assert "dspark_schedule_paper_g8_r256" in variants


def test_existing_output_and_bad_arch(compiled: Path, tmp_path: Path):
    result = CliRunner().invoke(plugins, ["--arch", "sm_90", "-o", str(compiled)])
    assert result.exit_code == 3 and "--force" in result.output
    result = CliRunner().invoke(plugins, ["--arch", "gfx942", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unsupported architecture" in result.output


def test_default_specs_cover_every_head_and_scheduler():
    specs = aot.default_specs()
    kinds = {s.constexprs["KIND"] for s in specs if s.plugin == "MarkovSample"}
    assert kinds == {1, 2, 3}
    assert {s.constexprs["PRODUCTION"] for s in specs if s.plugin == "DSparkSchedule"} == {False, True}
    for spec in specs:  # TensorRT AOT convention: pointers, then only int32 scalars, then pointers
        kinds_in_order = ["ptr" if t.startswith("*") else t for t in spec.signature.values()]
        first_scalar = kinds_in_order.index("i32")
        last_scalar = len(kinds_in_order) - 1 - kinds_in_order[::-1].index("i32")
        assert set(kinds_in_order[first_scalar:last_scalar + 1]) == {"i32"}


@pytest.mark.skipif(has_module("tensorrt"), reason="TensorRT is installed here")
def test_tensorrt_registration_is_lazy_and_explains_what_to_install():
    from dspark_trt.plugins import trt  # importing never needs TensorRT

    with pytest.raises(MissingDependencyError, match=r"pip install tensorrt --extra-index-url https://pypi\.nvidia\.com"):
        trt.register()


def _gpu_available() -> bool:
    return has_module("tensorrt") and shutil.which("nvidia-smi") is not None


gpu = pytest.mark.skipif(not _gpu_available(), reason="needs an NVIDIA GPU with TensorRT (not on this machine)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("plugin", ["MarkovSample", "DSparkConfidence", "DSparkSchedule"])
def test_tensorrt_plugin_matches_reference(plugin: str):
    """Build a one-plugin TensorRT network with the AOT kernel and compare with the Triton launch (same
    kernel, already compared with the torch reference on CPU). Runs in a child process."""
    done = subprocess.run([sys.executable, "-m", "dspark_trt.plugins.trt_check", plugin],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
