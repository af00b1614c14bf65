"""Every key of a trained SD-1.5-architecture LoRA maps to a weight of SD 1.5
under the key rules of ComfyUI and AUTOMATIC1111 (lorabooth.formats.clients, written
from their published loader source)."""

import re

import pytest

from lorabooth.adapters.lora import read_lora
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.clients import (
    a1111_module,
    a1111_unloaded,
    comfyui_key_map,
    comfyui_unloaded,
    sd15_names,
    sdxl_names,
    unloaded_by_client,
)
from lorabooth.formats.layouts import old_text_keys


@pytest.fixture(scope="module")
def sd15():
    return sd15_names()


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, session_photos):
    """Stable Diffusion 1.5's architecture (random weights), text-encoder LoRA on."""
    from lorabooth import TrainConfig, train

    return train(TrainConfig(
        model="sd15-random", resolution=64, steps=1, train_text_encoder=True,
        instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
        output=str(tmp_path_factory.mktemp("sd15") / "run")))


def test_the_rules_name_sd15_as_the_clients_do(sd15):
    """Known places of SD 1.5's original layout: a client rule that mapped
    them elsewhere would be caught here, not only by our own files."""
    key_map = comfyui_key_map(sd15)
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    ldm = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"
    assert key_map[f"lora_unet_{down.replace('.', '_')}_to_q"] == f"{ldm}.to_q.weight"
    assert key_map[f"unet.{down}.processor.to_out"] == f"{ldm}.to_out.0.weight"
    up = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"
    assert key_map["unet." + up.replace(".to_k", ".processor.to_k")] == \
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    assert key_map["lora_te_text_model_encoder_layers_11_self_attn_v_proj"] == \
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.v_proj.weight"
    assert a1111_module("lora_unet_mid_block_attentions_0_proj_in") == \
        "diffusion_model_middle_block_1_proj_in"
    assert a1111_module("lora_unet_up_blocks_3_resnets_2_conv1") == \
        "diffusion_model_output_blocks_11_0_in_layers_2"
    assert comfyui_unloaded(["lora_unet_nowhere.lora_up.weight"], sd15) == \
        a1111_unloaded(["lora_unet_nowhere.lora_up.weight"], sd15) == \
        ["lora_unet_nowhere.lora_up.weight"]


def test_trained_sd15_files_load_completely_in_comfyui_and_a1111(sd15_run, sd15):
    kohya, _ = read_lora(sd15_run / KOHYA_WEIGHT_NAME)
    diffusers, _ = read_lora(sd15_run / WEIGHT_NAME)
    # 16 UNet attention blocks x 2 attentions x 4 projections, 12 CLIP layers
    # x 4 projections; each module: down, up (+ alpha in kohya)
    assert len(kohya) == (128 + 48) * 3 and len(diffusers) == (128 + 48) * 2
    assert sum(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya) == 144
    assert unloaded_by_client(list(kohya), sd15) == {"ComfyUI": [], "AUTOMATIC1111": []}
    assert unloaded_by_client(list(diffusers), sd15) == {"ComfyUI": []}


def test_the_transformers_5_spelling_is_what_the_clients_drop(sd15_run, sd15):
    """The files of lorabooth before this fix: 144 text-encoder keys dropped."""
    kohya, _ = read_lora(sd15_run / KOHYA_WEIGHT_NAME)
    old = [re.sub(r"^lora_te_text_model_", "lora_te_", k) for k in kohya]
    assert len(old_text_keys(dict.fromkeys(old))) == 144
    unloaded = unloaded_by_client(old, sd15)
    assert len(unloaded["ComfyUI"]) == len(unloaded["AUTOMATIC1111"]) == 144
    assert all(k.startswith("lora_te_encoder_") for k in unloaded["ComfyUI"])
    diffusers, _ = read_lora(sd15_run / WEIGHT_NAME)
    old = [k.replace("text_encoder.text_model.", "text_encoder.") for k in diffusers]
    assert len(unloaded_by_client(old, sd15)["ComfyUI"]) == 96


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_names()


def test_the_rules_name_sdxl_as_the_clients_do(sdxl):
    """Known places of SDXL's original layout, in each spelling a file may use."""
    key_map = comfyui_key_map(sdxl)
    ldm = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    diffusers = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert key_map["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"] == ldm
    assert key_map[f"lora_unet_{diffusers.replace('.', '_')}"] == ldm
    assert key_map["unet." + diffusers.replace(".to_k", ".processor.to_k")] == ldm
    assert key_map["lora_te1_text_model_encoder_layers_11_self_attn_v_proj"] == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.v_proj.weight"
    te2 = "conditioner.embedders.1.model.transformer.resblocks.31."
    assert key_map["lora_te2_text_model_encoder_layers_31_self_attn_q_proj"] == \
        key_map["text_encoder_2.text_model.encoder.layers.31.self_attn.k_proj"] == \
        te2 + "attn.in_proj_weight"
    assert key_map["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == te2 + "mlp.c_fc.weight"
    assert "lora_te2_text_model_encoder_layers_32_mlp_fc1" not in key_map  # bigG has 32 layers
    assert a1111_module("lora_te2_text_model_encoder_layers_3_mlp_fc2") == \
        "1_model_transformer_resblocks_3_mlp_c_proj"
    assert a1111_module("lora_te2_text_model_encoder_layers_3_self_attn_out_proj") == \
        "1_model_transformer_resblocks_3_attn_out_proj"
    up = ".lora_up.weight"
    fine = ["lora_te2_text_model_encoder_layers_31_self_attn_q_proj" + up,  # onto the fused attn
            "lora_te1_text_model_encoder_layers_0_mlp_fc1" + up,
            "lora_unet_output_blocks_2_1_transformer_blocks_9_attn1_to_out_0" + up,
            "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn1_to_out_0" + up]
    assert a1111_unloaded(fine, sdxl) == []
    # SD 1.x's encoder prefix has no SDXL module in AUTOMATIC1111
    sd1_style = "lora_te_text_model_encoder_layers_0_mlp_fc1" + up
    assert a1111_unloaded([sd1_style], sdxl) == [sd1_style]
    nowhere = "lora_te2_text_model_encoder_layers_32_mlp_fc1" + up
    assert comfyui_unloaded([nowhere], sdxl) == a1111_unloaded([nowhere], sdxl) == [nowhere]


def test_sdxl_files_load_completely_in_comfyui_and_a1111(sdxl_lora, sdxl, tmp_path):
    from lorabooth.formats.layouts import convert_file

    kohya, _ = read_lora(convert_file(sdxl_lora, tmp_path / "k.safetensors", "kohya"))
    diffusers, _ = read_lora(convert_file(sdxl_lora, tmp_path / "d.safetensors", "diffusers"))
    modules = 96 + 20 + 20  # UNet, encoder 1, encoder 2 (the package's tiny SDXL: 5 layers each)
    assert len(kohya) == modules * 3 and len(diffusers) == modules * 2
    assert unloaded_by_client(list(kohya), sdxl) == {"ComfyUI": [], "AUTOMATIC1111": []}
    assert unloaded_by_client(list(diffusers), sdxl) == {"ComfyUI": []}
    # the encoder-1 names without `text_model` (transformers 5) are dropped
    old = [k.replace("lora_te1_text_model_", "lora_te1_") for k in kohya]
    unloaded = unloaded_by_client(old, sdxl)
    assert len(unloaded["ComfyUI"]) == len(unloaded["AUTOMATIC1111"]) == 20 * 3
