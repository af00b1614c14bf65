"""FLUX.2 [klein] and FLUX.1 as base models (issue 27 §4): the built-in tiny
models, the families' text encoding, latents and transformer inputs checked
against diffusers' own pipelines, folders and BFL single files loaded
offline, and the published architectures' sizes (on the meta device)."""

import time

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import save_file

from lorabooth.core.errors import UserError
from lorabooth.models import flux_latents as lat
from lorabooth.models.flux_architecture import (
    FLUX1_DEV_TRANSFORMER,
    FLUX2_KLEIN_TRANSFORMER,
    build_flux2_klein_random,
    build_flux_random,
    build_tiny_flux,
    build_tiny_flux2,
)
from lorabooth.models.flux_singlefile import PREFIX, bfl_config, to_bfl
from lorabooth.models.loading import (
    BUILTIN_MODELS,
    load_base,
    load_tokenizer,
    model_family,
    pipeline_from_parts,
    save_base,
)

TINY = {"tiny-flux2": build_tiny_flux2, "tiny-flux": build_tiny_flux}
PROMPTS = ["a photo of sks dog on the beach", "a dog", ""]


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    return load_base(request.param)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {name: save_base(load_base(name), root / name) for name in TINY}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_builds_in_seconds_the_same_per_seed(name):
    start = time.perf_counter()
    base = TINY[name](seed=0)
    assert time.perf_counter() - start < 30  # about a second alone; the machine is shared
    assert name in BUILTIN_MODELS and base.family.flow and base.native_resolution == 32
    again, other = TINY[name](seed=0), TINY[name](seed=1)
    for part in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(base, part), getattr(again, part))
    assert not _state_equal(base.unet, other.unet)


def test_tokenizers_are_built_offline_and_deterministic():
    """The same vocabularies in every process (a trainer that visits pieces
    in hash order would give other ids under another PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    from lorabooth.models.flux_tokenizers import qwen_tokenizer, t5_tokenizer

    code = ("from lorabooth.models.flux_tokenizers import qwen_tokenizer, t5_tokenizer;"
            "print(sorted(qwen_tokenizer().get_vocab().items()),"
            " sorted(t5_tokenizer().get_vocab().items()))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3")}
    assert len(runs) == 1
    qwen, t5 = qwen_tokenizer(), t5_tokenizer()
    ids = qwen("a photo of a dog é").input_ids
    assert qwen.decode(ids) == "a photo of a dog é"  # byte-level: every string round-trips
    assert t5("a dog").input_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert load_tokenizer("tiny-flux2").get_vocab() == qwen.get_vocab()


def test_encode_equals_the_pipelines_encode_prompt(tiny):
    family, pipe = tiny.family, pipeline_from_parts(tiny)
    with torch.no_grad():
        ours = family.encode(tiny.text_encoders, family.tokenize(tiny.tokenizers, PROMPTS))
        if family.name == "flux2":
            hidden, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
            pooled = None
        else:
            hidden, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu")
    assert hidden.shape[1] == 512
    torch.testing.assert_close(ours.hidden, hidden, atol=1e-6, rtol=0)
    if pooled is not None:
        torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=0)
    else:
        assert ours.pooled is None
    assert ours.hidden[0].sub(ours.hidden[1]).abs().max() > 0  # the prompt matters


def _pipeline_prediction(tiny, pipe, x, sigmas, context, guidance):
    """The transformer called with the pipeline's own packing and ids."""
    b, c, h, w = x.shape
    if tiny.family.name == "flux2":
        packed, img_ids = pipe._pack_latents(x), pipe._prepare_latent_ids(x)[0]
        out = tiny.unet(hidden_states=packed, timestep=sigmas, guidance=None,
                        encoder_hidden_states=context.hidden, img_ids=img_ids,
                        txt_ids=pipe._prepare_text_ids(context.hidden)[0], return_dict=False)[0]
        return pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(x), h, w)
    packed = pipe._pack_latents(x, b, c, h, w)
    out = tiny.unet(hidden_states=packed, timestep=sigmas, guidance=torch.full((b,), guidance),
                    pooled_projections=context.pooled, encoder_hidden_states=context.hidden,
                    txt_ids=torch.zeros(context.hidden.shape[1], 3),
                    img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                    return_dict=False)[0]
    return pipe._unpack_latents(out, h * tiny.vae_scale_factor, w * tiny.vae_scale_factor,
                                tiny.vae_scale_factor)


def test_predict_is_the_pipelines_transformer_call(tiny):
    family, pipe = tiny.family, pipeline_from_parts(tiny)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, tiny.vae.config.latent_channels, 16, 16, generator=generator)
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        context = family.encode(tiny.text_encoders, family.tokenize(tiny.tokenizers, PROMPTS[:2]))
        x = family.to_flow_latents(tiny.vae, z)
        ours = family.predict(tiny.unet, x, sigmas, context, guidance=3.5)
        theirs = _pipeline_prediction(tiny, pipe, x, sigmas, context, 3.5)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(family.from_flow_latents(tiny.vae, x), z, atol=1e-5, rtol=1e-5)


