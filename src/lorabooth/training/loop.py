"""DreamBooth LoRA training. Read ``_train``'s loop top to bottom for the
method: one line or one call per idea. Setup (``_setup_run``, with the builders
in ``trainsetup``), the batch, the loss, logging, checkpointing and validation
are functions of their own, kept out of the loop."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL.Image import Image
from tqdm.auto import tqdm

from ..adapters.lora import lora_parameters
from ..config import TrainConfig
from ..core.errors import UserError
from ..core.fileio import save_png, to_json, write_text
from ..models.families import Conditioning
from ..models.loading import BaseModel, load_base, pipeline_from_parts
from ..models.offload import BlockSwap, swap_blocks
from ..models.precision import cast_frozen, frozen_dtype, tune_allocator, weight_dtype
from ..models.quantise import quantise_base
from ..photos.identifier import identifier_warnings
from .batches import (
    Examples,
    batch_time_ids,
    check_prompt_windows,
    class_context,
    instance_captions,
    instance_images,
    sample_latents,
    setup_examples,
    text_context,
)
from .bucketing import bucket_denoisers, bucket_summary, instance_buckets
from .checkpoint import (
    latest_checkpoint,
    load_trainable_state,
    save_checkpoint,
)
from .data import BucketOrder, Shuffler, caption_dropout
from .ema import ema_applied, ema_shadow, ema_state, ema_update
from .lorafiles import write_lora_files
from .masks import MaskedLoss
from .noising import Denoiser
from .objective import offset_noise
from .optimizers import eval_mode, eval_weights, prodigy_step_size, train_mode
from .prior import model_prior_rows
from .processes import (
    all_rank_streams,
    end_distributed,
    mean_over_ranks,
    rank_streams,
)
from .resume import resume
from .runfiles import (
    check_folders,
    model_card,
    run_folder,
    run_settings,
    start_run,
)
from .setup import (
    TEXT_LR_KEYS,
    check_family_options,
    setup_accelerator,
    setup_class_images,
    setup_lora,
    setup_optimizer,
    setup_trained_token,
    use_token,
)
from .sharding import check_sharded, full_trainable, is_sharded, prepare, shard_on_cpu
from .snapshots import due, snapshot_dir
from .steploss import step_loss
from .tracking import log_record, start_trackers

log = logging.getLogger(__name__)
OnValidation = Callable[[int, list[Image]], None]  # (step, the validation's images)


def train(config: TrainConfig, on_validation: OnValidation | None = None) -> Path:
    """Train a DreamBooth LoRA as ``config`` says; returns the run folder.

    ``on_validation(step, images)`` sees each validation's images (single
    process only): `tune`'s pruner scores them and may raise to stop the run."""
    # bad input fails before any work, and before anything is written
    instance_paths = instance_images(config)
    captions = instance_captions(config, instance_paths)
    check_folders(config)
    tune_allocator()
    accelerator = setup_accelerator(config)
    shard_on_cpu(accelerator)  # an FSDP launch on a CPU-only machine
    check_sharded(config, accelerator)
    set_seed(config.seed)  # python, numpy, torch: the LoRA init draws from torch's global RNG
    with run_folder(config, accelerator.is_main_process) as output, _memory_advice(config):
        if on_validation is not None and accelerator.num_processes > 1:
            raise UserError("a validation callback (tune's pruner) runs in one process only")
        _train(config, accelerator, output, instance_paths, captions, on_validation)
    return output


@dataclass
class _Run:
    """What the loop works on, built once by ``_setup_run``."""
    config: TrainConfig
    accelerator: Accelerator
    output: Path
    base: BaseModel
    resolution: int
    examples: Examples
    modules: dict[str, torch.nn.Module]  # as accelerate prepared them (DDP-wrapped when several)
    trained: dict[str, torch.nn.Module]  # unwrapped, keyed as checkpoints and files save them
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    # bucket -> the UNet/transformer under the family's forward process (one without --buckets)
    denoisers: dict[tuple[int, int], Denoiser]
    noise_rng: torch.Generator  # every draw of the loop, in the order a resume replays
    instance_order: BucketOrder  # every batch from one bucket
    class_order: Shuffler | None  # None: no class images
    ema: dict[str, torch.Tensor] | None  # the fp32 average; None: no EMA
    start: int  # the step resumed from; 0 for a fresh run
    metrics: TextIO | None  # metrics.jsonl, main process only


