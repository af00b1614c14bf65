"""Single-file checkpoints in the original Stable Diffusion (LDM) key layout,
the `.safetensors` / `.ckpt` files model sites distribute.

Reading goes through diffusers' `from_single_file`; writing (`fuse
--single-file`, and the tests' own single files) maps diffusers names back to
LDM names for any SD-shaped config: the inverse of diffusers' converter, and
tested as such."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError, first_line

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) pairs for the blocks of a UNet config."""
    levels, n = len(config.block_out_channels), config.layers_per_block
    pairs = []
    for i in range(levels):
        attn = "CrossAttn" in config.down_block_types[i]
        for j in range(n):
            pairs.append((f"input_blocks.{1 + i * (n + 1) + j}.0.", f"down_blocks.{i}.resnets.{j}."))
            if attn:
                pairs.append((f"input_blocks.{1 + i * (n + 1) + j}.1.",
                              f"down_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            pairs.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op.",
                          f"down_blocks.{i}.downsamplers.0.conv."))
        up_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(n + 1):
            pairs.append((f"output_blocks.{i * (n + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{i * (n + 1) + j}.1.",
                              f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            slot = 2 if up_attn else 1
            pairs.append((f"output_blocks.{i * (n + 1) + n}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
              ("middle_block.2.", "mid_block.resnets.1."), ("time_embed.0.", "time_embedding.linear_1."),
              ("time_embed.2.", "time_embedding.linear_2."), ("input_blocks.0.0.", "conv_in."),
              ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL's size/crop embedding
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."),
                  ("label_emb.0.2.", "add_embedding.linear_2.")]
    return pairs


def ldm_pairs(config) -> list[tuple[str, str]]:
    """The (LDM, diffusers) prefix pairs, longest diffusers prefix first."""
    return sorted(_unet_prefixes(config), key=lambda p: -len(p[1]))


def unet_ldm_key(key: str, pairs: list[tuple[str, str]]) -> str:
    """One diffusers UNet state-dict key (or a module name followed by
    `.weight`) -> its name in the original layout, without
    `model.diffusion_model.`; ``pairs`` from ``ldm_pairs``."""
    found = next((p for p in pairs if key.startswith(p[1])), None)
    if found is None:
        raise UserError(f"UNet weight {key}: no place in the original layout")
    ldm_prefix, hf_prefix = found
    rest = key[len(hf_prefix):]
    if "resnets" in hf_prefix:
        for ldm, hf in RESNET:
            if rest.startswith(hf + "."):
                rest = ldm + rest[len(hf):]
    return ldm_prefix + rest


def unet_ldm_names(unet) -> dict[str, str]:
    """Each diffusers UNet state-dict key -> its name in the original layout."""
    pairs = ldm_pairs(unet.config)
    return {key: "model.diffusion_model." + unet_ldm_key(key, pairs) for key in unet.state_dict()}


def text_ldm_name(key: str) -> str:
    # transformers 5 drops the `text_model.` level from CLIPTextModel's names;
    # the original layout has it
    return "cond_stage_model.transformer." + (key if key.startswith("text_model.")
                                              else "text_model." + key)


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    names = unet_ldm_names(unet)
    return {names[k]: v for k, v in unet.state_dict().items()}


def _vae_prefixes(config) -> list[tuple[str, str]]:
    levels, n = len(config.block_out_channels), config.layers_per_block
    pairs = [("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
             ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")]
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
        pairs.append((f"{part}.norm_out.", f"{part}.conv_norm_out."))
    for i in range(levels):
        for j in range(n):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{levels - 1 - i}.upsample.",
                          f"decoder.up_blocks.{i}.upsamplers.0."))
        for j in range(n + 1):
            pairs.append((f"decoder.up.{levels - 1 - i}.block.{j}.",
                          f"decoder.up_blocks.{i}.resnets.{j}."))
    return pairs


VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    pairs = sorted(_vae_prefixes(vae.config), key=lambda p: -len(p[1]))
    out = {}
    for key, value in vae.state_dict().items():
        match = next((p for p in pairs if key.startswith(p[1])), None)
        if match is None:  # quant_conv, post_quant_conv, conv_in, conv_out keep their names
            out["first_stage_model." + key] = value
            continue
        ldm_prefix, hf_prefix = match
        rest = key[len(hf_prefix):]
        if "attentions" in hf_prefix:
            for ldm, hf in VAE_ATTENTION:
                if rest.startswith(hf):
                    rest = ldm + rest[len(hf):]
            if value.ndim == 2:  # LDM's attention uses 1x1 convolutions
                value = value[:, :, None, None]
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out["first_stage_model." + ldm_prefix + rest] = value
    return out


def to_single_file(base) -> dict[str, torch.Tensor]:
    """A whole SD-shaped model in the original single-file key layout."""
    te = {text_ldm_name(k): v for k, v in base.text_encoder.state_dict().items()}
    return {**unet_to_ldm(base.unet), **vae_to_ldm(base.vae), **te}


def save_single_file(base, path: str | Path, convert=None) -> Path:
    """``base`` as one checkpoint file, by ``convert`` (default: SD 1.x's
    `to_single_file`; formats.sdxl passes SDXL's)."""
    from safetensors.torch import save_file

    from ..core.fileio import atomic_path

    tensors = {k: v.detach().contiguous() for k, v in (convert or to_single_file)(base).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
    return Path(path)


def load_single_file(path: Path, config: str | Path, family: str = "sd1"):
    """Through diffusers' own single-file loader (StableDiffusionPipeline's,
    or StableDiffusionXLPipeline's for ``family`` "sdxl"), configs from
    ``config`` (a diffusers folder of the same architecture) so nothing is
    fetched. Pickled `.ckpt` files pass torch's safe loader first."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..core.fileio import load_pickle_safely

    if path.suffix.lower() in (".ckpt", ".pt", ".pth"):
        load_pickle_safely(path)  # refuses anything but plain tensors before diffusers reads it
    sdxl = family == "sdxl"
    extra = ({"add_watermarker": False} if sdxl
             else {"safety_checker": None, "requires_safety_checker": False})
    try:
        return (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
            **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        what = "an SDXL" if sdxl else "a Stable Diffusion"
        raise UserError(f"--model {path}: cannot be read as {what} single file "
                        f"({first})") from None
