import pytest
import torch

from lorabooth.core.errors import UserError
from lorabooth.models.loading import build_tiny, clip_tokenizer, load_base, save_base


def test_real_clip_tokenizer_offline():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # ids of the real CLIP vocabulary (openai/clip-vit-large-patch14)
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77


def test_tiny_is_sd_shaped_deterministic_and_offline(no_network):
    a = build_tiny()
    b = build_tiny()
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    assert a.native_resolution == 64 and a.vae_scale_factor == 2
    # building it does not disturb the caller's random stream
    torch.manual_seed(5)
    x = torch.rand(1)
    torch.manual_seed(5)
    build_tiny()
    assert torch.equal(torch.rand(1), x)
    assert no_network == []  # built from configs here, nothing fetched


def test_folder_round_trip(tmp_path):
    tiny = build_tiny()
    save_base(tiny, tmp_path / "m")
    loaded = load_base(str(tmp_path / "m"))
    assert len(loaded.tokenizer) == 49408
    for (n, p), (_, q) in zip(tiny.unet.named_parameters(), loaded.unet.named_parameters()):
        assert torch.equal(p, q), n


def test_folder_missing_its_unet(tmp_path):
    save_base(build_tiny(), tmp_path / "m")
    import shutil
    shutil.rmtree(tmp_path / "m" / "unet")
    with pytest.raises(UserError, match="missing unet/"):
        load_base(str(tmp_path / "m"))


@pytest.mark.parametrize("name,match", [
    ("nobody/no-such-model", "not in the local Hugging Face cache"),
    ("no_such_thing", "built-in models: tiny"),
])
def test_missing_model_fails_without_a_network_call(name, match, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=match):
        load_base(name)
    assert no_network == []


def test_model_path_that_is_a_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_base(str(f))


def test_single_file_in_the_original_layout_round_trips(tmp_path):
    """The tiny model written in the original SD key layout by our inverse map
    loads through diffusers' from_single_file with every tensor intact."""
    from lorabooth.formats.singlefile import save_single_file, to_single_file

    tiny = build_tiny()
    keys = to_single_file(tiny)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    config = save_base(tiny, tmp_path / "config")
    single = save_single_file(tiny, tmp_path / "tiny.safetensors")
    loaded = load_base(str(single), str(config))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), part


def test_train_and_generate_on_a_single_file(tmp_path, photos):
    from lorabooth import TrainConfig, generate, train
    from lorabooth.formats.singlefile import save_single_file

    tiny = build_tiny()
    config = save_base(tiny, tmp_path / "config")
    single = save_single_file(tiny, tmp_path / "tiny.safetensors")
    run = train(TrainConfig(model=str(single), model_config=str(config), steps=1,
                            instance_dir=str(photos), instance_prompt="a photo of sks dog",
                            output=str(tmp_path / "run")))
    assert len(generate(run, ["a dog"], num_images=1, steps=2)) == 1


def test_pickled_single_file_that_would_run_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with (tmp_path / "model.ckpt").open("wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(UserError, match="pickles can run arbitrary code"):
        load_base(str(tmp_path / "model.ckpt"))
    assert not (tmp_path / "pwned").exists()


def test_sd15_configs_are_built_offline(tmp_path):
    import json

    from lorabooth.models.loading import sd15_config_dir

    folder = sd15_config_dir(tmp_path / "sd15")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (folder / "tokenizer").is_dir() and (folder / "model_index.json").is_file()


def test_sd15_random_has_the_real_architecture():
    from lorabooth.models.loading import build_sd15_random

    base = build_sd15_random()
    assert sum(p.numel() for p in base.unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    assert base.native_resolution == 512 and base.text_encoder.config.hidden_size == 768
