"""The configs of the toy world's commands: `demo`, `toyworld pretrain`,
`toyworld flow-pretrain`, `toyworld claims` and `toyworld tune-study`."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import MAX_BATCH, MAX_RENDERED, MAX_TRAIN_STEPS, check_count, check_seeds
from .fields import _help, bad, check_numbers, option_name, require
from .search import MAX_TRIALS


@dataclass(frozen=True)
class DemoConfig:
    output: str = _help("Run folder.", "runs/demo")
    steps: int = _help("Training steps.", 400)

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.steps < 1:
            raise bad(self, "steps", "must be at least 1")
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
        require(self, "out")
        check_seeds([self.seed], "--seed")
        check_count(self.images, "--images", MAX_RENDERED)
        for key in ("vae_steps", "unet_steps", "judge_steps"):
            check_count(getattr(self, key), option_name(key), MAX_TRAIN_STEPS)
        check_count(self.batch, "--batch", MAX_BATCH)


@dataclass(frozen=True)
class FlowPretrainConfig:
    out: str = _help("Folder for the FLUX.2 [klein]-shaped model (diffusers layout; required).",
                     "")
    seed: int = _help("Random seed.", 0)
    images: int = _help("Rendered training pictures.", 16000)
    vae_steps: int = _help("VAE training steps.", 1000)
    vae_batch: int = _help("VAE batch size.", 32)
    text_steps: int = _help("Text-encoder steps (a causal language model on the captions; "
                            "then frozen).", 300)
    steps: int = _help("Transformer steps.", 1500)
    batch: int = _help("Transformer batch size.", 32)
    text_lr: float = _help("Learning rate of the text encoder while the transformer trains "
                           "(then frozen); 0: frozen after its language-model steps.", 3e-4)
    judge_steps: int = _help("Judge training steps (unless --judges-from).", 1500)
    judges_from: str = _help("A toy model folder whose judges to copy instead of training "
                             "new ones (they read pixels, not the model).", "")
    init: str = _help("An earlier flow toy model folder to start from: its VAE, tokenizer and "
                      "text encoder are kept (--vae-steps and --text-steps unused), its "
                      "transformer trains --steps more, its judges are copied unless "
                      "--judges-from.", "")
    threads: int = _help("CPU threads torch may use (0: torch's default).", 0)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "out")
        check_seeds([self.seed], "--seed")
        check_count(self.images, "--images", MAX_RENDERED)
        for key in ("vae_steps", "text_steps", "steps", "judge_steps"):
            check_count(getattr(self, key), option_name(key), MAX_TRAIN_STEPS)
        for key in ("batch", "vae_batch"):
            check_count(getattr(self, key), option_name(key), MAX_BATCH)
        if not 0 <= self.text_lr < 1:
            raise bad(self, "text_lr", "between 0 and 1")
        if not 0 <= self.threads <= 1024:
            raise bad(self, "threads", "between 0 and 1024")


CLAIMS_REPORTS = {"toy": "docs/toyworld.md", "flow-toy": "docs/toyworld-flow.md"}


@dataclass(frozen=True)
class ClaimsConfig:
    out: str = _help("Folder for runs and figures.", "runs/toyworld-claims")
    report: str = _help("Markdown report to write (its pictures and per-seed data go in a "
                        "folder of its name beside it); default docs/toyworld.md, or "
                        "docs/toyworld-flow.md with --model flow-toy.", "")
    quick: bool = _help("One seed, the fidelity claim only.", False)
    model: str = _help("toy (the UNet world) or flow-toy (the FLUX.2 [klein]-shaped "
                       "transformer, flow matching).", "toy", choices=tuple(CLAIMS_REPORTS))

    def __post_init__(self) -> None:
        if not self.report:
            object.__setattr__(self, "report", CLAIMS_REPORTS[self.model])


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
            raise bad(self, "repeats", "whole numbers between 0 and 1000")
        object.__setattr__(self, "repeats", [int(r) for r in self.repeats])


