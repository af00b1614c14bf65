"""Hostile and careless input (issue 14, items 1, 2, 3, 6, 9): a table of
commands, each run in-process through `lorabooth.commands.cli.main`. Every row checks
its exit status, a fragment of what it says, that no traceback was printed,
and that the photo folder and a finished run folder are byte-identical
afterwards (sha256 of every file, and the list of every path, dot-files too).
"""

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hostile import (
    PREPARE,
    TRAIN,
    Ctx,
    Row,
    absent,
    assert_outcome,
    assert_untouched,
    copy_world,
    main_at_umask,
    ready,
    smooth_photos,
)
from lorabooth.commands.cli import main
from lorabooth.core.fileio import atomic_path, save_png, write_text

PRIOR = ["--prior-preservation", "--class-prompt", "a photo of a dog", "--num-class-images", "1",
         "--class-draw-steps", "1"]
HOSTILE_PROMPT = "a photo of sks dog $(touch pwned) `id` <b>bold</b> | *x* _y_ [l](u) #"


# --- hostile files -----------------------------------------------------------------------

def png_bomb(path: Path, side: int = 50000) -> None:
    """A PNG whose header declares side x side pixels (PIL's DecompressionBombError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def half_jpeg(ctx: Ctx) -> None:
    Image.new("RGB", (64, 64), (10, 200, 30)).save(ctx.photos / "half.jpg", quality=95)
    data = (ctx.photos / "half.jpg").read_bytes()
    (ctx.photos / "half.jpg").write_bytes(data[: len(data) // 2])


def long_name(ctx: Ctx) -> None:
    im = Image.new("RGB", (64, 64), (250, 250, 250))
    im.paste((0, 0, 0), (0, 0, 32, 64))  # distinct from the other photos' hashes
    im.save(ctx.photos / ("x" * 240 + ".png"))


def latin1_caption(ctx: Ctx) -> None:
    (ctx.photos / "photo_1.txt").write_bytes("une photo de sks chien très mignon".encode("latin-1"))


class _Evil:
    """Unpickling this would run a shell command that leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(name: str, wrap: Callable[[object], object]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        with (ctx.tmp / name).open("wb") as f:
            pickle.dump(wrap(_Evil(ctx.tmp / "pwned")), f, protocol=2)
    return setup


def poisoned_checkpoint(ctx: Ctx) -> None:
    """A copy of the run whose checkpoint's state.pt was swapped for a pickle
    that runs code (its manifest no longer matches)."""
    shutil.copytree(ctx.run, ctx.tmp / "resumable")
    state = ctx.tmp / "resumable" / "checkpoints" / "step-000001" / "state.pt"
    with state.open("wb") as f:
        pickle.dump({"step": _Evil(ctx.tmp / "pwned")}, f, protocol=2)


def live_writer(ctx: Ctx) -> None:
    """A live process holds the run's lock and has temp files in flight."""
    (ctx.run / ".lock").write_text(f"{os.getppid()}\n")  # our parent: alive, not us
    (ctx.run / ".config.toml.0a1b2c3d.tmp").write_text("half a config")
    (ctx.run / ".lora-abc123").mkdir()
    (ctx.run / ".lora-abc123" / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    (ctx.run / "checkpoints" / ".tmp-step-000002").mkdir()


def prepared_then_two_deleted(ctx: Ctx) -> None:
    smooth_photos(ctx.photos, 5)
    argv = [ctx.fmt(a) for a in PREPARE] + ["--caption", "a photo of sks dog"]
    assert main(argv) == 0
    (ctx.tmp / "set" / "my_notes.txt").write_text("the user's own file")
    (ctx.photos / "photo_0.png").unlink()
    (ctx.photos / "photo_3.png").unlink()


def doctored_report(ctx: Ctx) -> None:
    """A prepare.json naming files outside OUT as its own outputs."""
    (ctx.tmp / "set").mkdir()
    files = [{"output": f"../photos/photo_{i}.png", "caption": "c"} for i in range(3)]
    files.append({"output": str(ctx.photos / "photo_0.png")})
    write_text(ctx.tmp / "set" / "prepare.json", json.dumps({"files": files}))


def sigint_at_step(n: int) -> Callable[[Ctx], None]:
    """A real SIGINT to this process in the middle of step ``n`` (Ctrl-C)."""
    def setup(ctx: Ctx) -> None:
        import lorabooth.training.steploss as T
        real, calls = T.dreambooth_loss, {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*args, **kwargs)
        ctx.monkeypatch.setattr(T, "dreambooth_loss", interrupted)
        # what a terminal's Ctrl-C meets; a process started in the background
        # of a non-interactive shell (as CI may start it) inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return setup


# --- checks after a row that succeeds or must leave something behind ---------------------

def kept_exactly(*names: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        got = sorted(p.name for p in (ctx.tmp / "set").iterdir())
        assert got == sorted([*names, "contact_sheet.png", "prepare.json"]), got
    return check


def stale_removed_user_file_kept(ctx: Ctx) -> None:
    kept_exactly("photo_1.png", "photo_1.txt", "photo_2.png", "photo_2.txt", "photo_4.png",
                 "photo_4.txt", "my_notes.txt")(ctx)


def card_quotes_the_prompt(ctx: Ctx) -> None:
    """The card's shell command, pasted into bash, passes the prompt as typed and
    runs nothing; the markdown shows no raw HTML; files follow the umask (022)."""
    out = ctx.tmp / "out"
    card = (out / "README.md").read_text()
    command = card.split("## Use it\n")[1].split("```\n", 1)[1].split("\n```", 1)[0]
    shell = subprocess.run(["bash", "-c", 'lorabooth() { printf "%s\\n" "$@"; }\n' + command],
                           cwd=ctx.tmp, capture_output=True, text=True, check=True)
    assert shell.stdout.splitlines()[:4] == ["generate", str(out), "--prompt",
                                             HOSTILE_PROMPT + " on the beach"]
    assert not (ctx.tmp / "pwned").exists()
    prose = card.split("## Use it")[0].split("---\n")[2]
    assert "<b>" not in prose and "&lt;b&gt;" in prose and r"\| \*x\*" in prose
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def resumes_after_interrupt(ctx: Ctx) -> None:
    out = ctx.tmp / "out"
    assert not (out / ".lock").exists()
    assert (out / "checkpoints" / "step-000001").is_dir()
    argv = [ctx.fmt(a) for a in TRAIN] + ["--steps", "3", "--checkpoint-every", "1",
                                          "--output", str(out), "--resume"]
    assert main(argv) == 0 and (out / "pytorch_lora_weights.safetensors").is_file()


def report_code_spans_hold(ctx: Ctx) -> None:
    report = (ctx.tmp / "eval" / "report.md").read_text()
    assert "class ``dog` <b>x</b>``;" in report


# --- the table ---------------------------------------------------------------------------

ROWS = {
    # 1: nothing is written before the lock is held and the options are checked
    "second writer refused, live run untouched": Row(
        TRAIN + ["--lr", "0.01", "--rank", "16", "--output", "{run}"], 2,
        "another lorabooth process", live_writer),
    "model not found offline, existing run untouched even with --overwrite": Row(
        TRAIN + ["--model", "someone/absent", "--overwrite", "--output", "{run}"], 2,
        "not in the local Hugging Face cache"),
    "model not found offline, no folder left behind": Row(
        TRAIN + ["--model", "someone/absent", "--output", "{tmp}/new/run"], 2,
        "not in the local Hugging Face cache", then=absent("new")),
    "resume across a rank change refused, run untouched": Row(
        TRAIN + ["--rank", "8", "--resume", "--output", "{run}"], 2, "--rank 4 -> 8"),
    # 2: class images never go into the photos
    "class dir is the instance dir": Row(
        TRAIN + PRIOR + ["--class-dir", "{photos}", "--output", "{tmp}/out"], 2,
        "--class-dir", then=absent("out")),
    "class dir inside the instance dir": Row(
        TRAIN + PRIOR + ["--class-dir", "{photos}/cls", "--output", "{tmp}/out"], 2,
        "--class-dir", then=absent("out")),
    "instance dir inside the class dir": Row(
        TRAIN + PRIOR + ["--class-dir", "{tmp}", "--output", "{tmp}/out"], 2, "--class-dir",
        then=absent("out")),
    "class dir a symlink to the instance dir": Row(
        TRAIN + PRIOR + ["--class-dir", "{tmp}/link", "--output", "{tmp}/out"], 2, "--class-dir",
        lambda ctx: (ctx.tmp / "link").symlink_to(ctx.photos), absent("out")),
    "output is the instance dir": Row(TRAIN + ["--output", "{photos}"], 2, "--output"),
    "output inside the instance dir": Row(TRAIN + ["--output", "{photos}/run"], 2, "--output"),
    # 3: prepare's output reflects the source and holds only what it wrote
    "prepare into a foreign non-empty folder": Row(
        ["prepare", "{photos}", "{run}"], 2, "that lorabooth prepare did not write"),
    "prepare rerun after deleting two photos": Row(
        PREPARE + ["--caption", "a photo of sks dog"], 0, "kept 3 of 3",
        prepared_then_two_deleted, stale_removed_user_file_kept),
    "prepare with a prepare.json naming the photos": Row(
        PREPARE, 0, "kept 3 of 3", doctored_report,
        kept_exactly("photo_0.png", "photo_1.png", "photo_2.png")),
    "prepare into a folder inside the source": Row(
        ["prepare", "{photos}", "{photos}/set"], 2, "lies inside SRC"),
    # 6: one bad file is one line naming it
    "prepare with a decompression bomb": Row(
        PREPARE, 0, "rejected bomb.png: too large to open safely",
        lambda ctx: png_bomb(ctx.photos / "bomb.png"),
        kept_exactly("photo_0.png", "photo_1.png", "photo_2.png")),
    "train with a decompression bomb": Row(
        TRAIN + ["--output", "{tmp}/out"], 2, "bomb.png: too large to open safely",
        lambda ctx: png_bomb(ctx.photos / "bomb.png"), absent("out")),
    "train with a half-length JPEG": Row(
        TRAIN + ["--output", "{tmp}/out"], 2, "half.jpg: truncated or corrupt image", half_jpeg,
        absent("out")),
    "prepare with a half-length JPEG": Row(
        PREPARE, 0, "rejected half.jpg: truncated or corrupt image", half_jpeg),
    "prepare with a 244-character file name": Row(PREPARE, 0, "kept 4 of 4", long_name),
    "train --captions with a Latin-1 caption": Row(
        TRAIN + ["--captions", "--output", "{tmp}/out"], 2, "photo_1.txt: not UTF-8 text",
        latin1_caption, absent("out")),
    # 9: what we write quotes what the user typed; files get the umask's mode
    "hostile prompt: card quoted and escaped, files 0644": Row(
        ["train", "--instance-dir", "{photos}", "--instance-prompt", HOSTILE_PROMPT,
         "--steps", "1", "--resolution", "32", "--output", "{tmp}/out"], 0, "LoRA:",
        then=card_quotes_the_prompt),
    "evaluate --class-noun with a backtick": Row(
        ["evaluate", "{run}", "--real", "{photos}", "--class-noun", "dog` <b>x</b>",
         "--prompts", "{tmp}/prompts.txt", "--images-per-prompt", "2", "--pres-images", "1",
         "--steps", "1", "--dino", "{judges}/dino", "--clip", "{judges}/clip",
         "--out", "{tmp}/eval"], 0, "report:",
        lambda ctx: (ctx.tmp / "prompts.txt").write_text("a {0} {1} in the snow\n"),
        report_code_spans_hold),
    # already right; kept so they stay right: no pickle runs code, bad files one line
    "pickled LoRA (.pt) that would run code": Row(
        ["generate", "{tmp}/lora.pt", "--prompt", "x", "--num-images", "1", "--steps", "1",
         "--output", "{tmp}/gen"], 2, "pickles can run arbitrary code",
        evil_pickle("lora.pt", lambda evil: {"unet.x.lora.down.weight": evil}),
        absent("pwned", "gen")),
    "pickled LoRA (.bin) in merge": Row(
        ["merge", "{run}", "{tmp}/lora.bin", "--out", "{tmp}/m.safetensors"], 2,
        "pickles can run arbitrary code", evil_pickle("lora.bin", lambda evil: [evil]),
        absent("pwned", "m.safetensors")),
    "pickled base model (.ckpt) that would run code": Row(
        TRAIN + ["--model", "{tmp}/model.ckpt", "--output", "{tmp}/out"], 2,
        "pickles can run arbitrary code",
        evil_pickle("model.ckpt", lambda evil: {"state_dict": {"x": evil}}),
        absent("pwned", "out")),
    "pickled base model (.pth) in fuse": Row(
        ["fuse", "{run}", "--model", "{tmp}/model.pth", "--out", "{tmp}/fused"], 2,
        "pickles can run arbitrary code", evil_pickle("model.pth", lambda evil: evil),
        absent("pwned", "fused")),
    "checkpoint state.pt swapped for a code-running pickle": Row(
        TRAIN + ["--checkpoint-every", "1", "--resume", "--force", "--output", "{tmp}/resumable"],
        0,
        "does not verify", poisoned_checkpoint, absent("pwned")),
    "malformed safetensors LoRA": Row(
        ["generate", "{tmp}/bad.safetensors", "--prompt", "x", "--output", "{tmp}/gen"], 2,
        "not a readable safetensors",
        lambda ctx: (ctx.tmp / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{not json"),
        absent("gen")),
    "SIGINT during train: lock released, resumes": Row(
        TRAIN + ["--steps", "3", "--checkpoint-every", "1", "--output", "{tmp}/out"], 130,
        "interrupted", sigint_at_step(2), resumes_after_interrupt),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_input(name, module_photos, finished_run, tmp_path, monkeypatch, capsys, caplog,
                       request):
    row = ROWS[name]
    caplog.set_level("INFO")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = Ctx(tmp_path, *copy_world(module_photos, finished_run, tmp_path), monkeypatch)
    if "{judges}" in " ".join(row.argv):  # random-weight DINO and CLIP, made once a session
        ctx.judges = Path(request.getfixturevalue("tiny_judges")[0]).parent
    before = ready(row, ctx, capsys, caplog)
    code = main_at_umask([ctx.fmt(a) for a in row.argv])
    assert_outcome(code, capsys.readouterr().err + caplog.text, row.code, row.says)
    assert_untouched(before)
    if row.then:
        row.then(ctx)


def test_atomic_writes_take_the_umask(tmp_path):
    """Files we write get 0666 less the umask, as any new file does (mkstemp's
    0600 used to survive the rename, and safetensors writes its files 0600)."""
    for umask, want in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            write_text(tmp_path / f"t{umask}.txt", "x")
            save_png(Image.new("RGB", (4, 4)), tmp_path / f"i{umask}.png")
            with atomic_path(tmp_path / f"s{umask}.safetensors") as tmp:
                save_file({"a": torch.zeros(2)}, tmp)
        finally:
            os.umask(old)
        for name in (f"t{umask}.txt", f"i{umask}.png", f"s{umask}.safetensors"):
            assert (tmp_path / name).stat().st_mode & 0o777 == want, (name, oct(umask))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_write_of_a_250_character_name(tmp_path):
    """The temp name beside it must stay under the 255-byte limit."""
    write_text(tmp_path / ("n" * 246 + ".txt"), "x")
    assert [p.name for p in tmp_path.iterdir()] == ["n" * 246 + ".txt"]
