"""One error type for every bad input, so the CLI can print it and exit with a meaningful code."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint (or a converted artefact) is not what it should be.

    The message always names where the problem is (file, and tensor or field when known), what was
    found and what was expected, so that a user can fix the input without reading our code.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        subject: str | None = None,
        found: object = None,
        expected: object = None,
    ) -> None:
        self.path = str(path)
        self.subject = subject
        self.problem = problem
        self.found = found
        self.expected = expected
        super().__init__(self.describe())

    def describe(self) -> str:
        where = self.path + (f" [{self.subject}]" if self.subject else "")
        text = f"{where}: {self.problem}"
        details = [f"{label} {value}" for label, value in (("found", self.found), ("expected", self.expected))
                   if value is not None]
        return text + (f" ({', '.join(details)})" if details else "")
