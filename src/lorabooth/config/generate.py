"""The configs of the commands that draw and measure: `generate` and
`evaluate`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .checks import KINDS, MAX_IMAGES, MAX_STEPS, check_count, check_options, check_seeds, check_size
from .fields import _help, bad, check_numbers, require

# the judges `evaluate` (and a sweep's [evaluate]) use unless told otherwise
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# the guidance scale each command draws with when given none (models/families.py)
FAMILY_GUIDANCE = ("the model family's own: 7.5 for SD 1.x and SDXL, 4 for FLUX.2 [klein] "
                   "as its pipeline, 3.5 for FLUX.1 [dev]")
# `generate --scheduler`: the samplers drawing.SCHEDULERS builds
SCHEDULERS = ("dpm", "ddim", "euler", "pndm")
# the toy world's own judges instead of DINO and CLIP ("": DINO and CLIP)
JUDGES = ("", "toy")


@dataclass(frozen=True)
class GenerateConfig:
    run: str = _help("Run folder (or a LoRA .safetensors file).", "", positional=True)
    prompt: list[str] = _help("Prompt to draw (repeatable).", default_factory=list)
    negative_prompt: str = _help("Negative prompt.", "")
    unet_scale: list[float] = _help("UNet LoRA scale(s), comma list.", default_factory=lambda: [1.0])
    text_scale: list[float] = _help("Text-encoder LoRA scale(s), comma list (SDXL: both "
                                    "encoders unless --text2-scale is given).",
                                    default_factory=lambda: [1.0])
    text2_scale: list[float] = _help("SDXL: the second text encoder's LoRA scale(s), comma list "
                                     "(default: --text-scale).", default_factory=list)
    guidance: list[float] = _help("Guidance scale(s), comma list (default: " + FAMILY_GUIDANCE
                                  + ").", default_factory=list)
    steps: int = _help("Sampler steps.", 25)
    num_images: int = _help("Images (seeds) per setting.", 4)
    seed: int = _help("First seed; image i uses seed+i.", 0)
    scheduler: str = _help("dpm, ddim, euler or pndm.", "dpm", choices=SCHEDULERS)
    width: int | None = _help("Image width in pixels, a multiple of 8 (default: the model's "
                              "native size).", None)
    height: int | None = _help("Image height in pixels, a multiple of 8 (default: the model's "
                               "native size).", None)
    model: str = _help("Base model (default: the run's own).", "")
    step: int = _help("Draw with the LoRA the run saved at this step (train --save-every); "
                      "0: the run's final LoRA.", 0)
    output: str = _help("Folder (default: RUN/generated, or RUN/generated-step-N with --step).",
                        "")

    @property
    def out_folder(self) -> str:
        if self.output:
            return self.output
        return str(Path(self.run) / ("generated" + (f"-step-{self.step}" if self.step else "")))

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "run")
        if self.step < 0:
            raise bad(self, "step", "must be 0 (the final LoRA) or a saved step")
        if not self.prompt:
            raise UserError("--prompt: give at least one prompt")
        for key in ("unet_scale", "text_scale"):
            if not getattr(self, key):
                raise bad(self, key, "expected at least one number")
        check_count(self.num_images, "--num-images", MAX_IMAGES)
        check_count(self.steps, "--steps", MAX_STEPS)
        check_size(self.width, "--width")
        check_size(self.height, "--height")
        check_seeds([self.seed, self.seed + self.num_images - 1], "--seed")


@dataclass(frozen=True)
class EvaluateOptions:
    """How `evaluate` scores a run: the options `evaluate`, a sweep's
    [evaluate] table and `tune` share, declared here once (each adds its
    own: the run or photos, the sampler steps, the judges)."""
    class_noun: str = _help("Class noun (default: from the run).", "")
    kind: str = _help("The paper's prompt set: live (subjects) or object.", "live",
                      choices=KINDS)
    prompts: str = _help("Own prompts file, one per line ({0}: identifier, {1}: class noun), "
                         "instead of the paper's.", "")
    images_per_prompt: int = _help("Images per prompt (the paper uses 4).", 4)
    pres_images: int = _help("Class-prompt images for PRES.", 8)
    dino: str = _help("DINO model (folder or hub id).", DEFAULT_DINO)
    clip: str = _help("CLIP model (folder or hub id; e.g. openai/clip-vit-large-patch14).",
                      DEFAULT_CLIP)

    def __post_init__(self) -> None:
        check_numbers(self)
        check_options(self.kind, self.prompts, self.images_per_prompt, self.pres_images)


def evaluate_options(config: EvaluateOptions) -> dict[str, Any]:
    """The shared options of ``config`` (a sweep's [evaluate], a tune), as
    EvaluateConfig's keywords."""
    return {f.name: getattr(config, f.name) for f in fields(EvaluateOptions)}


@dataclass(frozen=True)
class EvaluateConfig(EvaluateOptions):
    run: str = _help("Run folder.", "", positional=True)
    real: str = _help("Folder of the subject's photos (required).", "")
    identifier: str = _help("Identifier (default: from the run's metadata).", "")
    seed: int = _help("First seed; image i uses seed+i.", 0)
    unet_scale: float = _help("UNet LoRA scale.", 1.0)
    text_scale: float = _help("Text-encoder LoRA scale (SDXL: both encoders unless "
                              "--text2-scale is given).", 1.0)
    text2_scale: float | None = _help("SDXL: the second text encoder's LoRA scale (default: "
                                      "--text-scale).", None)
    guidance: float | None = _help("Guidance scale (default: " + FAMILY_GUIDANCE + ").", None)
    steps: int = _help("Sampler steps.", 25)
    model: str = _help("Base model (default: the run's own).", "")
    out: str = _help("Folder (default: RUN/eval).", "")
    baselines: bool = _help("Add the base model (floor) and the real photos leave-one-out "
                            "(ceiling).", False)
    snapshots: bool = _help("Score every step the run saved (train --save-every) and its final "
                            "LoRA: the figures against the step (OUT/snapshots.md, .svg, .json) "
                            "and the step to keep, by tune's rule.", False)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "run", "real")
        if self.snapshots and self.baselines:
            raise UserError("--snapshots: not with --baselines (score the base and the photos "
                            "once, without --snapshots)")
        check_options(self.kind, self.prompts, self.images_per_prompt, self.pres_images,
                      self.steps, self.seed)
