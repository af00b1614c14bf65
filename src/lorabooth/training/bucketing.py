"""`train --buckets`: which size each instance image trains at (its nearest
aspect-ratio bucket, ``photos/buckets.py``; without --buckets, the square at
--resolution as always), the run's buckets in words, and the denoiser of
each bucket (a flow model's timestep shift follows the bucket's token count)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ..config import TrainConfig
from ..models.loading import BaseModel
from ..photos.buckets import Size, bucket_sizes, nearest_bucket
from .batches import Examples
from .data import upright_size
from .noising import Denoiser, noising_for

log = logging.getLogger(__name__)


def instance_buckets(config: TrainConfig, paths: list[Path], resolution: int) -> list[Size]:
    """Each instance image's training size (width, height): with --buckets the
    bucket nearest its aspect, else the --resolution square (centre-cropped).
    Without --buckets, images that are not square are named in one warning."""
    sizes = [upright_size(path) for path in paths]
    if not config.buckets:
        oblong = [path for path, (w, h) in zip(paths, sizes) if w != h]
        if oblong:
            log.warning("--instance-dir: %d of %d images are not square (%s, ...): each is "
                        "centre-cropped to a square; --buckets trains each at its own aspect",
                        len(oblong), len(paths), oblong[0].name)
        return [(resolution, resolution)] * len(paths)
    table = bucket_sizes(resolution)
    buckets = [nearest_bucket(w, h, table) for w, h in sizes]
    log.info("--buckets: %s", bucket_summary(buckets))
    return buckets


def bucket_summary(buckets: list[Size]) -> str:
    """'512x512 (3 images), 640x384 (2 images)': the sizes a run trained at."""
    counts = Counter(buckets)
    return ", ".join(f"{w}x{h} ({n} image{'s' if n > 1 else ''})"
                     for (w, h), n in sorted(counts.items()))


def bucket_denoisers(config: TrainConfig, base: BaseModel, examples: Examples,
                     module: torch.nn.Module) -> dict[Size, Denoiser]:
    """Bucket -> the trained module under the family's forward process; flow
    models draw timesteps by --timestep-sampling, shifted for the bucket's
    token count as drawing at that size shifts them."""
    out = {}
    for i, bucket in enumerate(examples.instance_bucket):
        if bucket in out:
            continue
        h, w = examples.instance_mean[i].shape[-2:]
        tokens = (h // 2) * (w // 2)  # FLUX's 2 x 2 patches of the VAE's latents
        out[bucket] = Denoiser(module, base.family,
                               noising_for(base.noise_scheduler, config.timestep_sampling, tokens),
                               getattr(base.family, "train_guidance", None))
    return out
