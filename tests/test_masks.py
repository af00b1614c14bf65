"""--masked-loss: the weights' maths on small tensors, masks cropped as their
photos, and training with them (equal to plain training at weight 1, exact
resume, the masked prior), hostile masks refused in one line."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import lora_metadata
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME
from lorabooth.photos.imagefiles import image_files, mask_path
from lorabooth.training.data import load_image
from lorabooth.training.masks import instance_masks, load_mask
from lorabooth.training.objective import dreambooth_loss, mask_weights, masked_prior_loss, weighted_row_mse


def _config(photos, out, **kw):
    return TrainConfig(**{**dict(model="tiny", instance_dir=str(photos), steps=3, seed=0,
                                 instance_prompt="a photo of sks dog", output=str(out)), **kw})


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _masked_photos(folder, n=3):
    """make_photos' pictures, each with a mask: its left half the subject."""
    make_photos(folder, n)
    for photo in image_files(folder):
        with Image.open(photo) as im:
            mask = Image.new("L", im.size, 0)
        ImageDraw.Draw(mask).rectangle((0, 0, mask.width // 2 - 1, mask.height), fill=255)
        mask.save(mask_path(photo))
    return folder


def test_the_weighted_mean_is_the_plain_mse_at_weight_one_and_the_subjects_at_zero():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, :, :2] = 1  # the two left columns are the subject
    plain = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    assert torch.allclose(weighted_row_mse(pred, target, mask_weights(mask, 1.0)), plain)
    subject = ((pred - target)[..., :2] ** 2).flatten(1).mean(1)
    assert torch.allclose(weighted_row_mse(pred, target, mask_weights(mask, 0.0)), subject)
    # 0.1 outside: sum(w e) / sum(w) by hand
    w = mask_weights(mask, 0.1).expand_as(pred)
    by_hand = ((w * (pred - target) ** 2).flatten(1).sum(1) / w.flatten(1).sum(1))
    assert torch.allclose(weighted_row_mse(pred, target, mask_weights(mask, 0.1)), by_hand)


def test_the_loss_weighs_only_the_instance_rows_and_pools_to_a_packed_grid():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    masks = torch.zeros(1, 1, 8, 8)  # the latent grid before FLUX's 2 x 2 packing
    masks[..., :4, :] = 1  # the top half
    total, instance, prior = dreambooth_loss(pred, target, 1, 0.5, None, mask_weights(masks, 0.0))
    assert torch.allclose(instance, ((pred[0] - target[0])[:, :2] ** 2).mean())
    assert torch.allclose(prior, F.mse_loss(pred[1:], target[1:]))
    assert torch.allclose(total, instance + 0.5 * prior)
    # no masks, no min-SNR weights: the plain means exactly, as before masks
    assert torch.equal(dreambooth_loss(pred, target, 1, 0.5)[1], F.mse_loss(pred[:1], target[:1]))


def test_the_masked_prior_reads_only_outside_the_mask():
    pred, frozen = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2] = 1
    frozen[..., :2] = 5.0  # differs only on the subject: no pull
    assert masked_prior_loss(pred, frozen, masks).item() == 0
    frozen[..., 2:] = 1.0  # differs outside: the mean squared gap there
    assert masked_prior_loss(pred, frozen, masks).item() == pytest.approx(1.0)


def test_a_mask_is_cropped_and_resized_as_its_photo(tmp_path):
    """A photo whose subject is white on black and its own grey levels as the
    mask: the mask the loss reads is the photo as training sees it."""
    im = Image.new("RGB", (90, 60), (0, 0, 0))
    ImageDraw.Draw(im).ellipse((5, 10, 50, 55), fill=(255, 255, 255))  # off centre, cut by the crop
    photo = tmp_path / "p.png"
    im.save(photo)
    im.convert("L").save(mask_path(photo))
    mask = load_mask(mask_path(photo), im.size, 32)
    seen = (load_image(photo, 32)[0] + 1) / 2  # [-1, 1] -> [0, 1]
    assert mask.shape == (1, 32, 32)
    assert (mask[0] - seen).abs().mean() < 0.03  # same crop (the filters differ a little)
    (grid,) = instance_masks([photo], [(32, 32)], [(4, 4)])
    assert grid.shape == (1, 4, 4)
    assert torch.allclose(grid, F.adaptive_avg_pool2d(mask, 4))
    # at an aspect-ratio bucket (width 48, height 32) the mask is cut as the photo is
    (wide,) = instance_masks([photo], [(48, 32)], [(4, 6)])
    seen = (load_image(photo, (48, 32))[0] + 1) / 2
    assert wide.shape == (1, 4, 6)
    assert (wide[0] - F.adaptive_avg_pool2d(seen[None], (4, 6))[0]).abs().mean() < 0.03


def test_masks_are_not_photos(tmp_path):
    folder = _masked_photos(tmp_path / "p")
    assert [p.name for p in image_files(folder)] == ["photo_0.png", "photo_1.png", "photo_2.png"]


def test_at_unmasked_weight_one_training_is_plain_training(tmp_path):
    photos = _masked_photos(tmp_path / "p")
    plain = train(_config(photos, tmp_path / "a"))
    masked = train(_config(photos, tmp_path / "b", masked_loss=True, unmasked_weight=1.0))
    assert _losses(masked) == pytest.approx(_losses(plain), rel=1e-5)
    assert "masked_loss = true" in (masked / "config.toml").read_text().splitlines()
    assert "| masked loss | yes: photos' masks, weight 1 outside, masked prior 0 |" in \
        (masked / "README.md").read_text()
    assert lora_metadata(masked)["unmasked_weight"] == 1.0
    assert "masked_loss" not in lora_metadata(plain)
    weighted = train(_config(photos, tmp_path / "c", masked_loss=True, unmasked_weight=0.0))
    assert _losses(weighted)[0] != pytest.approx(_losses(plain)[0], rel=1e-3)


def test_a_masked_run_with_its_prior_resumes_exactly(tmp_path, caplog):
    photos = _masked_photos(tmp_path / "p")
    kw = dict(lr=1e-2, masked_loss=True, masked_prior_weight=1.0, checkpoint_every=2)
    straight = train(_config(photos, tmp_path / "a", steps=4, **kw))
    out = tmp_path / "b"
    train(_config(photos, out, steps=3, **kw))
    caplog.set_level("INFO", logger="lorabooth")
    resumed = train(_config(photos, out, steps=4, resume=True, **kw))
    assert "(step 2)" in caplog.text
    assert _losses(resumed) == _losses(straight)
    a, b = load_file(straight / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the masked prior adds to the loss once the LoRA has moved (step 2 on)
    without = train(_config(photos, tmp_path / "c", steps=2, lr=1e-2, masked_loss=True))
    assert _losses(without)[0] == _losses(straight)[0]
    assert _losses(without)[1] != pytest.approx(_losses(straight)[1], rel=1e-6)


def test_the_masked_prior_is_zero_while_the_lora_is_still_zero(tmp_path, monkeypatch):
    """At step 1 the LoRA's up matrices are zero: its prediction is the
    frozen base's, so the masked prior term must add exactly nothing."""
    import lorabooth.training.masks as m

    photos = _masked_photos(tmp_path / "p")
    seen = []
    real = m.masked_prior_loss
    monkeypatch.setattr(m, "masked_prior_loss", lambda *a: seen.append(real(*a)) or seen[-1])
    train(_config(photos, tmp_path / "a", steps=1, masked_loss=True, masked_prior_weight=1.0))
    assert len(seen) == 1 and seen[0].item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("case, match", [
    ("none", "no photo in .* has a mask"),
    ("size", r"photo_0.mask.png is 10x10 px, its photo 80x72"),
    ("broken", r"photo_0.mask.png: not a readable image"),
])
def test_hostile_masks_are_one_line(case, match, tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "p")
    if case == "size":
        Image.new("L", (10, 10), 255).save(mask_path(photos / "photo_0.png"))
    if case == "broken":
        mask_path(photos / "photo_0.png").write_bytes(b"\x89PNG not really")
    import lorabooth.training.loop as t

    monkeypatch.setattr(t, "load_base", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(UserError, match=match):  # before any model loads
        train(_config(photos, tmp_path / "r", masked_loss=True))
    assert not (tmp_path / "r" / WEIGHT_NAME).exists()


def test_the_mask_options_need_masked_loss():
    with pytest.raises(UserError, match="--masked-prior-weight: applies only with --masked-loss"):
        _config("p", "o", masked_prior_weight=1.0)
    with pytest.raises(UserError, match="--unmasked-weight: must be between 0 and 1"):
        _config("p", "o", masked_loss=True, unmasked_weight=-0.5)


def _prepare(src, out, **kw):
    from lorabooth.config import PrepareConfig
    from lorabooth.photos.prepare import prepare

    return prepare(PrepareConfig(src=str(src), out=str(out), resolution=64, min_size=16, **kw))


def test_prepare_mask_face_lies_over_the_face_in_the_output(tmp_path, monkeypatch):
    import lorabooth.photos.prepare as p

    monkeypatch.setattr(p, "find_faces", lambda im: [(100, 20, 40, 40)])  # the face's box
    src = tmp_path / "src"
    make_photos(src, 1, size=(200, 100))
    (entry,) = _prepare(src, tmp_path / "out", mask="face")
    assert entry.mask == "photo_0.mask.png"
    mask = Image.open(tmp_path / "out" / entry.mask)
    assert mask.size == (64, 64) and mask.mode == "L"
    # the centre crop keeps x 50..150: the face's centre (120, 40) lands at (45, 26)
    assert mask.getpixel((45, 26)) == 255 and mask.getpixel((2, 60)) == 0
    assert instance_masks([tmp_path / "out" / entry.output], [(64, 64)], [(8, 8)])[0][0, 3, 5] > 0.9


def test_prepare_carries_the_photos_own_mask_through_its_crop(tmp_path):
    """The photo is its own mask: after the crop the two still agree."""
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (120, 80), (0, 0, 0))
    ImageDraw.Draw(im).rectangle((15, 10, 55, 70), fill=(255, 255, 255))
    im.save(src / "p.jpg", quality=98)
    im.convert("L").save(src / "p.mask.png")
    Image.new("L", (5, 5)).save(src / "q.mask.png")  # a mask without its photo: not a photo
    for crop in ("center", "none"):
        out = tmp_path / f"out-{crop}"
        (entry,) = _prepare(src, out, crop=crop)
        photo = Image.open(out / entry.output).convert("L")
        mask = Image.open(out / entry.mask)
        assert mask.size == photo.size
        diff = torch.tensor(list(photo.getdata())) - torch.tensor(list(mask.getdata()))
        assert diff.abs().float().mean() < 4  # JPEG's ringing only


def test_prepare_leaves_out_a_mask_it_cannot_use_and_a_rerun_removes_a_stale_one(tmp_path):
    src = tmp_path / "src"
    make_photos(src, 1)
    Image.new("L", (10, 10), 255).save(src / "photo_0.mask.png")
    (entry,) = _prepare(src, tmp_path / "out")
    assert entry.kept and not entry.mask
    assert "photo_0.mask.png is 10x10 px, the photo 80x72: no mask" in entry.warnings
    Image.new("L", (80, 72), 255).save(src / "photo_0.mask.png")
    assert _prepare(src, tmp_path / "out")[0].mask == "photo_0.mask.png"
    (src / "photo_0.mask.png").unlink()
    assert not _prepare(src, tmp_path / "out")[0].mask
    assert not (tmp_path / "out" / "photo_0.mask.png").exists()


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux2", "tiny-flux"])
def test_masks_meet_every_familys_latent_grid(model, tmp_path, monkeypatch):
    """SDXL's latents and FLUX's packed 2 x 2 ones: the masks (on the VAE's
    grid) are pooled to each, the masked prior's teacher runs on each."""
    import lorabooth.training.masks as m

    photos = _masked_photos(tmp_path / "p")
    grids = []
    monkeypatch.setattr(m, "masked_prior_loss", lambda pred, frozen, masks: grids.append(
        (pred.shape, masks.shape)) or masked_prior_loss(pred, frozen, masks))
    run = train(_config(photos, tmp_path / "b", model=model, resolution=32, steps=2,
                        masked_loss=True, unmasked_weight=0.0, masked_prior_weight=1.0))
    assert torch.isfinite(torch.tensor(_losses(run))).all() and len(grids) == 2
    (pred, masks), _ = grids
    assert pred[0] == masks[0]  # one mask a row, on the VAE's grid (FLUX.2 packs 2 x 2 of it)
    assert tuple(masks[-2:]) in (tuple(pred[-2:]), tuple(2 * x for x in pred[-2:]))


def test_prepare_crop_bucket_cuts_the_mask_with_its_photo(tmp_path):
    from lorabooth.config import PrepareConfig
    from lorabooth.photos.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    ImageDraw.Draw(im).rectangle((20, 10, 90, 90), fill=(255, 255, 255))
    im.save(src / "p.png")
    im.convert("L").save(src / "p.mask.png")
    (entry,) = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), crop="bucket",
                                     resolution=64, min_size=16))
    photo = Image.open(tmp_path / "out" / entry.output).convert("L")
    mask = Image.open(tmp_path / "out" / entry.mask)
    assert mask.size == photo.size == tuple(entry.bucket) and photo.size[0] > photo.size[1]
    diff = torch.tensor(list(photo.getdata())) - torch.tensor(list(mask.getdata()))
    assert diff.abs().float().mean() < 2


def test_a_bucketed_masked_run_trains_each_mask_at_its_bucket(tmp_path, monkeypatch):
    import lorabooth.training.loop as t

    photos = tmp_path / "p"
    for i, size in enumerate([(96, 64), (64, 96), (80, 80)]):
        make_photos(photos / str(i), 1, size=size)
        (photos / str(i) / "photo_0.png").rename(photos / f"photo_{i}.png")
    _masked_photos(photos, 0)  # the masks of the three photos just made
    shapes = []
    real = t.MaskedLoss
    monkeypatch.setattr(t, "MaskedLoss", lambda masks, *a: shapes.append(masks.shape) or
                        real(masks, *a))
    run = train(_config(photos, tmp_path / "r", resolution=64, buckets=True, masked_loss=True,
                        masked_prior_weight=1.0, steps=3, batch_size=1))
    assert len({s[-2:] for s in shapes}) >= 2  # batches of different buckets, each its grid
    assert torch.isfinite(torch.tensor(_losses(run))).all()
