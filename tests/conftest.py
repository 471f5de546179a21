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
