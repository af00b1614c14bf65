"""Every command's options, one frozen dataclass each: with `TrainConfig`
and `PrepareConfig` (config.py) they are the config tree the CLI generates
its options from, `--config FILE.toml` reads, and the Python API takes:

    from lorabooth import GenerateConfig, run
    run(GenerateConfig(run="runs/dog", prompt=["a photo of sks dog on the beach"]))

`run(config)` is the one call the CLI makes after parsing. It imports the
heavy modules (torch, diffusers) only then, so a bad option is answered
without them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .checks import (
    MAX_BATCH,
    MAX_IMAGES,
    MAX_RANK,
    MAX_RENDERED,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TRAIN_STEPS,
    check_count,
    check_options,
    check_seeds,
    check_size,
)
from .config import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    PrepareConfig,
    TrainConfig,
    _help,
    check_numbers,
    option_name,
)
from .errors import UserError
from .evaluation.judges import register as register_judges
from .formats import WEIGHT_NAME
from .guard import check
from .plans import PLANS
from .tune_pruning import PRUNERS

log = logging.getLogger("lorabooth")
MAX_TRIALS = 10000  # `tune --budget`
MAX_WORKERS = 256  # `tune --workers`: processes on one machine
MAX_HEARTBEAT = 3600  # `tune --heartbeat` seconds: a dead worker's trial waits twice this


def _bad(config: Any, key: str, why: str) -> UserError:
    return UserError(f"{option_name(key)}: {why} (got {getattr(config, key)!r})")


def _require(config: Any, *keys: str) -> None:
    for key in keys:
        if not getattr(config, key):
            raise UserError(f"{option_name(key)}: is required")


def _one_of(config: Any, key: str, choices: tuple[str, ...]) -> None:
    if getattr(config, key) not in choices:
        raise _bad(config, key, f"must be one of {', '.join(choices)}")


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
    guidance: list[float] = _help("Guidance scale(s), comma list.", default_factory=lambda: [7.5])
    steps: int = _help("Sampler steps.", 25)
    num_images: int = _help("Images (seeds) per setting.", 4)
    seed: int = _help("First seed; image i uses seed+i.", 0)
    scheduler: str = _help("dpm, ddim, euler or pndm.", "dpm")
    width: int | None = _help("Image width in pixels, a multiple of 8 (default: the model's "
                              "native size).", None)
    height: int | None = _help("Image height in pixels, a multiple of 8 (default: the model's "
                               "native size).", None)
    model: str = _help("Base model (default: the run's own).", "")
    output: str = _help("Folder (default: RUN/generated).", "")

    def __post_init__(self) -> None:
        check_numbers(self)
        _require(self, "run")
        if not self.prompt:
            raise UserError("--prompt: give at least one prompt")
        for key in ("unet_scale", "text_scale", "guidance"):
            if not getattr(self, key):
                raise _bad(self, key, "expected at least one number")
        check_count(self.num_images, "--num-images", MAX_IMAGES)
        check_count(self.steps, "--steps", MAX_STEPS)
        check_size(self.width, "--width")
        check_size(self.height, "--height")
        check_seeds([self.seed, self.seed + self.num_images - 1], "--seed")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = _help("Run folder.", "", positional=True)
    real: str = _help("Folder of the subject's photos (required).", "")
    class_noun: str = _help("Class noun (default: from the run).", "")
    kind: str = _help("The paper's prompt set: live (subjects) or object.", "live")
    prompts: str = _help("Own prompts file, one per line ({0}: identifier, {1}: class noun).", "")
    identifier: str = _help("Identifier (default: from the run's metadata).", "")
    images_per_prompt: int = _help("Images per prompt (the paper uses 4).", 4)
    pres_images: int = _help("Class-prompt images for PRES.", 8)
    seed: int = _help("First seed; image i uses seed+i.", 0)
    unet_scale: float = _help("UNet LoRA scale.", 1.0)
    text_scale: float = _help("Text-encoder LoRA scale (SDXL: both encoders unless "
                              "--text2-scale is given).", 1.0)
    text2_scale: float | None = _help("SDXL: the second text encoder's LoRA scale (default: "
                                      "--text-scale).", None)
    guidance: float = _help("Guidance scale.", 7.5)
    steps: int = _help("Sampler steps.", 25)
    dino: str = _help("DINO model (folder or hub id).", DEFAULT_DINO)
    clip: str = _help("CLIP model (folder or hub id; e.g. openai/clip-vit-large-patch14).",
                      DEFAULT_CLIP)
    model: str = _help("Base model (default: the run's own).", "")
    out: str = _help("Folder (default: RUN/eval).", "")
    baselines: bool = _help("Add the base model (floor) and the real photos leave-one-out "
                            "(ceiling).", False)

    def __post_init__(self) -> None:
        check_numbers(self)
        _require(self, "run", "real")
        check_options(self.kind, self.prompts or None, self.images_per_prompt, self.pres_images,
                      self.steps, self.seed)


@dataclass(frozen=True)
class IdentifierConfig:
    model: str = _help("Whose tokenizer (tiny = CLIP's).", "tiny")
    n: int = _help("How many candidates to show.", 10)
    seed: int | None = _help("Draw --n at random from the rarest candidates instead of the top.",
                             None)
    check: str = _help("Show how this prompt tokenises and warn about its identifier.", "")

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.n < 1:
            raise _bad(self, "n", "must be at least 1")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise _bad(self, "seed", f"must be between 0 and {MAX_SEED}")


@dataclass(frozen=True)
class InspectConfig:
    file: str = _help("A LoRA file (.safetensors, any layout).", "", positional=True)
    model: str = _help("Check the clients' key rules against this base model's weights "
                       "(default: Stable Diffusion 1.5's for SD 1.x files, SDXL 1.0's for "
                       "SDXL files).", "")

    def __post_init__(self) -> None:
        _require(self, "file")


@dataclass(frozen=True)
class ConvertConfig:
    src: str = _help("A LoRA .safetensors file (diffusers, kohya or peft layout).", "",
                     positional=True)
    dst: str = _help("Output file (or folder).", "", positional=True)
    to: str = _help("Layout to write: kohya, diffusers or peft (required).", "")
    overwrite: bool = _help("Replace DST when it exists (never one of the inputs).", False)

    def __post_init__(self) -> None:
        _require(self, "src", "dst", "to")
        _one_of(self, "to", ("kohya", "diffusers", "peft"))


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
        _require(self, "out")
        if self.rank is not None:
            check_count(self.rank, "--rank", MAX_RANK)


@dataclass(frozen=True)
class FuseConfig:
    run: str = _help("Run folder or LoRA file.", "", positional=True)
    out: str = _help("Output model folder (required).", "")
    unet_scale: float = _help("UNet LoRA scale baked in.", 1.0)
    text_scale: float = _help("Text-encoder LoRA scale baked in.", 1.0)
    model: str = _help("Base model (default: the run's own).", "")
    single_file: bool = _help("Write one .safetensors in the original SD (or SDXL) layout "
                              "instead of a folder.", False)
    overwrite: bool = _help("With --single-file: replace --out when it exists.", False)

    def __post_init__(self) -> None:
        check_numbers(self)
        _require(self, "run", "out")


@dataclass(frozen=True)
class SweepConfig:
    file: str = _help("Sweep TOML: [base], [train.grid], [generate], [generate.grid], "
                      "[evaluate].", "", positional=True)
    yes: bool = _help("Start a sweep of more runs than the safety cap.", False)

    def __post_init__(self) -> None:
        _require(self, "file")


@dataclass(frozen=True)
class DemoConfig:
    output: str = _help("Run folder.", "runs/demo")
    steps: int = _help("Training steps.", 400)

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.steps < 1:
            raise _bad(self, "steps", "must be at least 1")
        check_count(self.steps, "--steps", MAX_TRAIN_STEPS)


@dataclass(frozen=True)
class PretrainConfig:
    out: str = _help("Folder for the model (diffusers layout; required).", "")
    seed: int = _help("Random seed.", 0)
    images: int = _help("Rendered training pictures.", 40000)
    vae_steps: int = _help("VAE training steps.", 3000)
    unet_steps: int = _help("UNet and text-encoder training steps.", 3000)
    judge_steps: int = _help("Judge training steps.", 1500)
    batch: int = _help("Batch size.", 64)
    reuse: str = _help("An earlier toy model folder whose VAE and judges to keep (they do not "
                       "depend on captions): only the UNet and text encoder are trained.", "")
    init: str = _help("An earlier toy model folder to start the UNet and text encoder from "
                      "(continued pretraining) instead of from scratch.", "")

    def __post_init__(self) -> None:
        check_numbers(self)
        _require(self, "out")
        check_seeds([self.seed], "--seed")
        check_count(self.images, "--images", MAX_RENDERED)
        for key in ("vae_steps", "unet_steps", "judge_steps"):
            check_count(getattr(self, key), option_name(key), MAX_TRAIN_STEPS)
        check_count(self.batch, "--batch", MAX_BATCH)


@dataclass(frozen=True)
class ClaimsConfig:
    out: str = _help("Folder for runs and figures.", "runs/toyworld-claims")
    report: str = _help("Markdown report to write.", "docs/toyworld.md")
    quick: bool = _help("One seed, the fidelity claim only.", False)


@dataclass(frozen=True)
class TuneStudyConfig:
    out: str = _help("Folder for the tunes, the fixed-setting runs and their scores.",
                     "runs/tune-study")
    report: str = _help("Markdown report to write (its figure goes beside it, in tune/).",
                        "docs/tune.md")
    repeats: list[int] = _help("Repeats to run here (tune seeds), comma list; run them as "
                               "separate processes side by side, each rewrites the report.",
                               default_factory=lambda: [0, 1, 2])
    budget: int = _help("Completed trials per tune.", 8)

    def __post_init__(self) -> None:
        check_numbers(self)
        check_count(self.budget, "--budget", MAX_TRIALS)
        if not self.repeats or any(r != int(r) or not 0 <= r <= 1000 for r in self.repeats):
            raise _bad(self, "repeats", "whole numbers between 0 and 1000")
        object.__setattr__(self, "repeats", [int(r) for r in self.repeats])


@dataclass(frozen=True)
class TuneConfig:
    photos: str = _help("Folder of the subject's photos.", "", positional=True)
    class_noun: str = _help("Class noun (required): prompts are 'a photo of sks NOUN' and "
                            "'a photo of a NOUN'.", "")
    budget: int = _help("Completed trials the study holds in total (a second tune adds up to "
                        "this).", 20)
    model: str = _help("Base model, as for train.", "tiny")
    out: str = _help("Folder: study.db, trials/, report.md, pareto.svg, best/.", "runs/tune")
    storage: str = _help("Optuna RDB URL, e.g. postgresql://user@host/db (default: SQLite "
                         "OUT/study.db); `tune`s on several machines share a study through it.",
                         "")
    workers: int = _help("Worker processes on this machine sharing the study: one GPU each "
                         "(round robin) when there are GPUs, else the CPU cores split between "
                         "them.", 1)
    heartbeat: int = _help("Seconds between a running trial's liveness beats in the storage; a "
                           "trial silent for twice as long belongs to a dead worker and is "
                           "retried once.", 60)
    space: str = _help("TOML file narrowing the search: lr = {low = 1e-4, high = 1e-3, log = "
                       "true}, steps = [100, 200], prior_preservation = \"model\" (one value "
                       "fixes a parameter; its steps replace --steps).", "")
    seed: int = _help("Seed of the sampler, the training runs and the evaluation.", 0)
    steps: list[int] = _help("Training step counts to choose from, comma list.",
                             default_factory=lambda: [100, 200, 400])
    resolution: int = _help("Training resolution (0: the model's own).", 0)
    num_class_images: int = _help("Class images for --prior-preservation images (drawn once, "
                                  "shared by the trials).", 50)
    kind: str = _help("The paper's prompt set to score on: live or object.", "live")
    prompts: str = _help("Own prompts file instead ({0}: identifier, {1}: class noun).", "")
    images_per_prompt: int = _help("Images per prompt.", 4)
    pres_images: int = _help("Class-prompt images for PRES.", 8)
    sample_steps: int = _help("Sampler steps for every image drawn.", 25)
    judges: str = _help("\"toy\": the toy world's judges instead of DINO and CLIP.", "")
    dino: str = _help("DINO model (folder or hub id).", DEFAULT_DINO)
    clip: str = _help("CLIP model (folder or hub id).", DEFAULT_CLIP)
    pruner: str = _help("percentile: stop a trial whose validation fidelity is in the bottom "
                        "--prune-percentile of the finished trials at the same step (after 4 "
                        "trials); none.", "percentile")
    prune_percentile: float = _help("The pruner's percentile: 25 pruned 55-68% of the planned "
                                    "steps on the toy world, 10 fewer (docs/tune.md).", 25.0)
    prune_every: int = _help("Steps between a trial's validations under the pruner (4 images "
                             "of the instance prompt, scored by the judges).", 50)

    def __post_init__(self) -> None:
        check_numbers(self)
        _require(self, "photos", "class_noun")
        _one_of(self, "pruner", PRUNERS)
        if not 0 < self.prune_percentile < 100:
            raise _bad(self, "prune_percentile", "between 0 and 100")
        check_count(self.prune_every, "--prune-every", MAX_TRAIN_STEPS)
        if self.class_noun != " ".join(self.class_noun.split()):
            raise _bad(self, "class_noun", "one line, no leading or trailing spaces")
        check_count(self.budget, "--budget", MAX_TRIALS)
        check_count(self.workers, "--workers", MAX_WORKERS)
        check_count(self.heartbeat, "--heartbeat", MAX_HEARTBEAT)
        # the command line reads a comma list as numbers: 200.0 is 200, 2.5 no step count
        if not self.steps or any(s != int(s) or not 1 <= s <= MAX_TRAIN_STEPS for s in self.steps):
            raise _bad(self, "steps", f"whole numbers between 1 and {MAX_TRAIN_STEPS}")
        object.__setattr__(self, "steps", [int(s) for s in self.steps])
        check_count(self.num_class_images, "--num-class-images", MAX_IMAGES)
        check_count(self.sample_steps, "--sample-steps", MAX_STEPS)
        if not 0 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise _bad(self, "resolution", f"must be a positive multiple of 8, at most {MAX_SIDE} "
                                           "(0: the model's own)")
        check_options(self.kind, self.prompts or None, self.images_per_prompt, self.pres_images,
                      1, self.seed)
        _one_of(self, "judges", ("", "toy"))


@dataclass(frozen=True)
class UiConfig:
    workspace: str = _help("The one folder the page reads and writes (photos, datasets, runs); "
                           "a path outside it, `..` or a symlink out of it is refused.",
                           "lorabooth-runs")
    host: str = _help("Address to listen on; any but 127.0.0.1, localhost or ::1 needs --auth.",
                      "127.0.0.1")
    port: int = _help("Port to listen on.", 7860)
    auth: str = _help("user:password the page asks for (required with a --host beyond this "
                      "machine).", "")
    model: str = _help("Base model the training form starts with (tiny, toy, a folder, a hub "
                       "id).", "tiny")
    max_upload_mb: int = _help("Largest photo the page accepts, in MB.", 25)

    def __post_init__(self) -> None:
        from .ui.server import parse_auth

        check_numbers(self)
        _require(self, "workspace", "host", "model")
        if not 0 < self.port < 65536:
            raise _bad(self, "port", "must be between 1 and 65535")
        if self.max_upload_mb < 1:
            raise _bad(self, "max_upload_mb", "must be at least 1")
        parse_auth(self.auth, self.host)


def _train(c: TrainConfig) -> Any:
    from .training import train

    output = train(c)
    log.info("LoRA: %s", output / WEIGHT_NAME)
    return output


def _generate(c: GenerateConfig) -> Any:
    from .drawing import generate

    images = generate(c.run, c.prompt, unet_scales=c.unet_scale, text_scales=c.text_scale,
                      guidances=c.guidance, num_images=c.num_images, seed=c.seed, steps=c.steps,
                      negative_prompt=c.negative_prompt, scheduler=c.scheduler,
                      output=c.output or None, model=c.model or None, width=c.width,
                      height=c.height, text2_scales=c.text2_scale)
    log.info("drew %d images", len(images))
    return images


def _prepare(c: PrepareConfig) -> Any:
    from .prepare import prepare

    return prepare(c)


def _identifier(c: IdentifierConfig) -> Any:
    from .identifier import check_prompt, rare_identifiers, render_table
    from .models import load_tokenizer

    tokenizer = load_tokenizer(c.model)
    if c.check:
        report, warnings = check_prompt(c.check, tokenizer)
        print(report)
        for w in warnings:
            log.warning("%s", w)
        return report
    candidates = rare_identifiers(tokenizer, n=c.n, seed=c.seed)
    print(render_table(candidates))
    return candidates


def _evaluate(c: EvaluateConfig) -> Any:
    from .evaluation.runner import evaluate

    return evaluate(c.run, c.real, class_noun=c.class_noun or None, kind=c.kind,
                    prompts_file=c.prompts or None, identifier=c.identifier or None,
                    images_per_prompt=c.images_per_prompt, seed=c.seed, unet_scale=c.unet_scale,
                    text_scale=c.text_scale, text2_scale=c.text2_scale, guidance=c.guidance,
                    steps=c.steps,
                    out=c.out or None, baselines=c.baselines, dino=c.dino, clip=c.clip,
                    model=c.model or None, pres_images=c.pres_images)


def _inspect(c: InspectConfig) -> Any:
    from .formats.inspection import check_summary, inspect_lora, render

    names, label = None, ""
    if c.model:
        from .formats.clients import is_sdxl_folder, model_names, sdxl_folder_names
        from .models import load_base

        if is_sdxl_folder(c.model):
            names, label = sdxl_folder_names(c.model), c.model
        else:
            base = load_base(c.model)
            names, label = model_names(base.unet, base.text_encoder, base.text_encoder_2), c.model
    summary = inspect_lora(c.file, names, label)
    print(render(summary))
    check_summary(summary)
    return summary


def _convert(c: ConvertConfig) -> Any:
    from .formats.layouts import convert_file

    out = convert_file(c.src, c.dst, c.to)
    log.info("wrote %s", out)
    return out


def _merge(c: MergeConfig) -> Any:
    from .formats.merging import merge

    return merge(c.loras, c.weights or None, c.out, rank=c.rank)


def _fuse(c: FuseConfig) -> Any:
    from .formats.merging import fuse

    return fuse(c.run, c.out, unet_scale=c.unet_scale, text_scale=c.text_scale,
                model=c.model or None, single_file=c.single_file)


def _sweep(c: SweepConfig) -> Any:
    from .sweep import run_sweep

    return run_sweep(c.file, yes=c.yes)


def _tune(c: TuneConfig) -> Any:
    from .tune import tune

    return tune(c)


def _ui(c: UiConfig) -> Any:
    from .ui.server import serve

    return serve(c.workspace, host=c.host, port=c.port, auth=c.auth, model=c.model,
                 max_upload_mb=c.max_upload_mb)


def _demo(c: DemoConfig) -> Any:
    from .demo import demo

    return demo(c.output, steps=c.steps)


def _pretrain(c: PretrainConfig) -> Any:
    from .toyworld.pretrain import pretrain

    return pretrain(c.out, seed=c.seed, images=c.images, vae_steps=c.vae_steps,
                    unet_steps=c.unet_steps, batch=c.batch, judge_steps=c.judge_steps,
                    reuse=c.reuse or None, init=c.init or None)


def _claims(c: ClaimsConfig) -> Any:
    from .toyworld.claims import claims

    return claims(c.out, report=c.report, quick=c.quick)


def _toy_judges() -> Any:
    from .toyworld.judges import toy_judges

    return toy_judges()


register_judges("toy", _toy_judges)  # --judges toy, in `tune` and a sweep's [evaluate]


def _tune_study(c: TuneStudyConfig) -> Any:
    from .toyworld.tune_study import tune_study

    return tune_study(c.out, c.report, c.repeats, c.budget, TuneConfig)


# command -> (config class, what it does, the function that runs it); "a b"
# is subcommand b of a
COMMANDS: dict[str, tuple[type, str, Callable[[Any], Any]]] = {
    "train": (TrainConfig, "train a DreamBooth LoRA on photos of one subject", _train),
    "generate": (GenerateConfig, "draw with a trained LoRA at chosen scales", _generate),
    "prepare": (PrepareConfig, "turn a folder of photos into a clean training set", _prepare),
    "identifier": (IdentifierConfig, "pick a rare-token identifier, or check one", _identifier),
    "evaluate": (EvaluateConfig, "DINO, CLIP-I, CLIP-T, PRES, DIV as in the paper", _evaluate),
    "toyworld pretrain": (PretrainConfig, "train the toy model and judges from scratch",
                          _pretrain),
    "toyworld claims": (ClaimsConfig, "measure DreamBooth's claims on the toy world", _claims),
    "toyworld tune-study": (TuneStudyConfig, "measure whether `tune` beats fixed settings on "
                                             "the toy world, at the same CPU time", _tune_study),
    "convert": (ConvertConfig, "LoRA file between diffusers, kohya and peft layouts", _convert),
    "inspect": (InspectConfig, "what a LoRA file holds, and whether ComfyUI and AUTOMATIC1111 "
                               "load every key of it", _inspect),
    "merge": (MergeConfig, "combine LoRAs trained on the same base", _merge),
    "fuse": (FuseConfig, "bake a LoRA into a full diffusers model folder", _fuse),
    "sweep": (SweepConfig, "a grid of training runs x inference settings, one report", _sweep),
    "tune": (TuneConfig, "search training settings and scales with Optuna: fidelity, "
                         "CLIP-T, PRES", _tune),
    "demo": (DemoConfig, "train and draw on the built-in model with example photos", _demo),
    "ui": (UiConfig, "the whole workflow in a local web page: photos, identifier, train, draw, "
                     "measure, runs", _ui),
}


def run(config: Any) -> Any:
    """Carry out the command ``config`` is the options of, once the write
    guard has passed what it declares it reads and writes (plans.PLANS)."""
    for name, (cls, _, runner) in COMMANDS.items():
        if type(config) is cls:
            if name not in PLANS:
                raise TypeError(f"command {name!r} declares no plan in plans.PLANS")
            check(PLANS[name](config))
            return runner(config)
    raise TypeError(f"not a lorabooth command config: {type(config).__name__}")
