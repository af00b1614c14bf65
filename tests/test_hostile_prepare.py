"""Hostile prepare (issue 24, items 6 and 7): a prepare stopped by a real
signal, two prepares into one folder at once, a stale lock, and `train` on a
prepare output (whose contact sheet is no photo). Every row checks its exit
status, a fragment of what it says, one line and no traceback, and the
sha256 of every file that must survive it: the photo folder always, the
whole scratch folder when the command is refused, and the row's ``keep``."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from hostile import PREPARE, TRAIN, assert_outcome, smooth_photos, tree
from hostile import Row as TableRow
from lorabooth.commands.cli import main

CAPTION = ["--caption", "a photo of sks dog"]

# Runs `lorabooth ARGV` in a fresh process whose prepare writes images through
# a hook: "kill SIG N" sends the process a real signal SIG right after its
# N-th image is written; "wait READY GO" touches READY after the first image
# (the lock is held by then) and waits until GO exists.
BOOT = """
import os, signal, sys, time
from pathlib import Path
import lorabooth.photos.prepare as P
from lorabooth.commands.cli import main
mode, a, b, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
real, calls = P.save_png, [0]
def hooked(*args, **kwargs):
    real(*args, **kwargs)
    calls[0] += 1
    if mode == "kill" and calls[0] == int(b):
        os.kill(os.getpid(), int(a))
    if mode == "wait" and calls[0] == 1:
        Path(a).touch()
        for _ in range(12000):  # a hang guard, not a speed limit
            if Path(b).exists():
                break
            time.sleep(0.05)
