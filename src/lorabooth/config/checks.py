"""Range checks the commands share: numbers that must be finite, seeds the
random generators accept, counts with a ceiling, and tensors or images that
must hold no NaN or inf before they are written. Each failure is one
``UserError`` naming the option or the thing refused."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI checks options before torch is loaded
    import numpy as np
    import torch

from ..core.errors import UserError

# numpy's legacy seeding (which accelerate's set_seed calls) takes 32 bits;
# one range for every command keeps a seed usable everywhere.
MAX_SEED = 2**32 - 1
# Images per setting (`generate --num-images`, `evaluate`'s per prompt): far
# beyond this the seed list alone exhausts memory before the first picture.
MAX_IMAGES = 1000
# Sampler steps: schedulers have 1000 training timesteps to spread them over.
MAX_STEPS = 1000
# Optimizer steps of one training run (`train --steps`, `tune --steps`, and
# the checkpoint and validation intervals): DreamBooth LoRA needs hundreds to
# a few thousand; 100,000 is days on one GPU, far more is a typo.
MAX_TRAIN_STEPS = 100_000
# Class images for prior preservation: the paper draws 200-1000; each one is a
# full sampling run before the first step.
MAX_CLASS_IMAGES = 10_000
# Images per step (training batch, class images drawn per batch).
MAX_BATCH = 256
# LoRA rank: SDXL's widest projection has 5120 features; past 1024 a LoRA is
# as large as the layers it adapts.
MAX_RANK = 1024
# Pixels on a side (train/prepare --resolution, generate --width/--height):
# 4096 is 16 times SDXL's native area; the latents of 8,000,000 alone would
# need terabytes.
MAX_SIDE = 4096
# Toy-world pictures rendered for pretraining (64 px, uint8): 12 GB of them.
MAX_RENDERED = 1_000_000
# Short side a photo may be asked to have (prepare --min-size): JPEG's limit.
MAX_PHOTO_SIDE = 65_535


def finite(value: float, option: str) -> float:
    if not math.isfinite(value):
        raise UserError(f"{option}: must be a finite number (got {value!r})")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type``: the error names the option (argparse adds it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (got {text!r})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


def finite_floats(text: str) -> list[float]:
    """An argparse ``type`` for a comma list of finite numbers."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas (got {text!r})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number (got {text!r})")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return values


def check_seeds(seeds: Iterable[int], option: str) -> None:
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"{option}: seeds must be between 0 and {MAX_SEED} (got {seed})")


def is_whole(value: object) -> bool:
    """An int, not a bool (True is an int) nor a float such as 1e23."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(value: int, option: str, high: int, low: int = 1) -> int:
    if not is_whole(value):
        raise UserError(f"{option}: must be a whole number between {low} and {high} "
                        f"(got {value!r})")
    if not low <= value <= high:
        raise UserError(f"{option}: must be between {low} and {high} (got {value})")
    return value


def check_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``tensors`` when any holds NaN or inf."""
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise UserError(f"{what}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); "
                        f"nothing was written")


def check_images(arrays: np.ndarray, what: str) -> None:
    """Refuse decoded images (floats in [0, 1]) that hold NaN or inf: saved
    as PNG they would silently turn black."""
    import numpy as np

    if not np.isfinite(arrays).all():
        raise UserError(f"{what}: the drawn images hold NaN or inf (the LoRA or the settings "
                        f"are broken); nothing was written")


def check_size(value: int | None, option: str) -> None:
    """None (the model's native size) or a positive multiple of 8, as the
    VAE's 8x downsampling of SD needs, up to MAX_SIDE."""
    if value is not None and (not is_whole(value) or not 8 <= value <= MAX_SIDE or value % 8):
        raise UserError(f"{option}: must be a positive multiple of 8 pixels, at most {MAX_SIDE} "
                        f"(got {value!r})")


KINDS = ("live", "object")  # the paper's prompt sets


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"--kind: must be one of {', '.join(KINDS)} (got {kind!r})")


def check_options(kind: str = "live", prompts_file: str | None = None, images_per_prompt: int = 4,
                  pres_images: int = 8, steps: int = 25, seed: int = 0) -> None:
    """What ``evaluate`` refuses before any work; a sweep checks its
    [evaluate] section with it before the first run trains."""
    if images_per_prompt < 2:
        raise UserError("--images-per-prompt: at least 2 (DIV compares images of one prompt)")
    check_count(images_per_prompt, "--images-per-prompt", MAX_IMAGES)
    check_count(pres_images, "--pres-images", MAX_IMAGES)
    check_count(steps, "--steps", MAX_STEPS)
    check_seeds([seed, seed + max(images_per_prompt, pres_images) - 1], "--seed")
    if not prompts_file:
        check_kind(kind)
    else:
        from .templates import read_prompts_file  # reads the file: every prompt must fill

        read_prompts_file(prompts_file)
