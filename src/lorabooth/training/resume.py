"""--resume: every state of a run restored from the newest checkpoint that
loads, checked against the settings that checkpoint was trained with."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..core.errors import UserError, first_line
from .checkpoint import latest_checkpoint, latest_loadable, load_trainable_state
from .data import BucketOrder, Shuffler
from .ema import ema_load
from .processes import restore_streams
from .runfiles import check_resume_config

log = logging.getLogger(__name__)


def resume(config: TrainConfig, output: Path, modules, optimizer, lr_scheduler,
            noise_rng: torch.Generator, instance_order: BucketOrder, class_order: Shuffler | None,
            ema: dict[str, torch.Tensor] | None, rank: int = 0) -> int:
    """The step to go on from, with every state restored from the newest
    checkpoint that loads; 0 when none does. What was skipped is one line."""
    skipped: list[str] = []
    found = latest_loadable(output, modules, skipped)
    if found is None:
        if skipped:  # a first run has none: nothing to say
            log.warning("--resume: %s; no checkpoint is usable, starting at step 0",
                        "; ".join(skipped))
        return 0
    path, tensors, state = found
    if skipped and path != latest_checkpoint(output, skipped=[]):
        check_resume_config(output, config, path)  # run_folder checked a newer one's settings
    try:
        load_trainable_state(modules, tensors)
        if ema is not None:  # a checkpoint written without EMA (--force) starts it from its weights
            ema_load(ema, state.get("ema") or tensors)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        streams = restore_streams(state, rank, noise_rng, instance_order, class_order)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise UserError(f"--resume: checkpoint {path} does not fit this run "
                        f"({first_line(e, 120)}); remove it, or start afresh with --overwrite"
                        ) from None
    if not streams:
        log.warning("--resume: %s was written by fewer processes; process %d starts its "
                    "random streams afresh", path, rank)
    resumed = f"resuming from {path} (step {state['step']})"
    if skipped:
        log.warning("--resume: %s; %s", "; ".join(skipped), resumed)
    else:
        log.info(resumed)
    return int(state["step"])
