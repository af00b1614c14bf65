import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")


def make_photos(folder: Path, n: int = 3, size: tuple[int, int] = (80, 72)) -> Path:
    """Small distinct pictures standing in for a user's subject photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (40 + 60 * i, 130, 200 - 50 * i))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 8, 60, 60), fill=(220, 60 + 30 * i, 40))
        im.save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")


@pytest.fixture(scope="session")
def session_photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("subject") / "photos")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, session_photos) -> Path:
    """One small run with everything on: prior preservation, text-encoder LoRA,
    alpha != rank (so a loader that ignored alpha would be caught)."""
    from lorabooth import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "full"
    config = TrainConfig(
        model="tiny", instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", prior_preservation=True, num_class_images=2,
        class_draw_steps=2, steps=4, lr=1e-2, lr_text=1e-2, train_text_encoder=True,
        rank=4, alpha=8, seed=0, output=str(out), validation_prompt="a photo of sks dog",
    )
    return train(config)
