"""One LoRA training step of a FLUX transformer at its real size: time and
peak memory, through lorabooth's own step (the family's packing and ids,
training/noising's flow-matching loss, the LoRA targets `train` puts on the
transformer, AdamW over the LoRA only).

Only the transformer is built (random weights, in the weight precision
asked): `train` caches the text embeddings and frees the text encoders and
the VAE before its first step, so a step holds the transformer, its LoRA and
optimizer state, and the activations. The conditioning is random, of the
encoder's real shape (FLUX.2 [klein]: 512 x 7680 from Qwen3's three layers;
FLUX.1: T5's 512 x 4096 and CLIP's pooled 768).

    PYTHONPATH=src python benchmarks/flux_step.py --model flux2-klein-random \\
        --resolution 512 --settings bf16 bf16-gc --json benchmarks/data/flux_step.json
    PYTHONPATH=src python benchmarks/flux_step.py --report benchmarks/data/flux_step.json

Peak memory: the process's peak RSS from the kernel (CPU), or torch's peak
allocated GPU memory when the step ran on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from common import machine

SETTINGS = {"bf16": (torch.bfloat16, False), "bf16-gc": (torch.bfloat16, True),
            "fp32": (torch.float32, False), "fp32-gc": (torch.float32, True)}
TEXT = {"flux2": (512, 7680, None), "flux1": (512, 4096, 768)}  # tokens, width, pooled


def transformer(model: str, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, str]:
    """The built-in's transformer alone (name -> module, family)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    from lorabooth.models import flux_architecture as arch

    configs = {"flux2-klein-random": (Flux2Transformer2DModel, arch.FLUX2_KLEIN_TRANSFORMER, "flux2"),
               "flux-random": (FluxTransformer2DModel, arch.FLUX1_DEV_TRANSFORMER, "flux1"),
               "tiny-flux2": None, "tiny-flux": None}
    if configs.get(model) is None:  # the tiny ones: the built-in's own transformer
        from lorabooth.models.loading import load_base

        base = load_base(model)
        return base.unet.to(device, dtype), base.family.name
    cls, config, family = configs[model]
    torch.manual_seed(0)
    with torch.device(device):
        return cls(**config).to(dtype), family


def step_once(model: str, resolution: int, dtype: torch.dtype, checkpointing: bool,
              steps: int, device: str) -> dict:
    from lorabooth.adapters.lora import add_unet_lora, freeze_all_but_lora, lora_parameters
    from lorabooth.formats import flux
    from lorabooth.models.families import FAMILIES, Conditioning
    from lorabooth.models.flux_architecture import flow_scheduler
    from lorabooth.training.noising import Denoiser, noising_for

    start = time.perf_counter()
    module, name = transformer(model, dtype, device)
    family = FAMILIES[name]
    module.requires_grad_(False)
    add_unet_lora(module, 16, 16.0, targets=flux.target_modules(name))
    freeze_all_but_lora(module)
    if checkpointing:
        module.enable_gradient_checkpointing()
    module.train()
    optimizer = torch.optim.AdamW(lora_parameters(module), lr=1e-4)
    tokens, width, pooled = TEXT[name]
    if "tiny" in model:
        tokens, width = 16, module.config.joint_attention_dim
        pooled = getattr(module.config, "pooled_projection_dim", None)
    g = torch.Generator().manual_seed(0)
    context = Conditioning(torch.randn(1, tokens, width, generator=g).to(device, dtype),
                           None if pooled is None else torch.randn(1, pooled, generator=g).to(device, dtype))
    channels = module.config.in_channels // (1 if name == "flux2" else 4)
    side = resolution // 16  # the VAE's 8x, then FLUX's 2 x 2 patches
    shape = (1, channels, side, side) if name == "flux2" else (1, channels, 2 * side, 2 * side)
    noising = noising_for(flow_scheduler(), "logit_normal")
    denoiser = Denoiser(module, family, noising, getattr(family, "train_guidance", None))
    built = time.perf_counter() - start
    from memory_table import timed_steps

    times, _ = timed_steps(denoiser, optimizer, shape, context, steps, device, dtype, g)
    row = {"model": model, "resolution": resolution, "dtype": str(dtype).removeprefix("torch."),
           "gradient_checkpointing": checkpointing, "build_s": round(built, 1),
           "step_s": [round(x, 2) for x in times],
           "transformer_params": sum(p.numel() for p in module.parameters()),
           "lora_params": sum(p.numel() for p in lora_parameters(module)),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    if device == "cuda":
        row["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        row["gpu"] = torch.cuda.get_device_name()
    return row


def table(data: dict) -> str:
    lines = [f"# {data['machine']}\n",
             "| model | px | weights | grad. ckpt | s/step (last) | peak RSS GB | peak GPU GB |",
             "|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lines.append(f"| {r['model']} | {r['resolution']} | {r['dtype']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['step_s'][-1]:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r.get('peak_gpu_allocated_gb', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux2-klein-random",
                    choices=("flux2-klein-random", "flux-random", "tiny-flux2", "tiny-flux"))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--settings", nargs="+", default=["bf16", "bf16-gc"], choices=SETTINGS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path, help="print the table of a saved --json and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting in this process
    args = ap.parse_args()
    if args.report:
        return print(table(json.loads(args.report.read_text())))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:  # a fresh process per setting: its peak RSS is that setting's alone
        dtype, ckpt = SETTINGS[args.one]
        return print(json.dumps(step_once(args.model, args.resolution, dtype, ckpt, args.steps, device)))
    import subprocess

    runs = []
    for name in args.settings:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--resolution",
                              str(args.resolution), "--steps", str(args.steps), "--one", name],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: failed\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    data = {"machine": machine(), "torch": torch.__version__, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
