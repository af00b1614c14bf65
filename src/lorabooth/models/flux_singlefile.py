"""FLUX transformers in Black Forest Labs' single-file layout (the
`flux1-dev.safetensors` / `flux-2-klein-4b.safetensors` files model sites
distribute): which family a file is, its config from the built-in one and
the file's shapes, and the key maps both ways.

BFL fuses what diffusers keeps apart: a double block's q, k, v in one
``qkv`` (per stream), a FLUX.1 single block's q, k, v and MLP input in
``linear1``; the final modulation is (shift, scale) where diffusers has
(scale, shift). One key map serves both directions and both families:
diffusers' own converters read BFL files only (and FLUX.1's fixes the width
at 3072, so no small model loads through it); the tests check this map
against them (FLUX.2 on values, FLUX.1 on names and shapes at full size).
``save_bfl_transformer`` writes such a file (`fuse --single-file`): FLUX.2's
loads back through diffusers' ``from_single_file``; FLUX.1's through it at
FLUX.1 [dev]'s width only (its converter splits `linear1` at 3072), through
``load_bfl_transformer`` at any width."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError

PREFIX = "model.diffusion_model."  # ComfyUI's checkpoints nest the transformer here
FLUX2_MARK = "single_stream_modulation.lin.weight"
FLUX1_MARK = "single_blocks.0.modulation.lin.weight"

# diffusers name -> BFL name, renamed as they stand (".weight"/".bias" follow)
_FLUX1_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_FLUX2_TOP = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm",
          "attn.norm_added_k": "txt_attn.norm.key_norm"}
_DOUBLE = {  # within transformer_blocks.N -> double_blocks.N
    "flux1": {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
              "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"},
    "flux2": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
              "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}}
_SINGLE = {  # within single_transformer_blocks.N -> single_blocks.N
    "flux1": {"norm.linear": "modulation.lin", "proj_out": "linear2"},
    "flux2": {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}}
_FUSED_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FUSED_SINGLE1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # FLUX.1's linear1


def _swap(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the same swap both ways."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _name_map(family: str, blocks: int, singles: int) -> dict[str, str]:
    """diffusers name -> BFL name of every tensor renamed one to one (the
    q/k/v norms' ``.weight`` is BFL's ``.scale``)."""
    names = {}
    for ours, theirs in (_FLUX1_TOP if family == "flux1" else _FLUX2_TOP).items():
        names |= {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}
    for i in range(blocks):
        for ours, theirs in _DOUBLE[family].items():
            for p in ("weight", "bias"):
                names[f"transformer_blocks.{i}.{ours}.{p}"] = f"double_blocks.{i}.{theirs}.{p}"
        for ours, theirs in _NORMS.items():
            names[f"transformer_blocks.{i}.{ours}.weight"] = f"double_blocks.{i}.{theirs}.scale"
    for i in range(singles):
        for ours, theirs in _SINGLE[family].items():
            for p in ("weight", "bias"):
                names[f"single_transformer_blocks.{i}.{ours}.{p}"] = f"single_blocks.{i}.{theirs}.{p}"
        for q in ("q", "k"):
            names[f"single_transformer_blocks.{i}.attn.norm_{q}.weight"] = \
                f"single_blocks.{i}.norm.{'query' if q == 'q' else 'key'}_norm.scale"
    return names


def _fused(family: str, blocks: int, singles: int) -> dict[str, tuple[str, ...]]:
    """BFL's fused tensor (no .weight/.bias) -> the diffusers tensors it joins."""
    fused = {f"double_blocks.{i}.{bfl}": tuple(f"transformer_blocks.{i}.{d}" for d in parts)
             for i in range(blocks) for bfl, parts in _FUSED_DOUBLE.items()}
    if family == "flux1":
        fused |= {f"single_blocks.{i}.linear1": tuple(f"single_transformer_blocks.{i}.{d}"
                                                      for d in _FUSED_SINGLE1)
                  for i in range(singles)}
    return fused


def _counts(keys, prefix: str) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(prefix)})


