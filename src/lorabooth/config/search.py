"""The configs of the commands that run many trainings: `sweep` (with its
file's [generate] and [evaluate] tables) and `tune`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from .checks import (
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TRAIN_STEPS,
    check_count,
    check_options,
    check_seeds,
)
from .fields import _help, bad, check_numbers, require
from .generate import FAMILY_GUIDANCE, JUDGES, EvaluateOptions

MAX_TRIALS = 10000  # `tune --budget`
MAX_WORKERS = 256  # `tune --workers`: processes on one machine
MAX_HEARTBEAT = 3600  # `tune --heartbeat` seconds: a dead worker's trial waits twice this

PRUNERS = ("percentile", "none")  # `tune --pruner`; search/tune_pruning builds them


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
    guidance: list[float] = _help("[generate.grid] guidance scales (default: "
                                  + FAMILY_GUIDANCE + ").", default_factory=list)

    def __post_init__(self) -> None:
        check_numbers(self)
        for key in ("prompts", "seeds", "unet_scale", "text_scale"):
            if not getattr(self, key):
                raise UserError(f"`{key}` must be a non-empty list (got [])")
        check_seeds(self.seeds, "`seeds`")
        check_count(self.steps, "`steps`", MAX_STEPS)


@dataclass(frozen=True)
class SweepEvaluate(EvaluateOptions):
    """A sweep file's [evaluate] table: `lorabooth evaluate` on every run
    (`prompts_file`, its older key for `prompts`, is read too)."""
    real: str = _help("Folder of the subject's photos (required).", "")
    steps: int = _help("Sampler steps.", 25)
    baselines: bool = _help("Add the base model and the real photos as rows.", False)
    judges: str = _help("\"toy\": the toy world's judges instead of DINO and CLIP.", "")
    snapshots: bool = _help("Also score every step each run saved (save_every in [base] or "
                            "[train.grid]): the figures against the step and the step to keep "
                            "per run, in the report.", False)

    def __post_init__(self) -> None:
        if not Path(self.real).is_dir():
            raise UserError(f"`real` must be the folder of the subject's photos (got {self.real!r})")
        if self.judges not in JUDGES:
            raise UserError(f"`judges` can only be \"toy\" (got {self.judges!r}); "
                            "leave it out for DINO and CLIP")
        check_numbers(self)
        check_options(self.kind, self.prompts, self.images_per_prompt, self.pres_images,
                      self.steps)


@dataclass(frozen=True)
class SweepConfig:
    file: str = _help("Sweep TOML: [base], [train.grid], [generate], [generate.grid], "
                      "[evaluate].", "", positional=True)
    yes: bool = _help("Start a sweep of more runs than the safety cap.", False)

    def __post_init__(self) -> None:
        require(self, "file")



@dataclass(frozen=True)
class TuneConfig(EvaluateOptions):
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
    sample_steps: int = _help("Sampler steps for every image drawn.", 25)
    judges: str = _help("\"toy\": the toy world's judges instead of DINO and CLIP.", "",
                        choices=JUDGES)
    pruner: str = _help("percentile: stop a trial whose validation fidelity is in the bottom "
                        "--prune-percentile of the finished trials at the same step (after 4 "
                        "trials); none.", "percentile", choices=PRUNERS)
    prune_percentile: float = _help("The pruner's percentile: 25 pruned 55-68% of the planned "
                                    "steps on the toy world, 10 fewer (docs/tune.md).", 25.0)
    prune_every: int = _help("Steps between a trial's validations under the pruner (4 images "
                             "of the instance prompt, scored by the judges).", 50)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "photos", "class_noun")
        if not 0 < self.prune_percentile < 100:
            raise bad(self, "prune_percentile", "between 0 and 100")
        check_count(self.prune_every, "--prune-every", MAX_TRAIN_STEPS)
        if self.class_noun != " ".join(self.class_noun.split()):
            raise bad(self, "class_noun", "one line, no leading or trailing spaces")
        check_count(self.budget, "--budget", MAX_TRIALS)
        check_count(self.workers, "--workers", MAX_WORKERS)
        check_count(self.heartbeat, "--heartbeat", MAX_HEARTBEAT)
        # the command line reads a comma list as numbers: 200.0 is 200, 2.5 no step count
        if not self.steps or any(s != int(s) or not 1 <= s <= MAX_TRAIN_STEPS for s in self.steps):
            raise bad(self, "steps", f"whole numbers between 1 and {MAX_TRAIN_STEPS}")
        object.__setattr__(self, "steps", [int(s) for s in self.steps])
        check_count(self.num_class_images, "--num-class-images", MAX_IMAGES)
        check_count(self.sample_steps, "--sample-steps", MAX_STEPS)
        if not 0 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise bad(self, "resolution", f"must be a positive multiple of 8, at most {MAX_SIDE} "
                                           "(0: the model's own)")
        check_options(self.kind, self.prompts, self.images_per_prompt, self.pres_images,
                      1, self.seed)


