"""The typed config tree: one frozen dataclass per command, validated on
construction, loaded from TOML and overridden from the command line.

Every field has a default and help text (peft's habit); ``__post_init__``
checks values and the error names the option as the user typed it.
"""

from __future__ import annotations

import dataclasses
import difflib
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .checks import (
    MAX_BATCH,
    MAX_CLASS_IMAGES,
    MAX_PHOTO_SIDE,
    MAX_RANK,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TRAIN_STEPS,
    check_count,
    check_seeds,
    finite,
    is_whole,
)
from .errors import UserError
from .tracking import check_report_to

MIXED_PRECISIONS = ("no", "fp16", "bf16")
# off; images: drawn class images (DreamBooth's prior preservation); model:
# no images, the frozen base model's own prediction under the class prompt
PRIOR_MODES = ("off", "images", "model")
# the judges `evaluate` (and a sweep's [evaluate]) use unless told otherwise
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _help(text: str, default: Any = None, *, positional: bool = False, **kw: Any) -> Any:
    """A field with its help text; ``positional`` fields are command-line
    arguments without a dash (a list-typed one takes one or more)."""
    meta = {"help": text, "positional": positional}
    if "flag_value" in kw:  # a str option that may also be given bare (or as true/false)
        meta["flag_value"] = kw["flag_value"]
    if "default_factory" in kw:
        return field(metadata=meta, default_factory=kw["default_factory"])
    return field(default=default, metadata=meta)


def field_kind(cls: type, key: str) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field: the types the tree
    uses are str, int, float, bool, list[str], list[float] and ``X | None``."""
    hint = get_type_hints(cls)[key]
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    if optional:
        hint = args[0]
    if get_origin(hint) is list:
        return get_args(hint)[0], True, optional
    return hint, False, optional


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_name(key: str) -> str:
    """``prior_loss_weight`` -> ``--prior-loss-weight``."""
    return "--" + key.replace("_", "-")


def prior_mode(value: Any) -> Any:
    """``prior_preservation`` was a bool before it had modes: true (a bare
    flag) is "images", false is "off"; a str is left for the range check."""
    if isinstance(value, bool):
        return "images" if value else "off"
    return value


def check_numbers(config: Any) -> None:
    """NaN and inf compare false with everything, so they slip past every
    range check; refuse them first, for every float field (lists too). An
    int field given a float (1e23 from the Python API) or a bool is refused
    too: a count must be a whole number before its range is checked."""
    for f in fields(config):
        kind, many, _ = field_kind(type(config), f.name)
        value = getattr(config, f.name)
        if kind is float:
            for v in (value if many else [value]):
                if v is not None:
                    finite(v, option_name(f.name))
        elif kind is int and not many and value is not None and not is_whole(value):
            raise UserError(f"{option_name(f.name)}: must be a whole number (got {value!r})")


ADAPTERS = ("lora", "dora")


def check_adapter(adapter: str, save_format: str) -> None:
    """DoRA files have no kohya export: the clients that read kohya files
    (ComfyUI, AUTOMATIC1111) apply kohya's `dora_scale` with their own axis
    conventions, unverified against peft's weight."""
    if adapter not in ADAPTERS:
        raise UserError(f"--adapter: must be one of {', '.join(ADAPTERS)} (got {adapter!r})")
    if adapter == "dora" and save_format == "kohya":
        raise UserError("--adapter dora: cannot be saved with --save-format kohya (kohya's "
                        "dora_scale is applied differently by each client); use diffusers or both")


# TrainConfig's counts and their ceilings (checks.py says why each)
TRAIN_CEILINGS = {"steps": MAX_TRAIN_STEPS, "batch_size": MAX_BATCH, "rank": MAX_RANK,
                  "num_class_images": MAX_CLASS_IMAGES, "class_draw_steps": MAX_STEPS,
                  "class_draw_batch": MAX_BATCH,
                  "validation_images": 64}  # each validation draws them all


