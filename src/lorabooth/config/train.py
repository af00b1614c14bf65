"""`train`'s config: TrainConfig, its choices and its checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .checks import (
    MAX_BATCH,
    MAX_CLASS_IMAGES,
    MAX_RANK,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TRAIN_STEPS,
)
from .fields import _help, check_numbers, option_name

MIXED_PRECISIONS = ("no", "fp16", "bf16")
# auto: the frozen weights in --mixed-precision's dtype, as before the option existed
BASE_PRECISIONS = ("auto", "int8", "nf4", "fp8")
SAVE_FORMATS = ("diffusers", "kohya", "both")
# off; images: drawn class images (DreamBooth's prior preservation); model:
# no images, the frozen base model's own prediction under the class prompt;
# dop: ai-toolkit's differential output preservation, the frozen prediction on
# the instance rows' own noisy latents under their caption without the identifier
PRIOR_MODES = ("off", "images", "model", "dop")


def prior_mode(value: Any) -> Any:
    """``prior_preservation`` was a bool before it had modes: true (a bare
    flag) is "images", false is "off"; a str is left for the range check."""
    if isinstance(value, bool):
        return "images" if value else "off"
    return value



ADAPTERS = ("lora", "dora", "lokr", "loha")
# --targets: the denoiser's attention, also its feed-forward Linears, also
# (LoCon) its ResNet convolutions (FLUX: every block Linear)
TARGETS = ("attn", "attn-mlp", "all")
LYCORIS = ("lokr", "loha")  # the adapters peft builds as LyCORIS defines them
# --optimizer (training/optimizers.py builds each) and --lr-scheduler (diffusers'
# get_scheduler names; cosine_with_restarts and piecewise_constant are left out:
# their cycles and rules would need options of their own)
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "schedulefree")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")
# Prodigy estimates its own step size; --lr multiplies it, so 1 is its natural
# value. These options' AdamW-sized defaults become 1 under --optimizer prodigy.
PRODIGY_LR = 1.0
PRODIGY_DEFAULTED = ("lr", "lr_text", "lr_token")
# flow models' timestep densities (Esser et al., 2024, sec. 3.1; diffusers' names)
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "mode")


def check_adapter(adapter: str, save_format: str) -> None:
    """DoRA files have no kohya export: the clients that read kohya files
    (ComfyUI, AUTOMATIC1111) apply kohya's `dora_scale` with their own axis
    conventions, unverified against peft's weight."""
    if adapter == "dora" and save_format == "kohya":
        raise UserError("--adapter dora: cannot be saved with --save-format kohya (kohya's "
                        "dora_scale is applied differently by each client); use diffusers or both")


# TrainConfig's counts and their ceilings (checks.py says why each)
# Options that leave what a training run computes (its LoRA and samples) as
# it was: a sweep's run stays done across them (search/sweep.config_hash).
# The set is part of the hash a sweep stores (sweep_hash.txt): adding a
# member would re-run every run an earlier sweep finished, so it only grows
# for a new option (report_to: runs hashed before it existed stay done).
SWEEP_NEUTRAL = frozenset({"output", "resume", "force", "overwrite", "report_to",
                           "validation_images"})
# Options that may change between a run and its --resume (training/runfiles):
# those above, and what --resume exists to change (more steps, another
# checkpoint or validation schedule, gradient checkpointing's memory trade).
# A sweep must not treat them as neutral: other steps or samples are
# another result, not the finished run.
RESUME_NEUTRAL = SWEEP_NEUTRAL | {"steps", "checkpoint_every", "validation_prompt",
                                  "validation_every", "gradient_checkpointing"}
