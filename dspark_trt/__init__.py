"""dspark-trt: DSpark speculative decoding on TensorRT and Triton Inference Server.

The repository's top-level folders are mapped under this namespace:
``builder/`` is ``dspark_trt.builder``, ``runtime/`` is ``dspark_trt.runtime``,
``plugins/`` is ``dspark_trt.plugins`` and ``client/`` is ``dspark_trt.client``.
"""

__version__ = "0.1.0"

# A source checkout that was never installed (`make gpu-check` on a machine without `make setup`):
# the top-level folders are found as this package's subpackages. An installed copy has no
# pyproject.toml beside it, and its package-dir mapping already does this.
import pathlib as _pathlib

_root = _pathlib.Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "runtime" / "__init__.py").is_file():
    __path__.append(str(_root))