@dataclass(frozen=True)
class TrainConfig:
    model: str = _help("A diffusers folder (SD 1.x or SDXL), a Hugging Face hub id, a single "
                       "checkpoint file, or a built-in: tiny, tiny-sdxl, toy, sd15-random, "
                       "sdxl-random.", "tiny")
    model_config: str = _help("For a single-file --model: a diffusers folder with that "
                              "architecture's configs (default: SD 1.5's or SDXL's, told "
                              "from the file's keys).", "")
    instance_dir: str = _help("Folder with 3-20 photos of the subject.", "")
    instance_prompt: str = _help("Prompt naming the subject, e.g. 'a photo of sks dog'.", "")
    class_prompt: str = _help("Bare class prompt for prior preservation, e.g. 'a photo of a dog'.", "")
    class_dir: str = _help("Folder of class images (default: OUTPUT/class_images).", "")
    prior_preservation: str = _help(
        "off; images: add the denoising loss on class images drawn by the base model; model: "
        "no class images, match the frozen base model's own prediction for the class prompt "
        "(one extra forward per step; --class-dir and --num-class-images are ignored). "
        "A bare --prior-preservation (true in TOML) means images.", "off", flag_value="images")
    num_class_images: int = _help("How many class images to use (drawn if missing).", 100)
    prior_loss_weight: float = _help("Weight lambda of the prior-preservation loss.", 1.0)
    resolution: int = _help("Training resolution in pixels (0: the model's own).", 0)
    steps: int = _help("Optimizer steps.", 300)
    batch_size: int = _help("Instance images per step (as many class images are added).", 1)
    lr: float = _help("Learning rate of the UNet LoRA.", 5e-4)
    lr_text: float = _help("Learning rate of the text-encoder LoRA.", 1e-4)
    lr_text2: float = _help("SDXL: learning rate of the second text encoder's LoRA (0: the "
                            "same as --lr-text).", 0.0)
    train_text_encoder: bool = _help("Also train LoRA on the text encoder's attention.", False)
    rank: int = _help("LoRA rank.", 4)
    alpha: float = _help("LoRA alpha (0: equal to the rank).", 0.0)
    mixed_precision: str = _help("no, fp16 or bf16 (LoRA weights stay fp32).", "no")
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: less memory, slower steps.", False)
    seed: int = _help("Random seed for weights, noise, timesteps and data order.", 0)
    checkpoint_every: int = _help("Write a resumable checkpoint every N steps (0: never).", 0)
    resume: bool = _help("Continue from the newest checkpoint in OUTPUT.", False)
    force: bool = _help("With --resume: continue even if the settings changed.", False)
    validation_prompt: str = _help("Prompt drawn into OUTPUT/samples during training.", "")
    validation_every: int = _help("Draw the validation prompt every N steps (0: only at the end).", 0)
    validation_images: int = _help("Images per validation (seeds SEED, SEED+1, ...): "
                                   "samples/step-N.png, then step-N-1.png, ...", 1)
    captions: bool = _help("Use IMAGE.txt beside each instance image as its prompt when present.",
                           False)
    output: str = _help("Run folder.", "runs/run")
    save_format: str = _help("diffusers, kohya (for AUTOMATIC1111/ComfyUI/InvokeAI) or both.",
                             "both")
    max_grad_norm: float = _help("Clip the gradient norm to this (0: no clipping).", 1.0)
    class_draw_steps: int = _help("Sampler steps used to draw class images.", 25)
    class_draw_batch: int = _help("Class images drawn per batch.", 4)
    snr_gamma: float = _help("Min-SNR-gamma loss weighting: weigh each sample by "
                             "min(SNR, gamma)/SNR (typical 5; 0: off).", 0.0)
    noise_offset: float = _help("Add this x N(0,1) per sample and channel to the noise, so "
                                "brightness can shift (typical 0.05; 0: off).", 0.0)
    caption_dropout: float = _help("Probability of training an instance image on the empty "
                                   "prompt instead of its own (0: never).", 0.0)
    ema_decay: float = _help("Keep an exponential moving average of the LoRA weights with this "
                             "decay and save it (typical 0.99; 0: off).", 0.0)
    train_token: bool = _help(
        "Pivotal tuning: also learn the input embedding of the identifier's token(s) "
        "(textual inversion beside the LoRA); saved in the LoRA file.", False)
    # Adam moves each element by about lr per step whatever the gradient's
    # scale; CLIP's embedding elements are ~0.01-0.02, so 1e-3 lets the rows
    # move a lot over a few hundred steps, half of what diffusers'
    # textual-inversion example takes (5e-4 x 4 accumulation) since the LoRA
    # learns beside them.
    lr_token: float = _help("Learning rate of the trained token embedding (--train-token).", 1e-3)
    adapter: str = _help("lora, or dora (weight-decomposed LoRA: a trained magnitude per "
                         "output channel; diffusers file only, no kohya export).", "lora")
    report_to: str = _help("Also log the per-step metrics to tensorboard or wandb (their package "
                           "must be installed), under OUTPUT/logs (empty: metrics.jsonl only).", "")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"{option_name(key)}: {why} (got {getattr(self, key)!r})")

        check_numbers(self)
        object.__setattr__(self, "prior_preservation", prior_mode(self.prior_preservation))
        if self.prior_preservation not in PRIOR_MODES:
            raise bad("prior_preservation", f"must be one of {', '.join(PRIOR_MODES)}")
        self._check_levers(bad)
        check_adapter(self.adapter, self.save_format)
        check_report_to(self.report_to)
        for key in ("lr", "lr_text", "prior_loss_weight", "lr_token"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be a positive number")
        for key, high in TRAIN_CEILINGS.items():
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
            if getattr(self, key) > high:
                raise bad(key, f"at most {high}")
        for key in ("checkpoint_every", "validation_every"):
            if not 0 <= getattr(self, key) <= MAX_TRAIN_STEPS:
                raise bad(key, f"must be between 0 and {MAX_TRAIN_STEPS}")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be between 0 and {MAX_SEED}")
        if self.alpha < 0:
            raise bad("alpha", "must be 0 (= rank) or positive")
        if self.lr_text2 < 0:
            raise bad("lr_text2", "must be 0 (= --lr-text) or positive")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be 0 (off) or positive")
        if not 0 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise bad("resolution", f"must be a positive multiple of 8, at most {MAX_SIDE} "
                                    "(0: the model's own)")
        if self.save_format not in ("diffusers", "kohya", "both"):
            raise bad("save_format", "must be one of diffusers, kohya, both")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise bad("mixed_precision", f"must be one of {', '.join(MIXED_PRECISIONS)}")
        if not self.model:
            raise bad("model", "is required")
        if not self.instance_dir:
            raise bad("instance_dir", "is required: a folder with photos of the subject")
        if not self.instance_prompt.strip():
            raise bad("instance_prompt", "is required, e.g. 'a photo of sks dog'")
        if self.uses_prior and not self.class_prompt.strip():
            raise bad("class_prompt", "is required with --prior-preservation, e.g. 'a photo of a dog'")
        if not self.output:
            raise bad("output", "is required")
        if self.train_token:
            from .identifier import guess_identifier

            if not guess_identifier(self.instance_prompt, self.class_prompt):
                raise bad("instance_prompt", "has no identifier word for --train-token to train")

    def _check_levers(self, bad) -> None:
        for key in ("snr_gamma", "noise_offset"):
            if getattr(self, key) < 0:
                raise bad(key, "must be 0 (off) or positive")
        for key in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be at least 0 (off) and below 1")

    def text_lr(self, encoder: str) -> float:
        """The learning rate of a text encoder's LoRA, by diffusers' name."""
        return (self.lr_text2 or self.lr_text) if encoder == "text_encoder_2" else self.lr_text

    @property
    def lora_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @property
    def uses_prior(self) -> bool:
        return self.prior_preservation != "off"

    @property
    def prior_images(self) -> bool:
        return self.prior_preservation == "images"

    @property
    def prior_model(self) -> bool:
        return self.prior_preservation == "model"

    @property
    def class_path(self) -> Path:
        return Path(self.class_dir) if self.class_dir else Path(self.output) / "class_images"


CROPS = ("center", "face", "none")


@dataclass(frozen=True)
class PrepareConfig:
    src: str = _help("Folder of the user's photos (never modified).", "", positional=True)
    out: str = _help("Folder for the training set.", "", positional=True)
    resolution: int = _help("Side of the square output images in pixels.", 512)
    crop: str = _help("center, face (largest face, OpenCV Haar cascade) or none.", "center")
    min_size: int = _help("Reject images whose short side is below this (0: half the resolution).", 0)
    face_margin: float = _help("Space around the face on each side, in face sizes "
                               "(0.75: a head-and-shoulders portrait).", 0.75)
    caption: str = _help("Caption template written beside each image, e.g. "
                         "'a photo of {identifier} {class}'.", "")
    identifier: str = _help("The identifier for {identifier} in --caption.", "sks")
    class_noun: str = _help("The class noun for {class} in --caption.", "")
    dedupe_threshold: int = _help("Near-duplicate when the 64-bit perceptual hashes differ in at "
                                  "most this many bits (-1: only exact duplicates).", 5)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"{option_name(key)}: {why} (got {getattr(self, key)!r})")

        check_numbers(self)
        if not 8 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise bad("resolution", f"must be a positive multiple of 8, at most {MAX_SIDE}")
        if self.crop not in CROPS:
            raise bad("crop", f"must be one of {', '.join(CROPS)}")
        if not 0 <= self.min_size <= MAX_PHOTO_SIDE:
            raise bad("min_size", f"must be between 0 and {MAX_PHOTO_SIDE}")
        if self.face_margin < 0:
            raise bad("face_margin", "must be 0 or more")
        if not -1 <= self.dedupe_threshold <= 64:
            raise bad("dedupe_threshold", "must be between -1 and 64")
        if "{class}" in self.caption and not self.class_noun:
            raise bad("class_noun", "is required when --caption uses {class}")
        if "{identifier}" in self.caption and not self.identifier:
            raise bad("identifier", "is required when --caption uses {identifier}")

    @property
    def min_size_px(self) -> int:
        return self.min_size or self.resolution // 2


