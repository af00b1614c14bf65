"""SDXL's names outside diffusers: the original (SGM) layout.

kohya's sd-scripts name SDXL LoRA modules after it (`lora_unet_input_blocks_4_1_…`,
`lora_te1_text_model_…`, `lora_te2_text_model_…`), ComfyUI and AUTOMATIC1111
map LoRA keys onto it, and SDXL single files store every weight in it: the
UNet as `model.diffusion_model.…` (as SD 1.x), encoder 1 (CLIP ViT-L) as
`conditioner.embedders.0.transformer.text_model.…` and encoder 2 (OpenCLIP
ViT-bigG) as `conditioner.embedders.1.model.…` in open_clip's own layout
(q, k and v fused into `in_proj_weight`, `ln_1`, `mlp.c_fc`, a transposed
`text_projection`). diffusers reads all of it (`lora_state_dict`,
`from_single_file`) but writes none of it; this module is that writer,
tested against diffusers' readers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from ..core.errors import UserError
from ..core.fileio import parse_json
from .flux import FLUX_FAMILIES, FLUX_NAMES, family_of_keys
from .singlefile import (
    ldm_pairs,
    save_single_file,
    text_ldm_name,
    unet_ldm_key,
    unet_to_ldm,
    vae_to_ldm,
)

# The model families, by the names the whole package uses for them
# (models/families.py's FAMILIES): one text encoder (SD 1.x/2.x) or SDXL's two.
# FLUX.1 and FLUX.2 [klein] (formats.flux) are named by their own names.
SD, SDXL = "sd1", "sdxl"
FAMILY_NAMES = {SD: "Stable Diffusion 1.x/2.x", SDXL: "SDXL", **FLUX_NAMES}
FAMILY_KEY = "lorabooth.family"
# What a LoRA file's header holds under FAMILY_KEY: "sd" for SD 1.x/2.x, as
# every lorabooth so far has written it (kept, so files do not change), and
# what a header may hold -> the family ("sd1" too, should a file say so).
HEADER_FAMILY = {SD: "sd", SDXL: "sdxl", **{f: f for f in FLUX_FAMILIES}}
FAMILY_OF_HEADER = {"sd": SD, SD: SD, SDXL: SDXL, **{f: f for f in FLUX_FAMILIES}}
# What kohya's sd-scripts write into an SDXL LoRA's header; AUTOMATIC1111 and
# model sites sort LoRAs by base model on these.
SDXL_KOHYA_META = {"ss_base_model_version": "sdxl_base_v1-0",
                   "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}

# SDXL 1.0's UNet, text encoders (CLIP ViT-L, OpenCLIP ViT-bigG) as diffusers
# configures them: the weight names the clients' rules are checked against, and
# (lorabooth.models.sdxl_architecture) the configs `sdxl-random` and a single SDXL file load with.
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
SDXL_TEXT_CONFIGS = (
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280})
# What SGM block numbering depends on: the levels, the layers per level and
# which levels hold attention (a transformer's depth only numbers inside a block).
BLOCK_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
              "addition_embed_type")
# A LoRA file's record of its UNet's blocks (SDXL), so its SGM names can be
# written and read without the model at hand.
UNET_BLOCKS_KEY = "lorabooth.unet_blocks"
# SDXL 1.0's numbering: for files that record none.
SDXL_UNET = SimpleNamespace(**{k: SDXL_UNET_CONFIG[k] for k in BLOCK_KEYS})
CROSS_ATTENTION_WIDTH = 2048  # CLIP-L 768 + OpenCLIP-G 1280, concatenated

TE1_LDM = "conditioner.embedders.0.transformer."
TE2_LDM = "conditioner.embedders.1.model."
# diffusers CLIP layer part -> open_clip's name for it
OPENCLIP = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
            ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


def family_of(tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> str:
    """SDXL, SD or a FLUX family for a LoRA in any layout: our header's field
    if written, else FLUX's block names, else a second text encoder's keys,
    else SDXL's cross-attention width."""
    recorded = (header or {}).get(FAMILY_KEY)
    if recorded:
        try:
            recorded = parse_json(recorded, FAMILY_KEY)
        except UserError:
            pass
        if isinstance(recorded, str) and recorded in FAMILY_OF_HEADER:
            return FAMILY_OF_HEADER[recorded]
    flux = family_of_keys(tensors)
    if flux is not None:
        return flux
    if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in tensors):
        return SDXL
    for key, value in tensors.items():
        if re.search(r"attn2[._](processor[._])?to_k", key) and value.ndim == 2 and (
                "down" in key.rsplit("attn2", 1)[1] or "lora_A" in key):
            return SDXL if value.shape[1] == CROSS_ATTENTION_WIDTH else SD
    return SD


