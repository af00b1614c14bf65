"""The configs of the commands that read or write LoRA files: `inspect`,
`convert`, `merge` and `fuse`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from .checks import MAX_RANK, check_count
from .fields import _help, check_numbers, require

LAYOUTS = ("kohya", "diffusers", "peft")  # `convert --to`


@dataclass(frozen=True)
class InspectConfig:
    file: str = _help("A LoRA file (.safetensors, any layout).", "", positional=True)
    model: str = _help("Check the clients' key rules against this base model's weights "
                       "(default: Stable Diffusion 1.5's for SD 1.x files, SDXL 1.0's for "
                       "SDXL files).", "")

    def __post_init__(self) -> None:
        require(self, "file")


@dataclass(frozen=True)
class ConvertConfig:
    src: str = _help("A LoRA .safetensors file (diffusers, kohya or peft layout).", "",
                     positional=True)
    dst: str = _help("Output file (or folder).", "", positional=True)
    to: str = _help("Layout to write: kohya, diffusers or peft (required).", "",
                    choices=LAYOUTS)
    overwrite: bool = _help("Replace DST when it exists (never one of the inputs).", False)

    def __post_init__(self) -> None:
        require(self, "src", "dst", "to")
        check_numbers(self)


@dataclass(frozen=True)
class MergeConfig:
    loras: list[str] = _help("Run folders or LoRA files (any layout).", default_factory=list,
                             positional=True)
    weights: list[float] = _help("Comma list, one weight per LoRA (default: equal).",
                                 default_factory=list)
    out: str = _help("Output .safetensors (diffusers layout; required).", "")
    rank: int | None = _help("Re-factorise to this rank by SVD (default: exact concatenation).",
                             None)
    overwrite: bool = _help("Replace --out when it exists (never one of the inputs).", False)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "out")
        if len(self.loras) < 2:
            raise UserError("merge: give at least two LoRAs")
        if self.weights and len(self.weights) != len(self.loras):
            raise UserError(f"--weights: {len(self.weights)} weights for {len(self.loras)} LoRAs")
        if self.rank is not None:
            check_count(self.rank, "--rank", MAX_RANK)


@dataclass(frozen=True)
class FuseConfig:
    run: str = _help("Run folder or LoRA file.", "", positional=True)
    out: str = _help("Output model folder (required).", "")
    unet_scale: float = _help("UNet LoRA scale baked in.", 1.0)
    text_scale: float = _help("Text-encoder LoRA scale baked in.", 1.0)
    model: str = _help("Base model (default: the run's own).", "")
    single_file: bool = _help("Write one .safetensors in the original layout instead of a "
                              "folder: SD's or SDXL's checkpoint, FLUX's transformer in Black "
                              "Forest Labs' names.", False)
    overwrite: bool = _help("With --single-file: replace --out when it exists.", False)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "run", "out")


