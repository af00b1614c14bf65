"""Issue 24, items 2, 3, 4 and 14: what the write guard (guard.py, plans.py)
refuses, one row each. Every row checks its exit status, one error line, no
traceback, and that every file that existed before the command (the photos,
the finished run, and whatever the row's setup put in its folder) keeps its
bytes; a refused row also leaves no new file behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from hostile import assert_outcome, assert_untouched, snapshot, tree
from lorabooth.commands.cli import main
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from test_hostile_options import PROMPT, Row, no_network, train_argv, world  # noqa: F401

GEN = ["generate", "{run}", "--prompt", PROMPT, "--num-images", "1", "--steps", "1"]
EVAL = ["evaluate", "{run}", "--real", "{photos}", "--class-noun", "dog"]
LORA = "{run}/" + WEIGHT_NAME


def foreign(name: str, *files: str):
    """A folder of the user's, holding ``files``."""
    def setup(ctx):
        folder = ctx.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            (folder / f).write_text(f"the user's own {f}\n")
    return setup


def a_file(name: str):
    def setup(ctx):
        (ctx.tmp / name).write_text("a plain file\n")
    return setup


def sweep_into(output: str):
    def setup(ctx):
        (ctx.tmp / "s.toml").write_text(
            f'[base]\nmodel = "tiny"\ninstance_dir = "{ctx.photos}"\ninstance_prompt = '
            f'"{PROMPT}"\nsteps = 1\nresolution = 32\noutput = "{output.format(**vars(ctx))}"\n'
            f'[train.grid]\nlr = [1e-4]\n[generate]\nprompts = ["{PROMPT}"]\n')
    return setup


