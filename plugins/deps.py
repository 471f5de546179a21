"""Optional GPU-side dependencies, checked lazily with one clear message naming what to install."""

from __future__ import annotations

import importlib.util

TENSORRT_INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
# DSparkDecodingConfig (PyTorch backend) arrived in 1.3.0rc27 (DSPARK_SPEC section 6).
TENSORRT_LLM_PYTORCH_INSTALL = 'pip install "tensorrt_llm>=1.3.0rc27" --extra-index-url https://pypi.nvidia.com'


class MissingDependencyError(Exception):
    """A GPU-only dependency is not installed here. The message is one line naming the install command."""

    exit_code = 4


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_tensorrt() -> None:
    if not has_module("tensorrt"):
        raise MissingDependencyError(f"TensorRT is not installed (needed for --backend tensorrt): {TENSORRT_INSTALL}")
