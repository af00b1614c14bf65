"""The run folder: checked and locked before anything in it is touched, the
effective config written when training starts, the model card written last."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, TextIO

import tomli_w

from .. import __version__
from ..adapters.pivotal import diffusers_lines
from ..config import (
    RESUME_NEUTRAL,
    TrainConfig,
    field_default,
    option_name,
    prior_mode,
    to_toml_dict,
)
from ..config.templates import guess_identifier
from ..config.train import LYCORIS
from ..core.errors import UserError
from ..core.fileio import (
    inside,
    load_toml,
    nested,
    read_metrics,
    to_json,
    write_text,
)
from ..core.locks import acquire_lock, release_lock
from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from ..reports import markdown as md
from .checkpoint import checkpoint_settings, checkpoints, latest_checkpoint

log = logging.getLogger(__name__)


# Options that change which LoRA tensors exist or their shapes: a checkpoint
# cannot be loaded across them, so --force does not override them.
# The optimizer's state is kept in its own form (8-bit, factored, ...).
RESUME_SHAPE = {"rank", "train_text_encoder", "train_token", "adapter", "optimizer",
                "targets"}
# What a run writes into OUTPUT, files then folders (the default class_images/
# is an input the next run reuses, not a record of this one).
RUN_FILES = (WEIGHT_NAME, KOHYA_WEIGHT_NAME, "config.toml", "metrics.jsonl", "README.md")
RUN_FOLDERS = ("checkpoints", "samples", "logs", "snapshots")


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings config.toml and every checkpoint record. --overwrite is
    left out: rerunning the file (`train --config RUN/config.toml`) must not
    replace a run unasked."""
    return {k: v for k, v in to_toml_dict(config).items() if k != "overwrite"}


