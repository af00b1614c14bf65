"""Which keys of a LoRA file the clients would load into an SD 1.x or SDXL
model, by their own matching rules, so a file can be checked without
running them.

Written from the clients' published loader source (not copied):
- ComfyUI `comfy/lora.py`: `model_lora_keys_unet` and `model_lora_keys_clip`
  name every weight of the model in the spellings LoRA files use (kohya
  `lora_unet_…`/`lora_te_text_model_…`, diffusers `unet.….processor.to_q`,
  `text_encoder.text_model.…`), and `load_lora` takes, for each such name,
  `.alpha` and one up/down pair in any of five suffix styles; every other key
  is reported as "lora key not loaded".
- AUTOMATIC1111 `extensions-builtin/Lora/networks.py`: `load_network` splits a
  key at its first dot, turns the module part into the original (LDM) module
  name with `convert_diffusers_name_to_compvis`, and looks that up among the
  model's modules; kohya layout only. For SDXL it then tries the key as it
  stands with `lora_unet` -> `diffusion_model` (kohya's SGM names) and
  `lora_te1_text_model` -> `0_transformer_text_model`, and maps
  `lora_te2_…` onto open_clip's modules (`1_model_transformer_resblocks_N_attn`,
  q/k/v onto the fused attention).

Both match against the original-layout checkpoint's names
(`model.diffusion_model.…`, `cond_stage_model.transformer.text_model.…`; SDXL:
`conditioner.embedders.0.transformer.text_model.…`, `conditioner.embedders.1.model.…`),
ComfyUI's text encoders against transformers' CLIP names (its clip_l, clip_g)."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .lycoris import LOHA_PARTS, LOKR_PARTS

CLIENTS = ("ComfyUI", "AUTOMATIC1111")
UNET_LDM, TEXT_LDM = "model.diffusion_model.", "cond_stage_model.transformer."
CLIP_MODULES = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                "self_attn.out_proj": "self_attn_out_proj"}
# (up, down) suffixes ComfyUI accepts after a module name, in its order
COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
               (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
               (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
A1111_PARTS = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha",
               *LOKR_PARTS, *LOHA_PARTS}


@dataclass(frozen=True)
class ModelNames:
    """A model's weights as the clients see them."""
    ldm: frozenset[str]               # original-layout weight keys
    diffusers_unet: dict[str, str]    # diffusers UNet key -> original-layout key
    # encoder ("text_encoder", "text_encoder_2") -> {weight in transformers'
    # CLIP names with `text_model.`: its original-layout key}. ComfyUI
    # matches LoRA keys on the former for both of SDXL's encoders.
    clip: dict[str, dict[str, str]]


def _clip_names(text_encoder, original) -> dict[str, str]:
    keys = (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
            for k in text_encoder.state_dict())
    return {k: original(k) for k in keys}


def model_names(unet, text_encoder, text_encoder_2=None) -> ModelNames:
    """The names of an SD model, or of an SDXL one (``text_encoder_2`` given);
    a FLUX transformer's (its ``unet``): FluxNames."""
    if "num_single_layers" in (getattr(unet, "config", None) or {}):
        clip = text_encoder if type(text_encoder).__name__ == "CLIPTextModel" else None
        return flux_names(unet, clip)  # FLUX.1's CLIP-L; FLUX.2's Qwen3 takes no LoRA
    from .sdxl import TE2_LDM, openclip_name, te1_ldm_name
    from .singlefile import text_ldm_name, unet_ldm_names

    unet_names = unet_ldm_names(unet)
    if text_encoder_2 is None:
        clip = {"text_encoder": _clip_names(text_encoder, text_ldm_name)}
    else:
        clip = {"text_encoder": _clip_names(text_encoder, te1_ldm_name),
                "text_encoder_2": _clip_names(text_encoder_2,
                                              lambda k: TE2_LDM + openclip_name(k))}
    text = frozenset(v for names in clip.values() for v in names.values())
    return ModelNames(frozenset(unet_names.values()) | text, unet_names, clip)


def sd15_names() -> ModelNames:
    """Stable Diffusion 1.5's weight names, from its configs on the meta
    device (no weights, no download, about a second)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.loading import sd15_config_dir

    with tempfile.TemporaryDirectory() as tmp, init_empty_weights():
        folder = sd15_config_dir(Path(tmp))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        text_encoder = CLIPTextModel(CLIPTextConfig(**{
            k: v for k, v in te_config.items() if k not in ("architectures", "model_type")}))
    return model_names(unet, text_encoder)


@lru_cache(maxsize=1)
def sdxl_names() -> ModelNames:
    """SDXL 1.0's weight names, from its configs on the meta device."""
    from .sdxl import sdxl_meta_models

    return model_names(*sdxl_meta_models())


