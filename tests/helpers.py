"""Plain helpers the tests share (fixtures live in conftest.py)."""

import json
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw

# The first three losses of the seeded tiny run (tiny model, 64 px, seed 0):
# test_train pins them for the plain loop, test_speed for the fast step.
PINNED_FIRST_LOSSES = [1.10967, 1.09367, 1.06258]


def make_photos(folder: Path, n: int = 3, size: tuple[int, int] = (80, 72)) -> Path:
    """Small distinct pictures standing in for a user's subject photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (40 + 60 * i, 130, 200 - 50 * i))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 8, 60, 60), fill=(220, 60 + 30 * i, 40))
        im.save(folder / f"photo_{i}.png")
    return folder


def strict_loads(text: str):
    """json.loads that, like JavaScript's JSON.parse, refuses NaN and Infinity."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def tiny_outputs(pipe):
    """A tiny pipeline's UNet prediction and text-encoder output for fixed
    inputs: two pipelines whose weights agree give the same pair."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), ctx).sample, pipe.text_encoder(ids)[0]


# Headless Chromium as the report tests run it; the timeouts are hang
# guards, not speed limits.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--virtual-time-budget=5000"]


def chromium_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it and ran its scripts."""
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=600).stdout
