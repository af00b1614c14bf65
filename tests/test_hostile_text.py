"""Hostile text (issue 24, items 8, 9, 10): prompts past the text encoder's
token window, counts past what can finish, and control characters in
prompts and a LoRA's metadata. Each row runs the CLI in-process and checks
its exit status, that what it says is one line (one error line, or the
warning once), no traceback, no raw control character on the terminal or
in the log, and the photo folder and a finished run byte-identical."""


import pytest
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hostile import (
    TRAIN,
    Ctx,
    Row,
    absent,
    assert_outcome,
    assert_untouched,
    copy_world,
    ready,
    tree,
)
from lorabooth.adapters.lora import read_lora
from lorabooth.commands.cli import main
from lorabooth.formats import WEIGHT_NAME
from lorabooth.training import loop as training

RAW = "\x1b[31mRED\x07\r"
CONTROLS = ("\x1b", "\x07", "\r", "\x00", "\u202e")
# 2000 words of one token each: the identifier after them is past CLIP's 77
PADDING = "very " * 2000
LONG_FIRST = ("a photo of sks dog " + "in a garden " * 900)[:10000]  # the identifier first
LONG_LAST = "a photo of " + PADDING + "sks dog"
GEN = ["generate", "{run}", "--output", "{tmp}/gen", "--num-images", "1", "--steps", "1",
       "--width", "32", "--height", "32"]
WINDOW = "falls past the text encoder's 77-token window"
TRUNCATED = "the prompt is truncated at 77 tokens"


def train(prompt: str, *extra: str) -> list[str]:
    argv = list(TRAIN)
    argv[argv.index("a photo of sks dog")] = prompt
    return argv + ["--output", "{tmp}/out", *extra]


def long_captions(ctx: Ctx) -> None:
    (ctx.photos / "photo_0.txt").write_text(LONG_FIRST)
    for i in (1, 2):
        (ctx.photos / f"photo_{i}.txt").write_text(f"a photo of sks dog, view {i}")


def identifier_cut_in_every_caption(ctx: Ctx) -> None:
    for i in range(3):
        (ctx.photos / f"photo_{i}.txt").write_text(LONG_LAST)


def never_load(ctx: Ctx) -> None:
    """The size must be refused before any model is loaded or image allocated."""
    import lorabooth.generation as D

    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline reached")
    ctx.monkeypatch.setattr(D, "load_pipeline", refuse)


def steps_toml(ctx: Ctx) -> None:
    (ctx.tmp / "c.toml").write_text("steps = 1e23\n")


def hostile_metadata(ctx: Ctx) -> None:
    tensors, header = read_lora(ctx.run / WEIGHT_NAME)
    save_file(tensors, ctx.tmp / "evil.safetensors",
              metadata={**header, "ss_comment": RAW, "x\x1b]0;title\x07": "key too"})


def card_is_clean(ctx: Ctx) -> None:
    card = (ctx.tmp / "out" / "README.md").read_text(encoding="utf-8")
    assert not any(c in card for c in CONTROLS), card
    assert "\\x1b" in card and "RED" in card  # shown, not dropped


def drew_one(ctx: Ctx) -> None:
    assert len(list((ctx.tmp / "gen").rglob("*_s0.png"))) == 1


