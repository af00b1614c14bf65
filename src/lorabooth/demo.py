"""`make demo`: train on the built-in model with the bundled example photos,
then draw a grid at UNet scales 0, 0.5 and 1."""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from .config import TrainConfig
from .generate import generate
from .train import train

log = logging.getLogger(__name__)

INSTANCE_PROMPT = "a photo of sks ball"


def demo_photos() -> Path:
    return Path(str(resources.files("lorabooth") / "assets" / "demo_photos"))


def demo(output: str | Path = "runs/demo", steps: int = 150) -> Path:
    start = time.perf_counter()
    config = TrainConfig(
        model="tiny", instance_dir=str(demo_photos()), instance_prompt=INSTANCE_PROMPT,
        class_prompt="a photo of a ball", prior_preservation=True, num_class_images=8,
        steps=steps, lr=1e-3, seed=0, checkpoint_every=max(1, steps // 2), output=str(output),
        resume=True,
    )
    run = train(config)
    generate(run, [f"{INSTANCE_PROMPT} on the beach"], unet_scales=[0.0, 0.5, 1.0],
             num_images=3, steps=20)
    grid = run / "generated" / "00-a-photo-of-sks-ball-on-the-beach" / "grid.png"
    log.info("done in %.0f s", time.perf_counter() - start)
    log.info("LoRA:       %s", run / "pytorch_lora_weights.safetensors")
    log.info("grid:       %s", grid)
    log.info("model card: %s", run / "README.md")
    log.info("(the built-in model has random weights: it shows the machinery, not a likeness)")
    return run
