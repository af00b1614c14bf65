"""An exponential moving average of the LoRA weights: a shadow copy updated
after every optimizer step, saved in checkpoints, and written as the run's
LoRA at the end. Keys are those of ``checkpoint.trainable_state``
(``component/parameter name``), so ``load_trainable_state`` puts it back."""

from __future__ import annotations

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


@torch.no_grad()
def ema_update(shadow: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
               decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * weights, in place."""
    for key, p in _trainable(modules):
        shadow[key].lerp_(p.detach().float(), 1 - decay)


def ema_load(shadow: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Restore a checkpoint's shadow; ValueError when it is not this run's."""
    if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in shadow.items()}:
        raise ValueError("its EMA tensors are not this run's (names or shapes differ)")
    for key, value in saved.items():
        shadow[key].copy_(value)


def ema_state(shadow: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The shadow as a checkpoint stores it (on the CPU); None without EMA."""
    return None if shadow is None else {k: v.cpu() for k, v in shadow.items()}
