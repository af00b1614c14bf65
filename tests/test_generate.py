import json

import pytest
import torch
from PIL import Image

from lorabooth import generate
from lorabooth.core.errors import UserError


def test_every_combination_with_the_same_seeds(trained_run, tmp_path):
    out = tmp_path / "gen"
    images = generate(trained_run, ["a photo of sks dog on the beach"], unet_scales=[0.0, 1.0],
                      text_scales=[1.0], guidances=[2.0, 7.5], num_images=2, seed=5, steps=2,
                      output=out)
    assert len(images) == 2 * 2 * 2
    folder = out / "00-a-photo-of-sks-dog-on-the-beach"
    pngs = sorted(p.name for p in folder.glob("u*.png"))
    assert pngs == sorted(f"u{u}_t1_g{g}_s{s}.png" for u in ("0", "1") for g in ("2", "7.5")
                          for s in (5, 6))
    meta = json.loads(Image.open(folder / "u1_t1_g7.5_s6.png").text["lorabooth"])
    assert meta == {"prompt": "a photo of sks dog on the beach", "negative_prompt": "",
                    "unet_scale": 1.0, "text_scale": 1.0, "guidance": 7.5, "seed": 6, "steps": 2,
                    "scheduler": "dpm", "lora": str(trained_run)}
    grid = Image.open(folder / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 4 * 64  # 4 rows of settings, 2 seed columns


def test_same_seed_same_image_and_seeds_differ(trained_run, tmp_path):
    a = generate(trained_run, ["a photo of sks dog"], num_images=2, steps=2, output=tmp_path / "a")
    b = generate(trained_run, ["a photo of sks dog"], num_images=2, steps=2, output=tmp_path / "b")
    assert a[0].tobytes() == b[0].tobytes()
    assert a[0].tobytes() != a[1].tobytes()


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "pndm"])
def test_schedulers(trained_run, tmp_path, scheduler):
    images = generate(trained_run, ["a dog"], num_images=1, steps=3, scheduler=scheduler,
                      output=tmp_path)
    assert images[0].size == (64, 64)


def test_bad_generate_input(trained_run, tmp_path):
    with pytest.raises(UserError, match="--scheduler"):
        generate(trained_run, ["x"], scheduler="heun2", output=tmp_path)
    with pytest.raises(UserError, match="no LoRA here"):
        generate(tmp_path, ["x"])
    with pytest.raises(UserError, match="--num-images"):
        generate(trained_run, ["x"], num_images=0)


def test_fused_drawing_equals_the_adapters_and_restores_the_weights(trained_run):
    """Fusing at fixed scales is a speed-up only: the images match drawing with
    the adapters beside the weights, and the weights come back afterwards."""
    import numpy as np

    from lorabooth.generation import Setting, draw, load_pipeline

    pipe, has_text = load_pipeline(trained_run)
    assert has_text
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    for setting in (Setting(0.5, 0.7, 7.5), Setting(1.0, 1.0, 3.0), Setting(0.0, 0.0, 7.5)):
        fast = draw(pipe, has_text, "a photo of sks dog", setting, [1, 2], 3, fuse=True)
        slow = draw(pipe, has_text, "a photo of sks dog", setting, [1, 2], 3, fuse=False)
        for a, b in zip(fast, slow):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert diff.max() <= 1, (setting, diff.max())
    for k, v in pipe.unet.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.allclose(v, te_before[k], atol=1e-6), k
    # scale 0, fused: exactly the base model
    base = draw(pipe, has_text, "a photo of sks dog", Setting(0.0, 0.0, 7.5), [1], 3)
    pipe.disable_lora()
    try:
        plain = draw(pipe, has_text, "a photo of sks dog", Setting(0.0, 0.0, 7.5), [1], 3, fuse=False)
    finally:
        pipe.enable_lora()
    assert base[0].tobytes() == plain[0].tobytes()


def test_width_and_height(trained_run, tmp_path):
    images = generate(trained_run, ["a dog"], num_images=1, steps=2, width=48, height=32,
                      output=tmp_path)
    assert images[0].size == (48, 32)
    with Image.open(tmp_path / "00-a-dog" / "u1_t1_g7.5_s0.png") as png:
        assert png.size == (48, 32)


@pytest.mark.parametrize("option,value", [
    ("--width", "100"), ("--height", "0"), ("--width", "-8"), ("--height", "4"), ("--width", "wide"),
])
def test_bad_size_is_one_line_exit_2(trained_run, tmp_path, capsys, option, value):
    from lorabooth.commands.cli import main

    code = main(["generate", str(trained_run), "--prompt", "x", option, value,
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and option in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists()