def is_sdxl_folder(model: str) -> bool:
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    from ..core.fileio import load_json

    data = load_json(index, "--model")
    return isinstance(data, dict) and "XL" in str(data.get("_class_name", ""))


def sdxl_folder_names(folder: str | Path) -> ModelNames:
    """An SDXL diffusers folder's weight names, from its configs alone."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder).expanduser()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return model_names(unet, te1, te2)


def comfyui_key_map(names: ModelNames) -> dict[str, str]:
    """LoRA module name -> model weight, as `model_lora_keys_unet/_clip` build it."""
    key_map: dict[str, str] = {}
    for ldm in names.ldm:
        if ldm.startswith(UNET_LDM) and ldm.endswith(".weight"):
            inner = ldm[len(UNET_LDM):-len(".weight")]
            key_map["lora_unet_" + inner.replace(".", "_")] = ldm
            key_map["diffusion_model." + inner] = ldm
    for hf, ldm in names.diffusers_unet.items():
        if not hf.endswith(".weight"):
            continue
        module = hf[:-len(".weight")]
        key_map["lora_unet_" + module.replace(".", "_")] = ldm
        legacy = module.replace(".to_", ".processor.to_")
        if legacy.endswith(".to_out.0"):
            legacy = legacy[:-len(".0")]
        for prefix in ("", "unet."):
            key_map[prefix + legacy] = ldm
    # `model_lora_keys_clip`: SD's one encoder (ComfyUI's clip_l) answers to
    # lora_te_ and lora_te1_; with a second (clip_g, SDXL) that one answers
    # to lora_te2_ and text_encoder_2.
    prefixes = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
    layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight$")
    for encoder, weights in names.clip.items():
        for weight, target in weights.items():
            m = layer.match(weight)
            if not (m and m[2] in CLIP_MODULES):
                continue
            kohya = f"text_model_encoder_layers_{m[1]}_{CLIP_MODULES[m[2]]}"
            for prefix in prefixes[encoder]:
                key_map[prefix + kohya] = target
            key_map[f"{encoder}.text_model.encoder.layers.{m[1]}.{m[2]}"] = target
    return key_map


def comfyui_unloaded(keys: list[str], names: ModelNames) -> list[str]:
    """The keys ComfyUI's `load_lora` would report as "lora key not loaded"."""
    keys_set, loaded = set(keys), set()
    for module in comfyui_key_map(names):
        if module + ".alpha" in keys_set:
            loaded.add(module + ".alpha")
        for up, down in COMFY_PAIRS:
            if module + up in keys_set and module + down in keys_set:
                loaded |= {module + up, module + down}
                break
        loaded |= comfyui_lycoris(module, keys_set)
    return sorted(keys_set - loaded)


def comfyui_lycoris(module: str, keys: set[str]) -> set[str]:
    """The LyCORIS keys of ``module`` ComfyUI's adapters take
    (`comfy/weight_adapter`): LoKr's when any of w1, w2, w1_a, w2_a is there,
    LoHa's when w1_a is."""
    present = {p for p in LOKR_PARTS + LOHA_PARTS if f"{module}.{p}" in keys}
    lokr = present & set(LOKR_PARTS)
    if lokr & {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"}:
        return {f"{module}.{p}" for p in lokr}
    if "hada_w1_a" in present and {"hada_w1_b", "hada_w2_a", "hada_w2_b"} <= present:
        return {f"{module}.{p}" for p in present & set(LOHA_PARTS)}
    return set()


def a1111_module_type(parts: set[str]) -> bool:
    """Whether a module's LyCORIS parts make a type `load_network` accepts
    (`network_lokr.ModuleTypeLokr`: w1 or w1_a+w1_b, and w2 or w2_a+w2_b;
    `network_hada.ModuleTypeHada`: all four hada matrices); modules without
    LyCORIS parts are judged by their LoRA parts as before."""
    if not parts & {*LOKR_PARTS, *LOHA_PARTS}:
        return True
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    return (has_1 and has_2) or {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts


_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
           "conv_shortcut": "skip_connection"}


def a1111_module(key: str) -> str:
    """`convert_diffusers_name_to_compvis` for SD 1.x (three blocks per level)."""
    def suffix(kind: str, rest: str) -> str:
        return _RESNET.get(rest, rest) if kind == "resnets" else rest

    def slot(kind: str) -> int:
        return 1 if kind == "attentions" else 0

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{slot(m[2])}_{suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_"
                   f"{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{slot(m[2])}_{suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_"
                   f"{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        # SDXL's second encoder: open_clip's module names
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[1]}_" + m[2].replace(
             "mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
    ]
    for pattern, build in rules:
        m = re.match(pattern, key)
        if m:
            return build(m)
    return key


