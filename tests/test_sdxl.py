"""SDXL through the same paths as SD 1.5, on the built-in `tiny-sdxl`: two
text encoders, pooled embeddings and time ids, both encoders' LoRA, drawing
with a scale per encoder, single files, evaluate and sweep."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import lora_metadata
from lorabooth.formats import WEIGHT_NAME
from lorabooth.models.families import FAMILIES, time_ids
from lorabooth.models.loading import load_base
from lorabooth.models.sdxl_architecture import build_tiny_sdxl

PROMPT, CLASS = "a photo of sks dog", "a photo of a dog"


def _config(photos, out, **kw):
    base = dict(model="tiny-sdxl", instance_dir=str(photos), instance_prompt=PROMPT, steps=2,
                seed=0, output=str(out), save_format="diffusers")
    return TrainConfig(**{**base, **kw})


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sdxl_run(tmp_path_factory, session_photos):
    """Both text encoders trained, prior preservation with drawn class images."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    return train(TrainConfig(
        model="tiny-sdxl", instance_dir=str(session_photos), instance_prompt=PROMPT,
        class_prompt=CLASS, prior_preservation="images", num_class_images=2, class_draw_steps=2,
        steps=3, lr=1e-2, lr_text=1e-2, lr_text2=2e-2, train_text_encoder=True, seed=0,
        output=str(out), save_format="diffusers"))


# --- the pure parts -------------------------------------------------------

def test_time_ids_of_a_centre_crop_and_of_a_prepare_crop_box():
    # an 80 x 72 photo, centre-cropped to 72 x 72 and scaled to 64: 4 px cut at
    # the left of the 80-wide photo is 4 x 64/72 = 3.6 -> 4 at the target scale
    assert time_ids((80, 72), (0, 0, 80, 72), 64) == (72, 80, 0, 4, 64, 64)
    assert time_ids((72, 80), (0, 0, 72, 80), 64) == (80, 72, 4, 0, 64, 64)
    # prepare's box (a face crop) in a 4000 x 3000 photo, trained at 1024
    assert time_ids((4000, 3000), (1500, 500, 2500, 1500), 1024) == (3000, 4000, 512, 1536,
                                                                       1024, 1024)
    # a box reaching past the photo (reflection padding) cut nothing there
    assert time_ids((100, 100), (-20, -10, 80, 90), 50) == (100, 100, 0, 0, 50, 50)
    # a square image shown whole: crop (0, 0), as for drawn class images
    assert time_ids((64, 64), (0, 0, 64, 64), 64) == (64, 64, 0, 0, 64, 64)


def test_tiny_sdxl_is_sdxl_shaped():
    base = build_tiny_sdxl()
    assert base.family is FAMILIES["sdxl"] and base.native_resolution == 64
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    hidden = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    assert base.unet.config.cross_attention_dim == hidden
    assert base.unet.config.addition_embed_type == "text_time"
    assert base.unet.config.projection_class_embeddings_input_dim == (
        6 * base.unet.config.addition_time_embed_dim + base.text_encoder_2.config.projection_dim)
    assert len(base.tokenizer_2) == len(base.tokenizer) == 49408  # CLIP's real vocabulary
    # the family's conditioning is what StableDiffusionXLPipeline computes for the prompt
    from lorabooth.models.families import encode_prompts
    from lorabooth.models.loading import pipeline_from_parts

    ours = encode_prompts(base.family, base.tokenizers, base.text_encoders, [PROMPT])
    theirs, _, pooled, _ = pipeline_from_parts(base).encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape == (1, 77, hidden)
    assert torch.allclose(ours.hidden, theirs) and torch.allclose(ours.pooled, pooled)


