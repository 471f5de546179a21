"""Shared fixtures: the tiny checkpoint pairs are generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def qwen3_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    out = tmp_path_factory.mktemp("qwen3") / "pair"
    write_qwen3_fixture(out, seed=0)
    return out


@pytest.fixture(scope="session")
def v4_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dspark_trt.builder.fixture_deepseek_v4 import write_deepseek_v4_fixture

    out = tmp_path_factory.mktemp("v4") / "pair"
    write_deepseek_v4_fixture(out, seed=0)
    return out


@pytest.fixture
def qwen3_copy(qwen3_pair: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "qwen3"
    shutil.copytree(qwen3_pair, dst)
    return dst


@pytest.fixture
def v4_copy(v4_pair: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "v4"
    shutil.copytree(v4_pair, dst)
    return dst


def convert_pair(pair: Path, out: Path, tp: int = 1) -> Path:
    from dspark_trt.builder.convert import convert

    convert(pair / "target", pair / "drafter", out, tp=tp, show_progress=False)
    return out


@pytest.fixture(scope="session")
def qwen3_ckpt(qwen3_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default Qwen3 fixture, converted with tp 1."""
    return convert_pair(qwen3_pair, tmp_path_factory.mktemp("ckpt") / "tp1")


@pytest.fixture(scope="session")
def markov_ckpts(qwen3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted checkpoints for each Markov head variant (same target weights, seed 0)."""
    from dspark_trt.builder.fixture_qwen3 import write_qwen3_fixture

    ckpts = {"vanilla": qwen3_ckpt}
    for kind in ("gated", "rnn"):
        pair = tmp_path_factory.mktemp(kind) / "pair"
        write_qwen3_fixture(pair, seed=0, markov_head_type=kind)
        ckpts[kind] = convert_pair(pair, pair.parent / "ckpt")
    return ckpts
