"""merge (exact and SVD) and fuse against the unfused maths; pickles refused."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_outputs
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import read_lora
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.formats.merging import delta, fuse, load_as_peft, merge, modules_of
from lorabooth.models.loading import build_tiny, load_base, pipeline_from_parts


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, session_photos):
    out = tmp_path_factory.mktemp("runs") / "second"
    return train(TrainConfig(instance_dir=str(session_photos), instance_prompt="a photo of zwx dog",
                             steps=3, lr=1e-2, rank=2, seed=7, output=str(out)))


def test_concat_merge_reproduces_the_weighted_sum_of_deltas(trained_run, second_run, tmp_path):
    info = merge([str(trained_run), str(second_run)], [0.7, 0.3], tmp_path / "m.safetensors")
    assert info["method"] == "concat" and info["rank"] == 6 and info["relative_error"] == 0
    (a, alpha_a, _), (b, alpha_b, _) = load_as_peft(trained_run), load_as_peft(second_run)
    merged, alpha_m, _ = load_as_peft(tmp_path / "m.safetensors")
    assert alpha_m == 6
    for module in modules_of(a):
        want = 0.7 * delta(a, module, alpha_a)
        if module in modules_of(b):
            want = want + 0.3 * delta(b, module, alpha_b)
        got = delta(merged, module, alpha_m)
        assert torch.allclose(got, want, atol=1e-5), module


def test_svd_merge_reports_its_error(trained_run, second_run, tmp_path):
    full = merge([str(trained_run), str(second_run)], [0.5, 0.5], tmp_path / "f.safetensors", rank=6)
    low = merge([str(trained_run), str(second_run)], [0.5, 0.5], tmp_path / "l.safetensors", rank=1)
    assert full["relative_error"] < 1e-5 < low["relative_error"] < 1
    assert low["rank"] == 1 and read_lora(tmp_path / "l.safetensors")[1]["lorabooth.merge"]


def test_merged_file_loads_in_diffusers(trained_run, second_run, tmp_path):
    """The merged file, loaded by diffusers alone, acts as diffusers' own blend
    of the two runs' LoRAs as two adapters at half weight each."""
    merge([str(trained_run), str(second_run)], None, tmp_path / "m.safetensors")
    merged = pipeline_from_parts(build_tiny())
    merged.load_lora_weights(str(tmp_path), weight_name="m.safetensors")
    blend = pipeline_from_parts(build_tiny())
    blend.load_lora_weights(str(trained_run), adapter_name="a")
    blend.load_lora_weights(str(second_run), adapter_name="b")
    blend.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    (um, tm), (ub, tb) = tiny_outputs(merged), tiny_outputs(blend)
    u0, t0 = tiny_outputs(pipeline_from_parts(build_tiny()))
    assert not torch.allclose(um, u0, atol=1e-5) and not torch.allclose(tm, t0, atol=1e-5)
    assert torch.allclose(um, ub, atol=1e-5), (um - ub).abs().max()
    assert torch.allclose(tm, tb, atol=1e-5), (tm - tb).abs().max()


def test_fused_model_equals_base_plus_lora_at_those_scales(trained_run, tmp_path):
    from lorabooth.adapters.lora import set_scales
    from lorabooth.generation import load_pipeline

    out = fuse(trained_run, tmp_path / "fused", unet_scale=0.5, text_scale=0.8)
    fused = pipeline_from_parts(load_base(str(out)))
    pipe, has_text = load_pipeline(trained_run)
    set_scales(pipe, 0.5, 0.8, has_text)
    (uf, tf), (ul, tl) = tiny_outputs(fused), tiny_outputs(pipe)
    ub, _ = tiny_outputs(pipeline_from_parts(build_tiny()))
    assert not torch.allclose(uf, ub, atol=1e-5)
    assert torch.allclose(uf, ul, atol=1e-5) and torch.allclose(tf, tl, atol=1e-5)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/lorabooth-pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    import os

    marker = "/tmp/lorabooth-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    evil = tmp_path / "evil_lora.bin"
    with evil.open("wb") as f:
        pickle.dump({"unet.x.lora.down.weight": _Evil()}, f)
    with pytest.raises(UserError, match="pickles can run arbitrary code"):
        read_lora(evil)
    assert not os.path.exists(marker)
    code = main(["convert", str(evil), str(tmp_path / "o.safetensors"), "--to", "kohya"])
    assert code == 2 and not os.path.exists(marker)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_plain_tensor_pickle_is_read(trained_run, tmp_path):
    tensors, _ = read_lora(trained_run / "pytorch_lora_weights.safetensors")
    torch.save(tensors, tmp_path / "lora.pt")
    again, _ = read_lora(tmp_path / "lora.pt")
    assert again.keys() == tensors.keys()


def test_merge_bad_input(trained_run, tmp_path):
    with pytest.raises(UserError, match="at least two"):
        merge([str(trained_run)], None, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="--weights"):
        merge([str(trained_run), str(trained_run)], [1.0], tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="no known LoRA layout"):
        merge([str(trained_run), str(tmp_path / "junk.safetensors")], None, tmp_path / "x.safetensors")