ROWS = [
    # 2: an output that is an input, or an existing file
    Row("merge --out the run's own LoRA, even with --overwrite",
        ["merge", "{run}", "{run}", "--out", LORA, "--overwrite"], 2, "lies inside the input"),
    Row("merge --out the run's other LoRA file",
        ["merge", "{run}", LORA, "--out", "{run}/" + KOHYA_WEIGHT_NAME], 2, "lies inside the input"),
    Row("merge --out a photo", ["merge", "{run}", "{run}", "--out", "{photos}/photo_0.png"], 2,
        "exists; add --overwrite"),
    Row("merge --out an existing file of the user's",
        ["merge", "{run}", "{run}", "--out", "{tmp}/mine.safetensors"], 2,
        "exists; add --overwrite", a_file("mine.safetensors")),
    Row("convert A A", ["convert", LORA, LORA, "--to", "kohya"], 2, "is or holds the input"),
    Row("convert A A --overwrite", ["convert", LORA, LORA, "--to", "kohya", "--overwrite"], 2,
        "is or holds the input"),
    Row("convert into the run folder (its own file name there)",
        ["convert", LORA, "{run}", "--to", "diffusers"], 2, "is or holds the input"),
    Row("fuse --single-file over an existing file",
        ["fuse", "{run}", "--single-file", "--out", "{tmp}/mine.safetensors"], 2,
        "exists; add --overwrite", a_file("mine.safetensors")),
    # 3: a non-empty folder that is not the command's own
    Row("train into the user's folder", train_argv("{photos}", "{tmp}/mine"), 2,
        "that lorabooth train did not write",
        foreign("mine", "README.md", "config.toml", "metrics.jsonl")),
    Row("fuse into the user's model folder", ["fuse", "{run}", "--out", "{tmp}/mine"], 2,
        "that lorabooth fuse did not write", foreign("mine", "model_index.json", "README.md")),
    Row("train into the home folder's place: the filesystem root",
        train_argv("{photos}", "/"), 2, "filesystem root"),
    # 4: the photo folder as output, refused before anything is written
    Row("generate --output the photos", GEN + ["--output", "{photos}"], 2,
        "that lorabooth generate did not write"),
    Row("evaluate --out the photos", EVAL + ["--out", "{photos}"], 2, "is or holds the input --real"),
    Row("evaluate --out the user's folder", EVAL + ["--out", "{tmp}/mine"], 2,
        "that lorabooth evaluate did not write", foreign("mine", "notes.txt")),
    Row("sweep output the photos", ["sweep", "{tmp}/s.toml"], 2, "is or holds the input",
        sweep_into("{photos}")),
    Row("sweep output the user's folder", ["sweep", "{tmp}/s.toml"], 2,
        "that lorabooth sweep did not write",
        lambda ctx: (sweep_into("{tmp}/mine")(ctx), foreign("mine", "a.txt")(ctx))),
    Row("tune --out the photos", ["tune", "{photos}", "--class-noun", "dog", "--out", "{photos}"],
        2, "is or holds the input PHOTOS"),
    Row("evaluate --out a folder inside the photos", EVAL + ["--out", "{photos}/eval"], 2,
        "lies inside --real"),
    Row("tune --out the user's folder",
        ["tune", "{photos}", "--class-noun", "dog", "--out", "{tmp}/mine"], 2,
        "that lorabooth tune did not write", foreign("mine", "study.txt")),
    # 14: an output under an existing file, a NUL byte, an unwritable folder
    *[Row(f"{argv[0]}: output under an existing file", argv, 2, "is a file, not a folder",
          a_file("f"))
      for argv in (GEN + ["--output", "{tmp}/f/gen"],
                   ["merge", "{run}", "{run}", "--out", "{tmp}/f/m.safetensors"],
                   ["fuse", "{run}", "--out", "{tmp}/f/fused"],
                   ["prepare", "{photos}", "{tmp}/f/set"],
                   ["tune", "{photos}", "--class-noun", "dog", "--out", "{tmp}/f/t"],
                   EVAL + ["--out", "{tmp}/f/e"],
                   ["convert", LORA, "{tmp}/f/k.safetensors", "--to", "kohya"],
                   train_argv("{photos}", "{tmp}/f/run"))],
    Row("sweep: output under an existing file", ["sweep", "{tmp}/s.toml"], 2,
        "is a file, not a folder", lambda ctx: (a_file("f")(ctx), sweep_into("{tmp}/f/s")(ctx))),
    Row("a NUL byte in an output path", GEN + ["--output", "{tmp}/a\0b"], 2, "NUL byte"),
    Row("a NUL byte in an input path", ["inspect", "{tmp}/a\0b"], 2, "NUL byte"),
    # a FIFO and /dev/zero as inputs: tests/test_hostile_reads.py, in a child
    # process under a memory limit and a timeout (a regression must not hang
    # or exhaust this one)
    Row("an unwritable output folder", GEN + ["--output", "{tmp}/ro/gen"], 2, "is not writable",
        lambda ctx: (ctx.tmp / "ro").mkdir() or ctx.monkeypatch.setattr(
            os, "access", lambda p, m, _a=os.access: _a(p, m) and Path(p).name != "ro")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_guard_refuses(row: Row, world, tmp_path, capsys, caplog, monkeypatch):  # noqa: F811
    ctx = SimpleNamespace(**vars(world), tmp=tmp_path, monkeypatch=monkeypatch)
    before = snapshot(world.photos, world.run)
    if row.setup:
        row.setup(ctx)
    before |= snapshot(tmp_path)  # nothing changed, nothing new
    argv = [a.format(**vars(ctx)) for a in row.argv]
    with no_network():
        try:
            code = main(argv)
        except Exception:
            pytest.fail(f"Traceback (most recent call last):\n{traceback.format_exc()}")
    assert_outcome(code, capsys.readouterr().err, row.code, row.fragment)
    assert_untouched(before)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(world, tmp_path, capsys,  # noqa: F811
                                                        monkeypatch):
    """ENOSPC from the image writer, however deep: one line naming the file;
    the earlier grid of the same name stays whole (atomic writes)."""
    out = tmp_path / "gen"
    assert main([a.format(run=world.run) for a in GEN] + ["--output", str(out)]) == 0
    before = tree(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code = main([a.format(run=world.run) for a in GEN] + ["--output", str(out)])
    err = capsys.readouterr().err
    assert_outcome(code, err, 2, "no space left on the device")
    assert len(err.strip().splitlines()) == 1, err  # not even a warning beside it
    assert tree(out) == before


def test_a_file_size_limit_is_one_line(world, tmp_path):  # noqa: F811
    """`ulimit -f`: the kernel's SIGXFSZ would kill the process without a
    word; lorabooth ignores it, and the failed write (EFBIG) is one line.
    The limit (64 KB) is far below the merged LoRA's size."""
    out = tmp_path / "m.safetensors"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
              "from lorabooth.commands.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "merge", str(world.run), str(world.run),
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_outcome(done.returncode, done.stderr, 2, "file-size limit")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left either
