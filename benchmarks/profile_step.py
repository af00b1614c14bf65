"""Where a training step's time goes, at SD 1.5's size: torch.profiler over
lorabooth's own step (cached latents and embeddings, UNet LoRA rank 4,
256 px, batch 1), after two warm-up steps. Prints the forward / backward /
optimizer split and the operators that take the most time.

    python benchmarks/profile_step.py [--precision no bf16] > benchmarks/profile_train.txt
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import DEFAULT_MODEL_DIR, machine, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()

    from lorabooth.config import TrainConfig
    from lorabooth.models.loading import load_base
    from lorabooth.models.precision import cast_frozen, tune_allocator, weight_dtype
    from lorabooth.training.noising import noising_for
    from lorabooth.training.setup import setup_lora, setup_optimizer

    t = importlib.import_module("lorabooth.training.loop")
    b = importlib.import_module("lorabooth.training.batches")
    tune_allocator()
    print(f"# {machine()}\n")
    for precision in args.precision:
        dtype = weight_dtype(precision)
        base = load_base(str(model_dir(args.model_dir)), unet_dtype=dtype)
        for m in (base.unet, base.vae, base.text_encoder):
            m.requires_grad_(False)
        photos = Path(__file__).resolve().parents[1] / "src/lorabooth/assets/demo_photos"
        config = TrainConfig(model="x", instance_dir=str(photos), output="unused",
                             instance_prompt="a photo of sks ball")
        paths = sorted(photos.glob("*.png"))
        examples = b.setup_examples(config, base, 256, paths, b.instance_captions(config, paths), [])
        base.vae = base.text_encoder = None
        modules = setup_lora(config, base)
        cast_frozen(base.unet, dtype)
        optimizer, _ = setup_optimizer(config, modules)
        gen = torch.Generator().manual_seed(0)

        def step() -> None:
            latents = b.sample_latents(examples, [0], [], gen)
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.randint(0, 1000, (1,), generator=gen)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                with record_function("forward"):
                    context = base.family.unet_inputs(
                        b.text_context(examples, modules, [0], 0, torch.device("cpu")))
                    loss, _, _ = t.step_loss(base.unet, noising_for(base.noise_scheduler), latents, noise,
                                             steps, context, 1, 1.0)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        tick = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        per_step = (time.perf_counter() - tick) / 2
        events = {e.key: e for e in prof.key_averages()}
        print(f"## {'fp32' if precision == 'no' else precision}: {per_step:.2f} s per step "
              "under the profiler\n")
        for phase in ("forward", "backward", "optimizer"):
            if phase in events:
                print(f"- {phase}: {events[phase].cpu_time_total / 2e6:.2f} s per step")
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=40))
        base = modules = optimizer = None  # free before the next precision loads


if __name__ == "__main__":
    main()