@dataclass(frozen=True)
class SweepGenerate:
    """A sweep file's [generate] table with its [generate.grid] lists: what
    every run draws."""
    prompts: list[str] = _help("Prompts drawn by every run (required).", default_factory=list)
    seeds: list[int] = _help("Seeds; every prompt and setting is drawn once per seed.",
                             default_factory=lambda: [0])
    steps: int = _help("Sampler steps.", 25)
    negative_prompt: str = _help("Negative prompt.", "")
    unet_scale: list[float] = _help("[generate.grid] UNet LoRA scales.", default_factory=lambda: [1.0])
    text_scale: list[float] = _help("[generate.grid] text-encoder LoRA scales.",
                                    default_factory=lambda: [1.0])
    text2_scale: list[float] = _help("[generate.grid] SDXL: the second text encoder's LoRA "
                                     "scales (default: the text scale).", default_factory=list)
    guidance: list[float] = _help("[generate.grid] guidance scales.", default_factory=lambda: [7.5])

    def __post_init__(self) -> None:
        check_numbers(self)
        for key in ("prompts", "seeds", "unet_scale", "text_scale", "guidance"):
            if not getattr(self, key):
                raise UserError(f"`{key}` must be a non-empty list (got [])")
        check_seeds(self.seeds, "`seeds`")
        check_count(self.steps, "`steps`", MAX_STEPS)


