"""Hostile files handed to lorabooth to read (issue 24, items 12-14): devices,
FIFOs, huge files, nesting deeper than any parser's recursion, templates
that ask str.format for 100 GB, a LoRA where a base model belongs.

A row that a regression could make hang or eat the machine's memory (a
device, a FIFO, a template asking for 100 GB: ``child=True``) runs
`lorabooth ...` in a child process under a memory limit (RLIMIT_AS), so a
regression that reads /dev/zero to the end fails the row with a MemoryError
instead of taking the machine, and one that blocks on a FIFO meets the
child's timeout, a safety net only: the assertions are on the exit status
and the one line said. The other rows run in-process through
`lorabooth.commands.cli.main`, as the other hostile tables do (a child
imports torch afresh: seconds a row). The photos and the finished run are
byte-identical afterwards (sha256 of every file)."""

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from hostile import (
    PREPARE,
    TRAIN,
    Ctx,
    absent,
    assert_outcome,
    assert_untouched,
    copy_world,
    ready,
    tree,
)
from lorabooth.commands.cli import build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"
MEMORY_LIMIT = 3 << 30  # bytes of address space: torch and a tiny model fit in 2 GiB
SAFETY_NET_S = 300  # only a hang reaches it; no row depends on it
LORA = "{run}/pytorch_lora_weights.safetensors"
EVAL = ["evaluate", "{run}", "--real", "{photos}", "--class-noun", "dog", "--out", "{tmp}/eval"]
TUNE = ["tune", "{photos}", "--class-noun", "dog", "--out", "{tmp}/tune"]
FORMAT_TRICKS = ["{class:>99999999999}", "{0:>99999999999}", "{0.__class__}", "{x[0]}",
                 "{identifier.__class__.__init__.__globals__}", "{}"]