def test_sdxl_random_is_sdxls_architecture():
    """Counted on the meta device: no memory for its 3.5 B weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        base = load_base("sdxl-random")
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in (
        ("unet", base.unet), ("te", base.text_encoder), ("te2", base.text_encoder_2),
        ("vae", base.vae))}
    assert round(count["unet"] / 1e6) == 2567  # SDXL base 1.0's UNet
    assert round(count["te"] / 1e6) == 123 and round(count["te2"] / 1e6) == 695
    assert round(count["vae"] / 1e6) == 84 and base.vae.config.scaling_factor == 0.13025
    assert base.native_resolution == 1024 and base.unet.config.cross_attention_dim == 2048


# --- training ----------------------------------------------------------------

def test_unet_only_run_saves_a_unet_lora_and_feeds_the_time_ids(photos, tmp_path, monkeypatch):
    import lorabooth.training.loop as t

    seen = []
    real = t.step_loss

    def spy(denoiser, latents, noise, timesteps, context, *rest):
        seen.append(denoiser.family.unet_inputs(context))  # what the UNet reads
        return real(denoiser, latents, noise, timesteps, context, *rest)

    monkeypatch.setattr(t, "step_loss", spy)
    run = train(_config(photos, tmp_path / "r", lr=1e-2))
    saved = load_file(run / WEIGHT_NAME)
    assert saved and all(k.startswith("unet.") for k in saved)
    losses = [r["loss"] for r in _losses(run)]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert "lr_text" not in _losses(run)[0]
    added = seen[0]["added_cond_kwargs"]
    assert seen[0]["encoder_hidden_states"].shape == (1, 77, 80)
    assert added["text_embeds"].shape == (1, 32)
    # the 80 x 72 photos, centre-cropped at 64 px
    assert added["time_ids"].tolist() == [[72, 80, 0, 4, 64, 64]]
    assert lora_metadata(run)["family"] == "sdxl" and lora_metadata(run)["resolution"] == 64


def test_prepare_crop_boxes_become_the_time_ids(tmp_path):
    import lorabooth.training.loop as t
    from lorabooth.training.data import readable_images

    photos = make_photos(tmp_path / "prepared", n=2, size=(64, 64))
    (photos / "prepare.json").write_text(json.dumps({"files": [
        {"source": "IMG_1.jpg", "kept": True, "output": "photo_0.png", "size": [4000, 3000],
         "crop_box": [1500, 500, 2500, 1500]},
        {"source": "IMG_2.jpg", "kept": False, "output": "", "size": [10, 10]}]}))
    config = _config(photos, tmp_path / "r")
    paths = readable_images(photos)
    examples = t.setup_examples(config, build_tiny_sdxl(), 64, paths,
                                 t.instance_captions(config, paths), [])
    # photo_1.png is not in prepare.json, so not in the training set (imagefiles.image_files)
    assert [p.name for p in paths] == ["photo_0.png"]
    assert examples.instance_time_ids.tolist() == [[3000, 4000, 32, 96, 64, 64]]  # prepare's box
    plain = make_photos(tmp_path / "plain", n=1, size=(64, 64))  # no prepare.json: the whole image
    config = _config(plain, tmp_path / "r2")
    paths = readable_images(plain)
    examples = t.setup_examples(config, build_tiny_sdxl(), 64, paths,
                                 t.instance_captions(config, paths), [])
    assert examples.instance_time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]


def test_both_text_encoders_train_each_at_its_rate(sdxl_run):
    saved = load_file(sdxl_run / WEIGHT_NAME)
    ups = {k: v for k, v in saved.items() if ".up." in k or "lora_B" in k}  # B starts at zero
    # SDXL reads encoder 1's penultimate states: its last layer gets no gradient
    # (encoder 2's does, through the pooled embedding)
    layers = build_tiny_sdxl().text_encoder.config.num_hidden_layers
    last = f"text_encoder.text_model.encoder.layers.{layers - 1}."
    unused = [v for k, v in ups.items() if k.startswith(last)]
    assert unused and all(v.abs().sum() == 0 for v in unused)
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        moved = [v for k, v in ups.items() if k.startswith(part) and not k.startswith(last)]
        assert moved and all(v.abs().sum() > 0 for v in moved), part
    rows = _losses(sdxl_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["lr_text"] == 1e-2 and r["lr_text2"] == 2e-2
        assert r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5)
    assert len(list((sdxl_run / "class_images").glob("*.png"))) == 2
    assert lora_metadata(sdxl_run)["lr_text2"] == 2e-2
    assert "StableDiffusionXLPipeline.from_pretrained" in (sdxl_run / "README.md").read_text()


def test_lr_text2_is_encoder_2s_param_group():
    from lorabooth.adapters.lora import lora_parameters
    from lorabooth.training.setup import setup_lora, setup_optimizer

    for lr_text2, want in ((3e-3, 3e-3), (0.0, 1e-4)):  # 0: the same as --lr-text
        config = TrainConfig(model="tiny-sdxl", instance_dir="x", instance_prompt=PROMPT,
                             train_text_encoder=True, lr_text=1e-4, lr_text2=lr_text2)
        modules = setup_lora(config, build_tiny_sdxl())
        optimizer, _ = setup_optimizer(config, modules)
        groups = optimizer.param_groups
        assert [g["lr"] for g in groups] == [config.lr, 1e-4, want]
        assert [id(p) for p in groups[2]["params"]] == [
            id(p) for p in lora_parameters(modules["text_encoder_2"])]


def test_prior_from_the_model_and_resume(photos, tmp_path, caplog):
    kw = dict(lr=1e-2, class_prompt=CLASS, prior_preservation="model", checkpoint_every=2,
              train_text_encoder=True)
    straight = train(_config(photos, tmp_path / "a", steps=4, **kw))
    rows = _losses(straight)
    assert rows[0]["loss_prior"] < 1e-8 < rows[-1]["loss_prior"]  # the LoRA starts as a no-op
    out = tmp_path / "b"
    train(_config(photos, out, steps=3, **kw))  # leaves a checkpoint at step 2
    caplog.set_level("INFO", logger="lorabooth")
    resumed = train(_config(photos, out, steps=4, resume=True, **kw))
    assert "(step 2)" in caplog.text
    assert [r["loss"] for r in _losses(resumed)] == pytest.approx([r["loss"] for r in rows])
    a, b = load_file(straight / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_train_token_is_refused_for_two_encoders(photos, tmp_path):
    from lorabooth.core.errors import UserError

    with pytest.raises(UserError, match="--train-token"):
        train(_config(photos, tmp_path / "r", train_token=True))
    assert not (tmp_path / "r" / WEIGHT_NAME).exists()


def test_sdxl_folder_is_told_apart_and_loads(tmp_path):
    from lorabooth.models.loading import save_base

    folder = save_base(build_tiny_sdxl(), tmp_path / "xl")
    base = load_base(str(folder))
    assert base.family is FAMILIES["sdxl"] and base.tokenizer_2 is not None
    ref = build_tiny_sdxl()
    for ours, theirs in ((base.text_encoder_2, ref.text_encoder_2), (base.unet, ref.unet)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                     theirs.state_dict().values()))


# --- single files ------------------------------------------------------------

def _original_layout(base) -> dict:
    """tiny-sdxl in SDXL's original single-file key layout (diffusers writes
    none): the UNet and VAE through lorabooth's SD writer, CLIP-L under
    `conditioner.embedders.0.transformer.`, OpenCLIP-bigG under
    `conditioner.embedders.1.model.` with q, k, v fused into in_proj and the
    projection transposed (the inverse of diffusers' convert_open_clip_checkpoint)."""
    from lorabooth.formats.singlefile import unet_to_ldm, vae_to_ldm

    out = {**unet_to_ldm(base.unet), **vae_to_ldm(base.vae)}
    for k, v in base.text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.")
                                                      else "text_model.") + k] = v
    te2, p = base.text_encoder_2.state_dict(), "conditioner.embedders.1.model."
    out[p + "positional_embedding"] = te2["text_model.embeddings.position_embedding.weight"]
    out[p + "token_embedding.weight"] = te2["text_model.embeddings.token_embedding.weight"]
    out[p + "text_projection"] = te2["text_projection.weight"].T
    for part in ("weight", "bias"):
        out[p + f"ln_final.{part}"] = te2[f"text_model.final_layer_norm.{part}"]
    for i in range(base.text_encoder_2.config.num_hidden_layers):
        hf, ldm = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[ldm + f"attn.in_proj_{part}"] = torch.cat(
                [te2[f"{hf}self_attn.{x}_proj.{part}"] for x in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                out[f"{ldm}{theirs}.{part}"] = te2[f"{hf}{ours}.{part}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_single_sdxl_file_is_detected_and_loads_offline(tmp_path, monkeypatch, no_network):
    from safetensors.torch import save_file

    import lorabooth.models.sdxl_architecture
    from lorabooth.models.loading import save_base
    from lorabooth.models.sdxl_architecture import file_family

    ref = build_tiny_sdxl()
    path = tmp_path / "xl.safetensors"
    save_file(_original_layout(ref), path)
    assert file_family(path) == "sdxl"
    sd15 = tmp_path / "sd15.safetensors"
    from lorabooth.formats.singlefile import save_single_file
    from lorabooth.models.loading import build_tiny

    save_single_file(build_tiny(), sd15)
    assert file_family(sd15) == "sd1"

    # no --model-config: told SDXL by its keys, configs written offline (here
    # tiny-sdxl's, standing in for sdxl_config_dir's real SDXL ones)
    written = []
    monkeypatch.setattr(lorabooth.models.sdxl_architecture, "sdxl_config_dir",
                        lambda folder: written.append(folder) or save_base(build_tiny_sdxl(), folder))
    for model_config in ("", str(save_base(ref, tmp_path / "config"))):
        base = load_base(str(path), model_config)
        assert base.family is FAMILIES["sdxl"] and type(base.text_encoder_2).__name__ == \
            "CLIPTextModelWithProjection"
        for ours, theirs in ((base.unet, ref.unet), (base.vae, ref.vae),
                             (base.text_encoder, ref.text_encoder),
                             (base.text_encoder_2, ref.text_encoder_2)):
            a, b = ours.state_dict(), theirs.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(written) == 1 and not no_network


def test_sdxl_config_dir_is_sdxl_base_10(tmp_path):
    from diffusers import UNet2DConditionModel

    from lorabooth.models.sdxl_architecture import folder_family, sdxl_config_dir

    folder = sdxl_config_dir(tmp_path / "c")
    assert folder_family(folder) == "sdxl"
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["sample_size"] == 128
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2").pad_token == "!"  # OpenCLIP's
    assert CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer").pad_token == "<|endoftext|>"


# --- drawing -----------------------------------------------------------------

@pytest.fixture(scope="session")
def sdxl_unet_run(tmp_path_factory, session_photos):
    out = tmp_path_factory.mktemp("sdxl") / "unet-only"
    return train(TrainConfig(model="tiny-sdxl", instance_dir=str(session_photos),
                             instance_prompt=PROMPT, steps=2, lr=1e-2, output=str(out),
                             save_format="diffusers"))


def _pixels(pipe, parts, setting):
    import numpy as np

    from lorabooth.generation import draw

    return np.asarray(draw(pipe, parts, PROMPT, setting, [0], 2)[0], dtype=float)


def test_each_text_encoder_has_its_scale(sdxl_run, sdxl_unet_run):
    import numpy as np

    from lorabooth.generation import Setting, load_pipeline
    from lorabooth.models.loading import pipeline_from_parts

    pipe, parts = load_pipeline(sdxl_run)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert parts == ("text_encoder", "text_encoder_2")
    full = _pixels(pipe, parts, Setting(1.0, 1.0, 5.0))
    assert (full == _pixels(pipe, parts, Setting(1.0, 1.0, 5.0, 1.0))).all()  # text2 = text
    others = [_pixels(pipe, parts, s) for s in (Setting(1.0, 1.0, 5.0, 0.0),
                                                 Setting(1.0, 0.0, 5.0, 1.0),
                                                 Setting(0.0, 1.0, 5.0))]
    for i, image in enumerate(others):  # each scale alone changes the image
        assert abs(image - full).mean() > 0.05, i
    assert abs(others[0] - others[1]).mean() > 0.05  # encoder 1 and 2 are scaled apart
    off = _pixels(pipe, parts, Setting(0.0, 0.0, 5.0, 0.0))
    plain = pipeline_from_parts(build_tiny_sdxl())  # the base model, no LoRA loaded
    plain.set_progress_bar_config(disable=True)
    arrays = plain([PROMPT], guidance_scale=5.0, num_inference_steps=2,
                   generator=[torch.Generator().manual_seed(0)], output_type="np").images
    base = np.asarray(plain.numpy_to_pil(arrays)[0], dtype=float)
    assert abs(off - base).max() <= 1  # every scale 0: the base model's image

    pipe, parts = load_pipeline(sdxl_unet_run)  # no text-encoder LoRA: text scales change nothing
    assert parts == ()
    assert (_pixels(pipe, parts, Setting(1.0, 1.0, 5.0, 0.0))
            == _pixels(pipe, parts, Setting(1.0, 0.0, 5.0, 1.0))).all()


def test_generate_draws_what_plain_diffusers_draws(sdxl_run, tmp_path):
    """No --negative-prompt: the unconditional branch is SDXL's default
    (force_zeros_for_empty_prompt: zeros), not the encoded empty prompt, so
    lorabooth's image is plain diffusers' with the same LoRA, seed and steps."""
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from lorabooth.generation import generate

    ours = generate(sdxl_run, [PROMPT], guidances=[5.0], num_images=2, steps=3,
                    output=tmp_path / "g")
    base = build_tiny_sdxl()
    plain = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config))
    assert plain.config.force_zeros_for_empty_prompt
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(sdxl_run))
    theirs = plain([PROMPT] * 2, guidance_scale=5.0, num_inference_steps=3, output_type="pil",
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    for a, b in zip(ours, theirs):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1, diff.max()  # lorabooth fuses the LoRA: rounding, one level


def test_generate_grid_over_text2_scales(sdxl_run, tmp_path):
    from lorabooth.commands import GenerateConfig, run

    out = tmp_path / "g"
    images = run(GenerateConfig(run=str(sdxl_run), prompt=[PROMPT], text2_scale=[0.0, 1.0],
                                num_images=1, steps=2, output=str(out)))
    assert len(images) == 2 and images[0].size == (64, 64)  # tiny-sdxl's native size
    names = sorted(p.name for p in (out / "00-a-photo-of-sks-dog").iterdir())
    assert names == ["grid.png", "u1_t1_tt0_g7.5_s0.png", "u1_t1_tt1_g7.5_s0.png"]


def test_the_sdxl_vae_decodes_in_fp32_under_autocast():
    from lorabooth.models.loading import pipeline_from_parts

    base = build_tiny_sdxl()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipeline_from_parts(base)  # the SDXL pipeline keeps its VAE's decode in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = base.vae.decode(z.bfloat16()).sample
        exact = base.vae.decode(z.bfloat16().float()).sample
    assert under.dtype == torch.float32 and torch.equal(under, exact)


# --- evaluate and sweep ------------------------------------------------------

def test_evaluate_scores_an_sdxl_run_at_a_text2_scale(sdxl_run, session_photos, tiny_judges,
                                                       tmp_path):
    from lorabooth import evaluate

    dino, clip = tiny_judges
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    out = tmp_path / "eval"
    result = evaluate(sdxl_run, str(session_photos), prompts_file=str(prompts),
                      images_per_prompt=2, steps=2, out=out, dino=dino, clip=clip,
                      pres_images=2, text2_scale=0.5)
    assert result["text2_scale"] == 0.5 and result["identifier"] == "sks"
    for metric in ("dino", "clip_i", "clip_t", "pres", "div"):
        assert -1 <= result["rows"]["lorabooth"][metric]["mean"] <= 1, metric
    # the cache is named by the settings and the LoRA file's sha256
    assert [p.is_dir() for p in (out / "images").glob("u1_t1_tt0.5_g7.5_steps2_lora*")] == [True]


def test_sweep_trains_draws_and_scores_tiny_sdxl(tmp_path, photos, tiny_judges):
    from lorabooth.search.sweep import run_sweep

    dino, clip = tiny_judges
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    f = tmp_path / "sweep.toml"
    f.write_text(f"""
[base]
model = "tiny-sdxl"
instance_dir = "{photos}"
instance_prompt = "a photo of sks dog"
steps = 2
save_format = "diffusers"
output = "{tmp_path / 'sweep'}"

[train.grid]
train_text_encoder = [true]

[generate]
prompts = ["a photo of sks dog"]
steps = 2

[generate.grid]
text2_scale = [0.0, 1.0]

[evaluate]
real = "{photos}"
prompts_file = "{prompts}"
images_per_prompt = 2
pres_images = 2
steps = 2
dino = "{dino}"
clip = "{clip}"
""")
    assert run_sweep(f).is_file()
    folders = sorted(p.name for p in (tmp_path / "sweep").glob("*/sweep/00-*/*") if p.is_dir())
    # named by the settings, then the LoRA file's sha256
    assert [f.rsplit("_lora", 1)[0] for f in folders] == ["u1_t1_tt0_g7.5_steps2",
                                                          "u1_t1_tt1_g7.5_steps2"]
    assert list((tmp_path / "sweep").glob("*/eval/metrics.json"))


# --- a trained SDXL run through every file command ---------------------------

def test_a_trained_sdxl_run_converts_inspects_merges_and_fuses(sdxl_run, tmp_path, capsys):
    """The files a real tiny-sdxl training wrote, not a hand-made LoRA: its
    kohya file carries sd-scripts' names for all three parts and maps onto
    both clients (inspect exits 0), the round trip back is exact, a merge
    with itself is the same adapter, and fuse bakes it into a folder whose
    UNet differs from the base exactly where the LoRA acts."""
    from lorabooth.commands.cli import main
    from lorabooth.formats.sdxl import family_of

    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(sdxl_run / WEIGHT_NAME), str(kohya), "--to", "kohya"]) == 0
    names = load_file(kohya)
    assert family_of(names, None) == "sdxl"
    for prefix in ("lora_unet_input_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) for k in names), prefix
    assert main(["inspect", str(kohya)]) == 0
    assert "SDXL" in capsys.readouterr().out
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(kohya), str(back), "--to", "diffusers"]) == 0
    original = load_file(sdxl_run / WEIGHT_NAME)
    assert {k: v for k, v in load_file(back).items() if k in original}.keys() == original.keys()
    assert all(torch.equal(load_file(back)[k], v) for k, v in original.items())

    merged = tmp_path / "m.safetensors"
    assert main(["merge", str(sdxl_run), str(sdxl_run), "--out", str(merged)]) == 0
    fused = tmp_path / "fused"
    assert main(["fuse", str(sdxl_run), "--out", str(fused), "--model", "tiny-sdxl"]) == 0
    base = load_base("tiny-sdxl")
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(fused / "unet")
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])}
    assert changed and all("attn" in k for k in changed)
    assert main(["fuse", str(sdxl_run), "--out", str(tmp_path / "sd"), "--model", "tiny"]) == 2
    assert "SDXL LoRA" in capsys.readouterr().err


