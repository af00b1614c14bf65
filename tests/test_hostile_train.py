"""The train run folder and --resume (issue 24, items 1 and 5): a table of
`lorabooth train` commands into a folder holding a run, each run in-process
through `lorabooth.commands.cli.main`. Every row checks its exit status, a fragment of
what it says and that no traceback was printed; a refused row (exit 2) says
one error line and leaves every file below the test's folder (the photos, the
finished run, the doctored copy) byte-identical; a row that trains leaves the
photos and the finished run alone and passes its own check."""

import hashlib
import json
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import tomli_w
from safetensors.torch import load_file

from hostile import TRAIN, Row, assert_outcome, assert_untouched, main_at_umask, ready, tree
from lorabooth.commands.cli import main

RESUME = TRAIN + ["--checkpoint-every", "1", "--resume", "--output", "{tmp}/r"]


@dataclass
class Ctx:
    tmp: Path
    photos: Path
    run: Path
    said: str = ""  # what the command printed and logged
    warnings: tuple[str, ...] = ()  # the log's warning lines

    def fmt(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, photos=self.photos, run=self.run)

    @property
    def copy(self) -> Path:
        return self.tmp / "r"


# --- setups: a copy of the finished run at {tmp}/r, doctored -----------------------------

def copy_run(*doctor: Callable[[Path], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.run, ctx.copy)
        for step in doctor:
            step(ctx.copy)
    return setup


def unfinished(run: Path) -> None:
    """Killed after its step-1 checkpoint: no LoRA file, no model card."""
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"):
        (run / name).unlink()


def no_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def drop(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def config_says(**changes) -> Callable[[Path], None]:
    """config.toml rewritten (as a plain train into the folder used to) with
    other settings than its checkpoint was trained with."""
    def doctor(run: Path) -> None:
        old = tomllib.loads((run / "config.toml").read_text())
        (run / "config.toml").write_text(tomli_w.dumps({**old, **changes}))
    return doctor


def config_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda run: (run / "config.toml").write_bytes(data)


def manifest_of(run: Path, step: int = 1) -> Path:
    return run / "checkpoints" / f"step-{step:06d}" / "manifest.json"


def old_manifest(run: Path) -> None:
    """As lorabooth wrote it before manifests held the settings."""
    manifest = json.loads(manifest_of(run).read_text())
    del manifest["config"]
    manifest_of(run).write_text(json.dumps(manifest))


def manifest_text(text: str, step: int = 1) -> Callable[[Path], None]:
    return lambda run: manifest_of(run, step).write_text(text)


def manifest_edit(edit: Callable[[dict], object], step: int = 1) -> Callable[[Path], None]:
    def doctor(run: Path) -> None:
        manifest = json.loads(manifest_of(run, step).read_text())
        manifest_of(run, step).write_text(json.dumps(edit(manifest)))
    return doctor


def second_checkpoint(run: Path) -> None:
    """step-000002: a copy of step-000001 (the one to fall back to)."""
    shutil.copytree(run / "checkpoints" / "step-000001", run / "checkpoints" / "step-000002")


def replace_with_file(name: str) -> Callable[[Path], None]:
    def doctor(run: Path) -> None:
        shutil.rmtree(run / name)
        (run / name).write_text("not a folder")
    return doctor


def replace_with_folder(name: str) -> Callable[[Path], None]:
    def doctor(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
        (run / name / "keep.txt").write_text("a user's file")
    return doctor


def append_metrics(data: bytes) -> Callable[[Path], None]:
    def doctor(run: Path) -> None:
        with (run / "metrics.jsonl").open("ab") as f:
            f.write(data)
    return doctor


def leftovers_of_the_old_run(run: Path) -> None:
    """What a fresh run must not mix in: a later checkpoint, later metrics, an
    old sample, an old tracker log; and a user's own file it must keep."""
    shutil.copytree(run / "checkpoints" / "step-000001", run / "checkpoints" / "step-000009")
    append_metrics(b'{"step": 9, "loss": 0.5}\n')(run)
    (run / "samples").mkdir()
    (run / "samples" / "step-000009.png").write_bytes(b"old")
    (run / "logs").mkdir()
    (run / "logs" / "events").write_bytes(b"old")
    (run / "notes.txt").write_text("the user's own notes")


def photos_in_samples(ctx: Ctx) -> None:
    shutil.copytree(ctx.photos, ctx.run / "samples")


# --- checks after a row that trains ------------------------------------------------------

def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def resumed_at(step: int, steps: list[int]) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert f"step-{step:06d} (step {step})" in ctx.said
        assert metric_steps(ctx.copy) == steps
    return check


def fresh_with_one_warning(ctx: Ctx) -> None:
    """No checkpoint was usable: one warning line says so, and the run
    trained from step 0 (metrics 1 and 2, nothing resumed)."""
    resumes = [w for w in ctx.warnings if "--resume" in w]
    assert len(resumes) == 1 and "starting at step 0" in resumes[0], ctx.warnings
    assert "resuming from" not in ctx.said
    assert metric_steps(ctx.copy) == [1, 2]


def replaced_as_fresh(ctx: Ctx) -> None:
    """--overwrite: the old run's records are gone, the user's file is kept,
    the settings are the new ones (and say nothing of --overwrite), and the
    LoRA is the one a run into a new folder trains."""
    run = ctx.copy
    assert metric_steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert not (run / "samples").exists() and not (run / "logs").exists()
    assert (run / "notes.txt").read_text() == "the user's own notes"
    settings = tomllib.loads((run / "config.toml").read_text())
    assert settings["seed"] == 7 and "overwrite" not in settings
    assert "resuming" not in ctx.said
    fresh = ctx.tmp / "fresh"
    argv = [ctx.fmt(a) for a in TRAIN] + ["--seed", "7", "--checkpoint-every", "1",
                                          "--output", str(fresh)]
    assert main(argv) == 0
    a, b = load_file(run / "pytorch_lora_weights.safetensors"), \
        load_file(fresh / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def metrics_rewritten(ctx: Ctx) -> None:
    resumed_at(1, [1, 2, 3])(ctx)
    assert (ctx.copy / "metrics.jsonl").read_bytes().endswith(b"}\n")


# --- the table ---------------------------------------------------------------------------

BAD_MANIFESTS = {
    "sha256 a list": manifest_edit(lambda m: {**m, "sha256": list(m["sha256"])}),
    "sha256 a string": manifest_edit(lambda m: {**m, "sha256": "abc"}),
    "checksums numbers": manifest_edit(lambda m: {**m, "sha256": {k: 1 for k in m["sha256"]}}),
    "checksums of other files": manifest_edit(lambda m: {**m, "sha256": {
        "../../config.toml": hashlib.sha256(b"").hexdigest()}}),
    "step a string": manifest_edit(lambda m: {**m, "step": "1"}),
    "settings a list": manifest_edit(lambda m: {**m, "config": ["seed", 0]}),
    "a list": manifest_edit(lambda m: [m]),
    "null": manifest_text("null"),
    "nested 100000 deep": manifest_text("[" * 100000 + "]" * 100000),
    "not JSON": manifest_text("{\"step\": 1, \"sha"),
    "a folder": lambda run: (manifest_of(run).unlink(), manifest_of(run).mkdir()),
    "a FIFO": lambda run: (manifest_of(run).unlink(), os.mkfifo(manifest_of(run))),
    "2 MiB": manifest_edit(lambda m: {**m, "pad": "x" * (2 << 20)}),
}

ROWS = {
    # item 1: a folder holding a run is continued or replaced, never replaced unasked
    "finished run, no --resume or --overwrite": Row(
        TRAIN + ["--output", "{run}"], 2, "holds a finished run (pytorch_lora_weights"),
    "finished run, other seed and prompt": Row(
        TRAIN + ["--seed", "5", "--instance-prompt", "a photo of zwx dog", "--output", "{run}"],
        2, "add --overwrite to train afresh in its place"),
    "finished run with only its kohya file": Row(
        TRAIN + ["--output", "{tmp}/r"], 2, "holds a finished run (lora_kohya.safetensors)",
        copy_run(drop("pytorch_lora_weights.safetensors"))),
    "interrupted run (checkpoints, no LoRA)": Row(
        TRAIN + ["--output", "{tmp}/r"], 2,
        "interrupted run (checkpoints up to step 1, no LoRA file); add --resume to continue it "
        "or --overwrite", copy_run(unfinished)),
    "--overwrite and --resume together": Row(
        RESUME + ["--overwrite"], 2, "--overwrite: cannot be combined with --resume",
        copy_run()),
    "--overwrite, model not found: run untouched": Row(
        TRAIN + ["--overwrite", "--model", "someone/absent", "--output", "{run}"], 2,
        "not in the local Hugging Face cache"),
    "--overwrite would delete the photos in OUTPUT/samples": Row(
        TRAIN + ["--overwrite", "--instance-dir", "{run}/samples", "--output", "{run}"], 2,
        "is or holds the input --instance-dir", photos_in_samples),
    "--overwrite replaces the run as a fresh one": Row(
        TRAIN + ["--overwrite", "--seed", "7", "--checkpoint-every", "1", "--output", "{tmp}/r"],
        0, "LoRA:", copy_run(leftovers_of_the_old_run), replaced_as_fresh),
    # item 5.2: --resume is checked against what the checkpoint was trained with
    "resume: checkpoint seed 0, config.toml rewritten to seed 5": Row(
        RESUME + ["--seed", "5"], 2, "--seed 0 -> 5", copy_run(config_says(seed=5))),
    "resume: checkpoint prompt differs, config.toml rewritten to match": Row(
        RESUME + ["--instance-prompt", "a photo of zwx dog"], 2,
        "--instance-prompt 'a photo of sks dog' -> 'a photo of zwx dog'",
        copy_run(config_says(instance_prompt="a photo of zwx dog"))),
    "resume: same as the checkpoint, config.toml differs": Row(
        RESUME + ["--steps", "3"], 0, "LoRA:", copy_run(config_says(seed=5)),
        resumed_at(1, [1, 2, 3])),
    "resume: an older checkpoint (no settings) falls back to config.toml": Row(
        RESUME + ["--seed", "5"], 2, "--seed 0 -> 5", copy_run(old_manifest)),
    # item 5.3: no failure of --resume rewrites the run's files
    "resume: checkpoints is a file": Row(
        RESUME, 2, "checkpoints there is not a folder", copy_run(replace_with_file("checkpoints"))),
    "resume: metrics.jsonl is a folder": Row(
        RESUME, 2, "metrics.jsonl there is not a file",
        copy_run(replace_with_folder("metrics.jsonl"))),
    "resume: config.toml is a folder": Row(
        RESUME, 2, "config.toml there is not a file", copy_run(replace_with_folder("config.toml"))),
    "resume: config.toml not TOML, checkpoint without settings": Row(
        RESUME, 2, "config.toml: not valid TOML", copy_run(old_manifest, config_bytes(b"seed = ["))),
    "resume: config.toml nested too deeply": Row(
        RESUME, 2, "config.toml: TOML nested too deeply",
        copy_run(old_manifest, config_bytes(b"a = " + b"[" * 100000 + b"]" * 100000))),
    "resume: config.toml binary": Row(
        RESUME, 2, "config.toml: not UTF-8 text",
        copy_run(old_manifest, config_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8))),
    "resume: config.toml not TOML, no checkpoint": Row(
        RESUME, 2, "config.toml: not valid TOML", copy_run(no_checkpoints, config_bytes(b"=\n"))),
    "resume: torn last line of metrics.jsonl": Row(
        RESUME + ["--steps", "3"], 0, "LoRA:", copy_run(append_metrics(b'{"step": 3, "lo')),
        metrics_rewritten),
    "resume: binary garbage in metrics.jsonl": Row(
        RESUME + ["--steps", "3"], 0, "LoRA:",
        copy_run(append_metrics(b"\xff\xfe\x00garbage\n[1, 2]\n{\"no\": \"step\"}\n")),
        metrics_rewritten),
    # every malformed manifest reads as none (test_checkpoint_manifests); two end to end
    "resume: manifest checksums a list, none other: fresh": Row(
        RESUME, 0, "LoRA:", copy_run(BAD_MANIFESTS["sha256 a list"]), fresh_with_one_warning),
    "resume: manifest nested 100000 deep, falls back to the older": Row(
        RESUME + ["--steps", "3"], 0, "LoRA:",
        copy_run(second_checkpoint, manifest_text("{\"a\":" * 100000 + "}" * 100000, step=2)),
        resumed_at(1, [1, 2, 3])),
}


@pytest.mark.parametrize("name", list(BAD_MANIFESTS))
def test_checkpoint_manifests(name, finished_run, tmp_path, caplog):
    """Each malformed manifest makes its checkpoint one that does not verify
    (skipped and named), never an exception; the intact one holds the
    settings it was trained with."""
    from lorabooth.training.checkpoint import checkpoint_settings, latest_checkpoint, read_manifest, verify

    run = tmp_path / "r"
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    step = run / "checkpoints" / "step-000001"
    assert verify(step) and checkpoint_settings(step)["seed"] == 0
    BAD_MANIFESTS[name](run)
    skipped: list[str] = []
    assert read_manifest(step) is None and not verify(step)
    assert latest_checkpoint(run, skipped) is None
    assert skipped == [f"checkpoint {step} does not verify against its manifest"]
    assert caplog.records == []  # named in ``skipped``, not logged


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_train(name, module_photos, finished_run, tmp_path, monkeypatch, capsys, caplog):
    row = ROWS[name]
    caplog.set_level("INFO")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the photos the run was trained from (another path would be a changed --instance-dir)
    ctx = Ctx(tmp_path, module_photos, tmp_path / "run")
    shutil.copytree(finished_run, ctx.run)
    before = ready(row, ctx, capsys, caplog)
    everything = tree(tmp_path)
    code = main_at_umask([ctx.fmt(a) for a in row.argv])
    ctx.said = capsys.readouterr().err + caplog.text
    ctx.warnings = tuple(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert_outcome(code, ctx.said, row.code, row.says)
    if code == 2:
        assert tree(tmp_path) == everything  # every file: config.toml and metrics.jsonl too
    assert_untouched(before)
    if row.then:
        row.then(ctx)
