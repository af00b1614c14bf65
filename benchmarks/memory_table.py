"""Peak memory and step time of one LoRA training step for every family x
base precision x gradient checkpointing x block swap (issue 28 §5), through
lorabooth's own pieces: the base's denoiser with random weights of the real
architecture, quantised by `models/quantise.py` (--base-precision), its
last blocks parked by `models/offload.py` (--blocks-to-swap), the LoRA
`train` puts on it, `step_loss`, AdamW over the LoRA.

Only the denoiser is built: `train` caches the latents and text embeddings
and frees the VAE and the text encoders before its first step, so a step
holds the denoiser, its LoRA and optimizer state, and the activations. The
conditioning is random, of each encoder's real shape. The full FLUX
transformers are built one layer at a time straight into bf16 and the base
precision (FLUX.1's 11.9 B parameters are 24 GB in bf16, 12 GB in int8), so
a machine holds what the step holds and not a full-precision copy first.

    # a machine with a CUDA GPU: the nine settings the goals are about
    PYTHONPATH=src python benchmarks/memory_table.py --goals \
        --json benchmarks/data/memory_table/gpu_goals.json
    # every full architecture at 1024 px and 512 (128 settings)
    PYTHONPATH=src python benchmarks/memory_table.py --json benchmarks/data/memory_table/gpu.json
    # the CPU mode the tests run: the tiny built-ins, 32 px
    PYTHONPATH=src python benchmarks/memory_table.py --tiny
    PYTHONPATH=src python benchmarks/memory_table.py --report benchmarks/data/memory_table/gpu_goals.json

Each setting runs in a fresh process, so its peak is its own: torch's peak
allocated GPU memory on CUDA; on the CPU the process's peak RSS (which
includes building SD's fp32 UNet) and, in brackets, the peak RSS of the
steps alone (the kernel's count restarted once the model is built).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine

FULL = ("sd15-random", "sdxl-random", "flux2-klein-random", "flux-random")
TINY = ("tiny", "tiny-sdxl", "tiny-flux2", "tiny-flux")
PRECISIONS = ("bf16", "int8", "nf4", "fp8")
# the goals: (model, px, precision) -> GB of GPU memory a step stays under
GOALS = {("sdxl-random", 1024, "*"): 8.0, ("flux2-klein-random", 1024, "*"): 12.0,
         ("flux-random", 512, "int8"): 16.0, ("flux-random", 512, "nf4"): 12.0}
TEXT = {"sd1": (77, None), "sdxl": (77, 1280), "flux2": (512, None), "flux1": (512, 768)}


def denoiser(model: str, precision: str) -> tuple[torch.nn.Module, str]:
    """The built-in's denoiser alone on the CPU, its frozen weights in bf16 and
    quantised as ``precision`` says (name -> module, family)."""
    from lorabooth.models.flux_architecture import BUILTIN_FLUX
    from lorabooth.models.precision import cast_frozen
    from lorabooth.models.quantise import quantise_module

    configs = _flux_configs()
    if model in configs:
        cls, config = configs[model]
        return streamed_transformer(cls, config, precision), BUILTIN_FLUX[model]
    from lorabooth.models.loading import load_base

    base = load_base(model)
    base.unet.requires_grad_(False)
    cast_frozen(base.unet, torch.bfloat16)
    quantise_module(base.unet, "auto" if precision == "bf16" else precision)
    return base.unet, base.family.name


def _flux_configs() -> dict:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    from lorabooth.models import flux_architecture as arch

    return {"flux2-klein-random": (Flux2Transformer2DModel, arch.FLUX2_KLEIN_TRANSFORMER),
            "flux-random": (FluxTransformer2DModel, arch.FLUX1_DEV_TRANSFORMER)}


def streamed_transformer(cls, config: dict, precision: str, seed: int = 0) -> torch.nn.Module:
    """A full FLUX transformer built one layer at a time: its shapes on the
    meta device, then each layer's tensors made in bf16 from a seeded
    generator and, for a quantised base, its Linear quantised at once. Neither
    the fp32 model (FLUX.1: 48 GB) nor the bf16 one (24 GB) is ever resident,
    only the base as it will train, as when `train` streams a checkpoint in."""
    from lorabooth.models.quantise import (
        is_plain_linear,
        is_quantised,
        mark_quantised,
        quantise_linear,
    )

    with torch.device("meta"):
        module = cls(**config).requires_grad_(False)
    if any(b.is_meta for b in module.buffers()):  # nothing here could make them
        raise SystemExit(f"{cls.__name__}: a buffer is built in __init__; build it on the device")
    g = torch.Generator().manual_seed(seed)
    # by name, not a list of the modules: nf4 replaces each Linear, and a list
    # would keep every replaced one's bf16 weight alive (FLUX.1: 24 GB)
    for path in [name for name, _ in module.named_modules()]:
        layer = module.get_submodule(path)
        if not any(p.is_meta for p in layer.parameters(recurse=False)):
            continue
        layer.to_empty(device="cpu", recurse=False)
        for name, p in layer.named_parameters(recurse=False):
            with torch.no_grad():
                if p.dim() > 1:  # a random weight of the layer's fan-in scale
                    p.copy_(torch.randn(p.shape, generator=g).mul_(p[0].numel() ** -0.5))
                else:  # norms' scales one, biases zero
                    p.fill_(1.0 if name == "weight" else 0.0)
            p.data = p.data.to(torch.bfloat16)
        if is_quantised(precision) and is_plain_linear(layer):
            parent, _, name = path.rpartition(".")
            quantise_linear(module.get_submodule(parent), name, precision)
    mark_quantised(module, precision)
    return module


def _context(module: torch.nn.Module, family: str, tiny: bool, device: str, dtype, g):
    from lorabooth.models.families import Conditioning

    tokens, pooled = TEXT[family]
    if tiny:
        tokens = 16
    config = module.config
    width = config.get("joint_attention_dim") or config.cross_attention_dim
    if family == "flux1":
        pooled = config.pooled_projection_dim
    elif family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    time_ids = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]) if family == "sdxl" else None
    return Conditioning(rand(1, tokens, width), None if pooled is None else rand(1, pooled),
                        None if time_ids is None else time_ids.to(device, dtype))


def _latent_shape(module: torch.nn.Module, family: str, resolution: int) -> tuple[int, ...]:
    side = resolution // 8  # the VAE's 8x
    channels = module.config.in_channels
    if family == "flux2":  # already 2 x 2 patchified
        return (1, channels, side // 2, side // 2)
    if family == "flux1":  # packed by the family's predict
        return (1, channels // 4, side, side)
    return (1, channels, side, side)


def step_once(model: str, resolution: int, precision: str, checkpointing: bool, swapped: int,
              steps: int, device: str) -> dict:
    from lorabooth.adapters.lora import (
        UNET_TARGETS,
        add_unet_lora,
        freeze_all_but_lora,
        lora_parameters,
    )
    from lorabooth.formats import flux
    from lorabooth.models.components import sd_noise_scheduler
    from lorabooth.models.families import FAMILIES
    from lorabooth.models.flux_architecture import flow_scheduler
    from lorabooth.models.offload import swap_blocks
    from lorabooth.models.quantise import frozen_bytes
    from lorabooth.training.noising import Denoiser, noising_for

    start = time.perf_counter()
    dtype = torch.bfloat16
    module, name = denoiser(model, precision)  # frozen
    family = FAMILIES[name]
    if swapped:  # parked before the move: those weights never reach the device
        swap_blocks(module, swapped, device)
    module.to(device)
    targets = flux.target_modules(name) if family.flow else UNET_TARGETS
    add_unet_lora(module, 16, 16.0, targets=targets)
    freeze_all_but_lora(module)
    if checkpointing:
        module.enable_gradient_checkpointing()
    module.train()
    optimizer = torch.optim.AdamW(lora_parameters(module), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    context = _context(module, name, model in TINY, device, dtype, g)
    shape = _latent_shape(module, name, resolution)
    scheduler = flow_scheduler() if family.flow else sd_noise_scheduler()
    noising = noising_for(scheduler, "logit_normal")
    step = Denoiser(module, family, noising, getattr(family, "train_guidance", None))
    built = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # the steps' own peak, not the fp32 build's
        reset_peak_rss()
    times, loss = timed_steps(step, optimizer, shape, context, steps, device, dtype, g)
    row = {"model": model, "resolution": resolution, "precision": precision,
           "gradient_checkpointing": checkpointing, "blocks_to_swap": swapped,
           "build_s": round(built, 1), "step_s": [round(x, 3) for x in times],
           "frozen_gb": round(frozen_bytes(module) / 1e9, 3), "frozen_bytes": frozen_bytes(module),
           "lora_params": sum(p.numel() for p in lora_parameters(module)),
           "loss": loss.item(), "peak_rss_gb": round(
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}  # kB
    if device == "cpu":
        row["step_peak_rss_gb"] = step_peak_rss_gb()
    if device == "cuda":
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        row["gpu"] = torch.cuda.get_device_name()
    return row


def reset_peak_rss() -> None:
    """Return freed memory to the system and start the kernel's peak-RSS
    count (VmHWM) afresh (Linux: ``clear_refs`` 5), so what follows is the
    steps' peak, not the full-precision build's before quantisation."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def step_peak_rss_gb() -> float | None:
    """The peak RSS since ``reset_peak_rss`` (VmHWM), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        pass
    return None


def timed_steps(denoiser, optimizer, shape: tuple[int, ...], context, steps: int, device: str,
                dtype: torch.dtype, g: torch.Generator) -> tuple[list[float], torch.Tensor]:
    """``steps`` LoRA steps of lorabooth's loss on random latents: the
    seconds of each, and the last loss."""
    from lorabooth.training.loop import step_loss

    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = denoiser.noising.draw(1, g)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss, _, _ = step_loss(denoiser, latents.to(device), noise.to(device), t.to(device),
                                   context, 1, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return times, loss


def goal(row: dict) -> float | None:
    for key in ((row["model"], row["resolution"], row["precision"]),
                (row["model"], row["resolution"], "*")):
        if key in GOALS:
            return GOALS[key]
    return None


def table(data: dict) -> str:
    """The markdown table: one row per setting; step time also as a ratio
    to the same model's bf16 step (same px, checkpointing and swap)."""
    runs = data["runs"]
    bf16 = {(r["model"], r["resolution"], r["gradient_checkpointing"], r["blocks_to_swap"]):
            r["step_s"][-1] for r in runs if r["precision"] == "bf16" and "error" not in r}
    lines = [f"# {data['machine']} (torch {data['torch']})\n",
             "| model | px | base | grad. ckpt | swapped blocks | frozen GB | s/step (last) | "
             "x bf16 | peak GPU GB | goal GB | peak RSS GB (steps) |", "|---|" * 1 + "---|" * 10]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['resolution']} | {r['precision']} | "
                         f"{'yes' if r['gradient_checkpointing'] else 'no'} | "
                         f"{r['blocks_to_swap']} | failed: {r['error']} |||||| ")
            continue
        ref = bf16.get((r["model"], r["resolution"], r["gradient_checkpointing"],
                        r["blocks_to_swap"]))
        ratio = f"{r['step_s'][-1] / ref:.2f}" if ref else "–"
        want = goal(r)
        peak = r.get("peak_gpu_gb")
        mark = "" if want is None or peak is None else (" ✓" if peak <= want else " ✗")
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['precision']} | "
            f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['blocks_to_swap']} | "
            f"{r['frozen_gb']:.3f} | {r['step_s'][-1]:.3f} | {ratio} | "
            f"{'–' if peak is None else peak}{mark} | {'–' if want is None else want} | "
            f"{r['peak_rss_gb']:.2f} ({r.get('step_peak_rss_gb') or '–'}) |")
    return "\n".join(lines) + "\n"