def test_tune_runs_a_trial_on_tiny_sdxl(session_photos, tiny_judges, tmp_path):
    from lorabooth.commands.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    dino, clip = tiny_judges
    out = tmp_path / "tune"
    assert main(["tune", str(session_photos), "--class-noun", "dog", "--model", "tiny-sdxl",
                 "--out", str(out), "--steps", "2", "--budget", "1", "--resolution", "32",
                 "--prompts", str(prompts), "--images-per-prompt", "2", "--pres-images", "2",
                 "--sample-steps", "2", "--pruner", "none", "--dino", dino, "--clip", clip]) == 0
    assert (out / "best" / WEIGHT_NAME).is_file()
    import optuna
    (trial,) = optuna.load_study(study_name="lorabooth-tune",
                                 storage=f"sqlite:///{out / 'study.db'}").trials
    assert trial.user_attrs["settings"]["train_token"] is False and "train_token" not in trial.params


def test_kohya_names_follow_the_models_own_blocks(tmp_path, capsys):
    """An SDXL-family model with 1 layer per block numbers its SGM blocks
    otherwise than SDXL 1.0: the kohya file of a run names its modules as
    that model has them, so diffusers loads it to the same UNet as the
    diffusers file, and `inspect --model` finds every key in the model."""
    from diffusers import StableDiffusionXLPipeline

    from helpers import tiny_sdxl_outputs
    from lorabooth.adapters.lora import add_unet_lora
    from lorabooth.commands.cli import main
    from lorabooth.formats import KOHYA_WEIGHT_NAME
    from lorabooth.formats.layouts import save_lora
    from lorabooth.models.loading import save_base

    base = build_tiny_sdxl(layers_per_block=1)
    folder = save_base(base, tmp_path / "model")
    add_unet_lora(base.unet, 4, 8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" up-projection: B away from its zero init
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    run = tmp_path / "run"
    save_lora(run, base.unet, None, {}, ("diffusers", "kohya"), family="sdxl")

    def unet_output(weight_name=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        if weight_name:
            pipe.load_lora_weights(str(run), weight_name=weight_name)
        return tiny_sdxl_outputs(pipe)[0]

    ours = unet_output(WEIGHT_NAME)
    assert not torch.allclose(ours, unet_output(), atol=1e-4)  # the LoRA acts
    assert torch.allclose(unet_output(KOHYA_WEIGHT_NAME), ours, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", str(run / KOHYA_WEIGHT_NAME), "--model", str(folder)]) == 0
    said = capsys.readouterr().out
    assert said.count("every key maps to a weight") == 2, said  # ComfyUI and AUTOMATIC1111
