"""Prior preservation with class images against the image-free prior, on the
toy model: wall time of drawing the class images, of training, and both.

Each run: `--model toy`, the demo subject, 400 steps, batch 4, lr 1e-3, UNet
LoRA, seed 0, prior weight 1; class images: 64 drawn with 20 sampler steps
in batches of 16 (into an empty folder, so their cost is counted).

    python benchmarks/prior_modes.py [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import machine
from lorabooth.config import TrainConfig
from lorabooth.demo import demo_photos
from lorabooth.training.loop import train


def timed(config: TrainConfig) -> dict:
    t0 = time.perf_counter()
    run = train(config)
    total = time.perf_counter() - t0
    steps = [json.loads(line)["s_per_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"total_s": round(total, 1), "steps_s": round(sum(steps), 1),
            "s_per_step": round(sum(steps[5:]) / max(1, len(steps) - 5), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    print(json.dumps({"machine": machine()}))
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(model="toy", instance_dir=str(demo_photos()), instance_prompt="a photo of sks ball",
                      class_prompt="a photo of a ball", steps=args.steps, batch_size=4, lr=1e-3,
                      seed=0, num_class_images=64, class_draw_steps=20, class_draw_batch=16,
                      save_format="diffusers")
        for mode in ("images", "model"):
            result = timed(TrainConfig(**common, prior_preservation=mode, output=f"{tmp}/{mode}",
                                       class_dir=f"{tmp}/class_images"))
            print(json.dumps({"prior_preservation": mode, **result}))


if __name__ == "__main__":
    main()
