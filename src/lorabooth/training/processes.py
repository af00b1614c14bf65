"""What each data-parallel process (``accelerate launch``/``torchrun``) keeps
of its own, and what the run records of all of them.

Every process draws its own noise, timesteps and instance order (seeded
``seed + rank``), so a checkpoint holds one set of random streams per
process, and a resume gives each process back its own; the logged loss is the
mean over the processes, the loss of the whole (global) batch.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .data import BucketOrder, Shuffler


def rank_streams(noise_rng: torch.Generator, instance_order: BucketOrder,
                 class_order: Shuffler | None) -> dict:
    """This process's random streams, keyed as a checkpoint's state holds them."""
    return {"noise_rng": noise_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "instance_order": instance_order.state_dict(),
            "class_order": class_order.state_dict() if class_order else None}


def all_rank_streams(accelerator: Accelerator, own: dict) -> list[dict]:
    """Every process's streams, in process order (a collective: all processes call it)."""
    if accelerator.num_processes == 1:
        return [own]
    return gather_object([own])


def restore_streams(state: dict, rank: int, noise_rng: torch.Generator,
                    instance_order: BucketOrder, class_order: Shuffler | None) -> bool:
    """Give process ``rank`` its streams from a checkpoint's ``state``: its own
    entry of ``state["ranks"]``, or, for a checkpoint without one (a single
    process wrote it), the top-level streams for process 0. A process the
    checkpoint holds nothing for keeps its fresh ``seed + rank`` streams (it
    must not copy another's: both would draw the same noise); returns whether
    this process got streams back."""
    streams = state.get("ranks") or [state]
    if rank >= len(streams):
        return False
    mine = streams[rank]
    noise_rng.set_state(mine["noise_rng"])
    torch.set_rng_state(mine["torch_rng"])
    instance_order.load_state_dict(mine["instance_order"])
    if class_order is not None and mine["class_order"] is not None:
        class_order.load_state_dict(mine["class_order"])
    return True


def mean_over_ranks(accelerator: Accelerator, values: dict[str, torch.Tensor | None]
                    ) -> dict[str, float | None]:
    """Each value averaged over the processes (equal local batches: the mean
    over the global batch); a single process's values unchanged."""
    present = {k: v.detach().float().reshape(()) for k, v in values.items() if v is not None}
    if accelerator.num_processes > 1 and present:
        stacked = accelerator.reduce(torch.stack(list(present.values())), reduction="mean")
        present = dict(zip(present, stacked))
    return {k: (present[k].item() if k in present else None) for k in values}


def end_distributed(accelerator: Accelerator, prepared: dict[str, torch.nn.Module]) -> None:
    """Leave the process group without a hang. The DDP wrappers are dropped
    first, while the process group is still registered: their C++ reducer
    then only lets go of a reference. Dropped last (as ``_train``'s frame is
    cleared), the reducer destroys the gloo process group holding the GIL and
    joins gloo's worker thread, which may still need the GIL to free the last
    barrier's tensors: a deadlock seen in about one run in three on two CPU
    processes (torch 2.13)."""
    if accelerator.num_processes > 1:
        prepared.clear()
        accelerator.free_memory()
    accelerator.end_training()
