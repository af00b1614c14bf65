"""The toy world's pretraining learning-rate schedule: linear warm-up, then
cosine decay."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps)))


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
