"""--targets attn|attn-mlp|all: LoRA on the feed-forward Linears and (LoCon)
the ResNet convolutions, written with kohya's names, loaded completely by
ComfyUI's and AUTOMATIC1111's rules and read back exactly."""

import re

import pytest
import torch

from lorabooth.adapters.lora import ADAPTER, TARGETS, UNET_TARGETS, denoiser_targets, read_lora
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.clients import model_names, sd15_names, sdxl_names, unloaded_by_client
from lorabooth.formats.flux import FLUX1, FLUX2, target_modules
from lorabooth.formats.layouts import (
    convert_file,
    module_lora,
    peft_to_kohya,
    read_as_peft,
    unet_targets,
)
from lorabooth.formats.sdxl import SD, SDXL, family_of


def _targeted(unet, targets) -> list[str]:
    """The modules peft's suffix rule picks in ``unet`` (as `target_modules`
    as a list matches: the whole name or a dotted suffix)."""
    return [name for name, _ in unet.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)]


def _names_only_lora(unet, targets) -> dict[str, torch.Tensor]:
    """A peft LoRA on ``targets`` of a (meta-device) UNet, one-element tensors:
    the clients' rules read names only."""
    out = {}
    for module in _targeted(unet, targets):
        out[f"unet.{module}.lora_A.weight"] = torch.zeros(1, 1)
        out[f"unet.{module}.lora_B.weight"] = torch.zeros(1, 1)
    return out


def _sd15_unet():
    import tempfile
    from pathlib import Path

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lorabooth.models.loading import sd15_config_dir

    with tempfile.TemporaryDirectory() as tmp, init_empty_weights():
        folder = sd15_config_dir(Path(tmp))
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))


@pytest.mark.parametrize("family", [SD, SDXL])
def test_every_locon_key_of_sd15_and_sdxl_loads_in_both_clients(family):
    """SD 1.5's and SDXL 1.0's own module names (meta device): each target
    list, written by kohya's names, maps every key in ComfyUI and A1111."""
    from lorabooth.formats.sdxl import sdxl_meta_models

    unet, names = ((_sd15_unet(), sd15_names()) if family == SD
                   else (sdxl_meta_models()[0], sdxl_names()))
    counts = {}
    for which, targets in TARGETS.items():
        peft = _names_only_lora(unet, targets)
        kohya = peft_to_kohya(peft, 4.0, family)
        assert len(kohya) == len(peft) // 2 * 3
        assert unloaded_by_client(list(kohya), names) == {"ComfyUI": [], "AUTOMATIC1111": []}
        counts[which] = len(peft) // 2
    assert counts["attn"] < counts["attn-mlp"] < counts["all"]
    if family == SD:  # 16 transformer blocks; 22 ResNets (conv1, conv2, time_emb_proj), 14
        # with a conv_shortcut (a change of width); 16 transformers' proj_in/out
        assert counts == {"attn": 128, "attn-mlp": 160, "all": 160 + 22 * 3 + 14 + 32}
    kohya = peft_to_kohya(_names_only_lora(unet, TARGETS["all"]), 4.0, family)
    conv = "input_blocks_1_0_in_layers_2" if family == SDXL else "down_blocks_0_resnets_0_conv1"
    assert f"lora_unet_{conv}.lora_down.weight" in kohya


def test_the_attention_list_is_todays():
    assert TARGETS["attn"] == UNET_TARGETS == denoiser_targets(SD, False)
    assert denoiser_targets(FLUX1, True) == target_modules(FLUX1)
    assert denoiser_targets(FLUX2, True, "attn-mlp") == target_modules(FLUX2, mlp=True)
    every = denoiser_targets(FLUX1, True, "all")
    assert "norm1\\.linear" in every and "proj_mlp" in every


@pytest.fixture(scope="module")
def locon_run(tmp_path_factory, session_photos):
    from lorabooth import TrainConfig, train

    return train(TrainConfig(
        model="tiny", instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
        steps=2, lr=1e-2, lr_text=1e-2, rank=2, alpha=4, resolution=32, targets="all",
        train_text_encoder=True, output=str(tmp_path_factory.mktemp("locon") / "run")))


