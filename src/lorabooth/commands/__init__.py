"""Every command's runner and the table of commands (`COMMANDS`) the CLI
builds its parser from. The configs themselves are the config tree
(`lorabooth.config`), re-exported here for the older import path:

    from lorabooth import GenerateConfig, run
    run(GenerateConfig(run="runs/dog", prompt=["a photo of sks dog on the beach"]))

`run(config)` is the one call the CLI makes after parsing. It imports the
heavy modules (torch, diffusers) only then, so a bad option is answered
without them."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..config import (  # noqa: F401  (re-exported: the configs' older home)
    MAX_HEARTBEAT,
    MAX_TRIALS,
    MAX_WORKERS,
    ClaimsConfig,
    ConvertConfig,
    DemoConfig,
    EvaluateConfig,
    FlowPretrainConfig,
    FuseConfig,
    GenerateConfig,
    IdentifierConfig,
    InspectConfig,
    MergeConfig,
    PrepareConfig,
    PretrainConfig,
    SweepConfig,
    TrainConfig,
    TuneConfig,
    TuneStudyConfig,
    UiConfig,
)
from ..evaluation.judges import register as register_judges
from ..formats import WEIGHT_NAME
from .guard import check
from .plans import PLANS

log = logging.getLogger("lorabooth")


def _train(c: TrainConfig) -> Any:
    from ..training.loop import train

    output = train(c)
    log.info("LoRA: %s", output / WEIGHT_NAME)
    return output


def _generate(c: GenerateConfig) -> Any:
    from ..generation import generate

    images = generate(c)
    log.info("drew %d images", len(images))
    return images


def _prepare(c: PrepareConfig) -> Any:
    from ..photos.prepare import prepare

    return prepare(c)


def _identifier(c: IdentifierConfig) -> Any:
    from ..models.loading import load_tokenizers
    from ..photos.identifier import check_prompt, rare_identifiers, render_table

    tokenizers = load_tokenizers(c.model)
    # ranked by the tokenizer of the encoder the denoiser reads (FLUX.1: T5's, not CLIP's)
    tokenizer = tokenizers[-1]
    if c.check:
        report, warnings = check_prompt(c.check, tokenizers)
        print(report)
        for w in warnings:
            log.warning("%s", w)
        return report
    candidates = rare_identifiers(tokenizer, n=c.n, seed=c.seed)
    print(render_table(candidates))
    return candidates


def _evaluate(c: EvaluateConfig) -> Any:
    from ..evaluation.runner import evaluate

    return evaluate(c)


def _inspect(c: InspectConfig) -> Any:
    from ..formats.inspection import check_summary, inspect_lora, names_for_model, render

    names, label = names_for_model(c.file, c.model) if c.model else (None, "")
    summary = inspect_lora(c.file, names, label)
    print(render(summary))
    check_summary(summary)
    return summary


def _convert(c: ConvertConfig) -> Any:
    from ..formats.layouts import convert_file

    out = convert_file(c.src, c.dst, c.to)
    log.info("wrote %s", out)
    return out


def _merge(c: MergeConfig) -> Any:
    from ..formats.merging import merge

    return merge(c)


def _fuse(c: FuseConfig) -> Any:
    from ..formats.merging import fuse

    return fuse(c.run, c.out, unet_scale=c.unet_scale, text_scale=c.text_scale,
                model=c.model, single_file=c.single_file)


def _sweep(c: SweepConfig) -> Any:
    from ..search.sweep import run_sweep

    return run_sweep(c.file, yes=c.yes)


def _tune(c: TuneConfig) -> Any:
    from ..search.tune import tune

    return tune(c)


def _ui(c: UiConfig) -> Any:
    from ..ui.server import serve

    return serve(c.workspace, host=c.host, port=c.port, auth=c.auth, model=c.model,
                 max_upload_mb=c.max_upload_mb)


def _demo(c: DemoConfig) -> Any:
    from ..demo import demo

    return demo(c.output, steps=c.steps)


def _pretrain(c: PretrainConfig) -> Any:
    from ..toyworld.pretrain import pretrain

    return pretrain(c.out, seed=c.seed, images=c.images, vae_steps=c.vae_steps,
                    unet_steps=c.unet_steps, batch=c.batch, judge_steps=c.judge_steps,
                    reuse=c.reuse, init=c.init)


def _flow_pretrain(c: FlowPretrainConfig) -> Any:
    import torch

    from ..toyworld.flow_pretrain import flow_pretrain

    if c.threads:
        torch.set_num_threads(c.threads)
    return flow_pretrain(c.out, seed=c.seed, images=c.images, vae_steps=c.vae_steps,
                         vae_batch=c.vae_batch, text_steps=c.text_steps, steps=c.steps,
                         batch=c.batch, judge_steps=c.judge_steps, judges_from=c.judges_from,
                         init=c.init, text_lr=c.text_lr)


def _claims(c: ClaimsConfig) -> Any:
    from ..toyworld.claims import claims

    return claims(c.out, report=c.report, quick=c.quick, model=c.model)


def _toy_judges() -> Any:
    from ..toyworld.judges import toy_judges

    return toy_judges()


register_judges("toy", _toy_judges)  # --judges toy, in `tune` and a sweep's [evaluate]


def _tune_study(c: TuneStudyConfig) -> Any:
    from ..toyworld.tune_study import tune_study

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
    "toyworld flow-pretrain": (FlowPretrainConfig, "train the flow-matching (FLUX.2 [klein]-"
                                                   "shaped) toy model from scratch", _flow_pretrain),
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