def _child(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
            "from lorabooth.commands.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=SAFETY_NET_S)


# --- setups --------------------------------------------------------------------------------

def fifo(name: str) -> Callable[[Ctx], None]:
    return lambda ctx: os.mkfifo(ctx.tmp / name)


def write(name: str, text: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.tmp / name).write_text(text)
    return setup


def big_prompts(ctx: Ctx) -> None:
    """A regular 50 MB prompts file of valid lines: over the cap by size alone."""
    line = b"a {0} {1} in the snow\n"
    with (ctx.tmp / "big.txt").open("wb") as f:
        for _ in range(50 * (1 << 20) // (len(line) * 4096) + 1):
            f.write(line * 4096)


DEEP_TOML = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"  # past tomllib's recursion
DEEPISH_TOML = "lr = " + "{a = " * 60 + "1" + "}" * 60 + "\n"  # parses; past our depth limit
DEEP_JSON = "[" * 100_000 + "]" * 100_000  # past json's recursion


def prepared_set_with(report: str) -> Callable[[Ctx], None]:
    """A prepare output folder holding an image and the given prepare.json."""
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / "set").mkdir()
        (ctx.tmp / "set" / "photo_0.png").write_bytes((ctx.photos / "photo_0.png").read_bytes())
        (ctx.tmp / "set" / "prepare.json").write_text(report)
    return setup


def checkpoint_manifest(text: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.run, ctx.tmp / "resumable")
        (ctx.tmp / "resumable" / "checkpoints" / "step-000001" / "manifest.json").write_text(text)
    return setup


def _literal(text: str) -> str:
    """``text`` as an argv entry: the runner fills {tmp}, {photos}... with str.format."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass
class Row:
    argv: list[str]
    says: str
    setup: Callable[[Ctx], None] | None = None
    then: Callable[[Ctx], None] | None = None
    code: int = 2
    child: bool = False  # it could hang or exhaust memory: a child under a memory limit


ROWS = {
    # 12: a device, a FIFO, a huge file: refused before a byte is read
    "evaluate --prompts /dev/zero": Row(EVAL + ["--prompts", "/dev/zero"],
                                        "--prompts /dev/zero: not a regular file (a device)", child=True),
    "evaluate --prompts a FIFO": Row(EVAL + ["--prompts", "{tmp}/fifo.txt"],
                                     "fifo.txt: not a regular file (a FIFO", fifo("fifo.txt"), child=True),
    "evaluate --prompts a 50 MB file": Row(EVAL + ["--prompts", "{tmp}/big.txt"],
                                           "too large (at most 1048576)", big_prompts),
    "evaluate --prompts a folder": Row(EVAL + ["--prompts", "{tmp}"], "not a regular file (a folder)"),
    "tune --prompts /dev/zero": Row(TUNE + ["--prompts", "/dev/zero"], "--prompts /dev/zero", child=True),
    "sweep [evaluate] prompts_file a FIFO": Row(
        ["sweep", "{tmp}/sweep.toml"], "fifo.txt: not a regular file (a FIFO",
        lambda ctx: (fifo("fifo.txt")(ctx), write("sweep.toml", (
            f'[base]\nmodel = "tiny"\ninstance_dir = "{ctx.photos}"\n'
            f'instance_prompt = "a photo of sks dog"\nsteps = 1\nresolution = 32\n'
            f'output = "{ctx.tmp}/sweep"\n[train.grid]\nlr = [1e-4]\n[generate]\nprompts = ["x"]\n'
            f'[evaluate]\nreal = "{ctx.photos}"\nclass_noun = "dog"\n'
            f'prompts_file = "{ctx.tmp}/fifo.txt"\n'))(ctx)), absent("sweep"), child=True),
    "train --config /dev/zero": Row(TRAIN + ["--config", "/dev/zero", "--output", "{tmp}/out"],
                                    "--config /dev/zero: not a regular file (a device)",
                                    then=absent("out"), child=True),
    "train --config a FIFO": Row(TRAIN + ["--config", "{tmp}/c.toml", "--output", "{tmp}/out"],
                                 "c.toml: not a regular file (a FIFO", fifo("c.toml"), absent("out"),
                                 child=True),
    "tune --space a FIFO": Row(TUNE + ["--space", "{tmp}/s.toml"], "--space", fifo("s.toml"),
                               absent("tune"), child=True),
    "inspect a FIFO": Row(["inspect", "{tmp}/l.safetensors"], "l.safetensors: not a regular file (a FIFO",
                          fifo("l.safetensors"), child=True),
    "convert from a FIFO": Row(["convert", "{tmp}/l.safetensors", "{tmp}/k.safetensors", "--to",
                                "kohya"], "l.safetensors: not a regular file (a FIFO", fifo("l.safetensors"),
                               absent("k.safetensors"), child=True),
    "generate with a FIFO as the LoRA": Row(
        ["generate", "{tmp}/l.safetensors", "--prompt", "x", "--output", "{tmp}/gen"],
        "l.safetensors: not a regular file (a FIFO", fifo("l.safetensors"), absent("gen"), child=True),
    "train --captions with a FIFO caption": Row(
        TRAIN + ["--captions", "--output", "{tmp}/out"], "photo_1.txt: not a regular file (a FIFO",
        lambda ctx: os.mkfifo(ctx.photos / "photo_1.txt"), absent("out"), child=True),
    # 14: nesting past the parsers' recursion (and past what lorabooth walks)
    "train --config nested TOML": Row(
        TRAIN + ["--config", "{tmp}/deep.toml", "--output", "{tmp}/out"],
        "deep.toml: TOML nested too deeply", write("deep.toml", DEEP_TOML), absent("out")),
    "train --config TOML nested 60 tables": Row(
        TRAIN + ["--config", "{tmp}/deep.toml", "--output", "{tmp}/out"],
        "deep.toml: TOML nested too deeply", write("deep.toml", DEEPISH_TOML), absent("out")),
    "sweep file nested": Row(["sweep", "{tmp}/deep.toml"], "deep.toml: TOML nested too deeply",
                             write("deep.toml", DEEP_TOML)),
    "tune --space nested": Row(TUNE + ["--space", "{tmp}/deep.toml"],
                               "--space", write("deep.toml", DEEPISH_TOML), absent("tune")),
    "prepare into a folder with a nested prepare.json": Row(
        PREPARE, "prepare.json: JSON nested too deeply", prepared_set_with(DEEP_JSON)),
    "prepare into a folder with a prepare.json list": Row(
        PREPARE, "prepare.json: not the report", prepared_set_with("[1, 2]")),
    "train on a folder with a nested prepare.json": Row(
        TRAIN + ["--output", "{tmp}/out"], "(JSON nested too deeply",
        lambda ctx: (ctx.photos / "prepare.json").write_text(DEEP_JSON), absent("out")),
    "resume from a checkpoint with a nested manifest": Row(
        TRAIN + ["--checkpoint-every", "1", "--resume", "--force", "--output", "{tmp}/resumable"],
        "does not verify against its manifest", checkpoint_manifest(DEEP_JSON), code=0),
    # 14: templates fill only their documented placeholders
    **{f"prepare --caption {t}": Row(PREPARE + ["--caption", f"a photo of {_literal(t)}"],
                                     "--caption: unknown placeholder", then=absent("set"),
                                     child=">9999" in t)
       for t in FORMAT_TRICKS},
    "prepare --caption with a lone brace": Row(PREPARE + ["--caption", "a {{ photo"],
                                               "--caption: a lone '{'", then=absent("set")),
    **{f"prompts file {t}": Row(EVAL + ["--prompts", "{tmp}/p.txt"],
                                "p.txt: prompt 2: unknown placeholder",
                                write("p.txt", "a {{0}} {0} {1}\nx " + t + "\n"), child=">9999" in t)
       for t in FORMAT_TRICKS},
    # 14: a LoRA or a run is not a base model
    "train --model a LoRA file": Row(TRAIN + ["--model", LORA, "--output", "{tmp}/out"],
                                     "is a LoRA file, not a base model", then=absent("out")),
    "train --model a run folder": Row(TRAIN + ["--model", "{run}", "--output", "{tmp}/out"],
                                      "is a LoRA run folder", then=absent("out")),
    "generate --model a LoRA file": Row(
        ["generate", "{run}", "--model", LORA, "--prompt", "x", "--output", "{tmp}/gen"],
        "is a LoRA file, not a base model", then=absent("gen")),
    "fuse --model a run folder": Row(["fuse", "{run}", "--model", "{run}", "--out", "{tmp}/f"],
                                     "is a LoRA run folder", then=absent("f")),
    "evaluate --model a run folder": Row(
        EVAL + ["--model", "{run}", "--dino", "{judges}/dino", "--clip", "{judges}/clip"],
        "is a LoRA run folder", then=absent("eval")),
    "tune --model a LoRA file": Row(TUNE + ["--model", LORA], "is a LoRA file", then=absent("tune")),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_read(name, module_photos, finished_run, tmp_path, monkeypatch, request, capsys,
                      caplog):
    row = ROWS[name]
    ctx = Ctx(tmp_path, *copy_world(module_photos, finished_run, tmp_path), monkeypatch)
    if "{judges}" in " ".join(row.argv):
        ctx.judges = Path(request.getfixturevalue("tiny_judges")[0]).parent
    before = ready(row, ctx, capsys, caplog)
    argv = [ctx.fmt(a) for a in row.argv]
    if row.child:
        done = _child(argv, tmp_path)
        code, said = done.returncode, done.stderr
        assert "MemoryError" not in said
    else:
        caplog.set_level("INFO")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.chdir(tmp_path)
        code = main(argv)
        said = capsys.readouterr().err + caplog.text
    assert_outcome(code, said, row.code, row.says)
    assert_untouched(before)
    if row.then:
        row.then(ctx)


def test_the_memory_limit_holds():
    """The limit the rows run under stops an unbounded read (what /dev/zero as
    --prompts did) with a MemoryError rather than the machine's memory."""
    code = ("import resource\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
            "open('/dev/zero', 'rb').read()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SAFETY_NET_S)
    assert done.returncode != 0 and "MemoryError" in done.stderr
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != MEMORY_LIMIT  # only the child's


# --- the page starts whatever a ui-job.json holds -------------------------------------------

@pytest.mark.parametrize("state", [DEEP_JSON, "[1, 2]", '{"id": "x"}',
                                   json.dumps({"id": "a", "kind": "train", "argv": "x",
                                               "folder": "/", "created": "soon"})])
def test_a_broken_ui_job_is_one_line_and_the_page_starts(tmp_path, state, caplog):
    from lorabooth.ui.handlers import runs_overview
    from lorabooth.ui.jobs import Job, JobQueue, load_job
    from lorabooth.ui.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    (ws.root / "runs" / "bad").mkdir(parents=True)
    (ws.root / "runs" / "bad" / "ui-job.json").write_text(state)
    good = JobQueue(ws, launcher=["true"])
    (ws.root / "runs" / "good").mkdir()
    Job(id="g", kind="train", argv=["train"], folder=str(ws.root / "runs" / "good"),
        status="done").save()
    before = tree(ws.root)
    assert load_job(ws.root / "runs" / "bad") is None
    assert [j.id for j in good.jobs(warn=True)] == ["g"]
    runs_overview(ws)
    warned = [r.getMessage() for r in caplog.records if "ui-job.json" in r.getMessage()]
    assert warned and all("\n" not in w and "bad/ui-job.json" in w for w in warned), warned
    assert tree(ws.root) == before


# --- 13: every command's --help ---------------------------------------------------------------

def _commands(parser) -> list[list[str]]:
    """argv prefixes of every command and subcommand, walking the parser."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append([name])
                out += [[name, *rest] for rest in _commands(sub)]
    return out


def test_every_command_answers_help(capsys):
    from lorabooth.commands import COMMANDS

    commands = _commands(build_parser())
    assert {" ".join(c) for c in commands} >= set(COMMANDS)
    for argv in [[], *commands]:
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*argv, "--help"])
        assert stop.value.code == 0, argv
        assert main([*argv, "--help"]) == 0, argv
        assert "usage:" in capsys.readouterr().out


def test_a_fifo_swapped_in_after_the_check_is_refused_not_waited_on(tmp_path):
    """The race the stat cannot close: the path becomes a FIFO between the
    check and the open. O_NONBLOCK opens it at once and fstat refuses it
    (in a child: a regression would wait for a writer forever)."""
    os.mkfifo(tmp_path / "p.txt")
    code = ("import sys\n"
            "import lorabooth.core.fileio as F\n"
            "from lorabooth.core.errors import UserError\n"
            "F.check_regular_file = lambda *a, **k: None  # the check passed; then the swap\n"
            "try:\n"
            "    F.read_text_file(sys.argv[1], '--prompts')\n"
            "except UserError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.txt")], env=env,
                          capture_output=True, text=True, timeout=SAFETY_NET_S)
    assert done.stdout.strip() == f"--prompts {tmp_path / 'p.txt'}: not a regular file " \
                                  f"(a FIFO)", done.stderr