def test_flow_latents_are_the_pipelines():
    base = load_base("tiny-flux2")
    pipe = pipeline_from_parts(base)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = pipe._encode_vae_image(image, generator=None)
        z = base.vae.encode(image).latent_dist.mode()
    torch.testing.assert_close(base.family.to_flow_latents(base.vae, z), theirs)
    flux1 = load_base("tiny-flux")
    z = torch.randn(1, 16, 8, 8)
    config = flux1.vae.config
    torch.testing.assert_close(flux1.family.to_flow_latents(flux1.vae, z),
                               (z - config.shift_factor) * config.scaling_factor)


def test_pack_unpack_and_position_ids():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(lat.unpack_patches(lat.pack_patches(x), 6, 10), x)
    assert torch.equal(lat.unpack_flat(lat.pack_flat(x), 6, 10), x)
    assert torch.equal(lat.unpatchify(lat.patchify(x)), x)
    assert lat.pack_patches(x).shape == (2, 15, 64) and lat.pack_flat(x).shape == (2, 60, 16)
    # one token holds one 2 x 2 patch: token (row 1, column 2) is x[..., 2:4, 4:6]
    assert torch.equal(lat.pack_patches(x)[:, 1 * 5 + 2].view(2, 16, 2, 2), x[..., 2:4, 4:6])
    ids = lat.flux1_image_ids(6, 10)
    assert ids.shape == (15, 3) and ids[7].tolist() == [0, 1, 2]
    ids = lat.flux2_image_ids(3, 5)
    assert ids.shape == (15, 4) and ids[7].tolist() == [0, 1, 2, 0]
    assert lat.flux2_text_ids(4)[:, 3].tolist() == [0, 1, 2, 3]
    assert not lat.flux1_text_ids(4).any()


def test_the_pipeline_draws_offline(tiny):
    pipe = pipeline_from_parts(tiny)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a sks dog", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_folder_saves_and_loads_equal(folders):
    for name, folder in folders.items():
        base, loaded = load_base(name), load_base(str(folder))
        assert loaded.family is base.family and model_family(str(folder)) == base.family.name
        for part in ("unet", "vae", *base.family.encoders):
            assert _state_equal(getattr(base, part), getattr(loaded, part)), (name, part)
        assert type(loaded.tokenizer) is type(base.tokenizer)
        assert loaded.noise_scheduler.config.use_dynamic_shifting


def test_a_missing_part_is_one_line(folders, tmp_path):
    import shutil

    folder = tmp_path / "flux"
    shutil.copytree(folders["tiny-flux"], folder)
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UserError) as e:
        load_base(str(folder))
    message = str(e.value)
    assert "\n" not in message and "FLUX.1" in message
    assert "vae/" in message and "text_encoder_2/" in message and str(folder) in message


def test_a_flux_pipeline_we_do_not_train_is_one_line(folders, tmp_path):
    import json
    import shutil

    folder = tmp_path / "fill"
    shutil.copytree(folders["tiny-flux"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    with pytest.raises(UserError, match="FluxFillPipeline folder; lorabooth trains"):
        load_base(str(folder))


def test_an_uncached_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_base("black-forest-labs/FLUX.2-klein-base-4B-not-cached")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("name", list(TINY))
def test_a_bfl_single_file_loads_equal(name, folders, tmp_path):
    base = load_base(name)
    bfl = to_bfl(base.unet.state_dict(), base.family.name)
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in bfl)
    if name == "tiny-flux":  # ComfyUI's checkpoints nest the transformer
        bfl = {PREFIX + k: v for k, v in bfl.items()}
    path = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    assert model_family(str(path)) == base.family.name
    loaded = load_base(str(path), model_config=str(folders[name]))
    assert _state_equal(loaded.unet, base.unet) and loaded.family is base.family
    with pytest.raises(UserError, match="--model-config a FLUX") as e:
        load_base(str(path))
    assert "\n" not in str(e.value)


def test_bfl_layout_agrees_with_diffusers_converters():
    """FLUX.2: diffusers' converter reads our BFL file back to the same
    tensors. FLUX.1 (its converter fixes the published width): the same
    names and shapes at full size, on the meta device."""
    base = load_base("tiny-flux2")
    state = base.unet.state_dict()
    back = convert_flux2_transformer_checkpoint_to_diffusers(to_bfl(state, "flux2"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    full = build_flux_random(device="meta").unet.state_dict()
    back = convert_flux_transformer_checkpoint_to_diffusers(to_bfl(full, "flux1"))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in full.items()}


def test_the_published_architectures_on_meta():
    """Shapes only (FLUX.1 [dev] in bf16 is 33 GB, more than this machine
    holds): the sizes of black-forest-labs' models, and a BFL file of each
    gets the published config back from its shapes alone."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    klein = build_flux2_klein_random(device="meta")
    assert count(klein.unet) == 3_875_544_576 and count(klein.text_encoder) == 4_022_468_096
    assert klein.unet.dtype == torch.bfloat16 and klein.native_resolution == 1024
    dev = build_flux_random(device="meta")
    assert count(dev.unet) == 11_901_408_320
    assert [count(e) for e in dev.text_encoders] == [123_060_480, 4_762_310_656]
    for base, published in ((klein, FLUX2_KLEIN_TRANSFORMER), (dev, FLUX1_DEV_TRANSFORMER)):
        shapes = {k: tuple(v.shape) for k, v in to_bfl(base.unet.state_dict(),
                                                       base.family.name).items()}
        config = bfl_config(shapes, base.family.name)
        assert {k: config[k] for k in published} == published
