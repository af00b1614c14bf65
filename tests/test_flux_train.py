"""Training and drawing on the flow-matching families (issue 27 §1, §2):
tiny-flux2 (FLUX.2 [klein]) and tiny-flux (FLUX.1), through the same loop,
prior modes, resume, files and scales as SD."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME

FAMILIES = {"tiny-flux2": "flux2", "tiny-flux": "flux1"}


def _config(photos, out, model="tiny-flux2", **kw):
    base = dict(model=model, instance_dir=str(photos), instance_prompt="a photo of sks dog",
                class_prompt="a photo of a dog", steps=3, seed=0, resolution=32, lr=1e-2,
                output=str(out))
    return TrainConfig(**{**base, **kw})


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def flux_photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("flux") / "photos")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def flux_run(request, flux_photos, tmp_path_factory):
    model = request.param
    return model, train(_config(flux_photos, tmp_path_factory.mktemp(model) / "run", model,
                                prior_preservation="model"))


def test_the_step_is_the_flow_matching_loss(flux_photos, tmp_path, monkeypatch):
    """One step's loss is ||v(x_t) - (noise - x0)||² at x_t = (1 - s) x0 + s noise,
    the transformer called through the family with s = t / 1000."""
    import lorabooth.training.loop as t

    seen = []
    real = t.step_loss

    def spy(denoiser, latents, noise, timesteps, context, n_instance, prior_weight, *rest):
        out = real(denoiser, latents, noise, timesteps, context, n_instance, prior_weight, *rest)
        s = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = denoiser.family.predict(denoiser.module, (1 - s) * latents + s * noise,
                                           timesteps.float() / 1000, context,
                                           denoiser.guidance)
        seen.append((out[0].item(), F.mse_loss(pred, noise - latents).item(),
                     F.mse_loss(pred, noise).item(), timesteps.tolist()))
        return out

    monkeypatch.setattr(t, "step_loss", spy)
    run = train(_config(flux_photos, tmp_path / "r", batch_size=2))
    assert len(seen) == 3
    for loss, flow, against_noise, steps in seen:
        assert loss == pytest.approx(flow, rel=1e-5)
        assert flow != pytest.approx(against_noise, rel=1e-2)
        assert all(0 < v <= 1000 for v in steps)
    assert [r["loss"] for r in _losses(run)] == pytest.approx([s[0] for s in seen])


def test_a_run_writes_transformer_files_both_layouts_read(flux_run):
    model, run = flux_run
    family = FAMILIES[model]
    weights = load_file(run / WEIGHT_NAME)
    assert weights and all(k.startswith("transformer.") for k in weights)
    # both block kinds learn: the double-stream and the single-stream attention
    assert any(".single_transformer_blocks." in k for k in weights)
    assert any(".transformer_blocks." in k and "add_q_proj" in k for k in weights)
    kohya = load_file(run / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_unet_double_blocks_") for k in kohya)
    assert any(k.startswith("lora_unet_single_blocks_") for k in kohya)
    rows = _losses(run)
    assert rows[0]["loss_prior"] < 1e-6 < rows[-1]["loss_prior"]  # the LoRA starts as a no-op
    card = (run / "README.md").read_text()
    assert ("Flux2KleinPipeline" if family == "flux2" else "FluxPipeline") in card


def test_scale_zero_draws_the_base_model_and_scale_one_what_diffusers_loads(flux_run):
    """generate at scale 0 is the untouched base pixel for pixel; at scale 1
    it is what plain diffusers draws with the run's file loaded."""
    from lorabooth.generation import Setting, draw, load_pipeline
    from lorabooth.models.loading import load_base, pipeline_from_parts

    model, run = flux_run
    guidance = 3.5

    def plain(with_lora: bool):
        pipe = pipeline_from_parts(load_base(model))
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(str(run), weight_name=WEIGHT_NAME)
        with torch.inference_mode():
            return np.asarray(pipe(prompt=["a photo of sks dog"], num_inference_steps=3,
                                   guidance_scale=guidance, height=32, width=32,
                                   generator=[torch.Generator().manual_seed(0)]).images[0])

    pipe, has_text = load_pipeline(run)
    assert has_text == ()
    size = (32, 32)
    zero = draw(pipe, has_text, "a photo of sks dog", Setting(0.0, 1.0, guidance), [0], 3,
                size=size)[0]
    one = draw(pipe, has_text, "a photo of sks dog", Setting(1.0, 1.0, guidance), [0], 3,
               size=size, fuse=False)[0]
    assert np.array_equal(np.asarray(zero), plain(False))
    assert np.abs(np.asarray(one).astype(int) - plain(True).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(one), np.asarray(zero))


@pytest.mark.parametrize("mode", ["images", "dop"])
def test_both_prior_modes_train_a_flux_model(flux_photos, tmp_path, mode):
    run = train(_config(flux_photos, tmp_path / "r", prior_preservation=mode, num_class_images=2,
                        class_draw_steps=2))
    rows = _losses(run)
    assert all(r["loss_prior"] is not None for r in rows)
    assert bool(list((tmp_path / "r" / "class_images").glob("*.png"))) == (mode == "images")


