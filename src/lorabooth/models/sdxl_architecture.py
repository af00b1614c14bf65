"""Stable Diffusion XL's architecture, offline: the built-in `tiny-sdxl` and
`sdxl-random`, SDXL's component configs for single files
(``sdxl_config_dir``), and telling an SDXL folder or file from an SD 1.x one.

The configs are those of stabilityai/stable-diffusion-xl-base-1.0 (no
weights): a 2.6 B-parameter UNet with three levels (320/640/1280 channels,
1/2/10 transformer layers), cross-attention over CLIP-L (768) and
OpenCLIP-bigG (1280) side by side (2048), and the pooled bigG projection plus
six time ids (6 x 256) as the added embedding (1280 + 1536 = 2816)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..core.errors import UserError
from ..core.fileio import check_regular_file, load_json, load_pickle_safely
from ..formats.sdxl import SDXL_TEXT_CONFIGS, SDXL_UNET_CONFIG  # the one copy of SDXL 1.0's configs
from .families import FAMILIES

TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)

SDXL_UNET = {"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG}
SDXL_VAE = {
    "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4, "layers_per_block": 2, "sample_size": 1024,
    "scaling_factor": 0.13025, "force_upcast": True,
}
_CLIP_IDS = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
             "eos_token_id": 49407, "pad_token_id": 1}
SDXL_TEXT, SDXL_TEXT_2 = ({**config, **_CLIP_IDS} for config in SDXL_TEXT_CONFIGS)


def sdxl_tokenizer_2():
    """OpenCLIP's tokenizer as SDXL ships it: CLIP's BPE, padded with "!"."""
    from .components import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "!"
    return tokenizer


def sdxl_config_dir(folder: Path) -> Path:
    """SDXL's component configs (no weights) written into ``folder``, so a
    single SDXL file loads without the hub."""
    from ..core.fileio import to_json
    from .components import clip_tokenizer, sd_noise_scheduler

    def write(sub: str, config: dict) -> None:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(to_json(config))

    write("unet", SDXL_UNET)
    write("vae", SDXL_VAE)
    write("text_encoder", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                           **SDXL_TEXT})
    write("text_encoder_2", {"architectures": ["CLIPTextModelWithProjection"],
                             "model_type": "clip_text_model", **SDXL_TEXT_2})
    sd_noise_scheduler().save_pretrained(folder / "scheduler")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    sdxl_tokenizer_2().save_pretrained(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(to_json({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def build_tiny_sdxl(seed: int = 0, layers_per_block: int = 2):
    """An SDXL-shaped model with small random weights, built in about a second:
    two text encoders (the second with a projection), a UNet with SDXL's
    added text-and-time embedding. Same classes and code paths as SDXL;
    ``layers_per_block`` other than SDXL's 2 numbers its blocks otherwise."""
    from .components import BaseModel, clip_tokenizer, sd_noise_scheduler

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # different widths, so a swapped encoder or a wrong concatenation fails loudly
        text_1, text_2, pooled, time_dim = 32, 48, 32, 8
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            cross_attention_dim=text_1 + text_2, attention_head_dim=8, norm_num_groups=32,
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=TIME_IDS * time_dim + pooled,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=64, norm_num_groups=32, scaling_factor=0.13025, force_upcast=True,
        )
        common = dict(intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                      layer_norm_eps=1e-5, **{**_CLIP_IDS, "pad_token_id": 49407})
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=text_1, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=text_2, projection_dim=pooled, **common))
    return BaseModel("tiny-sdxl", clip_tokenizer(), text_encoder, vae, unet, sd_noise_scheduler(),
                     FAMILIES["sdxl"], clip_tokenizer(), text_encoder_2)


def build_sdxl_random(seed: int = 0):
    """SDXL's exact architecture with random weights (10 GB in fp32): the real
    compute and memory, for benchmarks, offline. Never in tests."""
    from .components import BaseModel, clip_tokenizer, sd_noise_scheduler

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)
        folder = sdxl_config_dir(Path(tmp))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    return BaseModel("sdxl-random", clip_tokenizer(), text_encoder, vae, unet,
                     sd_noise_scheduler(), FAMILIES["sdxl"], sdxl_tokenizer_2(), text_encoder_2)


def folder_family(path: Path) -> str:
    """"sdxl" for an SDXL diffusers folder (its model_index.json names an XL
    pipeline, or it has a second text encoder), else "sd1"."""
    try:
        name = load_json(path / "model_index.json").get("_class_name", "")
    except (UserError, AttributeError):
        name = ""
    return "sdxl" if "XL" in str(name) or (path / "text_encoder_2").is_dir() else "sd1"


# Keys only an SDXL single file has: its second text encoder (OpenCLIP-bigG
# under the conditioner) and the UNet's added text-and-time embedding.
SDXL_KEY_MARKS = ("conditioner.embedders.1.model.", "model.diffusion_model.label_emb.")


def file_family(path: Path) -> str:
    """"sdxl" when a single checkpoint file's keys are SDXL's, else "sd1"."""
    return "sdxl" if any(k.startswith(SDXL_KEY_MARKS) for k in single_file_keys(path)) else "sd1"


def single_file_keys(path: Path) -> list[str]:
    """A single checkpoint file's key names, no weights read (safetensors
    header; a pickle is loaded with torch's safe loader); [] when the file
    cannot be read (the loader then says why, with the file's name)."""
    check_regular_file(path, "--model")  # a FIFO would block safetensors
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return [str(k) for k in f.keys()]
        except Exception:  # noqa: BLE001 - safetensors raises many kinds on bad bytes
            return []
    data = load_pickle_safely(path)
    return [str(k) for k in data.get("state_dict", data)] if isinstance(data, dict) else []
