import time

import pytest
import torch

from lorabooth.errors import UserError
from lorabooth.models import build_tiny, clip_tokenizer, load_base, save_base


def test_real_clip_tokenizer_offline():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # ids of the real CLIP vocabulary (openai/clip-vit-large-patch14)
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77


def test_tiny_is_sd_shaped_deterministic_and_fast():
    t0 = time.perf_counter()
    a = build_tiny()
    assert time.perf_counter() - t0 < 10
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
def test_missing_model_fails_fast(name, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=match):
        load_base(name)
    assert time.perf_counter() - t0 < 5


def test_model_path_that_is_a_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_base(str(f))