def a1111_unloaded(keys: list[str], names: ModelNames) -> list[str]:
    """The keys `load_network` would list as "Failed to match keys" (or could
    not give a LoRA module type)."""
    modules = set()
    # `network_layer_mapping`: the UNet's modules, SD's encoder's, and SDXL's
    # two embedders' as `<i>_<name in the embedder>`
    shorts = ((UNET_LDM, "diffusion_model."), (TEXT_LDM, "transformer."),
              ("conditioner.embedders.", ""))
    for ldm in names.ldm:
        module = ldm.rsplit(".", 1)[0]
        for prefix, short in shorts:
            if module.startswith(prefix):
                modules.add((short + module[len(prefix):]).replace(".", "_"))
    unloaded = []
    parts: dict[str, set[str]] = {}
    for key in keys:
        base, _, part = key.partition(".")
        parts.setdefault(base, set()).add(part)
    for key in keys:
        base, _, part = key.partition(".")
        if not a1111_module_type(parts[base]):
            unloaded.append(key)
            continue
        converted = a1111_module(base)
        candidates = [converted]
        if m := re.match(r"(.*)_[qkv]_proj$", converted):  # open_clip's fused attention
            candidates.append(m[1])
        if "lora_unet" in base:
            candidates.append(base.replace("lora_unet", "diffusion_model"))
        elif "lora_te1_text_model" in base:
            candidates += [base.replace("lora_te1_text_model", "0_transformer_text_model"),
                           base.replace("lora_te1_text_model", "transformer_text_model")]
        if part not in A1111_PARTS or not any(c in modules for c in candidates):
            unloaded.append(key)
    return sorted(unloaded)


def unloaded_by_client(keys, names) -> dict[str, list[str]]:
    """Per client, the keys it would not load. AUTOMATIC1111 reads only the
    kohya layout, so it is checked for kohya files only; FLUX files
    (``names`` a FluxNames, ``keys`` the file's tensors) only in ComfyUI."""
    if isinstance(names, FluxNames):
        return {"ComfyUI": comfyui_flux_unloaded(keys, names)}
    out = {"ComfyUI": comfyui_unloaded(keys, names)}
    if keys and all(k.startswith("lora_") for k in keys):
        out["AUTOMATIC1111"] = a1111_unloaded(keys, names)
    return out


# ComfyUI's FLUX rules (`comfy/lora.py` `model_lora_keys_unet`, the `Flux`
# branch, which FLUX.2 takes too: `model_base.Flux2` is a `Flux`; and
# `comfy/utils.py` `flux_to_diffusers`). Its model holds BFL's weights as
# `diffusion_model.<BFL name>`; a LoRA module name maps to a weight, or to a
# row slice of a fused one (dim 0, offset, size).
FLUX_LDM = "diffusion_model."
_COMFY_FLUX_DOUBLE = {  # `flux_to_diffusers`' block_map, the Linear weights
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_COMFY_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
                      "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}


@dataclass(frozen=True)
class FluxNames:
    """A FLUX transformer's weights as ComfyUI holds them, and FLUX.1's CLIP-L's."""
    hidden: int
    weights: dict[str, tuple[int, ...]]  # `diffusion_model.<BFL>.weight` -> shape
    # LoRA module name -> `clip_l.transformer.text_model.…weight`, as
    # `model_lora_keys_clip` names CLIP-L for FLUX (diffusers' and lora_te1_)
    clip: dict[str, str] = field(default_factory=dict)


def comfy_flux_to_diffusers(depth: int, depth_single: int, hidden: int) -> dict[str, object]:
    """diffusers module -> BFL weight, or (BFL weight, (0, offset, size)):
    `flux_to_diffusers` re-derived for module names (Linear weights only)."""
    out: dict[str, object] = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}.", f"{FLUX_LDM}double_blocks.{i}."
        for n, p in enumerate("qkv"):
            out[f"{d}attn.to_{p}"] = (b + "img_attn.qkv.weight", (0, n * hidden, hidden))
            out[f"{d}attn.add_{p}_proj"] = (b + "txt_attn.qkv.weight", (0, n * hidden, hidden))
        out.update({d + k: f"{b}{v}.weight" for k, v in _COMFY_FLUX_DOUBLE.items()})
    for i in range(depth_single):
        s, b = f"single_transformer_blocks.{i}.", f"{FLUX_LDM}single_blocks.{i}."
        for n, p in enumerate("qkv"):
            out[f"{s}attn.to_{p}"] = (b + "linear1.weight", (0, n * hidden, hidden))
        out[s + "proj_mlp"] = (b + "linear1.weight", (0, 3 * hidden, 4 * hidden))
        out.update({s + k: f"{b}{v}.weight" for k, v in _COMFY_FLUX_SINGLE.items()})
    return out


