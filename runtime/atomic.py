"""Write a whole output directory or nothing, and never over an input.

Work happens in a hidden sibling (`.NAME.partial-PID-XXXX`) that is renamed into place at the end,
so an interrupted run never leaves a half-written artefact under the name users look for. Partial
directories left by killed processes are removed by the next run.

`check_output` is the one place that decides whether a command may write an output at all: it
refuses, before anything is touched and whatever `--force` says, an output that is, contains or lies
inside one of the command's inputs (symlinks resolved), an output that would replace or contain the
current or home directory, and a location that cannot hold files (under a regular file, on /proc,
/sys or /dev). `atomic_directory` runs it first, so every command writing a directory gets it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CheckpointError
from .watch import process_alive

# Kernel pseudo-filesystems: writing there fails or, worse, changes the running system.
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


class OutputExistsError(Exception):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: output already exists (pass --force to replace it)")
        self.path = path


class UnsafeOutputError(CheckpointError):
    """The output would destroy or write into an input, or cannot be written where it is (exit code 1)."""


def _relation(out: Path, other: Path) -> str | None:
    """How resolved path `out` overlaps resolved path `other`, in words; None if they are apart."""
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "lies inside"
    return None


def check_output(out: Path, *, inputs: Iterable[Path | None] = (), force: bool = False,
                 replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Refuse an output that would lose data or cannot be written; return its absolute path.

    `inputs` are every file or directory the command reads. An output that is one of them, contains
    one or lies inside one is refused with or without `force` (UnsafeOutputError, exit code 1).
    `replaceable`, for commands that write one file documented to live inside an input directory
    (profile's cost table, calibrate's sts.json): such an output may lie inside an input and replace
    an existing file there only when `replaceable(file)` says it is one of this command's own files.
    Otherwise an existing output needs `force` (OutputExistsError, exit code 3).
    """
    out = Path(out)
    resolved = out.resolve()
    output = "the output" + (f" (= {resolved})" if resolved != out.absolute() else "")
    for given in (Path(i) for i in inputs if i is not None):
        relation = _relation(resolved, given.resolve())
        if relation is None:
            continue
        if relation == "lies inside" and replaceable is not None:
            if not resolved.exists() or (resolved.is_file() and replaceable(resolved)):
                continue
            relation = "would replace a file of"
        shown = str(given) if given.resolve() == given.absolute() else f"{given} (= {given.resolve()})"
        raise UnsafeOutputError(out, f"{output} {relation} the input {shown}: refused, nothing was written "
                                "(choose an output outside every input)")
    for name, protected in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        relation = _relation(resolved, protected.resolve())
        if relation in ("is", "contains"):
            raise UnsafeOutputError(out, f"{output} {relation} {name} ({protected}): refused, nothing was "
                                    "written (choose a dedicated output directory)")
    _check_location(out, resolved)
    if os.path.lexists(out) and not force:
        raise OutputExistsError(out)
    return out.absolute()


def _check_location(out: Path, resolved: Path) -> None:
    for pseudo in PSEUDO_FILESYSTEMS:
        if resolved.is_relative_to(pseudo):
            raise UnsafeOutputError(out, f"the output is on {pseudo}, a kernel pseudo-filesystem that holds no "
                                    "files", expected="a path on a regular filesystem")
    # The nearest directory that exists: the output (or its missing parents) will be created in it.
    parent = next(p for p in resolved.parents if p.exists())
    if not parent.is_dir():
        raise UnsafeOutputError(out, f"cannot create the output: {parent} is a file, not a directory",
                                expected="a path whose parents are directories")
    if not os.access(parent, os.W_OK):
        raise UnsafeOutputError(out, f"no permission to write in {parent}", expected="a writable location")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old content or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a rename within one filesystem and therefore atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp's private 0600 would otherwise outlive the rename
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def remove_stale_partials(out: Path) -> None:
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(leftover.name.split(".partial-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False, *, inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` if the block finishes without an exception.

    `inputs`: what the command reads, which `out` must stay clear of (see `check_output`).
    """
    out = check_output(out, inputs=inputs, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise UnsafeOutputError(out, f"cannot create the output: {e.strerror or e}") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise outlive the rename
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / out.name)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
