"""Choose how this process runs Triton kernels: on a GPU, or on the CPU through Triton's interpreter.

Triton fixes the mode when it is imported: every `@triton.jit` function, including its own library
functions (`tl.argmax`, `tl.rand`, ...), is built either as a GPU kernel or as an interpreted one,
and the two cannot call each other. So the choice is per process, made before `triton` is imported:
tests call `enable_interpreter()` first; ahead-of-time compilation runs in a process without it
(`dspark_trt.plugins.aot` re-runs itself in a child process when it finds the interpreter on).
"""

from __future__ import annotations

import os
import sys

ENV = "TRITON_INTERPRET"


class InterpreterModeError(RuntimeError):
    """Triton was imported in the wrong mode for what was asked of it."""


def enable_interpreter() -> None:
    """Run every Triton kernel of this process on the CPU interpreter. Call before importing triton.

    The environment variable is removed again once triton has latched the mode, so that child
    processes (AOT compilation, servers) start in normal GPU-compile mode.
    """
    already = sys.modules.get("triton")
    if already is not None and not already.knobs.runtime.interpret:
        raise InterpreterModeError(
            "triton was imported before enable_interpreter(); kernels of this process would be GPU kernels. "
            f"Set {ENV}=1 in the environment or call enable_interpreter() before anything imports triton."
        )
    os.environ[ENV] = "1"
    import triton

    triton.knobs.runtime.interpret = True  # latched on the knob itself, no longer read from the environment
    os.environ.pop(ENV, None)


def interpreter_active() -> bool:
    """Whether Triton kernels of this process run on the CPU interpreter (imports triton)."""
    import triton

    return bool(triton.knobs.runtime.interpret)