@dataclass(frozen=True)
class SweepEvaluate:
    """A sweep file's [evaluate] table: `lorabooth evaluate` on every run."""
    real: str = _help("Folder of the subject's photos (required).", "")
    class_noun: str = _help("Class noun (default: from the run).", "")
    kind: str = _help("The paper's prompt set: live or object.", "live")
    prompts_file: str = _help("Own prompts file instead of the paper's.", "")
    images_per_prompt: int = _help("Images per prompt.", 4)
    pres_images: int = _help("Class-prompt images for PRES.", 8)
    steps: int = _help("Sampler steps.", 25)
    baselines: bool = _help("Add the base model and the real photos as rows.", False)
    dino: str = _help("DINO model (folder or hub id).", DEFAULT_DINO)
    clip: str = _help("CLIP model (folder or hub id).", DEFAULT_CLIP)
    judges: str = _help("\"toy\": the toy world's judges instead of DINO and CLIP.", "")

    def __post_init__(self) -> None:
        if not Path(self.real).is_dir():
            raise UserError(f"`real` must be the folder of the subject's photos (got {self.real!r})")
        if self.judges not in ("", "toy"):
            raise UserError(f"`judges` can only be \"toy\" (got {self.judges!r}); "
                            "leave it out for DINO and CLIP")