def unet_blocks(config) -> str:
    """The header value recording a UNet config's block layout (JSON)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                       for k in BLOCK_KEYS if (v := get(k)) is not None}, sort_keys=True)


def blocks_from_header(header: dict[str, str] | None) -> SimpleNamespace:
    """A file's recorded UNet block layout, or SDXL 1.0's when it has none
    (or an unreadable one)."""
    try:
        blocks = parse_json((header or {}).get(UNET_BLOCKS_KEY, ""), UNET_BLOCKS_KEY)
        return SimpleNamespace(**{**vars(SDXL_UNET), **{k: blocks[k] for k in BLOCK_KEYS[:4]},
                                  "addition_embed_type": blocks.get("addition_embed_type")})
    except (UserError, ValueError, KeyError, TypeError):
        return SDXL_UNET


def sgm_unet_module(module: str, blocks=SDXL_UNET) -> str:
    """A diffusers UNet module name (`down_blocks.1.attentions.0.…`) -> its
    SGM name (`input_blocks.4.1.…` in SDXL 1.0), the one kohya's SDXL files
    use, numbered by ``blocks`` (a UNet config: its layers per level and
    block types)."""
    return unet_ldm_key(module + ".weight", ldm_pairs(blocks)).removesuffix(".weight")


def openclip_name(key: str) -> str:
    """A CLIPTextModelWithProjection weight -> open_clip's name for it (no
    prefix); q, k and v all land in `attn.in_proj_weight`/`_bias`."""
    key = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
    if key in OPENCLIP_TOP:
        return OPENCLIP_TOP[key]
    if key == "text_projection.weight":
        return "text_projection"
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
    if m is None:
        raise ValueError(f"text_encoder_2 weight {key}: no open_clip name")
    rest = m[2]
    if q := re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
        rest = f"attn.in_proj_{q[1]}"
    else:
        hf, oc = next(((hf, oc) for hf, oc in OPENCLIP if rest.startswith(hf)), (None, None))
        if hf is None:
            raise ValueError(f"text_encoder_2 weight {key}: no open_clip name")
        rest = oc + rest[len(hf):]
    return f"transformer.resblocks.{m[1]}.{rest}"


def te2_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict -> open_clip's layout (no
    prefix): the inverse of diffusers' `convert_open_clip_checkpoint`."""
    out, fused = {}, {}
    for key, value in state.items():
        name = openclip_name(key)
        if ".in_proj_" in name:
            fused.setdefault(name, {})[re.search(r"([qkv])_proj", key)[1]] = value
        elif name == "text_projection":
            out[name] = value.T  # open_clip computes x @ P with P: (width, projection)
        else:
            out[name] = value
    for name, parts in fused.items():  # (3 * width, width): q, k, v stacked
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def te1_ldm_name(key: str) -> str:
    return TE1_LDM + text_ldm_name(key).removeprefix("cond_stage_model.transformer.")


def to_sdxl_single_file(pipe) -> dict[str, torch.Tensor]:
    """A whole SDXL pipeline in the original single-file key layout."""
    te1 = {te1_ldm_name(k): v for k, v in pipe.text_encoder.state_dict().items()}
    te2 = {TE2_LDM + k: v for k, v in te2_to_openclip(pipe.text_encoder_2.state_dict()).items()}
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **te1, **te2}


def save_sdxl_single_file(pipe, path: str | Path) -> Path:
    return save_single_file(pipe, path, to_sdxl_single_file)


def sdxl_meta_models():
    """SDXL 1.0's UNet and text encoders on the meta device (names and
    shapes, no weights, no download)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1, te2 = (CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c)
                for c in SDXL_TEXT_CONFIGS)
    with init_empty_weights():
        return (UNet2DConditionModel.from_config(SDXL_UNET_CONFIG), CLIPTextModel(te1),
                CLIPTextModelWithProjection(te2))
