"""Subject and class examples: reading images, the data order, and the frozen
work done once (VAE latent distributions, prompt embeddings)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..photos.imagefiles import image_files, problem
from ..photos.images import chw_uint8, signed_unit, upright_rgb


def readable_images(folder: Path) -> list[Path]:
    """The image files that decode in full (the check `prepare` uses)."""
    return [path for path in image_files(folder) if not problem(path)]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Upright RGB as `prepare` and `evaluate` see it (alpha over white), resize
    the short side, centre-crop: (3, R, R) in [-1, 1]."""
    with Image.open(path) as im:
        im = upright_rgb(im)
        im = ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return signed_unit(chw_uint8(im))


@torch.inference_mode()
def latent_distributions(vae, paths: list[Path], resolution: int,
                         batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image, computed once.

    Sampling ``mean + std * noise`` each step is the same method as encoding
    every step (what diffusers' script does), without repeating the encoder.
    """
    means, stds = [], []
    param = next(vae.parameters())
    for i in range(0, len(paths), batch):
        pixels = torch.stack([load_image(p, resolution) for p in paths[i : i + batch]])
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def caption_dropout(n: int, probability: float, rng: torch.Generator) -> torch.Tensor:
    """Which of ``n`` instance rows train on the empty prompt this step: (n,)
    bool, each True with ``probability``, so the LoRA also learns the subject
    unconditioned (what classifier-free guidance subtracts). Probability 0
    draws nothing from ``rng``."""
    if not probability:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=rng) < probability


class Shuffler:
    """An endless stream of indices in 0..n-1, reshuffled every epoch by its own
    generator; its state is saved in checkpoints so a resumed run sees the
    same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.position = 0
            out.append(self.order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order),
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.position = int(state["position"])