def config_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_scalar(expected: type, key: str, value: Any, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise UserError(f"{where}: `{key}` must be true or false (got {value!r})")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: `{key}` must be an integer (got {value!r})")
    if expected is float and not isinstance(value, float):
        raise UserError(f"{where}: `{key}` must be a number (got {value!r})")
    if expected is str and not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string (got {value!r})")
    return value


def _check_type(cls: type, key: str, value: Any, where: str) -> Any:
    kind, many, _ = field_kind(cls, key)
    if "flag_value" in cls.__dataclass_fields__[key].metadata:  # a str that may be a bool
        if not isinstance(value, (bool, str)):
            raise UserError(f"{where}: `{key}` must be a string or true/false (got {value!r})")
        return value  # the config checks the string and normalises the bool
    if not many:
        return _check_scalar(kind, key, value, where)
    if not isinstance(value, list):
        raise UserError(f"{where}: `{key}` must be a list (got {value!r})")
    return [_check_scalar(kind, key, v, where) for v in value]


def unknown_key(key: str, known: Iterable[str], where: str) -> UserError:
    """`unknown key `lerning_rate`; did you mean `learning_rate`?`"""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return UserError(f"{where}: unknown key `{key}`{hint}")


def check_keys(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown keys (suggesting the closest) and wrong types."""
    known = config_keys(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key(key, known, where)
        checked[key] = _check_type(cls, key, value, where)
    return checked


def build_section(cls: type, values: dict[str, Any], where: str):
    """A config from one table of a file: every error names the table."""
    try:
        return cls(**check_keys(cls, values, where))
    except UserError as e:
        raise e if str(e).startswith(where) else UserError(f"{where}: {e}") from None


# Far above any real config or sweep file; a larger "config" is a mistake
# (a model, a log) that would only be read into memory to fail.
MAX_TOML_BYTES = 1 << 20


def read_toml(path: str | Path) -> dict[str, Any]:
    """A small regular UTF-8 TOML file; anything else (a device such as
    /dev/zero, a folder, a huge or binary file) is one line."""
    path = Path(path)
    try:
        info = path.stat()  # before opening: opening a FIFO would wait for a writer
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: not a regular file")
        if info.st_size > MAX_TOML_BYTES:
            raise UserError(f"{path}: {info.st_size} bytes is too large for a TOML file "
                            f"(at most {MAX_TOML_BYTES})")
        with path.open("rb") as f:
            return tomllib.loads(f.read(MAX_TOML_BYTES + 1).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config: no such file: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def build_config(cls: type, file: str | Path | None, overrides: dict[str, Any]):
    """Defaults < TOML file < command-line overrides (``None`` means unset)."""
    values: dict[str, Any] = {}
    if file:
        values.update(check_keys(cls, read_toml(file), str(file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_toml_dict(config: Any) -> dict[str, Any]:
    """The config as TOML can hold it (TOML has no null: unset fields are left out)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
