"""The hostile-input table for option values, sweep files and tracebacks
(issue 14, items 4, 5, 7, 8, and `identifier --n` and the sweep size cap of
item 9).

Each row is a command run in-process through ``lorabooth.commands.cli.main``, the
exit status it must end with, a fragment of what it must say (on stderr or
in the log), and optional setup and after-checks. Every row also asserts: no
traceback, no network connection attempted, and the user's photo folder and
an existing finished run folder byte-identical afterwards.

Kept elsewhere, not repeated here: report.html escaping injected strings is
checked by tests/test_sweep.py::test_sweep_end_to_end_then_nothing_to_do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from hostile import assert_outcome, assert_untouched, snapshot
from lorabooth.adapters.lora import read_lora
from lorabooth.commands.cli import main
from lorabooth.formats import WEIGHT_NAME

PROMPT = "a photo of sks dog"


@contextmanager
def no_network():
    """As if online (HF_HUB_OFFLINE unset), but every attempt to reach
    another machine fails and is recorded (a blocked connection the code
    caught and ignored still counts)."""
    import huggingface_hub.constants

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network blocked by the test")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return refuse(self, address)
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


def train_argv(photos, output, *extra: str) -> list[str]:
    """The module run's options: a resume with these matches its config."""
    return ["train", "--model", "tiny", "--instance-dir", str(photos), "--instance-prompt", PROMPT,
            "--steps", "2", "--resolution", "32", "--checkpoint-every", "1",
            "--save-format", "diffusers", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_photos):
    """The user's photos, a finished 2-step run (diffusers' layout, trained
    offline as it would be online), and LoRA files derived from it: one full
    of NaN, one of another shape."""
    root = tmp_path_factory.mktemp("hostile")
    photos, run = module_photos, root / "run"
    with no_network() as attempts:
        assert main(train_argv(photos, run)) == 0
    assert attempts == []
    tensors, header = read_lora(run / WEIGHT_NAME)
    nan_lora, wide_lora = root / "nan.safetensors", root / "wide.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, nan_lora,
              metadata=header)
    # twice the input features on every down projection: a LoRA of another base
    save_file({k: torch.cat([v, v], dim=1) if k.endswith("lora.down.weight") else v
               for k, v in tensors.items()}, wide_lora, metadata=header)
    return SimpleNamespace(photos=photos, run=run, nan_lora=nan_lora, wide_lora=wide_lora)


@dataclass
class Row:
    id: str
    argv: list[str]  # {photos} {run} {tmp} {nan_lora} {wide_lora} are filled in
    code: int
    fragment: str
    setup: Callable | None = None  # (ctx) -> None, before the command
    after: Callable | None = None  # (ctx) -> None, extra checks


def write(name: str, text: str) -> Callable:
    def setup(ctx):
        (ctx.tmp / name).write_text(text.format(photos=ctx.photos, tmp=ctx.tmp))
    return setup


BASE = """[base]
model = "tiny"
instance_dir = "{photos}"
instance_prompt = "a photo of sks dog"
steps = 1
resolution = 32
save_format = "diffusers"
output = "{tmp}/sweep"
"""
GENERATE = """[generate]
prompts = ["a photo of sks dog"]
seeds = [0]
steps = 1
"""


def sweep(name: str, top: str = "", base: str = BASE, generate: str = GENERATE, rest: str = ""):
    """A sweep row: the file is BASE + GENERATE with parts replaced; a refused
    one must not even create the sweep folder."""
    def refused_before_anything(ctx):
        assert not (ctx.tmp / "sweep").exists()

    return Row(f"sweep: {name}", ["sweep", "{tmp}/s.toml"], 2, "",
               write("s.toml", top + base + generate + rest), refused_before_anything)


def sweep_row(name: str, fragment: str, **parts) -> Row:
    row = sweep(name, **parts)
    row.fragment = fragment
    return row


def nothing_at(relative: str) -> Callable:
    def after(ctx):
        assert not (ctx.tmp / relative).exists()
    return after


def file_kept(ctx) -> None:
    assert (ctx.tmp / "file").read_text() == "mine\n"


