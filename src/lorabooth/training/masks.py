"""Masked loss (--masked-loss): each photo's mask read once, at the latents'
size (the weights it gives are objective.py's).

A mask is ``IMAGE.mask.png`` beside the photo, white where the subject is;
it is cropped exactly as its photo is (`load_image`'s fit) and averaged down
to the latent grid, so a latent cell half on the subject weighs half."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..core.errors import UserError
from ..photos.buckets import Size
from ..photos.imagefiles import mask_path
from ..photos.images import upright_rgb
from .data import upright_size
from .objective import mask_weights, masked_prior_loss
from .prior import adapters_disabled

log = logging.getLogger(__name__)


def check_masks(paths: list[Path]) -> None:
    """Before any model loads: at least one photo has a mask, and each mask
    decodes and has its photo's size (read from the headers), else one line
    naming the file."""
    masks = [(p, mask_path(p)) for p in paths if mask_path(p).is_file()]
    if not masks:
        raise UserError(f"--masked-loss: no photo in {paths[0].parent} has a mask "
                        f"({mask_path(paths[0]).name} beside {paths[0].name}, white = subject); "
                        f"`lorabooth prepare --mask face` makes them from the face it finds")
    for photo, mask in masks:
        try:
            size = upright_size(mask)
        except (OSError, ValueError) as e:
            raise UserError(f"--masked-loss: {mask}: not a readable image ({e})") from None
        if size != upright_size(photo):
            want = upright_size(photo)
            raise UserError(f"--masked-loss: {mask} is {size[0]}x{size[1]} px, its photo "
                            f"{want[0]}x{want[1]}: a mask must have its photo's size")


def load_mask(mask: Path, photo_size: tuple[int, int], size: int | Size) -> torch.Tensor:
    """(1, H, W) in [0, 1]: the mask's grey levels, scaled to cover ``size``
    ((width, height) or a square's side) and centre-cropped as its photo is
    (`load_image`). A mask of another size than its (upright) photo, or one
    that does not decode, is one line naming it."""
    w, h = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(mask) as im:
            im.load()
            grey = upright_rgb(im).convert("L")
    except (OSError, ValueError) as e:
        raise UserError(f"--masked-loss: {mask}: not a readable image ({e})") from None
    if grey.size != photo_size:
        raise UserError(f"--masked-loss: {mask} is {grey.size[0]}x{grey.size[1]} px, its photo "
                        f"{photo_size[0]}x{photo_size[1]}: a mask must have its photo's size")
    grey = ImageOps.fit(grey, (w, h), method=Image.Resampling.BILINEAR)
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().div(255) \
        .view(1, h, w)


def instance_masks(paths: list[Path], sizes: list[Size],
                   grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each photo's mask (1, h, w), loaded at its training size ``sizes[i]``
    (its bucket) and averaged down to its latents' grid ``grids[i]``; a photo
    without a mask is all subject (weight 1 everywhere), named in one
    warning. None of them masked is one line."""
    rows, bare = [], []
    for path, size, grid in zip(paths, sizes, grids):
        mask = mask_path(path)
        if not mask.is_file():
            bare.append(path.name)
            rows.append(torch.ones(1, *grid))
            continue
        with Image.open(path) as photo:
            photo_size = upright_rgb(photo).size
        rows.append(F.adaptive_avg_pool2d(load_mask(mask, photo_size, size), grid))
    if len(bare) == len(paths):
        raise UserError(f"--masked-loss: no photo in {paths[0].parent} has a mask "
                        f"({mask_path(paths[0]).name} beside {paths[0].name}, white = subject); "
                        f"`lorabooth prepare --mask face` makes them from the face it finds")
    if bare:
        log.warning("--masked-loss: %d of %d photos have no mask (%s): their whole image "
                    "counts", len(bare), len(paths), ", ".join(bare[:3]) + (", ..." if len(bare) > 3 else ""))
    return rows


@dataclass(frozen=True)
class MaskedLoss:
    """The step's --masked-loss: its instance rows' masks (n, 1, h, w) and
    how they weigh; ``teacher`` (the unwrapped denoiser) draws the frozen
    base's prediction for --masked-prior-weight."""

    masks: torch.Tensor  # (n, 1, h, w)
    unmasked_weight: float
    prior_weight: float = 0.0
    teacher: Any = None

    @property
    def pixel_weights(self) -> torch.Tensor:
        return mask_weights(self.masks, self.unmasked_weight)

    def prior_loss(self, pred: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                   context: Any) -> torch.Tensor:
        """Masked prior preservation on the ``len(masks)`` instance rows of
        ``pred``: the frozen base (LoRA off, no grad) on the same noisy latents
        and conditioning, its prediction the target outside the mask."""
        n = len(self.masks)
        with torch.no_grad(), adapters_disabled(self.teacher.module):
            frozen = self.teacher(noisy[:n], timesteps[:n],
                                  context.rows(slice(0, n))._map(torch.Tensor.detach))
        return masked_prior_loss(pred[:n], frozen.to(pred.device), self.masks)
