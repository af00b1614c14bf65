"""Command line: parse -> config -> call one function. Nothing else here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from typing import get_type_hints

from . import __version__
from .checks import finite_float, parse_floats
from .config import PrepareConfig, TrainConfig, build_config, option_name
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per config field; its default and help come from there.
    Every default here is None so that only what the user typed overrides the
    --config file (and the dataclass's own default)."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(option_name(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(option_name(f.name), dest=f.name, default=None,
                                type=finite_float if kind is float else kind,
                                metavar=f.name.upper(), help=help_text)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    _add_options(parser, TrainConfig)
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file of train options (keys: option names with _); "
                             "command-line options override it")


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = build_config(TrainConfig, args.config, overrides)
    from .training import train  # heavy imports only once the options are known good

    output = train(config)
    logging.getLogger("lorabooth").info("LoRA: %s", output / "pytorch_lora_weights.safetensors")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    scales = {name: parse_floats(getattr(args, name), option_name(name))
              for name in ("unet_scale", "text_scale", "guidance")}
    from .drawing import generate  # torch only once the lists are known good

    images = generate(
        args.run, args.prompt, unet_scales=scales["unet_scale"],
        text_scales=scales["text_scale"], guidances=scales["guidance"], num_images=args.num_images,
        seed=args.seed, steps=args.steps, negative_prompt=args.negative_prompt,
        scheduler=args.scheduler, output=args.output, model=args.model, width=args.width,
        height=args.height)
    logging.getLogger("lorabooth").info("drew %d images", len(images))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(PrepareConfig)}
    config = build_config(PrepareConfig, None, overrides)
    from .prepare import prepare

    prepare(config)
    return 0


def _cmd_identifier(args: argparse.Namespace) -> int:
    from .identifier import check_prompt, rare_identifiers, render_table
    from .models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    if args.check:
        report, warnings = check_prompt(args.check, tokenizer)
        print(report)
        for w in warnings:
            logging.getLogger("lorabooth").warning("%s", w)
        return 0
    print(render_table(rare_identifiers(tokenizer, n=args.n, seed=args.seed)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.runner import evaluate

    evaluate(args.run, args.real, class_noun=args.class_noun, kind=args.kind,
             prompts_file=args.prompts, identifier=args.identifier,
             images_per_prompt=args.images_per_prompt, seed=args.seed,
             unet_scale=args.unet_scale, text_scale=args.text_scale, guidance=args.guidance,
             steps=args.steps, out=args.out, baselines=args.baselines, dino=args.dino,
             clip=args.clip, model=args.model, pres_images=args.pres_images)
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from .toyworld.claims import claims

    claims(args.out, report=args.report, quick=args.quick)
    return 0


def _cmd_toyworld(args: argparse.Namespace) -> int:
    from .toyworld.pretrain import pretrain

    pretrain(args.out, seed=args.seed, images=args.images, vae_steps=args.vae_steps,
             unet_steps=args.unet_steps, batch=args.batch, judge_steps=args.judge_steps)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats.layouts import convert_file

    out = convert_file(args.src, args.dst, args.to)
    logging.getLogger("lorabooth").info("wrote %s", out)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .formats.inspection import check_summary, inspect_lora, render

    names, label = None, ""
    if args.model:
        from .formats.clients import model_names
        from .models import load_base

        base = load_base(args.model)
        names, label = model_names(base.unet, base.text_encoder), args.model
    summary = inspect_lora(args.file, names, label)
    print(render(summary))
    check_summary(summary)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    weights = parse_floats(args.weights, "--weights") if args.weights else None
    from .formats.merging import merge

    merge(args.loras, weights, args.out, rank=args.rank)
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .formats.merging import fuse

    fuse(args.run, args.out, unet_scale=args.unet_scale, text_scale=args.text_scale,
         model=args.model, single_file=args.single_file)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    run_sweep(args.file, yes=args.yes)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(args.output, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorabooth", description="DreamBooth LoRA: train, draw, measure.")
    parser.add_argument("--version", action="version", version=f"lorabooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a DreamBooth LoRA on photos of one subject")
    _add_train_options(train)
    train.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="draw with a trained LoRA at chosen scales")
    gen.add_argument("run", help="run folder (or a LoRA .safetensors file)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--negative-prompt", default="", help="negative prompt")
    gen.add_argument("--unet-scale", default="1", help="UNet LoRA scale(s), comma list")
    gen.add_argument("--text-scale", default="1", help="text-encoder LoRA scale(s), comma list")
    gen.add_argument("--guidance", default="7.5", help="guidance scale(s), comma list")
    gen.add_argument("--steps", type=int, default=25, help="sampler steps")
    gen.add_argument("--num-images", type=int, default=4, help="images (seeds) per setting")
    gen.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i")
    gen.add_argument("--scheduler", default="dpm", help="dpm, ddim, euler or pndm")
    gen.add_argument("--width", type=int, default=None,
                     help="image width in pixels, a multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=int, default=None,
                     help="image height in pixels, a multiple of 8 (default: the model's native size)")
    gen.add_argument("--model", default=None, help="base model (default: the run's own)")
    gen.add_argument("--output", default=None, help="folder (default: RUN/generated)")
    gen.set_defaults(func=_cmd_generate)

    prep = sub.add_parser("prepare", help="turn a folder of photos into a clean training set")
    prep.add_argument("src", help="folder of photos (never modified)")
    prep.add_argument("out", help="folder for the training set")
    _add_options(prep, PrepareConfig, skip=("src", "out"))
    prep.set_defaults(func=_cmd_prepare)

    ident = sub.add_parser("identifier", help="pick a rare-token identifier, or check one")
    ident.add_argument("--model", default="tiny", help="whose tokenizer (default: tiny = CLIP's)")
    ident.add_argument("--n", type=int, default=10, help="how many candidates to show")
    ident.add_argument("--seed", type=int, default=None,
                       help="draw --n at random from the rarest candidates instead of the top")
    ident.add_argument("--check", metavar="PROMPT", default=None,
                       help="show how PROMPT tokenises and warn about its identifier")
    ident.set_defaults(func=_cmd_identifier)

    ev = sub.add_parser("evaluate", help="DINO, CLIP-I, CLIP-T, PRES, DIV as in the paper")
    ev.add_argument("run", help="run folder")
    ev.add_argument("--real", required=True, help="folder of the subject's photos")
    ev.add_argument("--class-noun", default=None, help="class noun (default: from the run)")
    ev.add_argument("--kind", default="live", choices=["live", "object"],
                    help="the paper's prompt set: live subjects or objects")
    ev.add_argument("--prompts", default=None, metavar="FILE",
                    help="own prompts, one per line ({0}: identifier, {1}: class noun)")
    ev.add_argument("--identifier", default=None, help="default: from the run's metadata")
    ev.add_argument("--images-per-prompt", type=int, default=4, help="the paper uses 4")
    ev.add_argument("--pres-images", type=int, default=8, help="class-prompt images for PRES")
    ev.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i")
    ev.add_argument("--unet-scale", type=finite_float, default=1.0, help="UNet LoRA scale")
    ev.add_argument("--text-scale", type=finite_float, default=1.0, help="text-encoder LoRA scale")
    ev.add_argument("--guidance", type=finite_float, default=7.5, help="guidance scale")
    ev.add_argument("--steps", type=int, default=25, help="sampler steps")
    ev.add_argument("--dino", default="facebook/dino-vits16", help="DINO model (folder or hub id)")
    ev.add_argument("--clip", default="openai/clip-vit-base-patch32",
                    help="CLIP model (folder or hub id; e.g. openai/clip-vit-large-patch14)")
    ev.add_argument("--model", default=None, help="base model (default: the run's own)")
    ev.add_argument("--out", default=None, help="folder (default: RUN/eval)")
    ev.add_argument("--baselines", action="store_true",
                    help="add the base model (floor) and real photos leave-one-out (ceiling)")
    ev.set_defaults(func=_cmd_evaluate)

    toy = sub.add_parser("toyworld", help="the toy world: pretrain its model and judges")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, parser_class=_Parser)
    pre = toy_sub.add_parser("pretrain", help="train the toy model and judges from scratch")
    pre.add_argument("--out", required=True, help="folder for the model (diffusers layout)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--images", type=int, default=40000, help="rendered training pictures")
    pre.add_argument("--vae-steps", type=int, default=3000)
    pre.add_argument("--unet-steps", type=int, default=3000)
    pre.add_argument("--judge-steps", type=int, default=1500)
    pre.add_argument("--batch", type=int, default=64)
    pre.set_defaults(func=_cmd_toyworld)
    cl = toy_sub.add_parser("claims", help="measure DreamBooth's claims on the toy world")
    cl.add_argument("--out", default="runs/toyworld-claims", help="folder for runs and figures")
    cl.add_argument("--report", default="docs/toyworld.md", help="markdown report to write")
    cl.add_argument("--quick", action="store_true", help="one seed, the fidelity claim only")
    cl.set_defaults(func=_cmd_claims)

    conv = sub.add_parser("convert", help="LoRA file between diffusers, kohya and peft layouts")
    conv.add_argument("src", help="a LoRA .safetensors file (any of the three layouts)")
    conv.add_argument("dst", help="output file (or folder)")
    conv.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"])
    conv.set_defaults(func=_cmd_convert)

    ins = sub.add_parser("inspect", help="what a LoRA file holds, and whether ComfyUI and "
                                         "AUTOMATIC1111 load every key of it")
    ins.add_argument("file", help="a LoRA file (.safetensors, any layout)")
    ins.add_argument("--model", default=None,
                     help="check the clients' key rules against this base model's weights "
                          "(default: Stable Diffusion 1.5's, for SD 1.x files)")
    ins.set_defaults(func=_cmd_inspect)

    mer = sub.add_parser("merge", help="combine LoRAs trained on the same base")
    mer.add_argument("loras", nargs="+", help="run folders or LoRA files (any layout)")
    mer.add_argument("--weights", default=None, help="comma list, one per LoRA (default: equal)")
    mer.add_argument("--out", required=True, help="output .safetensors (diffusers layout)")
    mer.add_argument("--rank", type=int, default=None,
                     help="re-factorise to this rank by SVD (default: exact concatenation)")
    mer.set_defaults(func=_cmd_merge)

    fus = sub.add_parser("fuse", help="bake a LoRA into a full diffusers model folder")
    fus.add_argument("run", help="run folder or LoRA file")
    fus.add_argument("--out", required=True, help="output model folder")
    fus.add_argument("--unet-scale", type=finite_float, default=1.0)
    fus.add_argument("--text-scale", type=finite_float, default=1.0)
    fus.add_argument("--model", default=None, help="base model (default: the run's own)")
    fus.add_argument("--single-file", action="store_true",
                     help="write one .safetensors in the original SD layout instead of a folder")
    fus.set_defaults(func=_cmd_fuse)

    sw = sub.add_parser("sweep", help="a grid of training runs x inference settings, one report")
    sw.add_argument("file", help="sweep TOML: [base], [train.grid], [generate], [generate.grid], "
                                 "[evaluate]")
    sw.add_argument("--yes", action="store_true",
                    help="run a grid of more than 1000 training runs")
    sw.set_defaults(func=_cmd_sweep)

    demo = sub.add_parser("demo", help="train and draw on the built-in model with example photos")
    demo.add_argument("--output", default="runs/demo", help="run folder")
    demo.add_argument("--steps", type=int, default=400, help="training steps")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _quiet_libraries() -> None:
    # The libraries' own warnings are mostly noise for a user; what matters
    # among them (a LoRA loading only in part) lorabooth checks and reports
    # itself (formats.load_into_pipeline).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="lorabooth: %(message)s", stream=sys.stderr)
    for name in ("accelerate", "diffusers", "transformers", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, already printed)
        return int(e.code or 0)
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:
        print(f"lorabooth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorabooth {args.command}: interrupted", file=sys.stderr)
        return 130
