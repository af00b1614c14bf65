"""The run's LoRA file in diffusers' own loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME
from lorabooth.formats.layouts import load_into_pipeline
from lorabooth.models.loading import build_tiny, pipeline_from_parts


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), ctx).sample


def _text_out(pipe):
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_diffusers_load_lora_weights_reproduces_the_trained_model(trained_run):
    """Plain diffusers, our file, nothing of lorabooth in the loading path. The
    reference is the trained model itself: at the end of training it drew
    samples/step-000004.png (the validation prompt, seed 0, 25 steps, the
    pipeline's defaults); the loaded LoRA draws that image, the base does not."""
    pipe = pipeline_from_parts(build_tiny())
    pipe.set_progress_bar_config(disable=True)
    before_unet, before_text = _unet_out(pipe), _text_out(pipe)

    def validation_image():
        with torch.inference_mode():
            image = pipe("a photo of sks dog", num_inference_steps=25,
                         generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image, dtype=int)

    base_image = validation_image()
    pipe.load_lora_weights(str(trained_run))
    assert not torch.allclose(before_unet, _unet_out(pipe), atol=1e-5)
    assert not torch.allclose(before_text, _text_out(pipe), atol=1e-5)
    with Image.open(trained_run / "samples" / "step-000004.png") as im:
        trained = np.asarray(im.convert("RGB"), dtype=int)
    assert np.abs(validation_image() - trained).max() <= 1
    assert np.abs(base_image - trained).max() > 8


def test_alpha_is_carried_in_the_file(trained_run):
    """rank 4, alpha 8: a loader that guessed alpha = rank would halve the delta."""
    pipe = pipeline_from_parts(build_tiny())
    load_into_pipeline(pipe, trained_run)
    scaling = {m.scaling["lorabooth"] for m in pipe.unet.modules() if hasattr(m, "scaling")
               and "lorabooth" in getattr(m, "scaling", {})}
    assert scaling == {2.0}


def test_scale_zero_is_the_base_model_pixel_for_pixel(trained_run):
    from lorabooth.generation import Setting, draw, load_pipeline

    plain = pipeline_from_parts(build_tiny())
    plain.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        base_img = plain(["a photo of sks dog"], num_inference_steps=3, guidance_scale=7.5,
                         generator=[torch.Generator().manual_seed(0)]).images[0]
    pipe, has_text = load_pipeline(trained_run)
    assert has_text
    zero = draw(pipe, has_text, "a photo of sks dog", Setting(0.0, 0.0, 7.5), [0], 3)[0]
    one = draw(pipe, has_text, "a photo of sks dog", Setting(1.0, 1.0, 7.5), [0], 3)[0]
    assert np.array_equal(np.asarray(zero), np.asarray(base_img))
    assert not np.array_equal(np.asarray(one), np.asarray(base_img))


def test_unet_and_text_scales_act_separately(trained_run):
    from lorabooth.adapters.lora import set_scales
    from lorabooth.generation import load_pipeline

    pipe, has_text = load_pipeline(trained_run)
    base = pipeline_from_parts(build_tiny())
    set_scales(pipe, 0.0, 1.0, has_text)
    assert torch.equal(_unet_out(pipe), _unet_out(base))
    assert not torch.allclose(_text_out(pipe), _text_out(base), atol=1e-5)
    set_scales(pipe, 1.0, 0.0, has_text)
    assert not torch.allclose(_unet_out(pipe), _unet_out(base), atol=1e-5)
    assert torch.equal(_text_out(pipe), _text_out(base))


def test_lora_that_does_not_fit_the_model(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(trained_run / WEIGHT_NAME)
    bad = {k: (torch.zeros(v.shape[0], v.shape[1] + 3) if "lora.down" in k or "lora_A" in k else v)
           for k, v in weights.items()}
    (tmp_path / "bad").mkdir()
    save_file(bad, tmp_path / "bad" / WEIGHT_NAME)
    pipe = pipeline_from_parts(build_tiny())
    with pytest.raises(UserError, match="does not fit"):
        load_into_pipeline(pipe, tmp_path / "bad")


def test_folder_without_a_lora(tmp_path):
    with pytest.raises(UserError, match="no LoRA here"):
        load_into_pipeline(pipeline_from_parts(build_tiny()), tmp_path)