def failure(returncode: int, stderr: str) -> str:
    """Why a setting's process failed, in one line: the signal that killed it
    (the kernel's out-of-memory killer sends SIGKILL), else the exception's
    own line, not a warning printed after it."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of host memory?)" if name == "SIGKILL" else "")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    return ((errors or lines or ["failed"])[-1])[:200]


def settings(models, resolutions, precisions, swaps, checkpointing=(False, True)) -> list[tuple]:
    """Every model x px x precision with gradient checkpointing on and off
    (no swap), then each swap count with checkpointing on."""
    out = []
    for model in models:
        for px in resolutions:
            for precision in precisions:
                out += [(model, px, precision, ckpt, 0) for ckpt in checkpointing]
                out += [(model, px, precision, True, n) for n in swaps]
    return out


def goal_settings() -> list[tuple]:
    """The short GPU run: each model and size a goal names, in bf16 (the
    time the goals compare with), int8 and nf4, with checkpointing."""
    sizes = dict.fromkeys((model, px) for model, px, _ in GOALS)
    return [(model, px, precision, True, 0) for model, px in sizes
            for precision in ("bf16", "int8", "nf4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=FULL + TINY)
    ap.add_argument("--resolutions", nargs="+", type=int)
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS)
    ap.add_argument("--swap", nargs="*", type=int, default=None,
                    help="block-swap counts to try (with gradient checkpointing)")
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                    help="gradient checkpointing in the rows without block swap")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the CPU mode: tiny built-ins, 32 px")
    ap.add_argument("--goals", action="store_true",
                    help="only the settings the goals name, each precision with checkpointing")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path, help="print the table of a saved --json and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, this process
    args = ap.parse_args()
    if args.report:
        return print(table(json.loads(args.report.read_text())))
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.one:
        model, px, precision, ckpt, swapped = json.loads(args.one)
        return print(json.dumps(step_once(model, px, precision, ckpt, swapped, args.steps, device)))
    models = args.models or (TINY if args.tiny else FULL)
    resolutions = args.resolutions or ([32] if args.tiny else [1024, 512])
    precisions = args.precisions or (("bf16", "int8", "nf4") if args.tiny else PRECISIONS)
    swaps = args.swap if args.swap is not None else ([1] if args.tiny else [4, 8])
    runs = []
    checkpointing = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    chosen = (goal_settings() if args.goals else
              settings(models, resolutions, precisions, swaps, checkpointing))
    for setting in chosen:
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                              *(["--tiny"] if args.tiny else []), "--one", json.dumps(setting)],
                             capture_output=True, text=True)
        if out.returncode:  # a setting that fails (out of memory, no fp8 here) is a row too
            model, px, precision, ckpt, swapped = setting
            runs.append({"model": model, "resolution": px, "precision": precision,
                         "gradient_checkpointing": ckpt, "blocks_to_swap": swapped,
                         "error": failure(out.returncode, out.stderr)})
        else:
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    data = {"machine": machine(), "torch": torch.__version__, "device": device, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
