"""LoRA file layouts: diffusers (`unet.….lora.down.weight`), peft
(`….lora_A.weight`) and kohya (`lora_unet_…`, `lora_te_…`, `.alpha`), which
AUTOMATIC1111, ComfyUI and InvokeAI read. Conversions go through diffusers'
own converters; round trips are exact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from safetensors.torch import save_file

from .errors import UserError
from .io import atomic_path, to_json
from .lora import KOHYA_WEIGHT_NAME, TEXT_TARGETS, UNET_TARGETS, WEIGHT_NAME, read_lora

LAYOUTS = ("diffusers", "kohya", "peft")



def detect_layout(tensors: dict[str, torch.Tensor], where: str) -> str:
    keys = list(tensors)
    if keys and all(k.startswith("lora_") for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder")) for k in keys):
        return "peft" if any(".lora_A." in k for k in keys) else "diffusers"
    first = keys[0] if keys else "none"
    raise UserError(f"{where}: keys of no known LoRA layout (diffusers, peft or kohya); "
                    f"first key: {first}")


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _text(tensors: dict[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """The text-encoder part through ``convert``; nothing when there is none
    (diffusers' converters refuse an empty dict)."""
    part = {k: v for k, v in tensors.items() if k.startswith("text_encoder")}
    return convert(part) if part else {}


def diffusers_to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet = convert_unet_state_dict_to_peft(_split(tensors, "unet."))
    text = _text(tensors, convert_state_dict_to_peft)
    return {**{f"unet.{k}": v for k, v in unet.items()}, **text}


def peft_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet = convert_state_dict_to_diffusers(_split(tensors, "unet."))
    text = _text(tensors, convert_state_dict_to_diffusers)
    return {**{f"unet.{k}": v for k, v in unet.items()}, **text}


def peft_to_kohya(tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    kohya = convert_state_dict_to_kohya(tensors)
    sdxl = any(k.startswith("lora_te2_") for k in kohya)
    out = {}
    for key, value in kohya.items():
        if not sdxl and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]  # SD 1.x names its one encoder lora_te
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))  # diffusers writes the rank; keep the real alpha
        out[key] = value.contiguous()
    return out


def kohya_to_peft(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Through diffusers' own kohya reader (what load_lora_weights does)."""
    renamed = {("lora_te1_" + k[len("lora_te_"):] if k.startswith("lora_te_") else k): v
               for k, v in tensors.items()}
    try:
        legacy, alphas = StableDiffusionPipeline.lora_state_dict(dict(renamed))
    except (ValueError, KeyError) as e:
        raise UserError(f"kohya file: cannot be read ({str(e).splitlines()[0][:120]})") from None
    values = {float(v) for v in (alphas or {}).values()}
    if len(values) > 1:
        raise UserError(f"kohya file: modules use different alphas {sorted(values)}; "
                        "only one alpha per file is supported")
    unet = convert_unet_state_dict_to_peft(_split(legacy, "unet."))
    text = _text(legacy, convert_state_dict_to_peft)
    rank = next(v.shape[0] for k, v in tensors.items() if "lora_down" in k)
    return {**{f"unet.{k}": v for k, v in unet.items()}, **text}, values.pop() if values else rank


def check_ranks(tensors: dict[str, torch.Tensor], where: str) -> int:
    """Every down/A matrix has the same rank, matching its up/B partner."""
    ranks = set()
    for key, down in tensors.items():
        # peft lora_A, diffusers .down. / lora.down, kohya .lora_down.
        if any(tag in key for tag in ("lora_A.", ".down.", ".lora_down.")):
            partner = (key.replace("lora_A.", "lora_B.").replace(".down.", ".up.")
                       .replace("lora_down", "lora_up"))
            up = tensors.get(partner)
            if up is None or up.shape[1] != down.shape[0]:
                raise UserError(f"{where}: rank mismatch at {key} "
                                f"({tuple(down.shape)} vs {tuple(up.shape) if up is not None else 'missing'})")
            ranks.add(down.shape[0])
    if len(ranks) > 1:
        raise UserError(f"{where}: mixed ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def adapter_header(tensors_peft: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers reads to rebuild rank and alpha."""
    meta = {}
    for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        if any(k.startswith(part + ".") for k in tensors_peft):
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()
            meta.update({f"{part}.{k}": (list(v) if isinstance(v, set) else v)
                         for k, v in config.items()})
    return {"format": "pt", "lora_adapter_metadata": to_json(meta, sort_keys=True, default=str)}


def kohya_metadata(header: dict[str, str]) -> dict[str, str]:
    """kohya's `ss_*` training fields from our header, so UIs show them."""
    def get(key: str, default: str = "") -> str:
        value = header.get(f"lorabooth.{key}", default)
        try:
            return str(json.loads(value))
        except (json.JSONDecodeError, TypeError):
            return str(value)

    return {
        "ss_network_module": "networks.lora", "ss_network_dim": get("rank"),
        "ss_network_alpha": get("alpha"), "ss_sd_model_name": get("base_model"),
        "ss_resolution": f"({get('resolution')}, {get('resolution')})",
        "ss_max_train_steps": get("steps"), "ss_learning_rate": get("lr"),
        "ss_unet_lr": get("lr"), "ss_text_encoder_lr": get("lr_text"), "ss_seed": get("seed"),
        "ss_training_comment": f"lorabooth {get('version')}: {get('instance_prompt')}",
        **{k: v for k, v in header.items() if k.startswith("lorabooth.")},
    }


def convert_file(src: str | Path, dst: str | Path, to: str) -> Path:
    """Any layout in, ``to`` out; metadata carried over."""
    if to not in LAYOUTS:
        raise UserError(f"--to: must be one of {', '.join(LAYOUTS)} (got {to!r})")
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        dst = dst / (KOHYA_WEIGHT_NAME if to == "kohya" else WEIGHT_NAME)
    tensors, header = read_lora(src)
    layout = detect_layout(tensors, str(src))
    rank = check_ranks(tensors, str(src))
    if layout == "kohya":
        peft, alpha = kohya_to_peft(tensors)
    else:
        peft = tensors if layout == "peft" else diffusers_to_peft(tensors)
        alpha = _alpha_from_header(header, rank)
    ours = {k: v for k, v in header.items() if k.startswith(("lorabooth.", "ss_"))}
    if to == "kohya":
        out = peft_to_kohya(peft, alpha)
        meta = {"format": "pt", **kohya_metadata(header)}
    else:
        out = peft if to == "peft" else peft_to_diffusers(peft)
        meta = {**adapter_header(peft, rank, alpha), **ours}
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=meta)
    return dst


def _alpha_from_header(header: dict[str, str], rank: int) -> float:
    try:
        meta = json.loads(header.get("lora_adapter_metadata", "{}"))
        return float(meta.get("unet.lora_alpha", meta.get("text_encoder.lora_alpha", rank)))
    except (ValueError, TypeError):
        return float(rank)
