"""Every key of a trained SD-1.5-architecture LoRA maps to a weight of SD 1.5
under the key rules of ComfyUI and AUTOMATIC1111 (lorabooth.formats.clients, written
from their published loader source)."""

import re

import pytest

from lorabooth.formats.clients import (
    a1111_module,
    a1111_unloaded,
    comfyui_key_map,
    comfyui_unloaded,
    sd15_names,
    unloaded_by_client,
)
from lorabooth.formats.layouts import old_text_keys
from lorabooth.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME, read_lora


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
