"""What every `dspark-build` command shares: its two consoles, its exit codes and `reports_errors`.

The commands live in cli.py (checkpoints to a repository, serving), cli_engine.py (TensorRT plugins,
ONNX export, engines) and evaluate.py (`eval`); they import this module, never one another.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..plugins.deps import MissingDependencyError
from ..runtime.atomic import OutputExistsError
from ..runtime.errors import CheckpointError

EXIT_INVALID_INPUT = 1
EXIT_OUTPUT_EXISTS = 3
EXIT_MISSING_DEPENDENCY = 4
EXIT_SERVER = 5

# soft_wrap: messages name files and tensors; they must stay greppable, never re-wrapped.
err = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our exceptions into one clear message and a meaningful exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .convert import ValidationError  # convert imports torch; most commands never need it

        try:
            return fn(*args, **kwargs)
        except ValidationError as e:
            err.print(f"[red]error:[/] {len(e.problems)} problem(s) with the input:")
            for problem in e.problems:
                err.print(f"  • {escape(str(problem))}")
            sys.exit(EXIT_INVALID_INPUT)
        except CheckpointError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            sys.exit(EXIT_INVALID_INPUT)
        except OutputExistsError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            sys.exit(EXIT_OUTPUT_EXISTS)
        except MissingDependencyError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            sys.exit(EXIT_MISSING_DEPENDENCY)
        except OSError as e:  # a file we were told to read or write is not there or not ours: no traceback
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "(no file named)"
            err.print(f"[red]error:[/] {escape(where)}: {escape(e.strerror or str(e))}")
            sys.exit(EXIT_INVALID_INPUT)

    return wrapper