def copy_run(ctx) -> Path:
    shutil.copytree(ctx.run, ctx.tmp / "r")
    return ctx.tmp / "r"


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the checksums match whatever the files now hold."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["sha256"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
                          for name in manifest["sha256"]}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def tampered_state(content: Callable[[Path], None]) -> Callable:
    """A copy of the run with a second checkpoint, step-000002, whose state.pt
    is replaced by ``content`` and whose manifest is rewritten to match; the
    run's own step-000001 is the older one to fall back to."""
    def setup(ctx):
        checkpoints = copy_run(ctx) / "checkpoints"
        shutil.copytree(checkpoints / "step-000001", checkpoints / "step-000002")
        content(checkpoints / "step-000002" / "state.pt")
        rewrite_manifest(checkpoints / "step-000002")
    return setup


def poisoned_checkpoint(ctx) -> None:
    """A copy of the run whose step-1 checkpoint holds NaN LoRA tensors (and a
    manifest to match); a resume at --steps 1 trains no step and saves them."""
    run = copy_run(ctx)
    step1 = run / "checkpoints" / "step-000001"
    from safetensors.torch import load_file
    tensors = load_file(step1 / "lora.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
              step1 / "lora.safetensors")
    rewrite_manifest(step1)
    ctx.kept = (run / WEIGHT_NAME).read_bytes()


def kept_weights(ctx) -> None:
    assert (ctx.tmp / "r" / WEIGHT_NAME).read_bytes() == ctx.kept


def cpu_oom(ctx) -> None:
    import lorabooth.training.loop

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1099511627776 bytes.")

    ctx.monkeypatch.setattr(lorabooth.training.loop, "text_context", oom)


def resumed_from_step_1(ctx) -> None:
    metrics = (ctx.tmp / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]


def two_runs_inside(ctx) -> None:
    runs = [p for p in (ctx.tmp / "sweep").iterdir() if p.name.startswith("instance_dir=")]
    assert len(runs) == 2 and all((p / WEIGHT_NAME).is_file() for p in runs)


def sweep_escape_setup(ctx) -> None:
    """The issue's `instance_dir = ["../../../data/dogs"]`: from this working
    directory (two levels below the sweep folder) the relative path reaches
    the photos, and so did the old run name (`instance_dir=` and the raw
    value) walked from the sweep folder. The two values differ by a trailing
    slash only: under the old names both runs shared one folder."""
    cwd = ctx.tmp / "sweep" / "a" / "b"
    cwd.mkdir(parents=True)
    ctx.monkeypatch.chdir(cwd)
    rel = os.path.relpath(ctx.photos, cwd)
    grid = f'[train.grid]\ninstance_dir = ["{rel}", "{rel}/"]\n'
    write("s.toml", BASE + grid + GENERATE)(ctx)


def levers_recorded(run: Path) -> None:
    from lorabooth.adapters.lora import lora_metadata

    config = (run / "config.toml").read_text()
    for line in ("snr_gamma = 5.0", "noise_offset = 0.05", "caption_dropout = 0.5",
                 "ema_decay = 0.9"):
        assert line in config.splitlines(), config
    meta = lora_metadata(run)
    assert [meta[k] for k in ("snr_gamma", "noise_offset", "caption_dropout", "ema_decay")] == \
        [5.0, 0.05, 0.5, 0.9]
    assert "| 5, 0.05, 0.5, 0.9 |" in (run / "README.md").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5


TRAIN = ["train", "--instance-dir", "{photos}", "--instance-prompt", PROMPT,
         "--output", "{tmp}/out", "--steps", "1", "--resolution", "32"]
GEN = ["generate", "{run}", "--prompt", PROMPT, "--output", "{tmp}/gen", "--num-images", "1",
       "--steps", "1"]
MERGE = ["merge", "{run}", "{run}", "--out", "{tmp}/m.safetensors"]
FUSE = ["fuse", "{run}", "--out", "{tmp}/fused"]
EVAL = ["evaluate", "{run}", "--real", "{photos}", "--class-noun", "dog"]
TUNE = ["tune", "{photos}", "--class-noun", "dog", "--out", "{tmp}/tune"]
FINITE = "must be a finite number"

