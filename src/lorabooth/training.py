"""DreamBooth LoRA training. Read ``train`` top to bottom for the method; the
``_setup_*`` helpers, checkpointing and validation are kept out of the loop."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from PIL.Image import Image
from tqdm.auto import tqdm

from . import __version__
from .batches import (
    Examples,
    batch_time_ids,
    check_prompt_windows,
    instance_captions,
    instance_images,
    sample_latents,
    setup_examples,
    text_context,
)
from .checkpoint import (
    latest_checkpoint,
    latest_loadable,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from .checks import check_tensors
from .config import TrainConfig
from .data import (
    Shuffler,
    caption_dropout,
    image_files,
)
from .ema import ema_load, ema_shadow, ema_state, ema_update
from .errors import UserError
from .fileio import save_png, to_json, write_text
from .formats.layouts import KOHYA_DORA_REFUSAL, save_lora
from .formats.sdxl import FAMILY_KEY, SD, SDXL
from .identifier import guess_identifier, identifier_warnings
from .lora import add_text_lora, add_unet_lora, freeze_all_but_lora, lora_parameters
from .models import BaseModel, load_base, pipeline_from_parts
from .objective import (
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    offset_noise,
    with_prior_target,
)
from .pivotal import TRAINED_TOKENS, attach, holds_tokens, setup_token
from .precision import cast_frozen, frozen_dtype, tune_allocator, weight_dtype
from .prior import (
    class_image_seed,
    class_images,
    draw_class_images,
    missing_indices,
    model_prior_rows,
    remove_stale_temps,
)
from .ranks import (
    all_rank_streams,
    end_distributed,
    mean_over_ranks,
    rank_streams,
    restore_streams,
)
from .runfiles import check_folders, model_card, run_folder, write_config
from .tracking import accelerator_options, log_record, start_trackers

log = logging.getLogger(__name__)
OnValidation = Callable[[int, list[Image]], None]  # (step, the validation's images)
# the text encoders' optimizer groups in order (after the UNet's), and their metrics keys
TEXT_LR_KEYS = (("text_encoder", "lr_text"), ("text_encoder_2", "lr_text2"))


def train(config: TrainConfig, on_validation: OnValidation | None = None) -> Path:
    """Train a DreamBooth LoRA as ``config`` says; returns the run folder.

    ``on_validation(step, images)`` sees each validation's images (single
    process only): `tune`'s pruner scores them and may raise to stop the run."""
    # bad input fails before any work, and before anything is written
    instance_paths = instance_images(config)
    captions = instance_captions(config, instance_paths)
    check_folders(config)
    tune_allocator()
    accelerator = _setup_accelerator(config)
    set_seed(config.seed)  # python, numpy, torch: the LoRA init draws from torch's global RNG
    with run_folder(config, accelerator.is_main_process) as output, _memory_advice(config):
        if on_validation is not None and accelerator.num_processes > 1:
            raise UserError("a validation callback (tune's pruner) runs in one process only")
        _train(config, accelerator, output, instance_paths, captions, on_validation)
    return output