ROWS = {
    # 8: an identifier the window drops is never trained: refused before any work
    "instance prompt: identifier past the window": Row(
        train(LONG_LAST), 2, f"--instance-prompt: the identifier 'sks' {WINDOW}",
        then=absent("out")),
    "--train-token: identifier past the window": Row(
        train(LONG_LAST, "--train-token"), 2, WINDOW, then=absent("out")),
    "--train-token: every caption drops the identifier": Row(
        train("a photo of sks dog", "--captions", "--train-token"), 2,
        "--train-token: every caption", identifier_cut_in_every_caption, absent("out")),
    "caption truncated: warned, naming the file": Row(
        train("a photo of sks dog", "--captions"), 0, "photo_0.txt: the prompt is truncated at 77",
        long_captions),
    "validation prompt: identifier past the window": Row(
        train("a photo of sks dog", "--validation-prompt", LONG_LAST), 2,
        f"--validation-prompt: the identifier 'sks' {WINDOW}", then=absent("out")),
    # 9: a 10,000-character prompt is truncated: said once
    "instance prompt of 10,000 characters: warned": Row(
        train(LONG_FIRST), 0, f"--instance-prompt: {TRUNCATED}"),
    "generate: 10,000-character prompt warned": Row(
        GEN + ["--prompt", LONG_FIRST], 0, f"--prompt: {TRUNCATED}", then=drew_one),
    "generate: identifier past the window refused": Row(
        GEN + ["--prompt", LONG_LAST], 2, f"--prompt: the identifier 'sks' {WINDOW}",
        then=absent("gen")),
    # 9: counts bounded to what can finish
    "train --steps 1e23": Row(train("a photo of sks dog", "--steps", "1e23"), 2, "--steps",
                              then=absent("out")),
    "train steps = 1e23 in TOML": Row(train("a photo of sks dog", "--config", "{tmp}/c.toml"), 2,
                                      "`steps` must be an integer", steps_toml, absent("out")),
    "train --steps 10**12": Row(train("a photo of sks dog", "--steps", str(10**12)), 2,
                                "--steps: at most 100000", then=absent("out")),
    "train --checkpoint-every 10**12": Row(
        train("a photo of sks dog", "--checkpoint-every", str(10**12)), 2,
        "--checkpoint-every: must be between 0 and 100000", then=absent("out")),
    "train --validation-every 10**12": Row(
        train("a photo of sks dog", "--validation-every", str(10**12)), 2,
        "--validation-every: must be between 0 and 100000"),
    "train --num-class-images 10**12": Row(
        train("a photo of sks dog", "--num-class-images", str(10**12)), 2,
        "--num-class-images: at most 10000"),
    "train --batch-size 10**9": Row(train("a photo of sks dog", "--batch-size", str(10**9)), 2,
                                    "--batch-size: at most 256"),
    "train --rank 10**9": Row(train("a photo of sks dog", "--rank", str(10**9)), 2,
                              "--rank: at most 1024"),
    "train --resolution 8000000": Row(train("a photo of sks dog", "--resolution", "8000000"), 2,
                                      "--resolution: must be a positive multiple of 8, at most"),
    "generate --width 8000000 refused before loading": Row(
        GEN[:-4] + ["--prompt", "a dog", "--width", "8000000"], 2,
        "--width: must be a positive multiple of 8 pixels, at most 4096", never_load,
        absent("gen")),
    "generate --height 8000000": Row(GEN[:-2] + ["--prompt", "a dog", "--height", "8000000"], 2,
                                     "--height: must be a positive multiple of 8 pixels",
                                     never_load),
    "generate --steps 1e23": Row(GEN[:6] + ["--prompt", "a dog", "--steps", "1e23"], 2,
                                 "argument --steps: invalid int value"),
    "prepare --resolution 8000000": Row(["prepare", "{photos}", "{tmp}/set", "--resolution",
                                         "8000000"], 2, "--resolution: must be a positive "
                                         "multiple of 8, at most 4096", then=absent("set")),
    "tune --resolution 8000000": Row(["tune", "{photos}", "--class-noun", "dog", "--out",
                                      "{tmp}/tune", "--resolution", "8000000"], 2,
                                     "--resolution: must be a positive multiple of 8",
                                     then=absent("tune")),
    "merge --rank 10**9": Row(["merge", "{run}", "{run}", "--out", "{tmp}/m.safetensors",
                               "--rank", str(10**9)], 2, "--rank: must be between 1 and 1024",
                              then=absent("m.safetensors")),
    "demo --steps 10**9": Row(["demo", "--output", "{tmp}/demo", "--steps", str(10**9)], 2,
                              "--steps: must be between 1 and 100000", then=absent("demo")),
    "toyworld pretrain --images 10**12": Row(
        ["toyworld", "pretrain", "--out", "{tmp}/toy", "--images", str(10**12)], 2,
        "--images: must be between 1 and 1000000", then=absent("toy")),
    # 10: control characters shown escaped
    "control characters in the prompt: model card and log clean": Row(
        train(f"a photo of sks dog {RAW}\u202e"), 0, "LoRA:", then=card_is_clean),
    "control characters in a missing folder's name: error escaped": Row(
        ["train", "--instance-dir", "{tmp}/no\x1b[2Jsuch", "--instance-prompt", "a photo of sks dog",
         "--output", "{tmp}/out"], 2, "no\\x1b[2Jsuch", then=absent("out")),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_text(name, module_photos, finished_run, tmp_path, monkeypatch, capsys, caplog):
    row = ROWS[name]
    caplog.set_level("INFO")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the progress bar redraws itself with carriage returns: ours, not the user's
    monkeypatch.setattr(training, "tqdm", lambda *a, **k: tqdm(*a, **{**k, "disable": True}))
    ctx = Ctx(tmp_path, *copy_world(module_photos, finished_run, tmp_path), monkeypatch)
    before = ready(row, ctx, capsys, caplog)
    code = main([ctx.fmt(a) for a in row.argv])
    out, err = capsys.readouterr()
    said = err + caplog.text
    assert_outcome(code, said, row.code, row.says, errors_in=err)
    assert not any(c in out + said for c in CONTROLS), repr(said[-2000:])
    if code != 2:  # a warning is said once, on one line
        assert len([line for line in caplog.text.splitlines() if row.says in line]) == 1
    assert_untouched(before)
    if row.then:
        row.then(ctx)


def test_inspect_shows_metadata_escaped(module_photos, finished_run, tmp_path, monkeypatch,
                                        capsys):
    ctx = Ctx(tmp_path, tmp_path / "photos", finished_run, monkeypatch)
    hostile_metadata(ctx)
    before = tree(finished_run)
    assert main(["inspect", str(tmp_path / "evil.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert not any(c in out + err for c in CONTROLS), repr(out)
    assert "meta ss_comment: \\x1b[31mRED\\x07\\x0d" in out
    assert "meta x\\x1b]0;title\\x07: key too" in out
    assert tree(finished_run) == before