ROWS = [
    # item 4: run names from :g collided, a raw path value walked out of the sweep folder
    Row("sweep: names unique and inside", ["sweep", "{tmp}/s.toml"], 0, "sweep of 2 runs done",
        sweep_escape_setup, two_runs_inside),
    # item 5: every float option, at parse time
    Row("train --alpha nan", TRAIN + ["--alpha", "nan"], 2, f"--alpha: {FINITE}"),
    Row("train --max-grad-norm nan", TRAIN + ["--max-grad-norm", "nan"], 2,
        f"--max-grad-norm: {FINITE}"),
    Row("train --prior-loss-weight inf", TRAIN + ["--prior-loss-weight", "inf"], 2,
        f"--prior-loss-weight: {FINITE}"),
    Row("train --lr nan", TRAIN + ["--lr", "nan"], 2, f"--lr: {FINITE}"),
    # --prior-preservation: off, images (also bare, or true in TOML), model or dop
    Row("train --prior-preservation maybe", TRAIN + ["--prior-preservation", "maybe"], 2,
        "--prior-preservation: must be one of off, images, model, dop (got 'maybe')"),
    Row("train --prior-preservation= (empty)", TRAIN + ["--prior-preservation="], 2,
        "--prior-preservation: must be one of off, images, model, dop (got '')"),
    Row("train --prior-preservation model without a class prompt",
        TRAIN + ["--prior-preservation", "model"], 2,
        "--class-prompt: is required with --prior-preservation"),
    Row("train --config prior_preservation = 1", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        "`prior_preservation` must be a string or true/false (got 1)",
        write("c.toml", "prior_preservation = 1\n")),
    sweep_row("prior_preservation grid value not a mode",
              "--prior-preservation: must be one of off, images, model, dop (got 'yes')",
              rest='[train.grid]\nprior_preservation = [false, "yes"]\n'),
    Row("train --lr-text -inf", TRAIN + ["--lr-text=-inf"], 2, f"--lr-text: {FINITE}"),
    Row("train --lr-token nan", TRAIN + ["--lr-token", "nan"], 2, f"--lr-token: {FINITE}"),
    Row("train --lr-token 0", TRAIN + ["--train-token", "--lr-token", "0"], 2,
        "--lr-token: must be a positive number", after=nothing_at("out")),
    Row("train --train-token without an identifier word",
        ["train", "--instance-dir", "{photos}", "--instance-prompt", "!!", "--train-token",
         "--output", "{tmp}/out", "--steps", "1"], 2,
        "--instance-prompt: has no identifier word for --train-token", after=nothing_at("out")),
    Row("train --config alpha = nan", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        f"--alpha: {FINITE}", write("c.toml", "alpha = nan\n")),
    # the training levers: off (0) or in range
    Row("train --snr-gamma -1", TRAIN + ["--snr-gamma=-1"], 2,
        "--snr-gamma: must be 0 (off) or positive"),
    Row("train --snr-gamma inf", TRAIN + ["--snr-gamma", "inf"], 2, f"--snr-gamma: {FINITE}"),
    Row("train --blocks-to-swap -1", TRAIN + ["--blocks-to-swap=-1"], 2,
        "--blocks-to-swap: must be 0 (off) or positive"),
    Row("train --blocks-to-swap with DoRA", TRAIN + ["--blocks-to-swap", "2", "--adapter", "dora"],
        2, "--blocks-to-swap: does not work with --adapter dora"),
    Row("train --blocks-to-swap past the model's blocks", TRAIN + ["--blocks-to-swap", "40"], 2,
        "--blocks-to-swap 40: the model's denoiser has"),
    Row("train --noise-offset nan", TRAIN + ["--noise-offset", "nan"], 2,
        f"--noise-offset: {FINITE}"),
    Row("train --noise-offset -0.05", TRAIN + ["--noise-offset=-0.05"], 2,
        "--noise-offset: must be 0 (off) or positive"),
    Row("train --masked-loss without a mask", TRAIN + ["--masked-loss"], 2,
        "--masked-loss: no photo in"),
    Row("train --unmasked-weight without --masked-loss", TRAIN + ["--unmasked-weight", "0.5"], 2,
        "--unmasked-weight: applies only with --masked-loss"),
    Row("train --masked-prior-weight -1", TRAIN + ["--masked-loss", "--masked-prior-weight=-1"],
        2, "--masked-prior-weight: must be 0 (off) or positive"),
    Row("train --unmasked-weight nan", TRAIN + ["--masked-loss", "--unmasked-weight", "nan"], 2,
        f"--unmasked-weight: {FINITE}"),
    Row("train --caption-dropout 1", TRAIN + ["--caption-dropout", "1"], 2,
        "--caption-dropout: must be at least 0 (off) and below 1"),
    Row("train --caption-dropout -0.1", TRAIN + ["--caption-dropout=-0.1"], 2,
        "--caption-dropout: must be at least 0 (off) and below 1"),
    Row("train --ema-decay 1.5", TRAIN + ["--ema-decay", "1.5"], 2,
        "--ema-decay: must be at least 0 (off) and below 1"),
    Row("train --config ema_decay = 1.0", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        "--ema-decay: must be at least 0 (off) and below 1", write("c.toml", "ema_decay = 1.0\n")),
    Row("train --config caption_dropout = 'high'", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        "caption_dropout", write("c.toml", "caption_dropout = 'high'\n")),
    Row("train --base-precision int4", TRAIN + ["--base-precision", "int4"], 2,
        "--base-precision"),
    Row("train --base-precision fp8 where fp8 cannot compute", TRAIN + ["--base-precision", "fp8"],
        2, "--base-precision fp8: this torch/CPU cannot compute with fp8 weights",
        lambda ctx: ctx.monkeypatch.setattr("lorabooth.models.quantise._fp8_works", lambda: False),
        after=nothing_at("out")),
    Row("prepare --mask body", ["prepare", "{photos}", "{tmp}/prep", "--mask", "body"],
        2, "--mask: must be one of none, face", after=nothing_at("prep")),
    Row("train --config buckets = 'yes'", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        "buckets", write("c.toml", "buckets = 'yes'\n")),
    Row("train --buckets=2", TRAIN + ["--buckets=2"], 2, "--buckets"),
    Row("prepare --crop buckets", ["prepare", "{photos}", "{tmp}/prep", "--crop", "buckets"],
        2, "--crop", after=nothing_at("prep")),
    Row("prepare --face-margin nan", ["prepare", "{photos}", "{tmp}/prep", "--face-margin", "nan"],
        2, f"--face-margin: {FINITE}", after=nothing_at("prep")),
    Row("generate --unet-scale nan", GEN + ["--unet-scale", "nan"], 2, f"--unet-scale: {FINITE}",
        after=nothing_at("gen")),
    Row("generate --text-scale 1,inf", GEN + ["--text-scale", "1,inf"], 2,
        f"--text-scale: {FINITE}"),
    Row("generate --guidance nan", GEN + ["--guidance", "nan"], 2, f"--guidance: {FINITE}"),
    Row("fuse --unet-scale nan", FUSE + ["--unet-scale", "nan"], 2, f"--unet-scale: {FINITE}",
        after=nothing_at("fused")),
    Row("fuse --text-scale inf", FUSE + ["--text-scale", "inf"], 2, f"--text-scale: {FINITE}"),
    Row("merge --weights nan,1", MERGE + ["--weights", "nan,1"], 2, f"--weights: {FINITE}",
        after=nothing_at("m.safetensors")),
    Row("evaluate --unet-scale nan", EVAL + ["--unet-scale", "nan"], 2, f"--unet-scale: {FINITE}"),
    Row("evaluate --guidance inf", EVAL + ["--guidance", "inf"], 2, f"--guidance: {FINITE}"),
    sweep_row("[base] lr = nan", f"--lr: {FINITE}", base=BASE + "lr = nan\n"),
    sweep_row("unet_scale = [nan]", f"[generate]: --unet-scale: {FINITE}",
              rest="[generate.grid]\nunet_scale = [1.0, nan]\n"),
    # tune: refused before the study or its folder exists
    Row("tune --budget 0", TUNE + ["--budget", "0"], 2, "--budget: must be between 1 and",
        after=nothing_at("tune")),
    Row("tune --budget -3", TUNE + ["--budget=-3"], 2, "--budget: must be between 1 and"),
    Row("tune --steps 2.5", TUNE + ["--steps", "2,2.5"], 2, "--steps: whole numbers between 1"),
    Row("tune --steps nan", TUNE + ["--steps", "nan"], 2, f"--steps: {FINITE}"),
    Row("tune without --class-noun", ["tune", "{photos}", "--out", "{tmp}/tune"], 2,
        "--class-noun: is required", after=nothing_at("tune")),
    Row("tune a missing photo folder", ["tune", "{tmp}/none", "--class-noun", "dog", "--out",
                                        "{tmp}/tune"], 2, "none: no such folder of photos",
        after=nothing_at("tune")),
    Row("tune a missing --clip model", TUNE + ["--clip", "{tmp}/noclip"], 2, "noclip",
        after=nothing_at("tune")),
    Row("tune --judges x", TUNE + ["--judges", "x"], 2, "--judges: must be one of"),
    Row("tune --storage malformed", TUNE + ["--storage", "not a url"], 2,
        "--storage not a url: cannot open", after=nothing_at("tune")),
    Row("tune --storage unknown database", TUNE + ["--storage", "nosuchdb://h/db"], 2,
        "--storage nosuchdb://h/db: cannot open", after=nothing_at("tune")),
    Row("tune --storage sqlite in no folder", TUNE + ["--storage", "sqlite:///{tmp}/no/x.db"], 2,
        "cannot open", after=nothing_at("no")),
    Row("tune --storage unreachable server", TUNE + ["--storage", "postgresql://u@127.0.0.1:1/db"],
        2, "--storage postgresql://u@127.0.0.1:1/db: cannot open", after=nothing_at("tune")),
    Row("tune --workers 0", TUNE + ["--workers", "0"], 2, "--workers: must be between 1 and"),
    Row("tune --space unknown parameter", TUNE + ["--space", "{tmp}/space.toml"], 2,
        "space.toml: unknown key `lerning_rate`",
        write("space.toml", "lerning_rate = 1e-4\n"), nothing_at("tune")),
    Row("tune --space low above high", TUNE + ["--space", "{tmp}/space.toml"], 2,
        "space.toml: `lr`: low 0.001 is above high 0.0001",
        write("space.toml", "lr = {{low = 1e-3, high = 1e-4}}\n"), nothing_at("tune")),
    # item 5: images and tensors checked before they are written
    Row("generate a NaN LoRA", ["generate", "{nan_lora}", "--prompt", PROMPT, "--output",
                                "{tmp}/gen", "--num-images", "1", "--steps", "1"], 2,
        "the drawn images hold NaN or inf", after=nothing_at("gen")),
    Row("fuse a NaN LoRA", ["fuse", "{nan_lora}", "--out", "{tmp}/fused"], 2,
        "hold NaN or inf", after=nothing_at("fused")),
    Row("merge a NaN LoRA", ["merge", "{nan_lora}", "{run}", "--out", "{tmp}/m.safetensors"], 2,
        "nan.safetensors: 96 tensors hold NaN or inf", after=nothing_at("m.safetensors")),
    Row("merge weights that overflow", MERGE + ["--weights", "1e308,1"], 2,
        "m.safetensors: ", after=nothing_at("m.safetensors")),
    Row("train saves a NaN LoRA", train_argv("{photos}", "{tmp}/r", "--resume", "--steps", "1"),
        2, "the trained LoRA: ", poisoned_checkpoint, kept_weights),
    # item 7: sweep files with wrong types, refused before anything runs
    sweep_row("train = 5", "`train` must be a table", top="train = 5\n"),
    sweep_row("base = 5", "`base` must be a table", top="base = 5\n", base=""),
    sweep_row("[train] grid = 5", "`grid` must be a table", rest="[train]\ngrid = 5\n"),
    *[sweep_row(f"seeds = {seeds}", fragment,
                generate=GENERATE.replace("seeds = [0]", f"seeds = {seeds}"))
      for seeds, fragment in [('["x"]', "`seeds` must be an integer (got 'x')"),
                              ("[]", "`seeds` must be a non-empty list"),
                              ("[1099511627776]", "seeds must be between 0 and 4294967295")]],
    sweep_row("unet_scale = []", "`unet_scale` must be a non-empty list",
              rest="[generate.grid]\nunet_scale = []\n"),
    sweep_row("[base] steps = -3", "--steps: must be at least 1 (got -3)",
              base=BASE.replace("steps = 1", "steps = -3")),
    sweep_row("[train.grid] steps = [1, -3]", "run steps=-3: --steps: must be at least 1",
              rest="[train.grid]\nsteps = [1, -3]\n"),
    sweep_row("[generate] steps = -3", "`steps`: must be between 1 and 1000 (got -3)",
              generate=GENERATE.replace("steps = 1", "steps = -3")),
    sweep_row("prompts = [3]", "`prompts` must be a string (got 3)",
              generate=GENERATE.replace('["a photo of sks dog"]', "[3]")),
    sweep_row("[evaluate] no real folder", "`real` must be the folder",
              rest='[evaluate]\nreal = "{tmp}/absent"\n'),
    sweep_row("[evaluate] images_per_prompt = 1", "--images-per-prompt: at least 2",
              rest='[evaluate]\nreal = "{photos}"\nimages_per_prompt = 1\n'),
    sweep_row("[evaluate] kind = 'x'", "--kind: must be one of live, object",
              rest='[evaluate]\nreal = "{photos}"\nkind = "x"\n'),
    sweep_row("[evaluate] judges = 'x'", '`judges` can only be "toy"',
              rest='[evaluate]\nreal = "{photos}"\njudges = "x"\n'),
    # item 8: tracebacks that become one line
    Row("merge LoRAs of different shapes", ["merge", "{run}", "{wide_lora}", "--out",
                                            "{tmp}/m.safetensors"], 2, "differ in shape",
        after=nothing_at("m.safetensors")),
    Row("merge --rank of a NaN LoRA", ["merge", "{nan_lora}", "{run}", "--rank", "2", "--out",
                                       "{tmp}/m.safetensors"], 2, "hold NaN or inf"),
    Row("generate --output a file", GEN[:4] + ["--output", "{tmp}/file"], 2,
        "is a file, not a folder", write("file", "mine\n"), file_kept),
    Row("fuse --out a file", ["fuse", "{run}", "--out", "{tmp}/file"], 2, "is a file",
        write("file", "mine\n"), file_kept),
    Row("fuse --single-file --out a folder", ["fuse", "{run}", "--single-file", "--out", "{tmp}"],
        2, "is a folder"),
    Row("merge --out a folder", ["merge", "{run}", "{run}", "--out", "{tmp}"], 2, "is a folder"),
    Row("train --seed 2**32", TRAIN + ["--seed", "4294967296"], 2,
        "--seed: must be between 0 and 4294967295"),
    Row("generate --seed 2**70", GEN + ["--seed", str(2**70)], 2, "--seed: seeds must be between"),
    Row("generate seeds past 2**32", GEN[:-4] + ["--seed", "4294967295", "--num-images", "2"], 2,
        "--seed: seeds must be between"),
    Row("evaluate --seed -1", EVAL + ["--seed", "-1"], 2, "--seed: seeds must be between"),
    Row("train --save-every -1", TRAIN + ["--save-every=-1"], 2,
        "--save-every: must be 0 (never) or positive"),
    Row("generate --step -2", GEN + ["--step=-2"], 2,
        "--step: must be 0 (the final LoRA) or a saved step"),
    Row("generate --step of a run without snapshots", GEN + ["--step", "5"], 2,
        "has no snapshot of that step (saved: none (train with --save-every N)"),
    Row("evaluate --snapshots with --baselines", EVAL + ["--snapshots", "--baselines"], 2,
        "--snapshots: not with --baselines"),
    Row("evaluate --snapshots of a run without any", EVAL + ["--snapshots"], 2,
        "holds no snapshots (train with --save-every N)"),
    Row("generate --num-images 10**9", GEN[:-4] + ["--num-images", "1000000000"], 2,
        "--num-images: must be between 1 and 1000"),
    Row("evaluate --pres-images 10**9", EVAL + ["--pres-images", "1000000000"], 2,
        "--pres-images: must be between 1 and 1000"),
    Row("train --config /dev/zero", TRAIN + ["--config", "/dev/zero"], 2,
        "/dev/zero: not a regular file"),
    Row("train --config a folder", TRAIN + ["--config", "{photos}"], 2, "not a regular file"),
    Row("train --config binary", TRAIN + ["--config", "{tmp}/c.toml"], 2, "not UTF-8 text",
        lambda ctx: (ctx.tmp / "c.toml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)),
    Row("train --config huge", TRAIN + ["--config", "{tmp}/c.toml"], 2, "too large",
        lambda ctx: (ctx.tmp / "c.toml").write_text("# x\n" * 300_000)),
    Row("sweep /dev/zero", ["sweep", "/dev/zero"], 2, "not a regular file"),
    Row("resume --force across a rank change",
        train_argv("{photos}", "{run}", "--resume", "--force", "--rank", "8"), 2,
        "cannot be loaded across a change of --rank, even with --force"),
    Row("resume --force across an adapter change",
        train_argv("{photos}", "{run}", "--resume", "--force", "--adapter", "dora"), 2,
        "its checkpoints cannot be loaded across a change of --adapter, even with --force"),
    Row("train --adapter lorra", TRAIN + ["--adapter", "lorra"], 2,
        "--adapter: must be one of lora, dora, lokr, loha (got 'lorra')"),
    Row("resume --force across a targets change",
        train_argv("{photos}", "{run}", "--resume", "--force", "--targets", "all"), 2,
        "its checkpoints cannot be loaded across a change of --targets, even with --force"),
    Row("train --targets convs", TRAIN + ["--targets", "convs"], 2,
        "--targets: must be one of attn, attn-mlp, all (got 'convs')"),
    Row("train --adapter lokr --blocks-to-swap", TRAIN + ["--adapter", "lokr", "--blocks-to-swap",
                                                          "2"], 2,
        "--blocks-to-swap: does not work with --adapter lokr"),
    Row("train --adapter loha --base-precision nf4",
        TRAIN + ["--adapter", "loha", "--base-precision", "nf4"], 2,
        "--base-precision: does not work with --adapter loha"),
    Row("train tiny-flux --adapter lokr", TRAIN + ["--model", "tiny-flux", "--adapter", "lokr"], 2,
        "--adapter lokr: not supported for tiny-flux (flux1)"),
    Row("train --adapter dora --save-format kohya",
        TRAIN + ["--adapter", "dora", "--save-format", "kohya"], 2,
        "--adapter dora: cannot be saved with --save-format kohya"),
    Row("train --config adapter = DoRA", TRAIN + ["--config", "{tmp}/c.toml"], 2,
        "--adapter: must be one of lora, dora, lokr, loha (got 'DoRA')",
        lambda ctx: (ctx.tmp / "c.toml").write_text('adapter = "DoRA"\n')),
    Row("resume --force across a text-encoder change",
        train_argv("{photos}", "{run}", "--resume", "--force", "--train-text-encoder"), 2,
        "--train-text-encoder False -> True); its checkpoints cannot be loaded across"),
    Row("tampered state.pt (junk), manifest rewritten",
        train_argv("{photos}", "{tmp}/r", "--resume", "--steps", "3"), 0,
        "step-000002 does not load",
        tampered_state(lambda p: p.write_bytes(b"not a checkpoint" * 64)), resumed_from_step_1),
    Row("tampered state.pt (a valid torch file), manifest rewritten",
        train_argv("{photos}", "{tmp}/r", "--resume", "--steps", "3"), 0,
        "step-000002 does not load", tampered_state(lambda p: torch.save({"step": 2}, p)),
        resumed_from_step_1),
    Row("CPU out of memory as RuntimeError", TRAIN, 2, "out of memory; lower --batch-size",
        cpu_oom),
    # item 9 (the parts here)
    Row("identifier --n -5", ["identifier", "--n", "-5"], 2, "--n: must be at least 1"),
    Row("identifier --n 0", ["identifier", "--n", "0"], 2, "--n: must be at least 1"),
    sweep_row("a grid of 2000 runs", "2000 training runs (more than 1000); add --yes",
              rest="[train.grid]\nseed = [" + ", ".join(map(str, range(1000))) + "]\n"
                   "rank = [1, 2]\n"),
    # kept passing: the tiny and toy commands reach no network. Blocked in every row;
    # the rows above train (tampered state.pt), draw (NaN LoRA) and fuse on tiny.
    Row("no network: train toy", TRAIN + ["--model", "toy"], 0, "LoRA:"),
    # the four training levers work on the toy model the toy world measures them on
    Row("no network: train toy with the levers",
        TRAIN + ["--model", "toy", "--steps", "5", "--snr-gamma", "5", "--noise-offset", "0.05",
                 "--caption-dropout", "0.5", "--ema-decay", "0.9"], 0, "LoRA:",
        after=lambda ctx: levers_recorded(ctx.tmp / "out")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(row: Row, world, tmp_path, capsys, caplog, monkeypatch):
    ctx = SimpleNamespace(**vars(world), tmp=tmp_path, monkeypatch=monkeypatch)
    before = snapshot(world.photos, world.run)
    if row.setup:
        row.setup(ctx)
    argv = [a.format(**vars(ctx)) for a in row.argv]
    caplog.set_level("INFO", logger="lorabooth")
    with no_network() as attempts:
        try:
            code = main(argv)
        except Exception:  # what the table exists to rule out
            pytest.fail(f"Traceback (most recent call last):\n{traceback.format_exc()}")
    err = capsys.readouterr().err
    assert_outcome(code, err + caplog.text, row.code, row.fragment, errors_in=err)
    assert attempts == []
    assert_untouched(before)
    if row.after:
        row.after(ctx)