def flux_names(transformer, clip_l=None) -> FluxNames:
    """A diffusers FLUX.1/FLUX.2 transformer's weights in ComfyUI's names:
    each Linear weight through `flux_to_diffusers`, a fused weight as tall as
    its slices reach; with ``clip_l`` (FLUX.1's CLIP text encoder) its layers'
    under the names `model_lora_keys_clip` gives them."""
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    table = comfy_flux_to_diffusers(config.num_layers, config.num_single_layers, hidden)
    weights: dict[str, tuple[int, ...]] = {}
    for name, module in transformer.named_modules():
        target = table.get(name)
        if target is None or getattr(getattr(module, "weight", None), "ndim", 0) != 2:
            continue
        rows, cols = module.weight.shape[0], module.weight.shape[-1]
        if isinstance(target, tuple):
            key, (_, offset, _) = target
            rows = max(weights.get(key, (0,))[0], offset + rows)
        else:
            key = target
        weights[key] = (rows, cols)
    clip: dict[str, str] = {}
    layer = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight$")
    for name, value in (clip_l.state_dict() if clip_l is not None else {}).items():
        m = layer.match(name)
        if not (m and m[2] in CLIP_MODULES):
            continue
        target = f"clip_l.transformer.text_model.encoder.layers.{m[1]}.{m[2]}.weight"
        weights[target] = tuple(value.shape)
        for prefix in ("lora_te_", "lora_te1_"):
            clip[f"{prefix}text_model_encoder_layers_{m[1]}_{CLIP_MODULES[m[2]]}"] = target
        clip[f"text_encoder.text_model.encoder.layers.{m[1]}.{m[2]}"] = target
    return FluxNames(hidden, weights, clip)


def comfyui_flux_key_map(names: FluxNames, depth: int, depth_single: int) -> dict[str, object]:
    """LoRA module name -> weight (or slice), as the `Flux` branch builds it."""
    key_map: dict[str, object] = {}
    for key in names.weights:  # every `diffusion_model.` weight
        inner = key[len(FLUX_LDM):-len(".weight")]
        key_map["lora_unet_" + inner.replace(".", "_")] = key
        key_map[FLUX_LDM + inner] = key
        if key.endswith(".linear1.weight"):
            key_map[key.replace(".linear1.weight", ".linear1_qkv")] = (
                key, (0, 0, 3 * names.hidden))
    for module, to in comfy_flux_to_diffusers(depth, depth_single, names.hidden).items():
        for name in ("transformer." + module, "lycoris_" + module.replace(".", "_"),
                     "lora_transformer_" + module.replace(".", "_"), module):
            key_map[name] = to
    key_map.update(names.clip)
    return key_map


def comfyui_flux_unloaded(tensors: dict, names: FluxNames) -> list[str]:
    """The keys ComfyUI would not load into this model: no module name in its
    map, a target the model lacks, or a LoRA whose shape differs from its
    weight or slice ("SHAPE MISMATCH ... NOT MERGED")."""
    depth = 1 + max((int(m[1]) for k in names.weights
                     if (m := re.search(r"double_blocks\.(\d+)\.", k))), default=-1)
    single = 1 + max((int(m[1]) for k in names.weights
                      if (m := re.search(r"single_blocks\.(\d+)\.", k))), default=-1)
    key_map, loaded = comfyui_flux_key_map(names, depth, single), set()
    for module, to in key_map.items():
        if module + ".alpha" in tensors:
            loaded.add(module + ".alpha")
        for up, down in COMFY_PAIRS:
            if module + up not in tensors or module + down not in tensors:
                continue
            weight, rows = (to[0], to[1][2]) if isinstance(to, tuple) else (to, None)
            shape = names.weights.get(weight)
            delta = (tensors[module + up].shape[0], tensors[module + down].shape[-1])
            if shape is not None and delta == (rows or shape[0], shape[1]):
                loaded |= {module + up, module + down}
            break
    return sorted(set(tensors) - loaded)
