"""What every hostile-input table (tests/test_hostile_*.py) shares: the
user's photo folder and a finished run its rows must leave alone (built once
a module by conftest.py's ``module_photos`` and ``finished_run``, copied for
a row by ``copy_world``), the row itself, and the checks made of it: the exit
status and the message, no traceback, a refusal said in one line, and the
files it must leave alone byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

TRAIN = ["train", "--instance-dir", "{photos}", "--instance-prompt", "a photo of sks dog",
         "--steps", "2", "--resolution", "32"]
PREPARE = ["prepare", "{photos}", "{tmp}/set", "--resolution", "32"]


def smooth_photos(folder: Path, n: int) -> Path:
    """``n`` smooth random 64 px pictures, far apart by perceptual hash (so
    prepare keeps them all): the user's photo folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        small = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
        small.resize((64, 64), Image.Resampling.BICUBIC).save(folder / f"photo_{i}.png")
    return folder


def train_run(argv: list[str], out: Path) -> Path:
    """The finished run ``lorabooth ARGV --output OUT`` leaves (in this process)."""
    from lorabooth.commands.cli import main

    assert main([*argv, "--output", str(out)]) == 0
    return out


def finished_run(photos: Path, out: Path) -> Path:
    """A finished 2-step run of ``photos`` with a checkpoint at step 1 too."""
    return train_run([a.format(photos=photos) for a in TRAIN] + ["--checkpoint-every", "1"], out)


def copy_world(photos: Path, run: Path, tmp: Path) -> tuple[Path, Path]:
    """A row's own copies of the photos and the finished run, at tmp/photos
    and tmp/run."""
    shutil.copytree(photos, tmp / "photos")
    shutil.copytree(run, tmp / "run")
    return tmp / "photos", tmp / "run"


def main_at_umask(argv: list[str], umask: int = 0o022) -> int:
    """``lorabooth ARGV`` in this process under ``umask`` (the usual one, so
    rows may check the modes of what was written whatever the test runner's)."""
    from lorabooth.commands.cli import main

    old = os.umask(umask)
    try:
        return main(argv)
    finally:
        os.umask(old)


@dataclass
class Ctx:
    """Where a row runs: its own folder, its copies of the photos and the
    finished run, and (for rows that need them) the tiny judges' folder."""
    tmp: Path
    photos: Path
    run: Path
    monkeypatch: pytest.MonkeyPatch
    judges: Path | None = None

    def fmt(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, photos=self.photos, run=self.run, judges=self.judges)


def absent(*names: str) -> Callable[[Ctx], None]:
    """A check after a row: nothing by these names below its folder."""
    def check(ctx: Ctx) -> None:
        for name in names:
            assert not (ctx.tmp / name).exists(), name
    return check


def ready(row: Row, ctx, capsys, caplog) -> dict[Path, dict[str, str]]:
    """The row's setup run, a ``snapshot`` of the photos and the run taken
    after it, and what was said so far forgotten: the row may start."""
    if row.setup:
        row.setup(ctx)
    before = snapshot(ctx.photos, ctx.run)
    capsys.readouterr()
    caplog.clear()
    return before


@dataclass
class Row:
    """A command (``{tmp}``, ``{photos}``, ``{run}`` filled in), the exit status
    it ends with, a fragment of what it says, a setup run before it and
    checks run after it."""
    argv: list[str]
    code: int
    says: str
    setup: Callable | None = None
    then: Callable | None = None


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
