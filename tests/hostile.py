"""The checks every hostile-input table makes of a row (tests/test_hostile_*.py):
the exit status and the message, no traceback, a refusal said in one line,
and the files it must leave alone byte for byte."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path


def tree(folder: Path) -> dict[str, str]:
    """Every path below ``folder`` -> sha256 of its bytes ('dir' for folders;
    'fifo' for the FIFOs rows plant, whose reading here would block)."""
    def digest(p: Path) -> str:
        if p.is_dir():
            return "dir"
        if stat.S_ISFIFO(p.stat().st_mode):
            return "fifo"
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))}


def snapshot(*folders: Path) -> dict[Path, dict[str, str]]:
    """``tree`` of each folder, for ``assert_untouched`` after the row ran."""
    return {folder: tree(folder) for folder in folders}


def assert_untouched(before: dict[Path, dict[str, str]]) -> None:
    """Nothing in the snapshot's folders changed, and nothing new is there."""
    for folder, paths in before.items():
        assert tree(folder) == paths, folder


def assert_outcome(code: int, said: str, want: int, fragment: str, *,
                   errors_in: str | None = None) -> None:
    """The row's exit status ``want`` and ``fragment`` in what it ``said`` (stderr
    and log); never a traceback; a refusal (exit 2) is exactly one error line,
    counted in ``errors_in`` when given (stderr alone, without the log)."""
    assert code == want, said[-2000:]
    assert fragment in said, said[-2000:]
    assert "Traceback" not in said
    if code == 2:
        errors = [line for line in (said if errors_in is None else errors_in).splitlines()
                  if ": error: " in line]
        assert len(errors) == 1, errors
