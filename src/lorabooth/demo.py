"""`make demo`: personalise the toy world's held-out subject (a purple
striped ball the toy model never saw) from 4 pictures, draw it in contexts
it was never shown in at UNet scales 0 / 0.5 / 1, and print how faithful the
pictures are by the toy world's judges."""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from .config import TrainConfig
from .formats import WEIGHT_NAME
from .generation import generate
from .training.loop import train

log = logging.getLogger(__name__)

INSTANCE_PROMPT = "a photo of sks ball"
PROMPTS = ["a photo of sks ball on the snow", "a photo of sks ball in the room"]
SCALES = [0.0, 0.5, 1.0]
IMAGES = 6


def demo_photos() -> Path:
    """The subject's 4 views, rendered by `lorabooth.toyworld` (grass and beach only)."""
    return Path(str(resources.files("lorabooth") / "assets" / "demo_photos"))


def demo(output: str | Path = "runs/demo", steps: int = 400) -> Path:
    from .toyworld.judges import toy_judge

    start = time.perf_counter()
    config = TrainConfig(
        model="toy", instance_dir=str(demo_photos()), instance_prompt=INSTANCE_PROMPT,
        # the image-free prior: in the toy world the setting that learns the
        # subject and keeps the class (docs/toyworld.md, the levers)
        class_prompt="a photo of a ball", prior_preservation="model",
        steps=steps, batch_size=4, lr=1e-3, lr_text=1e-4,
        seed=0, checkpoint_every=max(1, steps // 2),
        output=str(output), resume=True,
    )
    run = train(config)
    images = generate(run, PROMPTS, unet_scales=SCALES, text_scales=[1.0], guidances=[5.0],
                      num_images=IMAGES, steps=20)
    judge = toy_judge()
    from .evaluation.metrics import cosine_matrix
    from .photos.imagefiles import decode
    from .training.data import readable_images

    subject = judge.identity([decode(p)[0] for p in readable_images(demo_photos())])
    log.info("fidelity by the toy judges (%d images per row; the subject is purple, striped):",
             IMAGES * len(PROMPTS))
    per = IMAGES * len(SCALES)
    for k, scale in enumerate(SCALES):
        row = [im for p in range(len(PROMPTS))
               for im in images[p * per + k * IMAGES : p * per + (k + 1) * IMAGES]]
        preds = judge.predict(row)
        contexts = [c for c in ("snow", "room") for _ in range(IMAGES)]
        log.info("  UNet scale %.1f: identity similarity %.3f, looks like the subject %3.0f%%, "
                 "right context %3.0f%%", scale,
                 cosine_matrix(judge.identity(row), subject).mean().item(),
                 100 * sum(p["colour"] == "purple" and p["pattern"] == "striped"
                           for p in preds) / len(preds),
                 100 * sum(p["context"] == c for p, c in zip(preds, contexts)) / len(preds))
    log.info("done in %.0f s", time.perf_counter() - start)
    log.info("LoRA:       %s", run / WEIGHT_NAME)
    for p in sorted((run / "generated").glob("*/grid.png")):
        log.info("grid:       %s", p)
    log.info("model card: %s", run / "README.md")
    return run
