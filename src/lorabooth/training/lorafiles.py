"""The run's LoRA files: their header (what the run was, for every reader
and client) and the layouts --save-format asks for, written for the run's
end and for each --save-every snapshot alike."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import __version__
from ..adapters.pivotal import TRAINED_TOKENS
from ..config import TrainConfig
from ..config.checks import check_tensors
from ..core.fileio import to_json
from ..formats.layouts import KOHYA_DORA_REFUSAL, save_lora
from ..formats.sdxl import FAMILY_KEY, HEADER_FAMILY
from ..photos.identifier import guess_identifier
from .checkpoint import trainable_state

log = logging.getLogger(__name__)


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


def lora_header(config: TrainConfig, family: str, resolution: int,
                modules: dict[str, torch.nn.Module], step: int | None = None) -> dict:
    """The ``lorabooth.*`` fields of the files; ``step``: a snapshot's."""
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
        FAMILY_KEY: HEADER_FAMILY[family],  # "sd" or "sdxl", as it always was
        "lorabooth.resolution": resolution,
        "lorabooth.train_text_encoder": config.train_text_encoder,
        "lorabooth.snr_gamma": config.snr_gamma, "lorabooth.noise_offset": config.noise_offset,
        "lorabooth.caption_dropout": config.caption_dropout,
        "lorabooth.ema_decay": config.ema_decay,
        "lorabooth.adapter": config.adapter,
    }
    meta["lorabooth.train_token"] = config.train_token
    if config.targets != "attn":  # the files of runs without it stay as they were
        meta["lorabooth.targets"] = config.targets
    if config.base_precision != "auto":  # the files of runs without it stay as they were
        meta["lorabooth.base_precision"] = config.base_precision
    if config.masked_loss:
        meta.update({"lorabooth.masked_loss": True,
                     "lorabooth.unmasked_weight": config.unmasked_weight,
                     "lorabooth.masked_prior_weight": config.masked_prior_weight})
    if step is not None:  # a snapshot: the files of finished runs stay as they were
        meta["lorabooth.step"] = step
    if "token" in modules and modules["token"].by_word():
        meta[TRAINED_TOKENS] = modules["token"].ids
        meta["lorabooth.lr_token"] = config.lr_token
    return meta


def write_lora_files(config: TrainConfig, family: str, folder: Path,
                     modules: dict[str, torch.nn.Module], resolution: int,
                     whole: dict[str, dict[str, torch.Tensor]] | None = None,
                     step: int | None = None) -> None:
    """The LoRA files of ``modules`` (from ``whole``: FSDP's gathered shards)
    into ``folder``, checked finite first."""
    meta = lora_header(config, family, resolution, modules, step)
    embeddings = modules["token"].by_word() if "token" in modules else None
    trained = ({f"{name}/{k}": v for name, state in whole.items() for k, v in state.items()}
               if whole else trainable_state(modules))
    check_tensors(trained, f"--output {folder}: the trained LoRA")
    save_lora(folder, modules["unet"], modules.get("text_encoder"),
              {k: to_json(v) for k, v in meta.items()}, save_layouts(config), embeddings,
              modules.get("text_encoder_2"), family=family, states=whole)