def test_fuse_to_a_single_file(trained_run, tmp_path):
    from lorabooth.models.loading import save_base

    folder = fuse(trained_run, tmp_path / "fused", unet_scale=1.0, text_scale=1.0)
    single = fuse(trained_run, tmp_path / "fused.safetensors", single_file=True)
    config = save_base(build_tiny(), tmp_path / "config")
    a, b = load_base(str(folder)), load_base(str(single), str(config))
    for part in ("unet", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.allclose(sa[k], sb[k].reshape(sa[k].shape)) for k in sa), part


# SDXL: merge, fuse into a folder and into an original-layout single file.


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """The tiny SDXL model as a diffusers folder (what --model names)."""
    from helpers import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


def _sdxl_with(folder, *loras, weights=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for i, path in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
    if weights:
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=weights)
    return pipe


def test_sdxl_merge_is_the_weighted_blend(sdxl_lora, sdxl_base, tmp_path):
    """The merged SDXL file, loaded by diffusers, acts as diffusers' own blend
    of the two LoRAs as adapters at 0.7 and 0.3, in the UNet and both encoders."""
    from helpers import make_sdxl_lora, tiny_sdxl_outputs

    other = make_sdxl_lora(tmp_path / "other", rank=2, alpha=2.0, seed=1)
    info = merge([str(sdxl_lora), str(other)], [0.7, 0.3], tmp_path / "m.safetensors")
    assert info["rank"] == 6 and info["relative_error"] == 0
    merged = tiny_sdxl_outputs(_sdxl_with(sdxl_base, tmp_path / "m.safetensors"))
    blend = tiny_sdxl_outputs(_sdxl_with(sdxl_base, sdxl_lora, other, weights=[0.7, 0.3]))
    base = tiny_sdxl_outputs(_sdxl_with(sdxl_base))
    for part, (m, b, b0) in enumerate(zip(merged, blend, base)):
        assert not torch.allclose(m, b0, atol=1e-4), part
        assert torch.allclose(m, b, atol=1e-5), (part, (m - b).abs().max())
    assert read_lora(tmp_path / "m.safetensors")[1]["lorabooth.family"] == "sdxl"


def test_families_do_not_mix(trained_run, sdxl_lora, sdxl_base, tmp_path, capsys):
    for argv, needle in [
            (["merge", str(trained_run), str(sdxl_lora), "--out", str(tmp_path / "m.safetensors")],
             "of different model families cannot be merged"),
            (["fuse", str(sdxl_lora), "--out", str(tmp_path / "f"), "--model", "tiny"],
             "is an SDXL LoRA; it fuses only into an SDXL model"),
            (["fuse", str(trained_run), "--out", str(tmp_path / "g"), "--model", str(sdxl_base)],
             "an SDXL model")]:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written


def test_sdxl_fuse_to_a_folder_and_a_single_file(sdxl_lora, sdxl_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from helpers import tiny_sdxl_outputs

    folder = fuse(sdxl_lora, tmp_path / "fused", unet_scale=0.5, text_scale=0.8,
                  model=str(sdxl_base))
    fused = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    lora = _sdxl_with(sdxl_base, sdxl_lora)
    lora.set_adapters(["l0"], adapter_weights=[
        {"unet": 0.5, "text_encoder": 0.8, "text_encoder_2": 0.8}])
    for part, (f, want, base) in enumerate(zip(tiny_sdxl_outputs(fused), tiny_sdxl_outputs(lora),
                                               tiny_sdxl_outputs(_sdxl_with(sdxl_base)))):
        assert not torch.allclose(f, base, atol=1e-4), part
        assert torch.allclose(f, want, atol=1e-5), (part, (f - want).abs().max())
    single = fuse(sdxl_lora, tmp_path / "fused.safetensors", unet_scale=0.5, text_scale=0.8,
                  model=str(sdxl_base), single_file=True)
    keys = read_lora(single)[0].keys()
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn."
                            "in_proj_weight") for k in keys)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    back = StableDiffusionXLPipeline.from_single_file(str(single), config=str(sdxl_base),
                                                      local_files_only=True)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sb = getattr(fused, part).state_dict(), getattr(back, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k].reshape(sa[k].shape)) for k in sa), part


def test_open_clip_layout_is_the_inverse_of_diffusers_reader():
    """Encoder 2 written in open_clip's layout and read by diffusers'
    `convert_open_clip_checkpoint` gives every weight back."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from helpers import tiny_sdxl_pipeline
    from lorabooth.formats.sdxl import TE2_LDM, te2_to_openclip

    te2 = tiny_sdxl_pipeline().text_encoder_2
    state = te2.state_dict()
    ldm = {TE2_LDM + k: v for k, v in te2_to_openclip(state).items()}
    assert ldm[TE2_LDM + "transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert ldm[TE2_LDM + "text_projection"].shape == (48, 32)
    back = convert_open_clip_checkpoint(te2, ldm, prefix=TE2_LDM)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