def test_a_flux_run_resumes_to_the_same_numbers(flux_photos, tmp_path):
    kw = dict(prior_preservation="model", checkpoint_every=2, ema_decay=0.9, noise_offset=0.05,
              caption_dropout=0.3, timestep_sampling="mode")
    straight = train(_config(flux_photos, tmp_path / "a", steps=4, **kw))
    out = tmp_path / "b"
    train(_config(flux_photos, out, steps=3, **kw))
    resumed = train(_config(flux_photos, out, steps=4, resume=True, **kw))
    assert [{k: v for k, v in r.items() if k != "s_per_step"} for r in _losses(straight)] == \
        [{k: v for k, v in r.items() if k != "s_per_step"} for r in _losses(resumed)]
    a, b = load_file(straight / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_timestep_sampling_shapes_the_draws(flux_photos, tmp_path, monkeypatch):
    import lorabooth.training.loop as t

    drawn = {}
    for sampling in ("uniform", "logit_normal"):
        seen = []
        real = t.step_loss

        def spy(denoiser, latents, noise, timesteps, *rest, _seen=seen, _real=real):
            _seen.extend(timesteps.tolist())
            return _real(denoiser, latents, noise, timesteps, *rest)

        monkeypatch.setattr(t, "step_loss", spy)
        train(_config(flux_photos, tmp_path / sampling, steps=8, batch_size=3,
                      timestep_sampling=sampling))
        monkeypatch.setattr(t, "step_loss", real)
        drawn[sampling] = seen
    assert drawn["uniform"] != drawn["logit_normal"]


@pytest.mark.parametrize("option, value, says", [
    ("snr_gamma", 5.0, "--snr-gamma: min-SNR weighting is defined for epsilon/v-prediction"),
    ("train_text_encoder", True, "--train-text-encoder: not supported for tiny-flux2"),
    ("train_token", True, "--train-token: not supported for tiny-flux2"),
])
def test_levers_a_flow_model_cannot_take_are_refused_in_one_line(flux_photos, tmp_path, option,
                                                                  value, says):
    out = tmp_path / "r"
    with pytest.raises(UserError) as e:
        train(_config(flux_photos, out, **{option: value}))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert not out.exists()


def test_a_negative_prompt_is_refused_for_flux(flux_run, tmp_path):
    from lorabooth.generation import Setting, draw, load_pipeline

    _, run = flux_run
    pipe, has_text = load_pipeline(run)
    with pytest.raises(UserError, match="--negative-prompt: Flux"):
        draw(pipe, has_text, "a photo of sks dog", Setting(1.0, 1.0, 3.5), [0], 2,
             negative_prompt="blurry", size=(32, 32))


def test_dora_on_a_flux_model_is_the_base_at_scale_zero(flux_photos, tmp_path):
    """DoRA's magnitudes act on the transformer too; scale 0 switches them off."""
    from lorabooth.generation import Setting, draw, load_pipeline
    from lorabooth.models.loading import load_base, pipeline_from_parts

    run = train(_config(flux_photos, tmp_path / "r", adapter="dora"))
    assert any("lora_magnitude_vector" in k for k in load_file(run / WEIGHT_NAME))
    plain = pipeline_from_parts(load_base("tiny-flux2"))
    plain.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        base = np.asarray(plain(prompt=["a photo of sks dog"], num_inference_steps=3,
                                guidance_scale=4.0, height=32, width=32,
                                generator=[torch.Generator().manual_seed(0)]).images[0])
    pipe, has_text = load_pipeline(run)
    zero, one = (np.asarray(draw(pipe, has_text, "a photo of sks dog", Setting(s, 1.0, 4.0), [0],
                                 3, size=(32, 32))[0]) for s in (0.0, 1.0))
    assert np.array_equal(zero, base) and not np.array_equal(one, base)


def test_flux1_trains_clip_l_and_every_layout_carries_it(flux_photos, tmp_path):
    """--train-text-encoder on FLUX.1 puts LoRA on CLIP-L (T5 stays frozen, as
    kohya's default); the kohya file spells it lora_te1_ as ComfyUI reads it
    for FLUX, reads back exactly, and the text scale acts when drawing."""
    from lorabooth.formats.clients import model_names, unloaded_by_client
    from lorabooth.formats.layouts import read_as_peft
    from lorabooth.generation import Setting, draw, load_pipeline
    from lorabooth.models.loading import load_base

    run = train(_config(flux_photos, tmp_path / "r", "tiny-flux", train_text_encoder=True,
                        lr_text=1e-2))
    weights = load_file(run / WEIGHT_NAME)
    assert {k.split(".")[0] for k in weights} == {"transformer", "text_encoder"}
    kohya = load_file(run / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    a, b = read_as_peft(run / WEIGHT_NAME)[0], read_as_peft(run / KOHYA_WEIGHT_NAME)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_base("tiny-flux")
    names = model_names(base.unet, base.text_encoder, base.text_encoder_2)
    for f in (kohya, weights):
        assert unloaded_by_client(f, names) == {"ComfyUI": []}
    pipe, has_text = load_pipeline(run)
    assert has_text == ("text_encoder",)
    off, on = (np.asarray(draw(pipe, has_text, "a photo of sks dog", Setting(0.0, s, 3.5), [0], 2,
                               size=(32, 32))[0]) for s in (0.0, 1.0))
    assert not np.array_equal(off, on)