@dataclass
class _Batch:
    idx: list[int]  # the subject's examples
    cidx: list[int]  # the class examples; [] without class images
    denoiser: Denoiser  # the batch's bucket's
    latents: torch.Tensor  # (instance + class rows, C, h, w)
    noise: torch.Tensor  # as latents
    timesteps: torch.Tensor  # (rows,)
    dropped: torch.Tensor  # (instance rows,) True: that caption is dropped this step


def _train(config: TrainConfig, accelerator: Accelerator, output: Path,
           instance_paths: list[Path], captions: list[str],
           on_validation: OnValidation | None) -> None:
    run = _setup_run(config, accelerator, output, instance_paths, captions)
    bar = tqdm(range(run.start, config.steps), initial=run.start, total=config.steps,
               desc="train", mininterval=1.0, disable=not accelerator.is_main_process)
    for step in bar:
        tick, lrs = time.perf_counter(), run.lr_scheduler.get_last_lr()  # this step's rates
        # --gradient-accumulation batches (the subject's examples first, then as many class
        # examples), each: its DreamBooth loss and backward; the last one clips and steps
        losses = _mean_losses([_accumulate(run, step) for _ in range(config.gradient_accumulation)])
        if run.ema is not None:  # the average the file will hold
            ema_update(run.ema, run.trained, config.ema_decay, step)
        if not all(torch.isfinite(p).all() for p in _lora_parameters(run.modules)):
            raise _numerical_fault(config, output, step + 1, "the LoRA weights hold NaN or inf")
        # metrics.jsonl, --report-to trackers and the progress bar
        _log_step(run, bar, step, losses, lrs, tick)
        # every --checkpoint-every steps: the weights, optimizer and every random stream
        _maybe_checkpoint(run, step + 1)
        # every --save-every steps: the step's LoRA files, for evaluate --snapshots
        _maybe_snapshot(run, step + 1)
        # every --validation-every steps: sample the validation prompt (tune's pruner sees it)
        _maybe_validate(run, step + 1, on_validation)
    bar.close()
    if run.metrics:
        run.metrics.close()

    accelerator.wait_for_everyone()
    eval_mode(run.optimizer)  # --optimizer schedulefree: the file holds its averaged weights
    if run.ema is not None:  # the file (and the last sample) hold the average, not the last step
        load_trainable_state(run.trained, run.ema)
    # FSDP: every process gathers the LoRA's shards, the main process writes it
    whole = full_trainable(run.trained) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        _finish(config, run.base, output, _unwrapped(accelerator, run.modules), run.resolution,
                whole, bucket_summary(run.examples.instance_bucket) if config.buckets else "")
    end_distributed(accelerator, run.modules)


def _setup_run(config: TrainConfig, accelerator: Accelerator, output: Path,
               instance_paths: list[Path], captions: list[str]) -> _Run:
    """The model, its LoRA, the optimizer, the cached examples and the random
    streams, resumed from the last checkpoint under --resume."""
    # Under mixed precision the frozen weights are stored in the compute dtype
    # (the UNet's 860 M are not re-cast every step); the VAE that caches
    # latents stays fp32.
    dtype = weight_dtype(accelerator.mixed_precision)
    base = load_base(config.model, config.model_config, unet_dtype=dtype,
                     precision=config.base_precision)  # a folder's quantised as it streams in
    check_family_options(config, base)
    for warning in identifier_warnings(base.tokenizers, config.instance_prompt, config.class_prompt):
        log.warning("--instance-prompt: %s", warning)
    check_prompt_windows(config, base.tokenizers, instance_paths, captions)
    resolution = config.resolution or base.native_resolution
    for module in (base.vae, base.unet, *base.text_encoders):
        module.requires_grad_(False)
    _block_swap(config, base, accelerator, dtype)  # before the move: those stay on the host
    # under FSDP the denoiser stays in host memory: accelerate moves each shard to the device
    for module in (base.vae, *base.text_encoders, *([] if is_sharded(accelerator) else [base.unet])):
        module.to(accelerator.device)
    cast_frozen(base.unet, dtype)  # the sources that load fp32
    quantise_base(base, config.base_precision, dtype, ("unet",))  # and those built whole

    with accelerator.autocast():
        class_paths = setup_class_images(config, base, resolution, accelerator)
    examples = setup_examples(config, base, resolution, instance_paths, captions, class_paths,
                              instance_buckets(config, instance_paths, resolution))
    if not config.validation_prompt:
        base.vae = None  # latents are cached; nothing else needs the VAE
        if not (config.train_text_encoder or config.train_token):
            for name in base.family.encoders:  # nor the text encoders: prompt embeddings are cached
                setattr(base, name, None)
    token = setup_trained_token(config, base)  # before the cast: its rows start from the fp32 weights
    # the encoders that stay loaded, once their embeddings are cached; before peft wraps them
    quantise_base(base, config.base_precision, dtype, base.family.encoders)
    modules = setup_lora(config, base)
    for module in modules.values():
        cast_frozen(module, dtype)  # the text encoder's frozen part too; LoRA stays fp32
    modules.update(token)
    optimizer, lr_scheduler = setup_optimizer(config, modules, accelerator.num_processes)
    modules, optimizer, lr_scheduler = prepare(accelerator, modules, optimizer, lr_scheduler)
    use_token(accelerator, base, modules, examples)
    if config.train_text_encoder:  # the family's encoders that run frozen beside the trained
        examples.frozen_encoders = {name: getattr(base, name) for name in base.family.encoders
                                    if name not in modules}

    seed = config.seed + accelerator.process_index
    noise_rng = torch.Generator().manual_seed(seed)
    instance_order = BucketOrder(examples.instance_bucket, config.batch_size, seed)
    class_order = Shuffler(len(class_paths), seed + 1) if class_paths else None
    trained = _unwrapped(accelerator, modules)
    ema = ema_shadow(trained, config.ema_decay)
    start = 0
    if config.resume:
        start = resume(config, output, trained, optimizer, lr_scheduler, noise_rng,
                       instance_order, class_order, ema, accelerator.process_index)
    train_mode(optimizer)  # --optimizer schedulefree: its weights at the point it trains
    # only now: a run that fails to start leaves the folder as it was
    metrics = start_run(output, config, start) if accelerator.is_main_process else None
    start_trackers(accelerator, config, output, start)  # --report-to
    return _Run(config, accelerator, output, base, resolution, examples, modules, trained,
                optimizer, lr_scheduler, bucket_denoisers(config, base, examples, modules["unet"]),
                noise_rng, instance_order, class_order, ema, start, metrics)