def _train(config: TrainConfig, accelerator: Accelerator, output: Path,
           instance_paths: list[Path], captions: list[str],
           on_validation: OnValidation | None) -> None:
    # Under mixed precision the frozen weights are stored in the compute dtype
    # (the UNet's 860 M are not re-cast every step); the VAE that caches
    # latents stays fp32.
    dtype = weight_dtype(accelerator.mixed_precision)
    base = load_base(config.model, config.model_config, unet_dtype=dtype)
    if config.train_token and len(base.family.encoders) > 1:
        raise UserError(f"--train-token: trains one text encoder's token rows; {config.model} "
                        f"has {len(base.family.encoders)} text encoders (SDXL), not supported yet")
    for warning in identifier_warnings(base.tokenizer, config.instance_prompt, config.class_prompt):
        log.warning("--instance-prompt: %s", warning)
    check_prompt_windows(config, base.tokenizers, instance_paths, captions)
    resolution = config.resolution or base.native_resolution
    for module in (base.vae, base.unet, *base.text_encoders):
        module.requires_grad_(False)
        module.to(accelerator.device)
    cast_frozen(base.unet, dtype)  # the sources that load fp32

    with accelerator.autocast():
        class_paths = _setup_class_images(config, base, resolution, accelerator)
    examples = setup_examples(config, base, resolution, instance_paths, captions, class_paths)
    if not config.validation_prompt:
        base.vae = None  # latents are cached; nothing else needs the VAE
        if not (config.train_text_encoder or config.train_token):
            for name in base.family.encoders:  # nor the text encoders: prompt embeddings are cached
                setattr(base, name, None)
    token = _setup_token(config, base)  # before the cast: its rows start from the fp32 weights
    modules = _setup_lora(config, base)
    for module in modules.values():
        cast_frozen(module, dtype)  # the text encoder's frozen part too; LoRA stays fp32
    modules.update(token)
    optimizer, lr_scheduler = _setup_optimizer(config, modules)
    modules = {name: accelerator.prepare(m) for name, m in modules.items()}
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    _use_token(accelerator, base, modules, examples)

    seed = config.seed + accelerator.process_index
    noise_rng = torch.Generator().manual_seed(seed)
    instance_order = Shuffler(len(examples.instance_mean), seed)
    class_order = Shuffler(len(class_paths), seed + 1) if class_paths else None
    trained = _unwrapped(accelerator, modules)  # keyed as checkpoints and files save them
    ema = ema_shadow(trained, config.ema_decay)  # None: no EMA
    start = 0
    if config.resume:
        start = _resume(output, trained, optimizer, lr_scheduler, noise_rng,
                        instance_order, class_order, ema, accelerator.process_index)
    if accelerator.is_main_process:
        write_config(output, config)  # only now: a run that fails to start leaves none behind
    metrics = _open_metrics(output, start, accelerator.is_main_process)
    start_trackers(accelerator, config, output, start)  # --report-to

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               desc="train", mininterval=1.0, disable=not accelerator.is_main_process)
    for step in bar:
        tick = time.perf_counter()
        # One batch: the subject's examples first, then as many class examples.
        idx = instance_order.take(config.batch_size)
        cidx = class_order.take(config.batch_size) if class_order else []
        latents = sample_latents(examples, idx, cidx, noise_rng)
        noise = torch.randn(latents.shape, generator=noise_rng)
        timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=noise_rng)
        noise = offset_noise(noise, config.noise_offset, noise_rng)
        dropped = caption_dropout(len(idx), config.caption_dropout, noise_rng)
        with accelerator.autocast():
            frozen = None  # --prior-preservation model: rows whose target is the base model's
            if config.prior_model:
                latents, noise, timesteps, frozen = model_prior_rows(
                    accelerator.unwrap_model(modules["unet"]), base.noise_scheduler, latents,
                    noise, timesteps, _class_inputs(base, examples, idx, accelerator.device),
                    noise_rng)
            context = text_context(examples, modules, idx, len(latents) - len(idx),
                                    accelerator.device, dropped)
            context = context.with_time_ids(batch_time_ids(examples, idx, cidx, config.prior_model))
            loss, loss_instance, loss_prior = step_loss(
                modules["unet"], base.noise_scheduler, latents, noise, timesteps,
                base.family.unet_inputs(context), len(idx), config.prior_loss_weight, frozen,
                config.snr_gamma)
        if not torch.isfinite(loss):
            raise _numerical_fault(config, output, step + 1, f"the loss is {loss.item()}")
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(
                [p for m in modules.values() for p in lora_parameters(m)], config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, trained, config.ema_decay)
        if not all(torch.isfinite(p).all() for m in modules.values() for p in lora_parameters(m)):
            raise _numerical_fault(config, output, step + 1, "the LoRA weights hold NaN or inf")

        record = {"step": step + 1, **mean_over_ranks(accelerator, {
                      "loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior}),
                  "lr": lr_scheduler.get_last_lr()[0],
                  "s_per_step": round(time.perf_counter() - tick, 4)}
        for group, (name, key) in enumerate(TEXT_LR_KEYS, start=1):  # as _setup_optimizer
            if name in modules:
                record[key] = lr_scheduler.get_last_lr()[group]
        if metrics:
            metrics.write(to_json(record) + "\n")
            metrics.flush()
        log_record(accelerator, record)
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                         for k, v in record.items() if k != "step" and v is not None},
                        refresh=False)

        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            accelerator.wait_for_everyone()
            own = rank_streams(noise_rng, instance_order, class_order)
            ranks = all_rank_streams(accelerator, own)  # each process resumes its own streams
            if accelerator.is_main_process:
                path = save_checkpoint(output, done, _unwrapped(accelerator, modules), {
                    "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    **own, "ranks": ranks, "ema": ema_state(ema)})
                log.debug("checkpoint %s", path)
        if (config.validation_prompt and config.validation_every and done < config.steps
                and done % config.validation_every == 0 and accelerator.is_main_process):
            images = _validate(config, base, output, done)
            if on_validation is not None:
                on_validation(done, images)
    bar.close()
    if metrics:
        metrics.close()

    accelerator.wait_for_everyone()
    if ema is not None:  # the file (and the last sample) hold the average, not the last step
        load_trainable_state(trained, ema)
    if accelerator.is_main_process:
        _finish(config, base, output, _unwrapped(accelerator, modules), resolution)
    end_distributed(accelerator, modules)


def step_loss(unet: torch.nn.Module, scheduler, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, inputs: dict, n_instance: int,
              prior_weight: float, prior_target: torch.Tensor | None = None,
              snr_gamma: float = 0.0):
    """The DreamBooth loss of one batch (instance rows first): noise the
    latents at ``timesteps``, predict with the UNet's conditioning ``inputs``
    (the family's ``unet_inputs``), compare with the scheduler's target;
    ``prior_target`` (the frozen model's prediction) replaces it for the
    class rows when given; ``snr_gamma`` > 0 weighs the rows by min-SNR-gamma
    (by each row's timestep, the model-prior rows too)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    target = diffusion_target(noise, latents, timesteps, scheduler.alphas_cumprod, prediction_type)
    if prior_target is not None:
        target = with_prior_target(target.to(prior_target.device), n_instance, prior_target)
    weights = (min_snr_weights(timesteps, scheduler.alphas_cumprod, snr_gamma, prediction_type)
               if snr_gamma else None)
    device = inputs["encoder_hidden_states"].device
    pred = unet(noisy.to(device), timesteps.to(device), **inputs).sample
    return dreambooth_loss(pred, target.to(device), n_instance, prior_weight, weights)


def save_layouts(config: TrainConfig) -> tuple[str, ...]:
    """The file layouts --save-format asks for; a DoRA run has no kohya file
    (config refuses --save-format kohya; `both` writes the diffusers one)."""
    layouts = {"both": ("diffusers", "kohya")}.get(config.save_format, (config.save_format,))
    if config.adapter == "dora" and "kohya" in layouts:
        log.warning("--adapter dora: writing the diffusers file only (diffusers and peft apply "
                    "its magnitudes; ComfyUI reads them only as kohya dora_scale); %s",
                    KOHYA_DORA_REFUSAL)
        layouts = tuple(x for x in layouts if x != "kohya")
    return layouts


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


def _setup_accelerator(config: TrainConfig) -> Accelerator:
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
    return Accelerator(mixed_precision=precision, cpu=on_cpu,
                       **accelerator_options(config.report_to, config.output))


def _setup_class_images(config: TrainConfig, base: BaseModel, resolution: int,
                        accelerator: Accelerator) -> list[Path]:
    if config.prior_model and config.class_dir:
        log.warning("--class-dir: not used with --prior-preservation model (no class images)")
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


def _class_inputs(base: BaseModel, examples: Examples, idx: list[int],
                  device: torch.device) -> dict:
    """--prior-preservation model: the UNet's inputs for the prior rows, the
    frozen class prompt over the instance images' time ids."""
    context = examples.class_embedding.to(device).expand(len(idx))
    return base.family.unet_inputs(context.with_time_ids(examples.instance_time_ids[idx]))


def _setup_lora(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    dora = config.adapter == "dora"
    add_unet_lora(base.unet, config.rank, config.lora_alpha, dora)
    freeze_all_but_lora(base.unet)
    modules = {"unet": base.unet}
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    for name in base.family.encoders if config.train_text_encoder else ():
        encoder = getattr(base, name)
        add_text_lora(encoder, config.rank, config.lora_alpha, dora)
        freeze_all_but_lora(encoder)
        if config.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        modules[name] = encoder
    for module in modules.values():
        module.train()
    return modules


def _setup_optimizer(config: TrainConfig, modules: dict[str, torch.nn.Module]):
    groups = [{"params": lora_parameters(modules["unet"]), "lr": config.lr}]
    for name, _ in TEXT_LR_KEYS:
        if name in modules:
            groups.append({"params": lora_parameters(modules[name]), "lr": config.text_lr(name)})
    if "token" in modules:
        # no weight decay: it would pull the rows towards zero, not towards
        # where they started
        groups.append({"params": [modules["token"].vectors], "lr": config.lr_token,
                       "weight_decay": 0.0})
    # foreach: one fused kernel per group instead of a loop over 256 small tensors
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                  foreach=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant
    return optimizer, lr_scheduler


def _setup_token(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    """--train-token: the identifier's embedding rows as a module of their own."""
    if not config.train_token:
        return {}
    words = guess_identifier(config.instance_prompt, config.class_prompt)
    return {"token": setup_token(base.tokenizer, base.text_encoder, words)}


def _use_token(accelerator: Accelerator, base: BaseModel, modules: dict[str, torch.nn.Module],
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


def _unwrapped(accelerator: Accelerator, modules: dict[str, torch.nn.Module]):
    return {name: accelerator.unwrap_model(m) for name, m in modules.items()}


def _resume(output: Path, modules, optimizer, lr_scheduler, noise_rng: torch.Generator,
            instance_order: Shuffler, class_order: Shuffler | None,
            ema: dict[str, torch.Tensor] | None, rank: int = 0) -> int:
    found = latest_loadable(output, modules)
    if found is None:
        if any((output / "checkpoints").glob("*")):  # a first run has none: nothing to say
            log.warning("--resume: no checkpoint in %s loads; starting at step 0",
                        output / "checkpoints")
        return 0
    path, tensors, state = found
    load_trainable_state(modules, tensors)
    if ema is not None:  # a checkpoint written without EMA (--force) starts it from its weights
        ema_load(ema, state.get("ema") or tensors)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if not restore_streams(state, rank, noise_rng, instance_order, class_order):
        log.warning("--resume: %s was written by fewer processes; process %d starts its "
                    "random streams afresh", path, rank)
    log.info("resuming from %s (step %d)", path, state["step"])
    return int(state["step"])


def _open_metrics(output: Path, start: int, main: bool):
    """metrics.jsonl, keeping only the lines up to the step we resume from."""
    if not main:
        return None
    path = output / "metrics.jsonl"
    kept = []
    if start and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start]
    write_text(path, "".join(line + "\n" for line in kept))
    return path.open("a", encoding="utf-8")


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
        images = pipe(config.validation_prompt, num_inference_steps=25,
                      num_images_per_prompt=config.validation_images,
                      generator=torch.Generator().manual_seed(config.seed)).images
    base.unet.train(was_training)
    for k, image in enumerate(images):
        save_png(image, output / "samples" / (f"step-{step:06d}" + (f"-{k}" if k else "") + ".png"))
    return images


def _finish(config: TrainConfig, base: BaseModel, output: Path,
            modules: dict[str, torch.nn.Module], resolution: int) -> None:
    meta = {
        "lorabooth.version": __version__, "lorabooth.base_model": config.model,
        "lorabooth.model_config": config.model_config,
        "lorabooth.rank": config.rank, "lorabooth.alpha": config.lora_alpha,
        "lorabooth.instance_prompt": config.instance_prompt,
        "lorabooth.class_prompt": config.class_prompt,
        "lorabooth.identifier": " ".join(guess_identifier(config.instance_prompt,
                                                          config.class_prompt)),
        "lorabooth.prior_preservation": config.prior_preservation,
        "lorabooth.steps": config.steps, "lorabooth.lr": config.lr,
        "lorabooth.lr_text": config.lr_text, "lorabooth.seed": config.seed,
        "lorabooth.lr_text2": config.text_lr("text_encoder_2"),
        FAMILY_KEY: SDXL if base.family.name == "sdxl" else SD,  # the formats' names
        "lorabooth.resolution": resolution,
        "lorabooth.train_text_encoder": config.train_text_encoder,
        "lorabooth.snr_gamma": config.snr_gamma, "lorabooth.noise_offset": config.noise_offset,
        "lorabooth.caption_dropout": config.caption_dropout,
        "lorabooth.ema_decay": config.ema_decay,
        "lorabooth.adapter": config.adapter,
    }
    meta["lorabooth.train_token"] = config.train_token
    embeddings = modules["token"].by_word() if "token" in modules else None
    if embeddings:
        meta[TRAINED_TOKENS] = modules["token"].ids
        meta["lorabooth.lr_token"] = config.lr_token
    # the loop checks every step; a resume at its last step trains none
    check_tensors(trainable_state(modules), f"--output {output}: the trained LoRA")
    save_lora(output, modules["unet"], modules.get("text_encoder"),
              {k: to_json(v) for k, v in meta.items()}, save_layouts(config), embeddings,
              modules.get("text_encoder_2"), family=meta[FAMILY_KEY])
    if config.validation_prompt:
        _validate(config, base, output, config.steps)
    write_text(output / "README.md", model_card(config, resolution, base.family.pipeline_name))
