"""Drawing with a trained LoRA: UNet scale, text-encoder scale and guidance
set separately; every combination drawn with the same seeds; a labelled grid."""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .adapters.lora import find_lora, fused, lora_fingerprint, lora_metadata, set_scales
from .config import GenerateConfig, config_of
from .config.checks import check_images
from .core.errors import UserError
from .core.fileio import save_png, to_json
from .formats.layouts import load_into_pipeline
from .models.families import family_of
from .models.loading import load_base, pipeline_from_parts
from .models.precision import tune_allocator
from .models.tokenwindow import check_prompt, pipeline_tokenizers
from .reports.grid import make_grid
from .training.snapshots import snapshot_of

log = logging.getLogger(__name__)

SCHEDULERS = {
    "dpm": (DPMSolverMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    # as in SD 1.x's own scheduler config; the PRK warm-up fails below ~10 steps
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


@dataclass(frozen=True)
class Setting:
    unet_scale: float
    text_scale: float
    guidance: float
    text2_scale: float | None = None  # SDXL's second text encoder; None: text_scale

    @property
    def label(self) -> str:
        text2 = "" if self.text2_scale is None else f" | text2 {self.text2_scale:g}"
        return f"unet {self.unet_scale:g} | text {self.text_scale:g}{text2} | cfg {self.guidance:g}"

    @property
    def slug(self) -> str:
        text2 = "" if self.text2_scale is None else f"_tt{self.text2_scale:g}"
        return f"u{self.unet_scale:g}_t{self.text_scale:g}{text2}_g{self.guidance:g}"


def settings_grid(unet_scales: list[float], text_scales: list[float],
                  guidances: list[float], text2_scales: list[float] = ()) -> list[Setting]:
    """Every combination; no ``text2_scales``: each text encoder at the text scale."""
    return [Setting(u, t, g, t2) for u, t, t2, g in
            itertools.product(unet_scales, text_scales, list(text2_scales) or [None], guidances)]


def prompt_slug(index: int, prompt: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
    return f"{index:02d}-{words or 'prompt'}"


def _scheduler(name: str, base):
    """The sampler --scheduler names; a flow model (FLUX) draws with its own
    flow-matching Euler sampler whatever the name (the others integrate a
    DDPM schedule it was not trained on)."""
    if base.family.flow:
        if name != "dpm":  # not the default: the user asked for another
            log.warning("--scheduler %s: %s draws with its flow-matching Euler sampler",
                        name, base.name)
        return base.family.sampler(base.noise_scheduler)
    cls, extra = SCHEDULERS[name]
    return cls.from_config(base.noise_scheduler.config, **extra)


def load_pipeline(run: str | Path, model: str = "",
                  scheduler: str = "dpm") -> tuple[StableDiffusionPipeline, tuple[str, ...]]:
    """The run's base model (from its metadata unless ``model`` is given) with
    its LoRA loaded, in the model family's pipeline (SDXL's with an fp32 VAE);
    returns (pipeline, the text encoders holding LoRA). ``scheduler``: one
    of SCHEDULERS (the config's choices)."""
    find_lora(run)
    meta = lora_metadata(run)
    base_name = model or meta.get("base_model")
    if not base_name:
        raise UserError(f"{run}: the LoRA does not record its base model; pass --model")
    base = load_base(base_name, "" if model else str(meta.get("model_config", "")))
    pipe = pipeline_from_parts(base, _scheduler(scheduler, base))
    pipe.set_progress_bar_config(disable=True)
    if base.family.flow:  # FLUX pipelines draw 1024 px unless told (the tiny models: 32)
        pipe.native_resolution = base.native_resolution
    return pipe, load_into_pipeline(pipe, run)


def default_guidance(pipe) -> float:
    """The guidance scale to draw with when the user gives none: the model
    family's own (SD 7.5 as always; FLUX.2 [klein] 4, FLUX.1 [dev] 3.5)."""
    return family_of(pipe).guidance


def check_windows(pipe, run: str | Path, prompts: list[str], what: str) -> None:
    """Refuse a prompt whose identifier (the run's) falls past the text
    encoder's window; warn about one that is truncated."""
    words = str(lora_metadata(run).get("identifier", "")).split()
    for prompt in prompts:
        check_prompt(pipeline_tokenizers(pipe), prompt, words, what)


def _pnginfo(prompt: str, negative: str, setting: Setting, seed: int, steps: int,
             scheduler: str, run: str) -> PngInfo:
    info = PngInfo()
    fields = {"prompt": prompt, "negative_prompt": negative, "unet_scale": setting.unet_scale,
              "text_scale": setting.text_scale, "guidance": setting.guidance, "seed": seed,
              "steps": steps, "scheduler": scheduler, "lora": run}
    if setting.text2_scale is not None:
        fields["text2_scale"] = setting.text2_scale
    info.add_text("lorabooth", to_json(fields))
    info.add_text("parameters", f"{prompt}\nNegative prompt: {negative}\nSteps: {steps}, "
                  f"Sampler: {scheduler}, CFG scale: {setting.guidance:g}, Seed: {seed}, "
                  f"LoRA scales: {setting.label.rsplit(' | cfg', 1)[0].replace(' |', '')}")
    return info


@torch.inference_mode()
def draw(pipe: StableDiffusionPipeline, has_text: tuple[str, ...], prompt: str, setting: Setting,
         seeds: list[int], steps: int, negative_prompt: str | None = None,
         fuse: bool = True, size: tuple[int | None, int | None] = (None, None)
         ) -> list[Image.Image]:
    """One image per seed for one prompt at one setting, ``size`` (width,
    height) in pixels, None for the model's native size. The LoRA is fused
    into the weights at the setting's scales while drawing (as fast as the
    base model); ``fuse=False`` runs the adapters beside the weights.
    ``has_text``: the text encoders holding LoRA (``load_pipeline``'s).
    No (or an empty) ``negative_prompt``: none is passed, so the
    unconditional branch is the pipeline's default (SDXL's: zeros, not the
    encoded empty prompt), as plain diffusers draws."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    scales = (setting.unet_scale, setting.text_scale, has_text, setting.text2_scale)
    if fuse:
        with fused(pipe, *scales):
            return _call(pipe, prompt, setting, generators, steps, negative_prompt, size)
    set_scales(pipe, *scales)
    return _call(pipe, prompt, setting, generators, steps, negative_prompt, size)


def _call(pipe, prompt: str, setting: Setting, generators: list[torch.Generator], steps: int,
          negative_prompt: str | None, size: tuple[int | None, int | None]) -> list[Image.Image]:
    n = len(generators)
    native = getattr(pipe, "native_resolution", None)  # set for a FLUX model by load_pipeline
    size = (size[0] or native, size[1] or native)
    negative = {}
    if negative_prompt:
        if type(pipe).__name__.startswith("Flux"):
            raise UserError(f"--negative-prompt: {type(pipe).__name__} draws with distilled "
                            f"guidance and reads no negative prompt; leave it out")
        negative = {"negative_prompt": [negative_prompt] * n}
    arrays = pipe(prompt=[prompt] * n, **negative, **family_of(pipe).draw_options(pipe),
                  guidance_scale=setting.guidance,
                  num_inference_steps=steps, generator=generators, width=size[0],
                  height=size[1], output_type="np").images
    check_images(arrays, f"{prompt!r} at {setting.label}")  # as PNGs NaN would be black
    return pipe.numpy_to_pil(arrays)


def cache_name(setting: Setting, steps: int, run: str | Path,
               negative_prompt: str | None = None) -> str:
    """The folder name of cached images: everything they depend on besides
    the prompt and seed (the LoRA file's contents included)."""
    negative = (f"_neg{hashlib.sha256(negative_prompt.encode()).hexdigest()[:8]}"
                if negative_prompt else "")
    return f"{setting.slug}_steps{steps}_lora{lora_fingerprint(run)}{negative}"


def draw_cached(pipe, has_text: tuple[str, ...], prompt: str, setting: Setting, seeds: list[int],
                steps: int, folder: Path, negative_prompt: str | None = None) -> list[Image.Image]:
    """Images for ``seeds``, drawing only those not already in ``folder``
    (whose name must hold whatever else the images depend on)."""
    paths = [folder / f"seed{s}.png" for s in seeds]
    todo = [s for s, p in zip(seeds, paths) if not p.is_file()]
    if todo:
        for s, image in zip(todo, draw(pipe, has_text, prompt, setting, todo, steps,
                                       negative_prompt)):
            save_png(image, folder / f"seed{s}.png")
    return [Image.open(p).convert("RGB") for p in paths]


# the keywords `generate` has always taken -> GenerateConfig's fields
_KEYWORDS = {"prompts": "prompt", "unet_scales": "unet_scale", "text_scales": "text_scale",
             "text2_scales": "text2_scale", "guidances": "guidance"}


def generate(run: str | Path | GenerateConfig, prompts: list[str] | None = None,
             **options) -> list[Image.Image]:
    """Draw every prompt at every (UNet scale, text scale, SDXL's text-2
    scale, guidance) with the same seeds, ``width`` x ``height`` pixels
    (default: the model's native size); save PNGs with their settings and one
    labelled grid per prompt under ``output`` (default RUN/generated).
    Returns all images in order.

    ``generate(GenerateConfig(...))``, or its keywords: ``generate(run,
    prompts, unet_scales=, text_scales=, text2_scales=, guidances=,
    num_images=, seed=, steps=, negative_prompt=, scheduler=, output=,
    model=, width=, height=)``; the defaults and checks are GenerateConfig's."""
    c = config_of(GenerateConfig, "generate", {"run": run, "prompts": prompts, **options},
                  _KEYWORDS)
    seeds = [c.seed + i for i in range(c.num_images)]
    out = Path(c.out_folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: is a file, not a folder")
    lora = snapshot_of(c.run, c.step, lora_metadata(c.run).get("steps")) if c.step else c.run
    tune_allocator()
    pipe, has_text = load_pipeline(lora, c.model, c.scheduler)
    check_windows(pipe, lora, c.prompt, "--prompt")
    if c.negative_prompt:
        check_prompt(pipeline_tokenizers(pipe), c.negative_prompt, [], "--negative-prompt")
    settings = settings_grid(c.unet_scale, c.text_scale, c.guidance or [default_guidance(pipe)],
                             c.text2_scale)
    everything: list[Image.Image] = []
    for p, prompt in enumerate(c.prompt):
        folder = out / prompt_slug(p, prompt)
        rows = []
        for setting in settings:
            images = draw(pipe, has_text, prompt, setting, seeds, c.steps, c.negative_prompt,
                          size=(c.width, c.height))
            for s, image in zip(seeds, images):
                save_png(image, folder / f"{setting.slug}_s{s}.png",
                         _pnginfo(prompt, c.negative_prompt, setting, s, c.steps, c.scheduler,
                                  str(lora)))
            rows.append(images)
            everything.extend(images)
        grid = make_grid(rows, [s.label for s in settings], [f"seed {s}" for s in seeds],
                         title=prompt)
        save_png(grid, folder / "grid.png")
        log.info("wrote %s", folder / "grid.png")
    return everything
