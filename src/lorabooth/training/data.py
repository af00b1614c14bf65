"""Subject and class examples: reading images, the data order, and the frozen
work done once (VAE latent distributions, prompt embeddings)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..photos.buckets import Size
from ..photos.imagefiles import image_files, problem
from ..photos.images import chw_uint8, signed_unit, upright_rgb


def readable_images(folder: Path) -> list[Path]:
    """The image files that decode in full (the check `prepare` uses)."""
    return [path for path in image_files(folder) if not problem(path)]


def load_image(path: Path, size: int | Size) -> torch.Tensor:
    """Upright RGB as `prepare` and `evaluate` see it (alpha over white),
    scaled to cover ``size`` ((width, height), or a square's side) and
    centre-cropped to it: (3, H, W) in [-1, 1]."""
    w, h = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        im = upright_rgb(im)
        im = ImageOps.fit(im, (w, h), method=Image.Resampling.LANCZOS)
    return signed_unit(chw_uint8(im))


def upright_size(path: Path) -> Size:
    """(width, height) as ``load_image`` sees the file, EXIF rotation
    applied, from its header (no pixels decoded)."""
    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # Orientation: a quarter turn
    return (h, w) if turned else (w, h)


@torch.inference_mode()
def latent_distributions(vae, paths: list[Path], resolution: int | Size,
                         batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image at one size
    (``load_image``'s), computed once.

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


class BucketOrder:
    """The instance order under aspect-ratio buckets: every batch from one
    bucket. Each bucket's images have their own ``Shuffler`` stream, and the
    bucket of the next batch is drawn by a Shuffler over slots, one per batch
    a bucket fills in an epoch (ceil(images / batch)): over an epoch each
    bucket gives batches in proportion to its images, in random order. A
    bucket with fewer images than a batch repeats them, as a run with fewer
    photos than --batch-size always has.

    With one bucket (every square run) nothing is drawn for the bucket, its
    stream is ``Shuffler(n, seed)`` and its state that Shuffler's: the order
    and the checkpoints are those of the runs before buckets."""

    def __init__(self, buckets: list, batch: int, seed: int):
        keys = sorted(set(buckets))
        self.members = [[i for i, b in enumerate(buckets) if b == key] for key in keys]
        # seeds apart from each other, the class order's (seed + 1) and other processes'
        self.streams = [Shuffler(len(m), seed + (g << 32)) for g, m in enumerate(self.members)]
        self.slots = [g for g, m in enumerate(self.members) for _ in range(-(-len(m) // batch))]
        self.chooser = Shuffler(len(self.slots), seed + (len(keys) << 32))

    def take(self, k: int) -> list[int]:
        g = self.slots[self.chooser.take(1)[0]] if len(self.members) > 1 else 0
        return [self.members[g][i] for i in self.streams[g].take(k)]

    def state_dict(self) -> dict:
        if len(self.streams) == 1:
            return self.streams[0].state_dict()
        return {"buckets": [s.state_dict() for s in self.streams],
                "chooser": self.chooser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(self.streams) == 1:
            self.streams[0].load_state_dict(state)
            return
        if len(state.get("buckets", ())) != len(self.streams):
            raise ValueError(f"the checkpoint's data order has {len(state.get('buckets', ()))} "
                             f"buckets where this run has {len(self.streams)}")
        for stream, own in zip(self.streams, state["buckets"]):
            stream.load_state_dict(own)
        self.chooser.load_state_dict(state["chooser"])
