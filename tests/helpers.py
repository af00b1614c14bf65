"""Plain helpers the tests share (fixtures live in conftest.py)."""

import json
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw

# The first three losses of the seeded tiny run (tiny model, 64 px, seed 0):
# test_train pins them for the plain loop, test_speed for the fast step.
PINNED_FIRST_LOSSES = [1.10967, 1.09367, 1.06258]


def tune_argv(photos, out, judges, prompts, *extra, steps="1", sample_steps="1") -> list[str]:
    """`tune` as the tune tests run it: the tiny model at 32 px, one class
    image, two images per prompt and the tiny ``judges`` (dino, clip)."""
    dino, clip = judges
    return ["tune", str(photos), "--class-noun", "dog", "--out", str(out), "--steps", steps,
            "--resolution", "32", "--num-class-images", "1", "--prompts", prompts,
            "--images-per-prompt", "2", "--pres-images", "2", "--sample-steps", sample_steps,
            "--dino", dino, "--clip", clip, *extra]


def make_photos(folder: Path, n: int = 3, size: tuple[int, int] = (80, 72)) -> Path:
    """Small distinct pictures standing in for a user's subject photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (40 + 60 * i, 130, 200 - 50 * i))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 8, 60, 60), fill=(220, 60 + 30 * i, 40))
        im.save(folder / f"photo_{i}.png")
    return folder


def strict_loads(text: str):
    """json.loads that, like JavaScript's JSON.parse, refuses NaN and Infinity."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def tiny_outputs(pipe):
    """A tiny pipeline's UNet prediction and text-encoder output for fixed
    inputs: two pipelines whose weights agree give the same pair."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), ctx).sample, pipe.text_encoder(ids)[0]


# Headless Chromium as the report tests run it; the timeouts are hang
# guards, not speed limits.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--virtual-time-budget=5000"]


def chromium_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it and ran its scripts."""
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=600).stdout


def tiny_sdxl_pipeline(seed: int = 0):
    """The package's built-in tiny SDXL (`lorabooth.models.sdxl_architecture.build_tiny_sdxl`:
    small random weights, offline; its two text encoders differ in width on
    purpose, as diffusers' single-file reader tells CLIP-L from OpenCLIP-G's
    slot by width) as a StableDiffusionXLPipeline."""
    from diffusers import EulerDiscreteScheduler

    from lorabooth.models.sdxl_architecture import build_tiny_sdxl

    base = build_tiny_sdxl(seed)
    parts = {name: getattr(base, name) for name in
             ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)
    return base.family.pipeline(parts, scheduler)


def sdxl_lora_layers(pipe, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> dict:
    """A trained-looking LoRA on ``pipe`` (attention of the UNet and both text
    encoders, random non-zero B matrices) as peft state dicts per part."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from lorabooth.adapters.lora import TEXT_TARGETS, UNET_TARGETS

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS),
                          ("text_encoder_2", TEXT_TARGETS)):
        module = getattr(pipe, part)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha,
                                           target_modules=list(targets)), module)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        layers[part] = get_peft_model_state_dict(module)
    return layers


def make_sdxl_lora(folder: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """An SDXL LoRA file as diffusers itself saves one
    (`StableDiffusionXLPipeline.save_lora_weights`: keys `unet.…`,
    `text_encoder.…`, `text_encoder_2.…`), with rank and alpha in its header."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    from lorabooth.adapters.lora import TEXT_TARGETS, UNET_TARGETS
    from lorabooth.formats import WEIGHT_NAME

    layers = sdxl_lora_layers(tiny_sdxl_pipeline(), rank, alpha, seed)
    meta = {part: LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()
            for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS),
                                  ("text_encoder_2", TEXT_TARGETS))}
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"])
    return Path(folder) / WEIGHT_NAME


def tiny_sdxl_outputs(pipe):
    """The tiny SDXL pipeline's UNet prediction and both encoders' outputs
    for fixed inputs: two pipelines whose weights agree give the same three."""
    import torch

    g = torch.Generator().manual_seed(0)
    width, pooled = pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, width, generator=g)
    extra = {"text_embeds": torch.randn(1, pooled, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return (pipe.unet(x, torch.tensor([400]), ctx, added_cond_kwargs=extra).sample,
                pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0])