def config_differences(old: dict, new: dict) -> list[str]:
    """'--lr 0.0005 -> 0.001' for each option that differs and matters."""
    keys = sorted((set(old) | set(new)) - RESUME_NEUTRAL)
    return [f"{option_name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k)]


def _trained_with(output: Path, checkpoint: Path | None) -> dict | None:
    """The settings a --resume is compared with: those the checkpoint it
    starts from was trained with (its manifest), else (a checkpoint from
    before manifests held them, or none at all) the run's config.toml; None
    when neither exists. An unreadable config.toml is refused, not skipped:
    skipping it would turn the check off."""
    settings = checkpoint_settings(checkpoint) if checkpoint else None
    if settings is not None:
        return settings
    path = output / "config.toml"
    if not path.exists():
        return None
    try:
        return load_toml(path)
    except UserError as e:
        raise UserError(f"--resume: {e}; it holds the settings the run was trained with, so "
                        f"--resume cannot check its own against them: repair the file, or "
                        f"remove it to resume unchecked") from None


def check_resume_config(output: Path, config: TrainConfig, checkpoint: Path | None = None) -> None:
    """Refuse a --resume with other settings than those ``checkpoint`` (by
    default the newest that verifies) was trained with."""
    if not config.resume:
        return
    old = _trained_with(output, checkpoint or latest_checkpoint(output, skipped=[]))
    if old is None:
        return
    if "prior_preservation" in old:  # a bool in runs from before it had modes
        old["prior_preservation"] = prior_mode(old["prior_preservation"])
    # a run written before an option existed ran with its default
    old = {**{f.name: field_default(f) for f in fields(TrainConfig)}, **old}
    new = to_toml_dict(config)
    diffs = config_differences(old, new)
    shapes = " and ".join(option_name(k) for k in sorted(RESUME_SHAPE) if old.get(k) != new[k])
    if shapes:
        raise UserError(f"--resume: {output} was trained with other settings ({'; '.join(diffs)}); "
                        f"its checkpoints cannot be loaded across a change of {shapes}, even "
                        f"with --force; use the same {shapes} or another --output")
    if diffs and not config.force:
        raise UserError(f"--resume: {output} was trained with other settings "
                        f"({'; '.join(diffs)}); use the same options or add --force")
    if diffs:
        log.warning("--force: resuming despite changed settings: %s", "; ".join(diffs))


def _earlier_run(output: Path) -> str | None:
    """The finished or resumable run OUTPUT holds and what may be done with
    it, in words; None when it holds neither."""
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        if (output / name).exists():
            return (f"a finished run ({name}); add --overwrite to train afresh in its place, "
                    f"--resume with more --steps to continue it, or choose another --output")
    steps = checkpoints(output)
    if steps:
        return (f"an interrupted run (checkpoints up to step {steps[-1][0]}, no LoRA file); "
                f"add --resume to continue it or --overwrite to start afresh")
    return None  # a run stopped before its first checkpoint is simply started again


def _check_overwrite(output: Path, config: TrainConfig) -> None:
    """--overwrite deletes RUN_FILES and RUN_FOLDERS: none may be or hold an input."""
    inputs = {"--instance-dir": config.instance_dir, "--model": config.model,
              "--model-config": config.model_config,
              "--class-dir": str(config.class_path) if config.prior_images else ""}
    for name in (*RUN_FILES, *RUN_FOLDERS):
        for option, value in inputs.items():
            if value and Path(value).exists() and nested(output / name, value):
                raise UserError(f"--overwrite: would delete {output / name}, which is or holds "
                                f"{option} {value}; move the input or choose another --output")


def check_run_folder(output: Path, config: TrainConfig) -> None:
    """Before anything in OUTPUT is written: its run names hold what the run
    writes there, and an earlier run in it is continued (--resume) or
    replaced (--overwrite), never replaced unasked."""
    if config.overwrite:
        _check_overwrite(output, config)
        return
    for names, is_kind, kind in ((RUN_FILES, Path.is_file, "a file"),
                                 (RUN_FOLDERS, Path.is_dir, "a folder")):
        for name in names:
            if (output / name).exists() and not is_kind(output / name):
                raise UserError(f"--output {output}: {name} there is not {kind}, which the run "
                                f"writes under that name; move it, or add --overwrite")
    if config.resume:
        check_resume_config(output, config)
        return
    earlier = _earlier_run(output)
    if earlier:
        raise UserError(f"--output {output}: holds {earlier}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as e:
        raise UserError(f"--overwrite: cannot remove {path} ({e.strerror})") from None


def start_run(output: Path, config: TrainConfig, start: int) -> TextIO:
    """The run's records once training is known to go ahead (main process):
    with --overwrite the earlier run's files are removed first (a fresh run
    mixes in none of its metrics, samples or checkpoints); then config.toml;
    then metrics.jsonl cut back to the step resumed from, opened to append."""
    if config.overwrite:
        for name in (*RUN_FILES, *RUN_FOLDERS):
            _remove(output / name)
    path = output / "metrics.jsonl"
    kept = [r for r in read_metrics(path) if r["step"] <= start] if start else []
    write_text(output / "config.toml", tomli_w.dumps(run_settings(config)))
    write_text(path, "".join(to_json(r) + "\n" for r in kept))
    return path.open("a", encoding="utf-8")


def remove_leftovers(output: Path) -> None:
    """Temp files and folders of a process killed mid-write (never a finished file)."""
    for junk in [*output.glob(".*.tmp"), *output.glob(".lora-*"),
                 *(output / "checkpoints").glob(".tmp-*")]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


def check_folders(config: TrainConfig) -> None:
    """Refuse folders that would write into the subject's photos (or train on
    the subject as its own prior), before anything is written."""
    photos = config.instance_dir
    if config.prior_images and nested(config.class_path, photos):
        raise UserError(f"--class-dir {config.class_path}: is, holds or lies inside "
                        f"--instance-dir {photos}; class images need a folder of their own")
    if inside(config.output, photos):
        raise UserError(f"--output {config.output}: is or lies inside --instance-dir {photos}; "
                        f"choose a folder outside the photos")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: something worth keeping was written
            return


@contextmanager
def run_folder(config: TrainConfig, main: bool) -> Iterator[Path]:
    """OUTPUT, created if missing and locked while the block runs. Nothing in
    it is touched before the lock is held (a refused second writer leaves the
    live run's files alone); folders created here that are still empty when
    the block fails are removed again."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: is a file, not a folder")
    created = _missing_folders(output.absolute())
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {output}: cannot create the folder ({e.strerror})") from None
    lock = None
    try:
        if not os.access(output, os.W_OK | os.X_OK):
            raise UserError(f"--output {output}: folder is not writable")
        if main:
            lock = acquire_lock(output)
            remove_leftovers(output)
            check_run_folder(output, config)
        yield output
    except BaseException:
        release_lock(lock)
        lock = None
        _remove_empty(created)
        raise
    finally:
        release_lock(lock)


def model_card(config: TrainConfig, resolution: int,
               pipeline: str = "StableDiffusionPipeline", buckets: str = "") -> str:
    """README.md of the run (``buckets``: the sizes --buckets trained at, in
    words). Every user string is quoted for where it lands:
    JSON in the YAML header, markdown-escaped in the text, shlex-quoted in the
    shell command (a prompt holding `$(...)` must not run when pasted),
    repr() in the Python snippet."""
    text_encoder = "UNet and text encoder" if config.train_text_encoder else "UNet"
    prior = {"off": "no",
             "images": f"yes: {config.num_class_images} images of "
                       f"'{md.text(config.class_prompt)}', weight {config.prior_loss_weight}",
             "model": f"yes, image-free: the frozen base model's prediction for "
                      f"'{md.text(config.class_prompt)}', weight {config.prior_loss_weight}",
             "dop": f"yes, image-free (differential output preservation): the frozen base "
                    f"model's prediction on the same noisy photos under each caption without "
                    f"the identifier, weight {config.prior_loss_weight}",
             }[config.prior_preservation]
    levers = ", ".join(f"{v:g}" for v in (config.snr_gamma, config.noise_offset,
                                           config.caption_dropout, config.ema_decay))
    schedule = config.lr_scheduler + (f" power {config.lr_power:g}"
                                      if config.lr_scheduler == "polynomial" else "")
    optimizer = (f"{config.optimizer}, {schedule} ({config.lr_warmup_steps}), "
                 f"{config.gradient_accumulation}")
    masked = (f"yes: photos' masks, weight {config.unmasked_weight:g} outside, masked prior "
              f"{config.masked_prior_weight:g}" if config.masked_loss else "no")
    beach = f"{config.instance_prompt} on the beach"
    snapshots = (f", `snapshots/step-N/` (the LoRA every {config.save_every} steps: `lorabooth "
                 "evaluate RUN --snapshots` finds the step to keep)" if config.save_every else "")
    shell = (f"lorabooth generate {shlex.quote(config.output)} --prompt {shlex.quote(beach)} \\\n"
             f"    --unet-scale 0,0.5,1 --text-scale 1 --guidance 7.5")
    load = f"pipe.load_lora_weights({config.output!r})\n"
    words = guess_identifier(config.instance_prompt, config.class_prompt)
    token = "no"
    if config.train_token:
        load = ("import torch\nfrom safetensors.torch import load_file\n"
                + diffusers_lines(config.output, words, config.save_format == "kohya"))
        token = f"yes: {md.text(' '.join(words))}, learning rate {config.lr_token:g}"
    if config.adapter in LYCORIS:  # diffusers' load_lora_weights builds LoRA layers only
        load = ("from lorabooth.formats.layouts import load_into_pipeline\n"
                + load.replace(f"pipe.load_lora_weights({config.output!r})\n",
                               f"load_into_pipeline(pipe, {config.output!r})\n"))
    python = (f"pipe = {pipeline}.from_pretrained({config.model!r})\n"
              f"{load}image = pipe(prompt={beach!r}).images[0]")
    return f"""---
base_model: {json.dumps(config.model)}
library_name: diffusers
tags: [text-to-image, diffusers, lora, dreambooth, lorabooth]
instance_prompt: {json.dumps(config.instance_prompt)}
---
# DreamBooth LoRA: {md.text(config.instance_prompt)}

LoRA adapters for {md.code(config.model)}, trained by lorabooth {__version__}.

| setting | value |
|---|---|
| instance prompt | {md.text(config.instance_prompt)} |
| LoRA on | {text_encoder} |
| adapter | {config.adapter} |
| adapter targets | {config.targets} |
| rank / alpha | {config.rank} / {config.lora_alpha:g} |
| steps, batch size | {config.steps}, {config.batch_size} |
| optimizer, lr schedule (warmup steps), gradient accumulation | {optimizer} |
| learning rates (UNet / text) | {config.lr:g} / {config.lr_text:g} |
| resolution | {resolution} px |
| aspect-ratio buckets (--buckets) | {f"on: {buckets}" if config.buckets else "off (square)"} |
| prior preservation | {prior} |
| trained token embedding (pivotal tuning) | {token} |
| mixed precision | {config.mixed_precision} |
| frozen base stored as (--base-precision) | {config.base_precision} |
| min-SNR γ, noise offset, caption dropout, EMA decay (0: off) | {levers} |
| masked loss | {masked} |
| seed | {config.seed} |

## Use it
{md.fenced(shell)}
or in diffusers:
{md.fenced(python, "python")}

Files: `{WEIGHT_NAME}` (diffusers layout, metadata in its
header), `config.toml` (the exact settings; `lorabooth train --config` reruns
it), `metrics.jsonl` (loss per step), `samples/` (validation images){snapshots}.
"""
