"""A denoiser too large for one GPU, sharded across the processes by
accelerate's FSDP (``fsdp_version: 2``: torch's ``fully_shard``), started as
``accelerate launch --config_file examples/fsdp.yaml -m lorabooth train ...``.

Each process holds a shard of every weight, the frozen base's and the
LoRA's; a block's full weights are gathered for its forward and backward
and dropped after. What the loop reads whole in one process (the saved
LoRA) is gathered first, by every process. What would need the optimizer's
or the LoRA's shards in one process (checkpoints, EMA, validation samples)
is refused in one line.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

from ..config import TrainConfig
from ..core.errors import UserError
from ..models.quantise import keep_out_of_ddp
from .prior import missing_indices

log = logging.getLogger(__name__)

# What a sharded run cannot do, and why (one line each, before any work).
REFUSED = {
    "checkpoint_every": "a checkpoint holds the optimizer's state, which FSDP keeps in shards "
                        "that no process could write alone",
    "resume": "a sharded run writes no checkpoint to resume from",
    "save_every": "a snapshot would gather the LoRA's shards from every process mid-run",
    "ema_decay": "the average would be kept over each process's shard of the LoRA",
    "validation_prompt": "samples are drawn by the main process alone, and a sharded "
                         "denoiser runs only with every process",
    "train_text_encoder": "FSDP shards the denoiser only",
    "train_token": "FSDP shards the denoiser only",
    "blocks_to_swap": "block swap runs in one process; FSDP already spreads the blocks",
}


def fsdp_requested() -> bool:
    """The launcher's accelerate config says ``distributed_type: FSDP``."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def shard_on_cpu(accelerator: Accelerator) -> None:
    """Honour an FSDP launch on a CPU-only machine. accelerate 1.15 turns FSDP
    on only for accelerator devices (``AcceleratorState.__init__``: the switch
    to ``DistributedType.FSDP`` sits in the MULTI_GPU/NPU/XPU/... branch), so
    a CPU launch whose config asks for FSDP falls back to MULTI_CPU and
    DDP without a word. torch's ``fully_shard`` runs on gloo, so this sets
    what that branch sets on a GPU, from the same environment: the plugin
    and the distributed type, in the process-wide part too (every later
    ``AcceleratorState()`` copies it from there)."""
    if not (fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharded(config: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse, in one line, what a sharded run cannot do (nothing when not sharded)."""
    if not is_sharded(accelerator):
        return
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UserError("FSDP: set fsdp_version: 2 in the accelerate config (lorabooth shards "
                        "with torch's fully_shard; FSDP1 flattens and renames the LoRA's "
                        "parameters)")
    for field, why in REFUSED.items():
        if getattr(config, field):
            raise UserError(f"--{field.replace('_', '-')}: not under FSDP ({why})")
    if config.base_precision != "auto":
        raise UserError(f"--base-precision {config.base_precision}: not under FSDP (sharding "
                        "torchao's and bitsandbytes' quantised weights is untested here); "
                        "shard the bf16 base, or quantise it and train in one process")
    if config.prior_images and missing_indices(config.class_path, config.num_class_images):
        raise UserError(f"--class-dir {config.class_path}: under FSDP it must already hold "
                        f"--num-class-images {config.num_class_images} images (drawing them "
                        "needs the whole denoiser in one process; draw them with a "
                        "one-process run, or on a base that fits one GPU)")


def prepare(accelerator: Accelerator, modules: dict[str, torch.nn.Module],
            optimizer: torch.optim.Optimizer, lr_scheduler
            ) -> tuple[dict[str, torch.nn.Module], torch.optim.Optimizer, object]:
    """The trained modules, optimizer and schedule as accelerate prepares
    them. FSDP replaces every parameter with its shard, so the denoiser and
    the optimizer go in one call (accelerate then points the optimizer at the
    shards); otherwise (one process, DDP) each module, then the optimizer."""
    if is_sharded(accelerator):
        *prepared, optimizer, lr_scheduler = accelerator.prepare(*modules.values(), optimizer,
                                                                 lr_scheduler)
        for name, module in zip(modules, prepared):
            whole, held = shard_sizes(module)
            log.info("FSDP: %s's %.2f M parameters sharded over %d processes, %.2f M in this one",
                     name, whole / 1e6, accelerator.num_processes, held / 1e6)
        return dict(zip(modules, prepared)), optimizer, lr_scheduler
    # DDP leaves the quantised frozen weights alone (--base-precision)
    modules = {name: accelerator.prepare(keep_out_of_ddp(m)) for name, m in modules.items()}
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    return modules, optimizer, lr_scheduler


def shard_sizes(module: torch.nn.Module) -> tuple[int, int]:
    """(the module's parameter count, how many of them this process holds)."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return sum(p.numel() for p in params), held


def full_trainable(modules: dict[str, torch.nn.Module]
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter whole, fp32 on the CPU, per module and keyed
    by parameter name (as ``module.state_dict()`` keys it). A collective
    under FSDP: every process calls it, in the same order, and every process
    gets the whole LoRA (small: the frozen base stays sharded). A parameter
    that is not a shard is taken as it is."""
    from torch.distributed.tensor import DTensor

    def whole(p: torch.Tensor) -> torch.Tensor:
        p = p.detach()
        return (p.full_tensor() if isinstance(p, DTensor) else p).float().cpu().contiguous()

    return {name: {p_name: whole(p) for p_name, p in module.named_parameters() if p.requires_grad}
            for name, module in modules.items()}
