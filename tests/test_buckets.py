"""Aspect-ratio buckets: the maths (photos/buckets.py), `prepare --crop
bucket`, the data order (training/data.BucketOrder) and `train --buckets`
runs: exact resume, SDXL's time ids, square runs unchanged."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorabooth import TrainConfig, train
from lorabooth.config import PrepareConfig
from lorabooth.formats import WEIGHT_NAME
from lorabooth.models.families import time_ids
from lorabooth.photos.buckets import bucket_box, bucket_sizes, bucket_step, nearest_bucket
from lorabooth.photos.prepare import prepare
from lorabooth.training.data import BucketOrder, Shuffler

PROMPT = "a photo of sks dog"


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random picture: distinct seeds give distinct perceptual hashes."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _photos(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        _photo(i, size).save(folder / f"photo_{i}.png")
    return folder


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the maths -------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 512, 768, 1024])
def test_bucket_sizes_keep_the_area_the_step_and_the_aspect(resolution):
    sizes = bucket_sizes(resolution)
    step = bucket_step(resolution)
    assert (resolution, resolution) in sizes
    assert len(sizes) > 1  # something besides the square, even for the tiny models
    for w, h in sizes:
        assert w * h <= resolution * resolution
        assert (w, h) == (resolution, resolution) or (w % step == 0 and h % step == 0)
        assert max(w, h) <= 4 * min(w, h)
        assert (h, w) in sizes  # both ways round
    assert bucket_step(512) == bucket_step(1024) == 64


def test_nearest_bucket_by_aspect():
    table = bucket_sizes(512)
    assert nearest_bucket(3000, 3000, table) == (512, 512)
    assert nearest_bucket(4000, 3000, table) == (576, 448)  # 4:3 -> 1.29
    assert nearest_bucket(3000, 4000, table) == (448, 576)
    assert nearest_bucket(1920, 1080, table) == (640, 384)  # 16:9 -> 1.67
    assert nearest_bucket(5000, 500, table) == (1024, 256)  # 10:1 -> the widest, 4:1
    # equally near squares: the one at --resolution, not the rounded one
    assert nearest_bucket(10, 10, bucket_sizes(520)) == (520, 520)


def test_bucket_box_is_the_least_centred_crop():
    assert bucket_box(4000, 3000, (576, 448)) == (71, 0, 3928, 3000)  # the sides trimmed
    assert bucket_box(3000, 3000, (576, 448)) == (0, 333, 3000, 2666)  # top and bottom
    assert bucket_box(640, 384, (640, 384)) == (0, 0, 640, 384)  # already the shape


def test_time_ids_with_a_bucket_target():
    # the photo scaled to cover 576 x 448: 4000 -> 597, the 21 px excess cut evenly
    assert time_ids((4000, 3000), (0, 0, 4000, 3000), (576, 448)) == (3000, 4000, 0, 11, 448, 576)
    # a square target as one side or as a pair: the same numbers
    box = (1500, 500, 2500, 1500)
    assert time_ids((4000, 3000), box, 1024) == time_ids((4000, 3000), box, (1024, 1024))


# --- prepare --crop bucket ------------------------------------------------

def test_prepare_crop_bucket_keeps_each_photos_aspect(tmp_path):
    sizes = [(300, 240), (240, 300), (300, 300), (600, 150), (400, 225)]
    src = _photos(tmp_path / "src", sizes)
    out = tmp_path / "out"
    entries = prepare(PrepareConfig(src=str(src), out=str(out), resolution=64, crop="bucket"))
    want = {"photo_0.png": (72, 56), "photo_1.png": (56, 72), "photo_2.png": (64, 64),
            "photo_3.png": (128, 32), "photo_4.png": (80, 48)}
    got = {e.output: Image.open(out / e.output).size for e in entries}
    assert got == want
    report = json.loads((out / "prepare.json").read_text())
    for f in report["files"]:
        assert f["crop"] == "bucket" and tuple(f["bucket"]) == want[f["output"]]
        left, top, right, bottom = f["crop_box"]  # the bucket's aspect, one side whole
        bw, bh = f["bucket"]
        assert abs((right - left) / (bottom - top) - bw / bh) < 0.02
        assert (right - left, bottom - top) in {(f["size"][0], bottom - top),
                                                 (right - left, f["size"][1])}


# --- the data order ------------------------------------------------------

def test_bucket_order_never_mixes_buckets_and_resumes_exactly():
    buckets = ["a"] * 5 + ["b"] * 2 + ["c"]  # image i's bucket
    order = BucketOrder(buckets, batch=2, seed=3)
    seen = []
    for _ in range(40):
        batch = order.take(2)
        assert len({buckets[i] for i in batch}) == 1, batch
        seen += batch
    assert set(seen) == set(range(8))  # every image, the lone one in c too
    # each bucket's share of the batches is its share of an epoch's slots (3 : 1 : 1)
    firsts = [buckets[i] for i in seen[::2]]
    assert firsts.count("a") == 24 and firsts.count("b") == firsts.count("c") == 8
    state = order.state_dict()
    again = BucketOrder(buckets, batch=2, seed=99)
    again.load_state_dict(state)
    assert [order.take(2) for _ in range(7)] == [again.take(2) for _ in range(7)]
    with pytest.raises(ValueError, match="buckets"):
        BucketOrder(["a", "b"], batch=1, seed=0).load_state_dict(state | {"buckets": [1]})


def test_one_bucket_is_the_plain_shuffler():
    order, plain = BucketOrder([(64, 64)] * 5, batch=2, seed=7), Shuffler(5, 7)
    assert [order.take(2) for _ in range(9)] == [plain.take(2) for _ in range(9)]
    assert order.state_dict().keys() == plain.state_dict().keys()  # a square run's checkpoints


# --- training runs --------------------------------------------------------

def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt=PROMPT, steps=3,
                seed=0, output=str(out), resolution=64, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def test_square_runs_are_unchanged_by_buckets(tmp_path):
    """All-square photos: --buckets trains exactly what a run without it does,
    the class images' path included."""
    photos = _photos(tmp_path / "photos", [(96, 96)] * 3)
    common = dict(batch_size=2, prior_preservation="images", class_prompt="a photo of a dog",
                  num_class_images=2, class_draw_steps=1, class_dir=str(tmp_path / "cls"))
    plain = train(_config(photos, tmp_path / "plain", **common))
    bucketed = train(_config(photos, tmp_path / "bucketed", buckets=True, **common))
    assert _losses(plain) == _losses(bucketed)
    a, b = load_file(plain / WEIGHT_NAME), load_file(bucketed / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (bucketed / "README.md").read_text()
    assert "| aspect-ratio buckets (--buckets) | on: 64x64 (3 images) |" in card
    assert "buckets = true" in (bucketed / "config.toml").read_text()


def test_bucketed_run_resumes_exactly(tmp_path):
    """Three buckets, class images in each, a checkpoint mid-run: killed and
    resumed equals the uninterrupted run."""
    photos = _photos(tmp_path / "photos", [(96, 64), (96, 64), (64, 96), (64, 64)])
    common = dict(buckets=True, batch_size=2, steps=5, checkpoint_every=2,
                  prior_preservation="images", class_prompt="a photo of a dog",
                  num_class_images=2, class_draw_steps=1, class_dir=str(tmp_path / "cls"))
    full = train(_config(photos, tmp_path / "full", **common))
    part = _config(photos, tmp_path / "part", resume=True, **common)
    train(TrainConfig(**{**part.__dict__, "steps": 3}))  # "killed" after step 3
    resumed = train(part)
    assert _losses(resumed) == pytest.approx(_losses(full), abs=0)
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bucketed_sdxl_run_conditions_on_the_real_sizes(tmp_path, monkeypatch):
    """tiny-sdxl with --buckets and the image-free prior: every batch holds one
    bucket, and its rows' time ids are the photo's own size, the crop, and the
    bucket as target size (issue 29 §1)."""
    import lorabooth.training.loop as t

    sizes = {"photo_0.png": (96, 64), "photo_1.png": (64, 96), "photo_2.png": (70, 70)}
    photos = _photos(tmp_path / "photos", list(sizes.values()))
    seen, real = [], t.step_loss

    def spy(denoiser, latents, noise, timesteps, context, *rest, **kw):
        seen.append((tuple(latents.shape[-2:]), context.time_ids.tolist()))
        return real(denoiser, latents, noise, timesteps, context, *rest, **kw)

    monkeypatch.setattr(t, "step_loss", spy)
    train(_config(photos, tmp_path / "r", model="tiny-sdxl", buckets=True, steps=6,
                  batch_size=2, prior_preservation="model", class_prompt="a photo of a dog"))
    want = {  # (original h, w, crop top, left, target h, w), by the arithmetic in the docstring
        (24, 40): [64, 96, 3, 0, 48, 80],  # 3:2 -> 80 x 48 (latents 1/2: the tiny VAE)
        (40, 24): [96, 64, 0, 3, 80, 48],
        (32, 32): [70, 70, 0, 0, 64, 64]}
    assert len(seen) == 6 and {shape for shape, _ in seen} == set(want)
    for shape, rows in seen:
        assert len(rows) == 4  # 2 instance rows, 2 prior rows
        assert all(row == want[shape] for row in rows), (shape, rows)
        h, w = (side * 2 for side in shape)
        assert all(row[4:] == [h, w] for row in rows)
    assert math.isfinite(_losses(tmp_path / "r")[-1])


@pytest.mark.parametrize("model", ["tiny-flux2", "tiny-flux"])
def test_bucketed_flux_runs_shift_by_each_buckets_tokens(tmp_path, monkeypatch, model):
    """FLUX packs each batch's latents at its own size, and each bucket's
    timesteps are shifted for its own token count (the flow schedulers shift
    by resolution when they draw)."""
    import lorabooth.training.loop as t

    photos = _photos(tmp_path / "photos", [(48, 32), (32, 32)])
    seen, real = {}, t.step_loss

    def spy(denoiser, latents, *rest, **kw):
        seen[tuple(latents.shape[-2:])] = denoiser.noising.sigmas
        return real(denoiser, latents, *rest, **kw)

    monkeypatch.setattr(t, "step_loss", spy)
    run = train(_config(photos, tmp_path / "r", model=model, buckets=True, steps=4,
                        resolution=32))
    assert len(seen) == 2 and all(math.isfinite(x) for x in _losses(run))
    first, second = seen.values()
    assert not torch.equal(first, second)  # 40 x 24 and 32 x 32 px: other token counts