def to_bfl(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's state dict in BFL's layout."""
    blocks, singles = _counts(state, "transformer_blocks."), _counts(state, "single_transformer_blocks.")
    out = {theirs: state[ours] for ours, theirs in _name_map(family, blocks, singles).items()
           if ours in state}
    for bfl, parts in _fused(family, blocks, singles).items():
        for p in ("weight", "bias"):
            if f"{parts[0]}.{p}" in state:
                out[f"{bfl}.{p}"] = torch.cat([state[f"{d}.{p}"] for d in parts])
    for p in ("weight", "bias"):
        if f"norm_out.linear.{p}" in state:
            out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(state[f"norm_out.linear.{p}"])
    return out


def from_bfl(state: dict[str, torch.Tensor], family: str, config: dict) -> dict[str, torch.Tensor]:
    """BFL's layout (``PREFIX`` or not) -> the diffusers transformer of ``config``."""
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    blocks, singles = config["num_layers"], config["num_single_layers"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    names = {theirs: ours for ours, theirs in _name_map(family, blocks, singles).items()}
    out = {names[k]: v for k, v in state.items() if k in names}
    for bfl, parts in _fused(family, blocks, singles).items():
        sizes = [inner] * 3
        if len(parts) == 4:  # FLUX.1's linear1: q, k, v, then the MLP's input
            sizes.append(len(state[f"{bfl}.weight"]) - 3 * inner)
        for p in ("weight", "bias"):
            if f"{bfl}.{p}" in state:
                out |= dict(zip((f"{d}.{p}" for d in parts), state[f"{bfl}.{p}"].split(sizes)))
    for p in ("weight", "bias"):
        if f"final_layer.adaLN_modulation.1.{p}" in state:
            out[f"norm_out.linear.{p}"] = _swap(state[f"final_layer.adaLN_modulation.1.{p}"])
    return out


def bfl_family(keys: list[str]) -> str | None:
    """"flux2" or "flux1" for a transformer file in BFL's layout, else None."""
    keys = {k.removeprefix(PREFIX) for k in keys}
    if FLUX2_MARK in keys:
        return "flux2"
    return "flux1" if FLUX1_MARK in keys else None


def bfl_config(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    """The transformer config of a BFL file: the family's published one
    (FLUX.2 [klein] 4B, FLUX.1 [dev]), its sizes read from the file's shapes
    (so klein 9B, FLUX.1 [schnell] without guidance, and smaller models
    load). The rotary axes have no weights: the published ones, scaled to
    the head width when that differs."""
    from .flux_architecture import FLUX1_DEV_TRANSFORMER, FLUX2_KLEIN_TRANSFORMER

    shapes = {k.removeprefix(PREFIX): v for k, v in shapes.items()}
    config = dict(FLUX2_KLEIN_TRANSFORMER if family == "flux2" else FLUX1_DEV_TRANSFORMER)
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    inner, in_channels = shapes["img_in.weight"]
    config.update(in_channels=in_channels, attention_head_dim=head,
                  num_attention_heads=inner // head,
                  joint_attention_dim=shapes["txt_in.weight"][1],
                  num_layers=_counts(shapes, "double_blocks."),
                  num_single_layers=_counts(shapes, "single_blocks."),
                  guidance_embeds="guidance_in.in_layer.weight" in shapes)
    if family == "flux2":
        config["timestep_guidance_channels"] = shapes["time_in.in_layer.weight"][1]
    if family == "flux1":
        config["pooled_projection_dim"] = shapes["vector_in.in_layer.weight"][1]
    axes = config["axes_dims_rope"]
    if sum(axes) != head:
        config["axes_dims_rope"] = tuple(a * head // sum(axes) for a in axes)
    return config


def load_bfl_transformer(path: Path, family: str, config: dict | None,
                         dtype: torch.dtype = torch.float32):
    """The transformer of a BFL single file, its config ``config`` (a
    folder's) or else built in (``bfl_config``)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises many kinds on bad bytes
        raise UserError(f"--model {path}: cannot read ({str(e).splitlines()[0]})") from None
    if config is None:
        config = bfl_config({k: tuple(v.shape) for k, v in state.items()}, family)
    cls = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    converted = from_bfl(state, family, config)
    missing = set(model.state_dict()) - set(converted)
    if missing:
        raise UserError(f"--model {path}: lacks {len(missing)} of the FLUX transformer's weights "
                        f"(e.g. {sorted(missing)[0]}): not a {family} transformer file")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()


def save_bfl_transformer(transformer, family: str, path: Path,
                         metadata: dict[str, str] | None = None) -> Path:
    """A diffusers FLUX transformer written as the file model sites
    distribute (`flux1-dev.safetensors`, `flux-2-klein-4b.safetensors`): BFL's
    names, no prefix, what ComfyUI's "Load Diffusion Model" reads and what
    ``load_bfl_transformer`` (and, for FLUX.2, diffusers' ``from_single_file``)
    loads back. Refused, nothing written, where the key map would drop a
    weight (a variant it does not know)."""
    from safetensors.torch import save_file

    from ..core.fileio import atomic_path

    state = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    out = to_bfl(state, family)
    back = from_bfl(out, family, dict(transformer.config))
    if lost := sorted(set(state) - set(back)):
        raise UserError(f"{path}: not written: BFL's layout has no place for {len(lost)} of the "
                        f"transformer's weights (e.g. {lost[0]})")
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})
    return Path(path)
