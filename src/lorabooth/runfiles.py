"""The run folder: checked and locked before anything in it is touched, the
effective config written when training starts, the model card written last."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import tomli_w

from . import __version__
from . import markdown as md
from .config import TrainConfig, field_default, option_name, prior_mode, to_toml_dict
from .errors import UserError
from .fileio import MAX_JSON_BYTES, inside, load_toml, nested, parse_json, read_text_file, write_text
from .identifier import guess_identifier
from .pivotal import diffusers_lines

log = logging.getLogger(__name__)


# Options that may change between a run and its --resume without changing
# what the run computes.
RESUME_NEUTRAL = {"resume", "force", "steps", "checkpoint_every", "validation_prompt",
                  "validation_every", "validation_images", "output", "gradient_checkpointing",
                  "report_to"}
# Options that change which LoRA tensors exist or their shapes: a checkpoint
# cannot be loaded across them, so --force does not override them.
RESUME_SHAPE = {"rank", "train_text_encoder", "train_token", "adapter"}


def config_differences(old: dict, new: dict) -> list[str]:
    """'--lr 0.0005 -> 0.001' for each option that differs and matters."""
    keys = sorted((set(old) | set(new)) - RESUME_NEUTRAL)
    return [f"{option_name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k)]


def check_resume_config(output: Path, config: TrainConfig) -> None:
    path = output / "config.toml"
    if not (config.resume and path.is_file()):
        return
    old = load_toml(path, "--resume")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(output: Path) -> Path:
    """``OUTPUT/.lock`` holds the writer's pid; a second writer stops, a lock
    left by a killed process is taken over."""
    lock = output / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(read_text_file(lock, "", 4096).split()[0])
            except (UserError, ValueError, IndexError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise UserError(f"--output {output}: another lorabooth process (pid {pid}) is "
                                f"writing here; wait for it or choose another --output") from None
            log.warning("taking over the stale lock of process %s in %s", pid, output)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise UserError(f"--output {output}: could not take the lock {lock}")


def release_lock(lock: Path | None) -> None:
    if lock is not None:
        lock.unlink(missing_ok=True)


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
            check_resume_config(output, config)
        yield output
    except BaseException:
        release_lock(lock)
        lock = None
        _remove_empty(created)
        raise
    finally:
        release_lock(lock)


def write_config(output: Path, config: TrainConfig) -> None:
    write_text(output / "config.toml", tomli_w.dumps(to_toml_dict(config)))


def model_card(config: TrainConfig, resolution: int,
               pipeline: str = "StableDiffusionPipeline") -> str:
    """README.md of the run. Every user string is quoted for where it lands:
    JSON in the YAML header, markdown-escaped in the text, shlex-quoted in the
    shell command (a prompt holding `$(...)` must not run when pasted),
    repr() in the Python snippet."""
    text_encoder = "UNet and text encoder" if config.train_text_encoder else "UNet"
    prior = {"off": "no",
             "images": f"yes: {config.num_class_images} images of "
                       f"'{md.text(config.class_prompt)}', weight {config.prior_loss_weight}",
             "model": f"yes, image-free: the frozen base model's prediction for "
                      f"'{md.text(config.class_prompt)}', weight {config.prior_loss_weight}",
             }[config.prior_preservation]
    levers = ", ".join(f"{v:g}" for v in (config.snr_gamma, config.noise_offset,
                                           config.caption_dropout, config.ema_decay))
    beach = f"{config.instance_prompt} on the beach"
    shell = (f"lorabooth generate {shlex.quote(config.output)} --prompt {shlex.quote(beach)} \\\n"
             f"    --unet-scale 0,0.5,1 --text-scale 1 --guidance 7.5")
    load = f"pipe.load_lora_weights({config.output!r})\n"
    words = guess_identifier(config.instance_prompt, config.class_prompt)
    token = "no"
    if config.train_token:
        load = ("import torch\nfrom safetensors.torch import load_file\n"
                + diffusers_lines(config.output, words, config.save_format == "kohya"))
        token = f"yes: {md.text(' '.join(words))}, learning rate {config.lr_token:g}"
    python = (f"pipe = {pipeline}.from_pretrained({config.model!r})\n"
              f"{load}image = pipe({beach!r}).images[0]")
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
| rank / alpha | {config.rank} / {config.lora_alpha:g} |
| steps, batch size | {config.steps}, {config.batch_size} |
| learning rates (UNet / text) | {config.lr:g} / {config.lr_text:g} |
| resolution | {resolution} px |
| prior preservation | {prior} |
| trained token embedding (pivotal tuning) | {token} |
| mixed precision | {config.mixed_precision} |
| min-SNR γ, noise offset, caption dropout, EMA decay (0: off) | {levers} |
| seed | {config.seed} |

## Use it
{md.fenced(shell)}
or in diffusers:
{md.fenced(python, "python")}

Files: `pytorch_lora_weights.safetensors` (diffusers layout, metadata in its
header), `config.toml` (the exact settings; `lorabooth train --config` reruns
it), `metrics.jsonl` (loss per step), `samples/` (validation images).
"""


def open_metrics(output: Path, start: int, main: bool):
    """metrics.jsonl, keeping only the lines up to the step we resume from."""
    if not main:
        return None
    path = output / "metrics.jsonl"
    kept = []
    if start and path.exists():
        kept = [line for line in read_text_file(path, "--resume", MAX_JSON_BYTES).splitlines()
                if _step_of(line) <= start]
    write_text(path, "".join(line + "\n" for line in kept))
    return path.open("a", encoding="utf-8")


def _step_of(line: str) -> float:
    """A metrics line's step; a torn or foreign line sorts after every step."""
    try:
        record = parse_json(line, "metrics.jsonl")
    except UserError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf
