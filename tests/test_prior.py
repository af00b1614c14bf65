import pytest
import torch
from PIL import Image

from lorabooth.adapters.lora import add_unet_lora, lora_parameters
from lorabooth.models.families import Conditioning, encode_prompts
from lorabooth.models.loading import build_tiny, pipeline_from_parts
from lorabooth.training.noising import Denoiser, noising_for
from lorabooth.training.prior import (
    adapters_disabled,
    class_image_name,
    draw_class_images,
    missing_indices,
    model_prior_rows,
)


def _pipe():
    pipe = pipeline_from_parts(build_tiny())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_missing_indices_fill_the_gaps(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(1))
    Image.new("RGB", (8, 8)).save(tmp_path / "users_own.jpg")
    (tmp_path / class_image_name(0)).write_bytes(b"broken")  # unreadable: does not count
    assert missing_indices(tmp_path, 4) == [0, 2]
    assert missing_indices(tmp_path, 2) == []


def test_draws_the_count_at_the_resolution_and_reuses(tmp_path):
    pipe = _pipe()
    folder = tmp_path / "cls"
    n = draw_class_images(pipe, folder, "a photo of a dog", missing_indices(folder, 3),
                          resolution=32, seed=0, steps=2, batch=2, progress=False)
    assert n == 3
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [class_image_name(i) for i in range(3)]
    assert all(Image.open(f).size == (32, 32) for f in files)
    before = {f: f.stat().st_mtime_ns for f in files}
    # a second fill for more images draws only the missing one
    assert missing_indices(folder, 4) == [3]
    assert draw_class_images(pipe, folder, "a dog", missing_indices(folder, 4), 32, 0, 2, 2) == 1
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    assert len(list(folder.glob("*.png"))) == 4


def test_image_i_comes_from_seed_plus_i_whatever_the_batching(tmp_path):
    pipe = _pipe()
    draw_class_images(pipe, tmp_path / "a", "a dog", [0, 1, 2], 32, 7, 2, batch=3, progress=False)
    draw_class_images(pipe, tmp_path / "b", "a dog", [2, 0, 1], 32, 7, 2, batch=1, progress=False)
    for i in range(3):
        a = Image.open(tmp_path / "a" / class_image_name(i)).tobytes()
        b = Image.open(tmp_path / "b" / class_image_name(i)).tobytes()
        assert a == b


def test_stale_temp_files_are_removed_and_not_counted(tmp_path):
    from lorabooth.training.prior import remove_stale_temps

    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(0))
    (tmp_path / ".class_00001.png.abc.tmp").write_bytes(b"half written")
    assert missing_indices(tmp_path, 2) == [1]
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [class_image_name(0)]


def _trained_looking():
    """The tiny model with a LoRA whose B is away from zero, as after training."""
    base = build_tiny()
    add_unet_lora(base.unet, 4, 4.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return base


def _denoiser(base):
    return Denoiser(base.unet, base.family, noising_for(base.noise_scheduler))


def _batch(n=2):
    g = torch.Generator().manual_seed(9)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
            torch.tensor([10, 700][:n]))


def test_model_prior_target_is_the_base_models_prediction_exactly():
    base = _trained_looking()
    reference = build_tiny()  # the same weights, never given a LoRA
    context = encode_prompts(base.family, base.tokenizers, base.text_encoders,
                             ["a photo of a dog"]).hidden
    latents, noise, t = _batch()
    lat2, noise2, t2, frozen = model_prior_rows(
        _denoiser(base), latents, noise, t, Conditioning(context.expand(2, -1, -1)),
        torch.Generator().manual_seed(1))
    # (B, ...) -> (2B, ...): the instance rows untouched, then the same latents re-noised
    assert lat2.shape == noise2.shape == (4, 4, 8, 8) and t2.shape == (4,) and frozen.shape == (2, 4, 8, 8)
    assert torch.equal(lat2[:2], latents) and torch.equal(lat2[2:], latents)
    assert torch.equal(noise2[:2], noise) and torch.equal(t2[:2], t)
    assert not torch.equal(noise2[2:], noise)  # an independent draw

    noisy = base.noise_scheduler.add_noise(latents, noise2[2:], t2[2:])
    ctx = context.expand(2, -1, -1)
    with torch.no_grad():
        expected = reference.unet(noisy, t2[2:], ctx).sample
        with_lora = base.unet(noisy, t2[2:], ctx).sample
    assert torch.equal(frozen, expected)
    assert not torch.allclose(with_lora, frozen, atol=1e-3)  # the LoRA is back on
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in lora_parameters(base.unet))  # and still trains


def test_model_prior_rows_are_drawn_from_the_generator():
    base = build_tiny()
    add_unet_lora(base.unet, 4, 4.0)
    context = Conditioning(torch.randn(1, 77, 32).expand(2, -1, -1))
    latents, noise, t = _batch()
    a, b, c = (model_prior_rows(_denoiser(base), latents, noise, t, context,
                                torch.Generator().manual_seed(seed)) for seed in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[3], c[3])


def test_adapters_come_back_on_when_the_block_raises():
    base = _trained_looking()
    x, _, t = _batch(1)
    context = torch.randn(1, 77, 32)
    with torch.no_grad():
        on = base.unet(x, t, context).sample
        with pytest.raises(KeyError), adapters_disabled(base.unet):
            raise KeyError("boom")
        assert torch.equal(base.unet(x, t, context).sample, on)


def test_dop_prior_rows_reuse_the_instance_noise_and_timesteps():
    """--prior-preservation dop: the prior rows are the instance rows' own
    noisy input (nothing drawn), the target the base model's prediction there."""
    base = _trained_looking()
    reference = build_tiny()
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))
    latents, noise, t = _batch()
    rng = torch.Generator().manual_seed(1)
    lat2, noise2, t2, frozen = model_prior_rows(
        _denoiser(base), latents, noise, t, Conditioning(ctx), rng, same_noise=True)
    assert torch.equal(noise2[2:], noise) and torch.equal(t2[2:], t) and torch.equal(lat2[2:], latents)
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(1).get_state())
    with torch.no_grad():
        expected = reference.unet(base.noise_scheduler.add_noise(latents, noise, t), t, ctx).sample
    assert torch.equal(frozen, expected)


@pytest.mark.parametrize("caption, words, expected", [
    ("a photo of sks dog", ["sks"], "a photo of dog"),
    ("SKS dog on the beach, sks-like", ["sks"], "dog on the beach, sks-like"),  # whole words only
    ("a zwx ohwx toy", ["zwx", "ohwx"], "a toy"),
    ("a photo of a dog", ["sks"], "a photo of a dog"),
])
def test_the_class_caption_drops_the_identifier_words(caption, words, expected):
    from lorabooth.config.templates import without_identifier

    assert without_identifier(caption, words) == expected
