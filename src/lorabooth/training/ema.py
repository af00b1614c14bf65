"""An exponential moving average of the LoRA weights: a shadow copy updated
after every optimizer step, saved in checkpoints, and written as the run's
LoRA at the end. Keys are those of ``checkpoint.trainable_state``
(``component/parameter name``), so ``load_trainable_state`` puts it back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _trainable(modules: dict[str, torch.nn.Module]):
    return ((f"{name}/{p_name}", p) for name, module in modules.items()
            for p_name, p in module.named_parameters() if p.requires_grad)


def ema_shadow(modules: dict[str, torch.nn.Module], decay: float) -> dict[str, torch.Tensor] | None:
    """The shadow at the start: a fp32 copy of the trainable weights, on their
    device; None when ``decay`` is 0 (no EMA)."""
    if not decay:
        return None
    return {key: p.detach().float().clone() for key, p in _trainable(modules)}


def ema_decay_at(decay: float, step: int) -> float:
    """The decay of the update after optimizer step ``step`` (from 0), with
    diffusers EMAModel's warm-up: without it the shadow of a short run keeps
    decay**steps of the LoRA's zero init (0.99 over 100 steps: 37%)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(shadow: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
               decay: float, step: int) -> None:
    """shadow <- d * shadow + (1 - d) * weights, in place, d the warmed-up
    decay after optimizer step ``step`` (from 0)."""
    d = ema_decay_at(decay, step)
    for key, p in _trainable(modules):
        shadow[key].lerp_(p.detach().float(), 1 - d)


@contextmanager
def ema_applied(shadow: dict[str, torch.Tensor] | None,
                modules: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The modules hold the average while the block runs (what the run would
    save now), then their own weights again; no shadow: nothing changes."""
    if shadow is None:
        yield
        return
    own = {key: p.detach().clone() for key, p in _trainable(modules)}
    _copy_into(modules, shadow)
    try:
        yield
    finally:
        _copy_into(modules, own)


@torch.no_grad()
def _copy_into(modules: dict[str, torch.nn.Module], values: dict[str, torch.Tensor]) -> None:
    for key, p in _trainable(modules):
        p.copy_(values[key])


def ema_load(shadow: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Restore a checkpoint's shadow; ValueError when it is not this run's."""
    if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in shadow.items()}:
        raise ValueError("its EMA tensors are not this run's (names or shapes differ)")
    for key, value in saved.items():
        shadow[key].copy_(value)


def ema_state(shadow: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The shadow as a checkpoint stores it (on the CPU); None without EMA."""
    return None if shadow is None else {k: v.cpu() for k, v in shadow.items()}