def _block_swap(config: TrainConfig, base: BaseModel, accelerator: Accelerator,
                dtype: torch.dtype) -> BlockSwap | None:
    """--blocks-to-swap: the denoiser's last blocks parked in host memory,
    in the compute dtype (cast first, so what streams in is what runs)."""
    if not config.blocks_to_swap:
        return None
    if accelerator.num_processes > 1:
        raise UserError("--blocks-to-swap: one process only (with several, each would hold "
                        "its own host copy and DDP would broadcast the parked weights)")
    cast_frozen(base.unet, dtype)
    swap = swap_blocks(base.unet, config.blocks_to_swap, accelerator.device)
    log.info("--blocks-to-swap %d: %.1f MB of frozen weights in CPU memory", config.blocks_to_swap,
             swap.frozen_host_bytes() / 1e6)
    return swap


def _next_batch(run: _Run) -> _Batch:
    """The step's examples and every random draw it makes, from
    ``run.noise_rng`` in a fixed order (a resumed run replays it)."""
    config, rng = run.config, run.noise_rng
    idx = run.instance_order.take(config.batch_size)
    cidx = run.class_order.take(config.batch_size) if run.class_order else []
    denoiser = run.denoisers[run.examples.instance_bucket[idx[0]]]
    latents = sample_latents(run.examples, idx, cidx, rng)
    noise = torch.randn(latents.shape, generator=rng)
    timesteps = denoiser.noising.draw(latents.shape[0], rng)
    noise = offset_noise(noise, config.noise_offset, rng)
    dropped = caption_dropout(len(idx), config.caption_dropout, rng)
    return _Batch(idx, cidx, denoiser, latents, noise, timesteps, dropped)


def _batch_loss(run: _Run, batch: _Batch):
    """(loss, instance part, prior part) of one batch: the rows' conditioning,
    then ``step_loss``; --prior-preservation model first appends rows whose
    target is the frozen model's prediction (drawing from ``run.noise_rng``)."""
    config, accelerator, examples = run.config, run.accelerator, run.examples
    idx, latents, noise, timesteps = batch.idx, batch.latents, batch.noise, batch.timesteps
    with accelerator.autocast():
        frozen = None  # --prior-preservation model: rows whose target is the base model's
        if config.prior_model:
            latents, noise, timesteps, frozen = model_prior_rows(
                batch.denoiser.over(accelerator.unwrap_model(run.modules["unet"])), latents,
                noise, timesteps, _class_context(examples, idx, accelerator.device),
                run.noise_rng, same_noise=config.prior_same_noise)
        context = text_context(examples, run.modules, idx, len(latents) - len(idx),
                               accelerator.device, batch.dropped)
        context = context.with_time_ids(batch_time_ids(examples, idx, batch.cidx,
                                                       config.prior_model))
        return step_loss(batch.denoiser, latents, noise, timesteps, context, len(idx),
                         config.prior_loss_weight, frozen, config.snr_gamma,
                         _masked(run, batch))