def test_locon_run_trains_convolutions_and_writes_kohya_shapes(locon_run):
    kohya, header = read_lora(locon_run / KOHYA_WEIGHT_NAME)
    down = kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape == (2, 32, 3, 3) and up.shape == (32, 2, 1, 1)  # kohya's LoCon shapes
    assert up.abs().sum() > 0  # trained (B starts at zero)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.alpha" in kohya
    assert "lora_unet_up_blocks_0_resnets_0_time_emb_proj.lora_up.weight" in kohya
    assert header["lorabooth.targets"] == '"all"'
    assert "| adapter targets | all |" in (locon_run / "README.md").read_text()
    assert "targets = \"all\"" in (locon_run / "config.toml").read_text()


def test_locon_kohya_file_loads_in_both_clients_and_reads_back_exactly(locon_run, tmp_path):
    from lorabooth.models.loading import build_tiny

    base = build_tiny()
    names = model_names(base.unet, base.text_encoder)
    kohya, _ = read_lora(locon_run / KOHYA_WEIGHT_NAME)
    diffusers, _ = read_lora(locon_run / WEIGHT_NAME)
    assert unloaded_by_client(list(kohya), names) == {"ComfyUI": [], "AUTOMATIC1111": []}
    # diffusers reads one spelling per file, and ComfyUI reads the attention
    # only in the processor spelling: the diffusers file (peft's names) is
    # diffusers', the kohya file the clients'
    dropped = unloaded_by_client(list(diffusers), names)["ComfyUI"]
    assert dropped and all(re.search(r"\.attn[12]\.to_", k) for k in dropped)
    assert len(dropped) == sum(k.startswith("unet.") and ".attn" in k for k in diffusers)
    back = convert_file(locon_run / KOHYA_WEIGHT_NAME, tmp_path / "d.safetensors", "diffusers")
    assert read_lora(back)[0].keys() == diffusers.keys()
    assert all(torch.equal(read_lora(back)[0][k], v) for k, v in diffusers.items())
    peft = read_as_peft(locon_run / WEIGHT_NAME)[0]
    assert family_of(peft) == SD  # the UNet's ff keys are not FLUX.1's
    assert unet_targets(peft) == TARGETS["all"]


def test_generate_draws_the_locon_weights(locon_run):
    """diffusers' loader takes the mixed spelling (attention processors, peft
    names for the rest) and creates every module the file holds."""
    from lorabooth.formats.layouts import load_into_pipeline
    from lorabooth.models.loading import build_tiny, pipeline_from_parts

    pipe = pipeline_from_parts(build_tiny())
    load_into_pipeline(pipe, locon_run)
    file = read_as_peft(locon_run / WEIGHT_NAME)[0]
    held = module_lora(pipe.unet, "unet", ADAPTER)
    held.update(module_lora(pipe.text_encoder, "text_encoder", ADAPTER))
    assert held.keys() == file.keys() and all(torch.equal(held[k], v) for k, v in file.items())
    assert "unet.down_blocks.0.resnets.0.conv1.lora_B.weight" in file


def test_targets_is_a_resume_shape_and_refused_unknown():
    from lorabooth import TrainConfig
    from lorabooth.training.runfiles import RESUME_SHAPE

    assert "targets" in RESUME_SHAPE
    with pytest.raises(UserError, match="--targets"):
        TrainConfig(instance_dir="x", instance_prompt="a sks dog", targets="convs")


@pytest.mark.parametrize("model, modules", [("tiny-flux", 40), ("tiny-flux2", 28)])
def test_flux_every_block_linear_round_trips_through_kohya(model, modules, tmp_path):
    """--targets all on a FLUX family: every block Linear BFL names (FLUX.1's
    modulations too), written in kohya's BFL names and read back exactly."""
    from lorabooth.formats.layouts import save_lora
    from lorabooth.models.loading import load_base

    base = load_base(model)
    family = base.family.name
    from lorabooth.adapters.lora import add_unet_lora

    add_unet_lora(base.unet, 2, 2.0, False, denoiser_targets(family, True, "all"))
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_lora(tmp_path, base.unet, None, {}, ("diffusers", "kohya"), family=family)
    ours = module_lora(base.unet, "transformer")
    assert len(ours) // 2 == modules
    back = read_as_peft(tmp_path / KOHYA_WEIGHT_NAME)[0]
    assert back.keys() == ours.keys()
    assert all(torch.allclose(back[k], ours[k], atol=1e-6) for k in ours)
