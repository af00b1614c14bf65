"""--optimizer and --lr-scheduler: the optimizer over the LoRA's parameter
groups, its learning-rate schedule, and schedule-free AdamW's two sets of
weights (it trains on one point and saves another). The libraries beyond
torch are imported only when chosen."""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager, redirect_stdout
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2  # AdamW's, shared by its variants
# what the optional libraries log when imported (CPU kernels not found, ...)
NOISY = ("bitsandbytes", "torchao", "torch.utils._pytree")


@contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """``name``'s optimizer over ``groups`` (each with its own lr; ``lr`` is
    the default the polynomial schedule reads). ``warmup_steps`` is used by
    schedulefree only: it has no schedule, and warms up itself."""
    if name == "adamw":
        # foreach: one fused kernel per group instead of a loop over 256 small tensors
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS,
                                 foreach=True)
    if name == "adamw8bit":
        with _quiet():
            import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                   eps=EPS)
    if name == "adafactor":
        # transformers', not torch.optim.Adafactor: torch's scales each step
        # by the parameter's RMS, and a LoRA's B starts at zero, so it would
        # move 1000x slower than --lr says; this one takes --lr as the step
        with _quiet():
            from transformers.optimization import Adafactor
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        with redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(groups, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    if name == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(groups, lr=lr, betas=BETAS, eps=EPS,
                                              weight_decay=WEIGHT_DECAY,
                                              warmup_steps=warmup_steps)
    raise ValueError(f"unknown optimizer {name!r}")  # config's choices refuse it first


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int,
                    steps: int, power: float = 1.0, processes: int = 1
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule ``name`` (a factor on each group's lr). accelerate
    steps a prepared scheduler once per process each optimizer step, so the
    lengths count process-steps, as diffusers' training examples do."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * processes,
                         num_training_steps=steps * processes, power=power)


def schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for schedulefree's optimizers (accelerate's wrapper included):
    they train on one point and evaluate at another, switched by
    ``train()``/``eval()``."""
    return "train_mode" in optimizer.param_groups[0]


def train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Before training steps: a schedule-free optimizer's weights set to the
    point it trains at (a no-op when already there, and for the others)."""
    if schedule_free(optimizer):
        optimizer.train()


def eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """For good: the schedule-free average in the weights (what the run saves)."""
    if schedule_free(optimizer):
        optimizer.eval()


@contextmanager
def eval_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
                 ) -> Iterator[None]:
    """A schedule-free optimizer's averaged weights in ``params`` for a
    moment (a validation draws what the run would save now), then the
    training point restored bit for bit: ``train()`` recomputes it only to
    float precision, and a run with validations must equal one without."""
    if not schedule_free(optimizer):
        yield
        return
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def prodigy_step_size(optimizer: torch.optim.Optimizer) -> float | None:
    """Prodigy's estimated step size d (the lr it applies is d x --lr); None
    for the other optimizers."""
    d = optimizer.param_groups[0].get("d")
    return float(d) if d is not None else None
