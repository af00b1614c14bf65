"""The parts of a training run that ``training`` builds before its loop: the
accelerator, the class images, the LoRA modules, the optimizer and the
--train-token rows. Each takes the config and returns plain objects."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from ..adapters.lora import (
    adapter_kind,
    add_text_lora,
    add_unet_lora,
    denoiser_targets,
    freeze_all_but_lora,
    lora_parameters,
)
from ..adapters.pivotal import attach, holds_tokens, setup_token
from ..config import TrainConfig
from ..config.fields import option_name
from ..config.templates import guess_identifier
from ..config.train import LYCORIS
from ..core.errors import UserError
from ..models.loading import BaseModel, pipeline_from_parts
from .batches import Examples
from .data import image_files
from .optimizers import build_optimizer, build_scheduler
from .prior import (
    class_image_seed,
    class_images,
    draw_class_images,
    missing_indices,
    remove_stale_temps,
)
from .tracking import accelerator_options

log = logging.getLogger(__name__)
# the text encoders' optimizer groups in order (after the UNet's), and their metrics keys
TEXT_LR_KEYS = (("text_encoder", "lr_text"), ("text_encoder_2", "lr_text2"))


def setup_accelerator(config: TrainConfig) -> Accelerator:
    precision = config.mixed_precision
    on_cpu = not torch.cuda.is_available()
    if on_cpu and precision == "fp16":
        log.warning("--mixed-precision fp16 needs a GPU; training in fp32 on the CPU")
        precision = "no"
    if on_cpu and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("--mixed-precision bf16: this CPU has no bf16 support; training in fp32")
        precision = "no"
    # accelerate keeps one process-wide state; a second run in the same Python
    # process (a notebook, the tests) with another precision must reset it.
    # The distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    # cpu=: without it a CPU-only process started by `accelerate launch` or
    # torchrun ignores WORLD_SIZE and trains alone (accelerate only picks gloo
    # for cpu=True), every "rank" writing the same folder.
    # gradient_accumulation_steps: accelerator.accumulate() syncs, and the
    # optimizer steps, on every N-th batch; backward() divides the loss by N
    return Accelerator(mixed_precision=precision, cpu=on_cpu,
                       gradient_accumulation_steps=config.gradient_accumulation,
                       **accelerator_options(config.report_to, config.output))


def check_family_options(config: TrainConfig, base: BaseModel) -> None:
    """Options the model's family cannot take, refused in one line each: the
    family's ``frozen`` (which `tune` keeps off and the web page refuses
    too), and for flow models min-SNR."""
    family, model = base.family, config.model
    why = {"train_token": ("the identifier's token rows stay frozen in a flow model's text "
                           "encoder" if family.flow else
                           f"it trains one text encoder's token rows and {model} has "
                           f"{len(family.encoders)}"),
           "train_text_encoder": "its text encoder is a language model whose embeddings are "
                                 "cached once"}
    for key in family.frozen:
        if getattr(config, key):
            raise UserError(f"{option_name(key)}: not supported for {model} ({family.name}): "
                            f"{why[key]}")
    if not family.flow:
        if config.timestep_sampling != "logit_normal":
            log.warning("--timestep-sampling: ignored by %s (a DDPM model draws timesteps "
                        "uniformly)", model)
        return
    if config.adapter in LYCORIS:  # kohya's FLUX layout splits fused LoRA weights
        raise UserError(f"--adapter {config.adapter}: not supported for {model} "
                        f"({family.name}): lorabooth writes LoKr/LoHa for SD 1.x and SDXL only "
                        "(the FLUX layouts split fused weights, which a Kronecker or Hadamard "
                        "product cannot be split into)")
    if config.snr_gamma:
        raise UserError(f"--snr-gamma: min-SNR weighting is defined for epsilon/v-prediction; "
                        f"{model} is a flow model: shape the noise levels with "
                        f"--timestep-sampling instead")


def setup_class_images(config: TrainConfig, base: BaseModel, resolution: int,
                        accelerator: Accelerator) -> list[Path]:
    if config.prior_model and config.class_dir:
        log.warning("--class-dir: not used with --prior-preservation %s (no class images)",
                    config.prior_preservation)
    if not config.prior_images:
        return []
    folder = config.class_path
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--class-dir {folder}: is a file, not a folder")
    if accelerator.is_main_process and folder.is_dir():
        remove_stale_temps(folder)  # leftovers of a fill killed mid-write
    plan = missing_indices(folder, config.num_class_images)
    have = len(image_files(folder))  # by name: missing_indices has already verified them
    if have > config.num_class_images and accelerator.is_main_process:
        log.info("--class-dir %s holds %d images; using %d of them (--num-class-images) and "
                 "keeping the rest", folder, have, config.num_class_images)
    accelerator.wait_for_everyone()  # every process plans before anyone draws
    if plan:
        pipe = pipeline_from_parts(base)
        pipe.set_progress_bar_config(disable=True)
        draw_class_images(pipe, folder, config.class_prompt,
                          plan[accelerator.process_index::accelerator.num_processes], resolution,
                          seed=class_image_seed(config.seed), steps=config.class_draw_steps,
                          batch=config.class_draw_batch, progress=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return class_images(folder, config.num_class_images)


def setup_lora(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    dora, kind = adapter_kind(config.adapter)
    targets = denoiser_targets(base.family.name, base.family.flow, config.targets)
    add_unet_lora(base.unet, config.rank, config.lora_alpha, dora, targets, kind)
    freeze_all_but_lora(base.unet)
    modules = {"unet": base.unet}
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    for name in base.family.lora_encoders if config.train_text_encoder else ():
        encoder = getattr(base, name)
        add_text_lora(encoder, config.rank, config.lora_alpha, dora, kind)
        freeze_all_but_lora(encoder)
        if config.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        modules[name] = encoder
    for module in modules.values():
        module.train()
    return modules


def setup_optimizer(config: TrainConfig, modules: dict[str, torch.nn.Module],
                    processes: int = 1):
    """--optimizer over one group per trained module (the UNet's first, then
    the text encoders' as TEXT_LR_KEYS, then the token rows), and its
    --lr-scheduler."""
    groups = [{"params": lora_parameters(modules["unet"]), "lr": config.lr}]
    for name, _ in TEXT_LR_KEYS:
        if name in modules:
            groups.append({"params": lora_parameters(modules[name]), "lr": config.text_lr(name)})
    if "token" in modules:
        # no weight decay: it would pull the rows towards zero, not towards
        # where they started
        groups.append({"params": [modules["token"].vectors], "lr": config.lr_token,
                       "weight_decay": 0.0})
    if config.optimizer == "prodigy":
        log.info("--optimizer prodigy: learning rates %s multiply the step size Prodigy "
                 "estimates (its own value is 1: --lr, --lr-text and --lr-token left at their "
                 "defaults are 1)", " / ".join(f"{g['lr']:g}" for g in groups))
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.lr_warmup_steps)
    # schedule-free warms up inside the optimizer; its schedule stays constant
    warmup = 0 if config.optimizer == "schedulefree" else config.lr_warmup_steps
    lr_scheduler = build_scheduler(config.lr_scheduler, optimizer, warmup, config.steps,
                                   config.lr_power, processes)
    return optimizer, lr_scheduler


def setup_trained_token(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    """--train-token: the identifier's embedding rows as a module of their own."""
    if not config.train_token:
        return {}
    words = guess_identifier(config.instance_prompt, config.class_prompt)
    return {"token": setup_token(base.tokenizer, base.text_encoder, words)}


def use_token(accelerator: Accelerator, base: BaseModel, modules: dict[str, torch.nn.Module],
               examples: Examples) -> None:
    """The text encoder looks the identifier up in the trained rows from now
    on; cached embeddings that hold it are dropped (the encoder runs on those
    prompts every step; the class prompt's stay cached when it lacks it)."""
    if "token" not in modules:
        return
    attach(base.text_encoder, modules["token"])
    if "text_encoder" in modules:
        return  # it runs every step already
    token = accelerator.unwrap_model(modules["token"])
    examples.encoders, examples.instance_embedding = [base.text_encoder], None
    if examples.class_ids is not None and holds_tokens(examples.class_ids, token):
        examples.class_embedding = None