P.save_png = hooked
signal.signal(signal.SIGINT, signal.default_int_handler)  # what a terminal's Ctrl-C meets
sys.exit(main(argv))
"""


def lorabooth(mode: str, a: str, b: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-c", BOOT, mode, a, b, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Ctx:
    tmp: Path
    photos: Path
    said: str = ""
    live: subprocess.Popen | None = None  # a prepare running beside the row's command
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def fmt(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, photos=self.photos)

    @property
    def out(self) -> Path:
        return self.tmp / "set"


@dataclass
class Row(TableRow):
    kill: tuple[int, int] | None = None  # (signal, after the n-th image): run in a subprocess
    keep: list[str] = field(default_factory=list)  # paths below tmp that must stay byte-identical


def run_row(row: Row, ctx: Ctx) -> tuple[int, str]:
    argv = [ctx.fmt(a) for a in row.argv]
    if row.kill:
        sig, n = row.kill
        p = lorabooth("kill", str(int(sig)), str(n), argv)
        _, err = p.communicate()
        return p.returncode, err
    return main(argv), ""


# --- setups --------------------------------------------------------------------------------

def prepared(ctx: Ctx, *extra: str) -> None:
    assert main([ctx.fmt(a) for a in PREPARE] + list(extra)) == 0


def interrupted(sig: int, n: int, *extra: str) -> Callable[[Ctx], None]:
    """A prepare stopped by a real ``sig`` right after its ``n``-th image."""
    def setup(ctx: Ctx) -> None:
        p = lorabooth("kill", str(int(sig)), str(n), [ctx.fmt(a) for a in PREPARE] + list(extra))
        _, err = p.communicate()
        assert p.returncode == 130, err
    return setup


def earlier_run_then_two_more_photos(ctx: Ctx) -> None:
    """A finished prepare of photos 0-2 with a user's file beside it; then two
    new photos (3, 4) in SRC, so a rerun writes names the report lacks."""
    prepared(ctx, *CAPTION)
    (ctx.out / "my_notes.txt").write_text("the user's own file")
    smooth_photos(ctx.photos, 5)


def live_prepare(ctx: Ctx) -> None:
    """A prepare into OUT that has written its first image and waits."""
    sync = ctx.tmp / "sync"
    sync.mkdir()
    p = lorabooth("wait", str(sync / "ready"), str(sync / "go"),
                  [ctx.fmt(a) for a in PREPARE] + CAPTION)
    ctx.cleanup.append(lambda: (p.poll() is None and p.kill(), p.communicate()))
    ctx.live = p
    for _ in range(12000):  # a hang guard, not a speed limit
        if (sync / "ready").exists() or p.poll() is not None:
            break
        time.sleep(0.05)
    assert (sync / "ready").exists(), p.communicate()


def stale_lock(ctx: Ctx) -> None:
    prepared(ctx)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ctx.out / ".lock").write_text(f"{dead.pid}\n")


def unreadable_sheet(ctx: Ctx) -> None:
    """A prepare output whose contact sheet no longer decodes: reading it as a
    photo would stop train."""
    prepared(ctx)
    (ctx.out / "contact_sheet.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)


def curated(ctx: Ctx) -> None:
    """The user dropped one output and added a picture prepare never saw."""
    unreadable_sheet(ctx)
    (ctx.out / "photo_1.png").unlink()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(ctx.out / "extra.png")


def sheet_and_dotfile_in_photos(ctx: Ctx) -> None:
    (ctx.photos / "contact_sheet.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (ctx.photos / ".hidden.png").write_bytes(b"not an image")


def broken_report(ctx: Ctx) -> None:
    prepared(ctx)
    (ctx.out / "prepare.json").write_text("{not json")


# --- checks --------------------------------------------------------------------------------

def kept_exactly(*names: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        got = sorted(p.name for p in ctx.out.iterdir())  # dot-files too: no lock, no temp
        assert got == sorted([*names, "contact_sheet.png", "prepare.json"]), got
    return check


def rerun_after_deleting(wrote: str, *deleted: str, keeps: list[str]) -> Callable[[Ctx], None]:
    """The stopped run wrote ``wrote`` and holds no lock; once ``deleted``
    leave SRC, a rerun leaves exactly ``keeps`` (images and captions)."""
    def check(ctx: Ctx) -> None:
        assert (ctx.out / wrote).is_file(), sorted(p.name for p in ctx.out.iterdir())
        assert not (ctx.out / ".lock").exists()
        assert json.loads((ctx.out / "prepare.json").read_text())["running"] is True
        for name in deleted:
            (ctx.photos / name).unlink()
        extra = CAPTION if any(k.endswith(".txt") for k in keeps) else []
        assert main([ctx.fmt(a) for a in PREPARE] + extra) == 0
        kept_exactly(*keeps)(ctx)
    return check


def live_run_finishes_intact(ctx: Ctx) -> None:
    (ctx.tmp / "sync" / "go").touch()
    out, err = ctx.live.communicate()
    assert ctx.live.returncode == 0, err
    kept_exactly("photo_0.png", "photo_0.txt", "photo_1.png", "photo_1.txt", "photo_2.png",
                 "photo_2.txt")(ctx)
    assert {p.read_text() for p in ctx.out.glob("*.txt")} == {"a photo of sks dog\n"}


def said(fragment: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert fragment in ctx.said, ctx.said[-2000:]
    return check


# --- the table -----------------------------------------------------------------------------

TRAIN_SET = [a.replace("{photos}", "{tmp}/set") for a in TRAIN] + ["--output", "{tmp}/out"]

ROWS = {
    # 6: a stopped prepare's rerun removes every image it wrote that SRC no longer keeps
    "SIGTERM mid-prepare over an earlier run, rerun after two photos deleted": Row(
        PREPARE + CAPTION, 130, "lorabooth prepare: interrupted", earlier_run_then_two_more_photos,
        rerun_after_deleting("photo_3.png", "photo_0.png", "photo_3.png",
                             keeps=["photo_1.png", "photo_1.txt", "photo_2.png", "photo_2.txt",
                                    "photo_4.png", "photo_4.txt", "my_notes.txt"]),
        kill=(signal.SIGTERM, 4), keep=["set/my_notes.txt"]),
    "SIGINT mid-prepare into a new folder, rerun after a photo deleted": Row(
        PREPARE, 130, "lorabooth prepare: interrupted", None,
        rerun_after_deleting("photo_1.png", "photo_1.png", keeps=["photo_0.png", "photo_2.png"]),
        kill=(signal.SIGINT, 2)),
    "train on the output of a stopped prepare": Row(
        TRAIN_SET, 2, "did not finish", interrupted(signal.SIGTERM, 2)),
    # 6: one prepare into a folder at a time; a dead one's lock is taken over
    "second prepare into a folder another prepare is writing": Row(
        PREPARE + ["--caption", "a photo of zzz cat"], 2, "another lorabooth process",
        live_prepare, live_run_finishes_intact),
    "prepare into a folder with a dead process's lock": Row(
        PREPARE, 0, "taking over the stale lock", stale_lock,
        kept_exactly("photo_0.png", "photo_1.png", "photo_2.png")),
    # 7: what is not a photo of the subject stays out of training
    "train on a prepare output: the contact sheet is not read": Row(
        TRAIN_SET, 0, "set: 3 images", unreadable_sheet, keep=["set"]),
    "train on a curated prepare output: its listed images that exist": Row(
        TRAIN_SET, 0, "set: 2 images", curated, said("not listed in its prepare.json"),
        keep=["set"]),
    "train on photos beside a contact sheet and a dot-file": Row(
        TRAIN + ["--output", "{tmp}/out"], 0, "photos: 3 images", sheet_and_dotfile_in_photos),
    "train on a prepare output with a broken prepare.json": Row(
        TRAIN_SET, 2, "prepare.json: not a readable report", broken_report),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_prepare(name, tmp_path, monkeypatch, capsys, caplog):
    row = ROWS[name]
    caplog.set_level("INFO")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = Ctx(tmp_path, smooth_photos(tmp_path / "photos", 3))
    try:
        if row.setup:
            row.setup(ctx)
        everything, photos = tree(ctx.tmp), tree(ctx.photos)
        kept = {k: tree(ctx.tmp / k) if (ctx.tmp / k).is_dir() else everything[k] for k in row.keep}
        capsys.readouterr()
        caplog.clear()
        code, err = run_row(row, ctx)
        ctx.said = err + capsys.readouterr().err + caplog.text
        assert_outcome(code, ctx.said, row.code, row.says)
        if code != 0:  # an interrupted prepare too ends on one line
            ends = [line for line in ctx.said.splitlines()
                    if ": error: " in line or line.endswith(": interrupted")]
            assert len(ends) == 1, ends
        if code == 2:  # refused: nothing anywhere changed
            assert tree(ctx.tmp) == everything
        assert tree(ctx.photos) == photos
        if row.then:
            row.then(ctx)
        for k, digest in kept.items():
            assert (tree(ctx.tmp / k) if (ctx.tmp / k).is_dir()
                    else tree(ctx.tmp)[k]) == digest, k
    finally:
        for undo in ctx.cleanup:
            undo()