TRAIN_CEILINGS = {"steps": MAX_TRAIN_STEPS, "batch_size": MAX_BATCH, "rank": MAX_RANK,
                  "num_class_images": MAX_CLASS_IMAGES, "class_draw_steps": MAX_STEPS,
                  "class_draw_batch": MAX_BATCH,
                  "validation_images": 64,  # each validation draws them all
                  "gradient_accumulation": MAX_BATCH}  # micro-batches per optimizer step


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
        "(one extra forward per step; --class-dir and --num-class-images are ignored); "
        "dop: as model, but on the instance rows' own noisy latents and timesteps, under each "
        "caption with the identifier removed ('a photo of sks dog' -> 'a photo of dog'; "
        "ai-toolkit's differential output preservation). "
        "A bare --prior-preservation (true in TOML) means images.", "off", flag_value="images",
        choices=PRIOR_MODES)
    num_class_images: int = _help("How many class images to use (drawn if missing).", 100)
    prior_loss_weight: float = _help("Weight lambda of the prior-preservation loss.", 1.0)
    resolution: int = _help("Training resolution in pixels (0: the model's own).", 0)
    buckets: bool = _help(
        "Aspect-ratio buckets: train each instance image at the size nearest its aspect "
        "(sides multiples of 64, about --resolution squared in area, 1:4 to 4:1) instead of "
        "centre-cropping it square; each batch from one bucket (class images centre-cropped "
        "to it). Square images train as without it.", False)
    steps: int = _help("Optimizer steps.", 300)
    batch_size: int = _help("Instance images per step (as many class images are added).", 1)
    lr: float = _help("Learning rate of the UNet LoRA.", 5e-4)
    lr_text: float = _help("Learning rate of the text-encoder LoRA.", 1e-4)
    lr_text2: float = _help("SDXL: learning rate of the second text encoder's LoRA (0: the "
                            "same as --lr-text).", 0.0)
    train_text_encoder: bool = _help("Also train LoRA on the text encoder's attention.", False)
    rank: int = _help("LoRA rank.", 4)
    alpha: float = _help("LoRA alpha (0: equal to the rank).", 0.0)
    mixed_precision: str = _help("no, fp16 or bf16 (LoRA weights stay fp32).", "no",
                                 choices=MIXED_PRECISIONS)
    base_precision: str = _help(
        "How the frozen base's linear layers (UNet/transformer, and a text encoder that stays "
        "loaded) are stored while training: auto (in --mixed-precision's dtype), int8 or fp8 "
        "(torchao, weight-only), nf4 (bitsandbytes 4-bit); dequantised layer by layer, the "
        "LoRA stays fp32 and its file is the same.", "auto", choices=BASE_PRECISIONS)
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: less memory, slower steps.", False)
    blocks_to_swap: int = _help(
        "Keep the frozen weights of the denoiser's last N blocks in CPU memory and copy each "
        "to the GPU one block ahead of use, forward and backward (sd-scripts' "
        "--blocks_to_swap): less GPU memory, slower steps. 0: off.", 0)
    seed: int = _help("Random seed for weights, noise, timesteps and data order.", 0)
    checkpoint_every: int = _help("Write a resumable checkpoint every N steps (0: never).", 0)
    save_every: int = _help("Every N steps, save that step's LoRA files (the --save-format "
                            "layouts, loadable in every client) in OUTPUT/snapshots/step-N/, for "
                            "`evaluate --snapshots` and `generate --step N` (0: never).", 0)
    resume: bool = _help("Continue from the newest checkpoint in OUTPUT.", False)
    force: bool = _help("With --resume: continue even if the settings changed.", False)
    overwrite: bool = _help("Train afresh in an OUTPUT that holds a finished or interrupted run: "
                            "its LoRA files, checkpoints, metrics, samples, tracker logs, config "
                            "and model card are deleted when training starts (class images are "
                            "kept). Without it such an OUTPUT is refused.", False)
    validation_prompt: str = _help("Prompt drawn into OUTPUT/samples during training.", "")
    validation_every: int = _help("Draw the validation prompt every N steps (0: only at the end).", 0)
    validation_images: int = _help("Images per validation (seeds SEED, SEED+1, ...): "
                                   "samples/step-N.png, then step-N-1.png, ...", 1)
    captions: bool = _help("Use IMAGE.txt beside each instance image as its prompt when present.",
                           False)
    output: str = _help("Run folder.", "runs/run")
    save_format: str = _help("diffusers, kohya (for AUTOMATIC1111/ComfyUI/InvokeAI) or both.",
                             "both", choices=SAVE_FORMATS)
    max_grad_norm: float = _help("Clip the gradient norm to this (0: no clipping).", 1.0)
    # --- the optimizer, its schedule and gradient accumulation (_check_optimizer) ---
    optimizer: str = _help(
        "adamw (torch's); adamw8bit (bitsandbytes: 8-bit moments, less memory); adafactor "
        "(transformers', factored second moments, --lr as given); prodigy (estimates its own "
        "step size: --lr multiplies it, and the AdamW-sized default learning rates become 1); "
        "schedulefree (schedule-free AdamW: no schedule, saves its averaged weights).", "adamw",
        choices=OPTIMIZERS)
    lr_scheduler: str = _help(
        "How the learning rates change over the steps (diffusers' schedules): constant, "
        "constant_with_warmup, linear, cosine or polynomial (to 0 after --lr-warmup-steps).",
        "constant", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _help("Steps over which the learning rates rise linearly from 0 "
                                 "(not with --lr-scheduler constant).", 0)
    lr_power: float = _help("--lr-scheduler polynomial: the decay's power (1: linear).", 1.0)
    gradient_accumulation: int = _help(
        "Average the gradients of N batches before each optimizer step (a step is one "
        "optimizer step: --steps 100 with N=4 draws 400 batches).", 1)
    class_draw_steps: int = _help("Sampler steps used to draw class images.", 25)
    class_draw_batch: int = _help("Class images drawn per batch.", 4)
    snr_gamma: float = _help("Min-SNR-gamma loss weighting: weigh each sample by "
                             "min(SNR, gamma)/SNR (typical 5; 0: off).", 0.0)
    timestep_sampling: str = _help(
        "Flow models (FLUX): how each step draws its noise level: logit_normal (mass in the "
        "middle, SD3's default), uniform, or mode (SD3's mode sampling). Ignored by SD 1.x/SDXL, "
        "which draw uniformly.", "logit_normal", choices=TIMESTEP_SAMPLINGS)
    noise_offset: float = _help("Add this x N(0,1) per sample and channel to the noise, so "
                                "brightness can shift (typical 0.05; 0: off).", 0.0)
    caption_dropout: float = _help("Probability of training an instance image on the empty "
                                   "prompt instead of its own (0: never).", 0.0)
    masked_loss: bool = _help(
        "Weigh each photo's loss by its mask (NAME.mask.png beside NAME.jpg, white = subject; "
        "`prepare --mask face` makes them): the subject counts fully, the rest by "
        "--unmasked-weight. A photo without one counts whole.", False)
    unmasked_weight: float = _help("--masked-loss: the loss weight outside the mask (0: the "
                                   "background is not learnt; 1: as without masks).", 0.1)
    masked_prior_weight: float = _help(
        "--masked-loss: also pull the LoRA's prediction outside the mask to the frozen base's "
        "(masked prior preservation), this weight x that MSE; one more forward pass of the "
        "instance rows per step (0: off).", 0.0)
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
    adapter: str = _help("lora, dora (weight-decomposed LoRA: a trained magnitude per "
                         "output channel; diffusers file only, no kohya export), lokr "
                         "(Kronecker product) or loha (Hadamard product), LyCORIS's, through "
                         "peft; SD 1.x and SDXL only.", "lora", choices=ADAPTERS)
    targets: str = _help("Which denoiser layers take the adapter: attn (the attention "
                         "projections), attn-mlp (also the feed-forward Linears) or all (also "
                         "the ResNet convolutions, time projections and proj_in/proj_out, "
                         "kohya's LoCon; FLUX: every block Linear).", "attn", choices=TARGETS)
    report_to: str = _help("Also log the per-step metrics to tensorboard or wandb (their package "
                           "must be installed), under OUTPUT/logs (empty: metrics.jsonl only).", "")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"{option_name(key)}: {why} (got {getattr(self, key)!r})")

        object.__setattr__(self, "prior_preservation", prior_mode(self.prior_preservation))
        check_numbers(self)  # and every field's choices
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
        self._check_optimizer(bad)  # after --steps' range: the warmup is checked against it
        for key in ("checkpoint_every", "validation_every"):
            if not 0 <= getattr(self, key) <= MAX_TRAIN_STEPS:
                raise bad(key, f"must be between 0 and {MAX_TRAIN_STEPS}")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be between 0 and {MAX_SEED}")
        if self.alpha < 0:
            raise bad("alpha", "must be 0 (= rank) or positive")
        if self.lr_text2 < 0:
            raise bad("lr_text2", "must be 0 (= --lr-text) or positive")
        if self.save_every < 0:
            raise bad("save_every", "must be 0 (never) or positive")
        if self.blocks_to_swap < 0:
            raise bad("blocks_to_swap", "must be 0 (off) or positive")
        if self.blocks_to_swap and self.adapter == "dora":
            raise bad("blocks_to_swap", "does not work with --adapter dora (peft reads the "
                      "frozen weights when it builds DoRA, and they are parked in CPU memory)")
        if self.adapter in LYCORIS and self.blocks_to_swap:
            raise bad("blocks_to_swap", f"does not work with --adapter {self.adapter} (peft "
                      "sizes LoKr/LoHa by the frozen weights, and they are parked in CPU memory)")
        if self.adapter in LYCORIS and self.base_precision != "auto":
            raise bad("base_precision", f"does not work with --adapter {self.adapter} (peft has "
                      "quantised-layer forms for LoRA only); use --base-precision auto")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be 0 (off) or positive")
        if not 0 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise bad("resolution", f"must be a positive multiple of 8, at most {MAX_SIDE} "
                                    "(0: the model's own)")
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
        if self.overwrite and self.resume:
            raise bad("overwrite", "cannot be combined with --resume (--resume continues the run "
                      "in OUTPUT, --overwrite replaces it)")
        if self.train_token or self.prior_preservation == "dop":
            from .templates import guess_identifier

            if not guess_identifier(self.instance_prompt, self.class_prompt):
                why = "--train-token to train" if self.train_token else "--prior-preservation dop to remove"
                raise bad("instance_prompt", f"has no identifier word for {why}")

    def _check_levers(self, bad) -> None:
        for key in ("snr_gamma", "noise_offset"):
            if getattr(self, key) < 0:
                raise bad(key, "must be 0 (off) or positive")
        for key in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be at least 0 (off) and below 1")
        if not 0 <= self.unmasked_weight <= 1:
            raise bad("unmasked_weight", "must be between 0 and 1")
        if self.masked_prior_weight < 0:
            raise bad("masked_prior_weight", "must be 0 (off) or positive")
        defaults = type(self).__dataclass_fields__
        for key in ("unmasked_weight", "masked_prior_weight"):
            if not self.masked_loss and getattr(self, key) != defaults[key].default:
                raise bad(key, "applies only with --masked-loss")

    def _check_optimizer(self, bad) -> None:
        """--optimizer, its schedule and accumulation (the count's range is
        TRAIN_CEILINGS'); Prodigy's defaulted learning rates set to 1 here,
        so config.toml and the model card hold what the run used."""
        if self.optimizer == "prodigy":
            for key in PRODIGY_DEFAULTED:
                if getattr(self, key) == type(self).__dataclass_fields__[key].default:
                    object.__setattr__(self, key, PRODIGY_LR)
            # prodigyopt refuses groups with different rates (its one step
            # size estimate is shared)
            used = {"lr_text": self.train_text_encoder,
                    "lr_text2": self.train_text_encoder and self.lr_text2 > 0,
                    "lr_token": self.train_token}
            for key in (k for k, on in used.items() if on and getattr(self, k) != self.lr):
                raise bad(key, f"--optimizer prodigy takes one learning rate for every part: "
                               f"use --lr's ({self.lr:g})")
        if not 0 <= self.lr_warmup_steps <= self.steps:
            raise bad("lr_warmup_steps", f"must be between 0 and --steps ({self.steps})")
        if not self.lr_power > 0:
            raise bad("lr_power", "must be a positive number")
        if self.optimizer == "schedulefree":
            if self.lr_scheduler != "constant":
                raise bad("lr_scheduler", "--optimizer schedulefree replaces the schedule: use "
                          "constant (--lr-warmup-steps is its own warmup)")
            if self.ema_decay:
                raise bad("ema_decay", "--optimizer schedulefree already averages the weights "
                          "and saves that average: use --ema-decay 0")
        elif self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise bad("lr_warmup_steps", "the constant schedule has no warmup: use "
                      "--lr-scheduler constant_with_warmup")

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
        """Image-free: the frozen model's own predictions (model or dop)."""
        return self.prior_preservation in ("model", "dop")

    @property
    def prior_same_noise(self) -> bool:
        """dop: the prior rows reuse the instance rows' noise and timesteps,
        under each caption with the identifier removed."""
        return self.prior_preservation == "dop"

    @property
    def class_path(self) -> Path:
        return Path(self.class_dir) if self.class_dir else Path(self.output) / "class_images"


# --report-to value -> the package its accelerate tracker needs
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def check_report_to(value: str) -> None:
    """One line naming the option and the package, before anything is written."""
    if not value:
        return
    if value not in REPORTERS:
        raise UserError(f"--report-to: must be one of {', '.join(REPORTERS)} or empty "
                        f"(got {value!r})")
    package = REPORTERS[value]
    if not installed(package):
        raise UserError(f"--report-to {value}: the `{package}` package is not installed "
                        f"(pip install {package})")
