"""Prior preservation's targets: class images drawn by the frozen base model
(``--prior-preservation images``), or the frozen model's own prediction, step
by step, without images (``model``).

Class images are resumable and safe to interrupt: images already in the folder are reused,
only the missing ones are drawn, each written atomically, and image ``i`` is
always drawn from seed ``seed + i`` so a refill draws what a full run would.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..core.fileio import save_png
from ..models.families import family_of
from .data import readable_images

log = logging.getLogger(__name__)


def class_image_seed(run_seed: int) -> int:
    """The seed class image 0 is drawn from (image i: this + i), apart from
    the seeds a run's own noise and order draw from."""
    return run_seed * 1_000_003


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    """Indices whose file is needed: as many as ``count`` minus the readable
    images already present, taking the lowest free names."""
    have = readable_images(folder)
    need = count - len(have)
    taken = {p.name for p in have}
    out, i = [], 0
    while len(out) < need:
        if class_image_name(i) not in taken:
            out.append(i)
        i += 1
    return out


def remove_stale_temps(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@torch.inference_mode()
def draw_class_images(pipe, folder: Path, prompt: str, indices: list[int], resolution: int,
                      seed: int, steps: int, batch: int, progress: bool = True) -> int:
    """Draw the class images numbered ``indices`` into ``folder``.

    Under several processes, every process computes ``missing_indices`` first,
    all wait, then each draws its own slice: nobody's plan sees another's
    half-finished work."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = list(indices)
    if not todo:
        return 0
    log.info("drawing %d class images for %r into %s", len(todo), prompt, folder)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="class images", mininterval=1.0, disable=not progress)
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + i) for i in chunk]
        images = pipe(prompt=[prompt] * len(chunk), **family_of(pipe).draw_options(pipe),
                      height=resolution, width=resolution,
                      num_inference_steps=steps, generator=generators).images
        for i, image in zip(chunk, images):
            save_png(image, folder / class_image_name(i))
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def class_images(folder: Path, count: int) -> list[Path]:
    return readable_images(folder)[:count]


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """The base model exactly: every LoRA layer skipped (diffusers' peft
    switch), then switched back on, also when the block raises."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def model_prior_rows(denoiser, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, class_context, rng: torch.Generator,
                     same_noise: bool = False):
    """The batch with prior rows appended (``--prior-preservation model``):
    the instance latents again, noised by the family's forward process
    (``denoiser.noising``) with a fresh draw of noise and timesteps from
    ``rng``, and their target, the frozen base model's prediction (LoRA off,
    no grad) under the class prompt, ``class_context`` (the Conditioning of
    B rows). The LoRA model will be trained to predict the same there.
    ``denoiser``: a ``noising.Denoiser`` over the unwrapped model.

    Why the subject's own latents: the input then covers the noise levels and
    image statistics the instance loss trains on, so the prior holds the class
    prompt's behaviour exactly where the LoRA moves the model, at the cost of
    one no-grad forward and no images to draw or store.

    ``same_noise`` (``dop``, ai-toolkit's differential output preservation):
    the prior rows are the instance rows' own noisy latents and timesteps
    (nothing drawn from ``rng``), so the LoRA is told, at the very input it
    learns the subject on, to leave the class caption's prediction alone.
    Returns (latents, noise, timesteps, frozen prediction); (B, ...) -> (2B, ...)."""
    noising = denoiser.noising
    if same_noise:
        prior_noise, prior_t = noise, timesteps
    else:
        prior_noise = torch.randn(latents.shape, generator=rng)
        prior_t = noising.draw(latents.shape[0], rng)
    noisy = noising.noisy(latents, prior_noise, prior_t)
    with torch.no_grad(), adapters_disabled(denoiser.module):
        frozen = denoiser(noisy, prior_t, class_context)
    return (torch.cat([latents, latents]), torch.cat([noise, prior_noise]),
            torch.cat([timesteps, prior_t]), frozen)