def _masked(run: _Run, batch: _Batch) -> MaskedLoss | None:
    """The batch's --masked-loss (None without it)."""
    config, masks = run.config, run.examples.instance_masks
    if masks is None:
        return None
    teacher = batch.denoiser.over(run.accelerator.unwrap_model(run.modules["unet"]))
    return MaskedLoss(torch.stack([masks[i] for i in batch.idx]), config.unmasked_weight,
                      config.masked_prior_weight, teacher)


def _accumulate(run: _Run, step: int) -> dict[str, torch.Tensor | None]:
    """One batch's loss and backward under accelerate's accumulation: its
    draws, then the optimizer step on the --gradient-accumulation-th batch."""
    with run.accelerator.accumulate(*run.modules.values()):
        # one batch: the subject's examples first, then as many class examples
        batch = _next_batch(run)
        # the DreamBooth loss (with the frozen model's targets under --prior-preservation model)
        loss, loss_instance, loss_prior = _batch_loss(run, batch)
        if not torch.isfinite(loss):  # stop before a NaN reaches the weights
            raise _numerical_fault(run.config, run.output, step + 1,
                                   f"the loss is {loss.item()}")
        _optimizer_step(run, loss)
    return {"loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior}


def _mean_losses(parts: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """Each loss's mean over the step's accumulated batches (of one: itself)."""
    return {k: None if parts[0][k] is None else torch.stack([p[k] for p in parts]).mean()
            for k in parts[0]}


def _optimizer_step(run: _Run, loss: torch.Tensor) -> None:
    """Backward; on the batch that ends an accumulation (every batch without
    one): clip the summed gradient, step, schedule, zero."""
    run.accelerator.backward(loss)
    if not run.accelerator.sync_gradients:
        return
    if run.config.max_grad_norm:
        run.accelerator.clip_grad_norm_(_lora_parameters(run.modules), run.config.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _lora_parameters(modules: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for m in modules.values() for p in lora_parameters(m)]


def _log_step(run: _Run, bar: tqdm, step: int, losses: dict[str, torch.Tensor | None],
              lrs: list[float], tick: float) -> None:
    """One metrics.jsonl line (the losses averaged over the processes, the
    learning rates the step used), the same record to the --report-to
    trackers, and the progress bar's postfix."""
    record = {"step": step + 1, **mean_over_ranks(run.accelerator, losses), "lr": lrs[0],
              "s_per_step": round(time.perf_counter() - tick, 4)}
    for group, (name, key) in enumerate(TEXT_LR_KEYS, start=1):  # as setup_optimizer
        if name in run.modules:
            record[key] = lrs[group]
    if (d := prodigy_step_size(run.optimizer)) is not None:
        record["prodigy_d"] = d  # the step size it applies is d x lr
    if run.metrics:
        run.metrics.write(to_json(record) + "\n")
        run.metrics.flush()
    log_record(run.accelerator, record)
    bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                     for k, v in record.items() if k != "step" and v is not None}, refresh=False)


def _maybe_checkpoint(run: _Run, done: int) -> None:
    """Every --checkpoint-every steps but the last: the weights, optimizer,
    scheduler, EMA and every process's random streams (``resume`` reads them)."""
    config, accelerator = run.config, run.accelerator
    if not (config.checkpoint_every and done % config.checkpoint_every == 0
            and done < config.steps):
        return
    accelerator.wait_for_everyone()
    own = rank_streams(run.noise_rng, run.instance_order, run.class_order)
    ranks = all_rank_streams(accelerator, own)  # each process resumes its own streams
    if accelerator.is_main_process:
        path = save_checkpoint(run.output, done, _unwrapped(accelerator, run.modules), {
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            **own, "ranks": ranks, "ema": ema_state(run.ema)}, run_settings(config))
        log.debug("checkpoint %s", path)


def _maybe_snapshot(run: _Run, done: int) -> None:
    """Every --save-every steps but the last (whose files are the run's own):
    the LoRA files as the run would write them now (the EMA average under
    --ema-decay, schedule-free's averaged weights), in OUTPUT/snapshots/
    step-N/; main process only."""
    if not (due(done, run.config.save_every, run.config.steps)
            and run.accelerator.is_main_process):
        return
    with ema_applied(run.ema, run.trained), eval_weights(run.optimizer,
                                                         _lora_parameters(run.modules)):
        write_lora_files(run.config, run.base.family.name, snapshot_dir(run.output, done),
                         _unwrapped(run.accelerator, run.modules), run.resolution, step=done)


def _maybe_validate(run: _Run, done: int, on_validation: OnValidation | None) -> None:
    """Every --validation-every steps but the last (``_finish`` draws that one),
    main process only: the EMA weights' samples, seen by ``on_validation``."""
    config = run.config
    if not (config.validation_prompt and config.validation_every and done < config.steps
            and done % config.validation_every == 0 and run.accelerator.is_main_process):
        return
    # what the run would save now: the EMA, or schedule-free's averaged weights
    with ema_applied(run.ema, run.trained), eval_weights(run.optimizer,
                                                         _lora_parameters(run.modules)):
        images = _validate(config, run.base, run.output, done)
    if on_validation is not None:
        on_validation(done, images)


def _numerical_fault(config: TrainConfig, output: Path, step: int, what: str) -> UserError:
    good = latest_checkpoint(output)
    keep = (f"the last good checkpoint is {good} (--resume continues from it)" if good
            else "no checkpoint was written (--checkpoint-every keeps one)")
    hint = " or --mixed-precision bf16 instead of fp16" if config.mixed_precision == "fp16" else ""
    return UserError(f"step {step}: {what}; training stopped. Lower --lr (now {config.lr:g}) "
                     f"or --lr-text (now {config.lr_text:g}){hint}; {keep}")


@contextmanager
def _memory_advice(config: TrainConfig) -> Iterator[None]:
    """Out of memory, on the GPU or the CPU, becomes one line of what to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not is_cpu_oom(e):
            raise
        raise UserError(
            f"out of memory; lower --batch-size (now {config.batch_size}) or --resolution "
            f"(now {config.resolution or 'the model default'}), use --mixed-precision bf16, "
            f"or fewer --class-draw-batch images (now {config.class_draw_batch})") from None


# What torch's CPU allocator says when an allocation fails: a plain
# RuntimeError there, not torch.OutOfMemoryError as on the GPU.
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")


def is_cpu_oom(error: RuntimeError) -> bool:
    return any(text in str(error) for text in CPU_OOM)


def _class_context(examples: Examples, idx: list[int], device: torch.device) -> Conditioning:
    """--prior-preservation model: the prior rows' conditioning, the frozen
    class prompt over the instance images' time ids."""
    context = class_context(examples, idx, len(idx), device)
    return context.with_time_ids(examples.instance_time_ids[idx])


def _unwrapped(accelerator: Accelerator, modules: dict[str, torch.nn.Module]):
    return {name: accelerator.unwrap_model(m) for name, m in modules.items()}


@torch.no_grad()
def _validate(config: TrainConfig, base: BaseModel, output: Path, step: int) -> list[Image]:
    """Draws the validation prompt ``config.validation_images`` times from one
    generator: the first image starts from the same noise whatever the count
    (batched arithmetic may still move a pixel by one level)."""
    pipe = pipeline_from_parts(base)
    pipe.set_progress_bar_config(disable=True)
    was_training = base.unet.training
    base.unet.eval()
    dtype = frozen_dtype(base.unet)  # bf16 weights under mixed precision
    with torch.autocast(base.unet.device.type, dtype=dtype, enabled=dtype != torch.float32):
        side = base.native_resolution  # SD's pipeline default; FLUX's would be its own 1024
        images = pipe(prompt=config.validation_prompt, **base.family.draw_options(pipe),
                      num_inference_steps=25, height=side,
                      width=side,
                      num_images_per_prompt=config.validation_images,
                      generator=torch.Generator().manual_seed(config.seed)).images
    base.unet.train(was_training)
    for k, image in enumerate(images):
        save_png(image, output / "samples" / (f"step-{step:06d}" + (f"-{k}" if k else "") + ".png"))
    return images


def _finish(config: TrainConfig, base: BaseModel, output: Path,
            modules: dict[str, torch.nn.Module], resolution: int,
            whole: dict[str, dict[str, torch.Tensor]] | None = None, buckets: str = "") -> None:
    """The LoRA files (from ``whole``: FSDP's gathered shards), last sample, model
    card (``buckets``: the sizes --buckets trained at, in words)."""
    write_lora_files(config, base.family.name, output, modules, resolution, whole)
    if config.validation_prompt:
        _validate(config, base, output, config.steps)
    write_text(output / "README.md", model_card(config, resolution, base.family.pipeline_name,
                                                buckets))
