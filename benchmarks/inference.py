"""Drawing with a LoRA at a fixed scale versus the base model, SD 1.5 size.

One process loads the SD 1.5-architecture folder, attaches a rank-4 UNet LoRA
(random, non-zero: the cost does not depend on the values), and draws one
256 px image (DPM-Solver++, guidance 7.5) three ways, in turns, several
rounds: the base model (adapters disabled), the LoRA beside the weights
(peft's extra matmuls in every attention projection), and the LoRA fused
into the weights at that scale (lorabooth's default when scales are fixed).

    python benchmarks/inference.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import DEFAULT_MODEL_DIR, machine, model_dir, warm_page_cache


def _lora_run(base, folder: Path) -> Path:
    """A run folder holding a rank-4 UNet LoRA for this base model."""
    from lorabooth.adapters.lora import add_unet_lora, lora_parameters
    from lorabooth.formats.layouts import save_lora

    add_unet_lora(base.unet, 4, 4)
    with torch.no_grad():
        for p in lora_parameters(base.unet):
            p.normal_(0, 0.02)
    save_lora(folder, base.unet, None, {})
    base.unet.delete_adapters("default")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()

    from lorabooth.adapters.lora import fused, set_scales
    from lorabooth.formats.layouts import load_into_pipeline
    from lorabooth.generation import _scheduler
    from lorabooth.models.loading import load_base, pipeline_from_parts
    from lorabooth.models.precision import tune_allocator

    tune_allocator()
    model = model_dir(args.model_dir)
    warm_page_cache(model)
    print(json.dumps({"machine": machine(), "steps": args.steps, "size": args.size}), flush=True)
    base = load_base(str(model))
    run = _lora_run(base, Path(tempfile.mkdtemp(prefix="bench-inference-")))
    pipe = pipeline_from_parts(base, _scheduler("dpm", base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    has_text = load_into_pipeline(pipe, run)

    @torch.inference_mode()
    def call() -> None:
        pipe("a photo of sks ball", height=args.size, width=args.size, guidance_scale=7.5,
             num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    def timed(fuse: bool, lora: bool) -> float:
        (pipe.enable_lora if lora else pipe.disable_lora)()
        tick = time.perf_counter()
        if fuse:  # what generate's draw does at fixed scales
            with fused(pipe, 1.0, 1.0, has_text):
                call()
        else:
            set_scales(pipe, 1.0, 1.0, has_text)
            call()
        return time.perf_counter() - tick

    ways = {"base model": (False, False), "LoRA, unfused": (False, True), "LoRA, fused": (True, True)}
    timed(False, False)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, (fuse, lora) in ways.items():
            times[name].append(timed(fuse, lora))
            print(json.dumps({"way": name, "s": round(times[name][-1], 2)}), flush=True)
    for name, ts in times.items():
        print(json.dumps({"way": name, "s_per_image": [round(x, 2) for x in ts]}), flush=True)
    base_s = statistics.median(times["base model"])
    print("\n| way | s per image (median) | vs base model |")
    print("|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {s:.2f} | {100 * (s / base_s - 1):+.1f}% |")


if __name__ == "__main__":
    main()
