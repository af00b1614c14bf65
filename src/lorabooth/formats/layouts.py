"""LoRA file layouts: diffusers (`unet.….lora.down.weight`), peft
(`….lora_A.weight`) and kohya (`lora_unet_…`, `lora_te_…`, `.alpha`), which
AUTOMATIC1111, ComfyUI and InvokeAI read. Conversions go through diffusers'
own converters; round trips are exact."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ..adapters.lora import ADAPTER, TARGETS, TEXT_TARGETS, attach_state, find_lora, read_lora
from ..adapters.pivotal import embedding_keys, split_embeddings, write_rows
from ..core.errors import UserError, first_line
from ..core.fileio import atomic_path, parse_json, to_json
from ..core.logs import diffusers_warnings_off
from . import KOHYA_WEIGHT_NAME, WEIGHT_NAME, lycoris
from .flux import FLUX_FAMILIES, FLUX_KOHYA_META, FLUX_NAMES, from_bfl_kohya, to_bfl_kohya
from .sdxl import (
    FAMILY_KEY,
    HEADER_FAMILY,
    SDXL,
    SDXL_KOHYA_META,
    UNET_BLOCKS_KEY,
    blocks_from_header,
    family_of,
    sgm_unet_module,
    unet_blocks,
)

log = logging.getLogger(__name__)

LAYOUTS = ("diffusers", "kohya", "peft")
TEXT_PARTS = ("text_encoder", "text_encoder_2")  # diffusers' names of the text encoders

# transformers 5 dropped the `text_model.` level from CLIPTextModel's module
# names. Every SD client (ComfyUI, AUTOMATIC1111/Forge, InvokeAI, kohya's
# scripts) and every published LoRA keeps it, so files always carry it and
# reading accepts both spellings.
_TEXT_PREFIXES = (("text_encoder.", "."), ("text_encoder_2.", "."), ("lora_te_", "_"),
                  ("lora_te1_", "_"), ("lora_te2_", "_"))


def canonical_key(key: str) -> str:
    """A key with the text encoder's `text_model` level put back if missing."""
    for prefix, sep in _TEXT_PREFIXES:
        if key.startswith(prefix + "encoder" + sep):
            return f"{prefix}text_model{sep}{key[len(prefix):]}"
    return key


def old_text_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys spelled without `text_model` (lorabooth before 0.2, transformers 5)."""
    return [k for k in tensors if canonical_key(k) != k]


# DoRA's magnitude, one per output channel: peft names it `….lora_magnitude_vector`
# (its state dict) or `….lora_magnitude_vector.weight` (the parameter); kohya
# files name it `….dora_scale`.
MAGNITUDE = ".lora_magnitude_vector"
KOHYA_MAGNITUDE = ".dora_scale"
KOHYA_DORA_REFUSAL = ("a DoRA adapter has no kohya export: ComfyUI and AUTOMATIC1111 apply "
                      "kohya's dora_scale by their own axis conventions, not verified against "
                      "peft's weight; use the diffusers file")


KOHYA_LYCORIS_READ = ("lorabooth reads LoKr/LoHa files in the diffusers (peft) layout only; its "
                      "kohya file is for ComfyUI and AUTOMATIC1111")
PEFT_CONFIGS = {"lora": LoraConfig, "lokr": LoKrConfig, "loha": LoHaConfig}


def is_dora(tensors: dict[str, torch.Tensor]) -> bool:
    return any(MAGNITUDE in k or k.endswith(KOHYA_MAGNITUDE) for k in tensors)


def peft_magnitude_key(key: str) -> str:
    """`….lora_magnitude_vector.weight` -> peft's state-dict name."""
    return key.removesuffix(".weight") if key.endswith(MAGNITUDE + ".weight") else key


def detect_layout(tensors: dict[str, torch.Tensor], where: str) -> str:
    keys = list(tensors)
    if keys and all(k.startswith("lora_") for k in keys):
        return "kohya"
    # a transformer's LoRA (FLUX): diffusers writes peft's own names
    if keys and all(k.startswith(("transformer.", "text_encoder")) for k in keys) and any(
            k.startswith("transformer.") for k in keys):
        return "diffusers"
    if keys and all(k.startswith(("unet.", "text_encoder")) for k in keys):
        return "peft" if any(".lora_A." in k for k in keys) or lycoris.lycoris_kind(keys) \
            else "diffusers"
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
    """Any diffusers spelling (`.lora.down`, the attention-processor layout
    `.processor.to_q_lora.down`, `.lora_linear_layer.down`) -> peft."""
    tensors = {canonical_key(k).replace(".processor.", "."): v for k, v in tensors.items()}
    unet = convert_unet_state_dict_to_peft(_split(tensors, "unet."))
    text = _text(tensors, convert_state_dict_to_peft)
    return {**{f"unet.{k}": v for k, v in unet.items()}, **text}


# UNet keys as diffusers' attention processors named them, the layout ComfyUI
# maps for SD 1.x files (`….attn1.processor.to_q_lora.down.weight`); diffusers
# still reads it.
_UNET_LEGACY = re.compile(r"\.(to_q|to_k|to_v|to_out)(?:\.0)?\.lora_([AB])\.weight$")


def peft_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Peft -> the diffusers layout every client reads: UNet in the attention-
    processor spelling, text encoder as `….q_proj.lora_linear_layer.down`."""
    def unet_key(key: str) -> str:
        return _UNET_LEGACY.sub(
            lambda m: f".processor.{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight", key)

    tensors = {canonical_key(k): v for k, v in tensors.items()}
    if lycoris.lycoris_kind(tensors):  # LoKr/LoHa: peft's own names, as peft loads them
        return tensors
    if is_dora(tensors):
        # The attention-processor spelling has no place for DoRA's magnitude:
        # peft names throughout, the magnitude as the parameter
        # (`….lora_magnitude_vector.weight`), the one spelling diffusers 0.42
        # loads into both the UNet and (through transformers 5) the text encoder.
        return {(k + ".weight" if k.endswith(MAGNITUDE) else k): v for k, v in tensors.items()}
    if unet_targets(tensors) != TARGETS["attn"]:
        # --targets beyond the attention: the processor spelling names the
        # attention only, and diffusers reads a file in one spelling: peft's
        return tensors
    unet = {unet_key(k): v for k, v in tensors.items() if k.startswith("unet.")}
    text = _text(tensors, convert_state_dict_to_diffusers)
    return {**unet, **text}


def _sgm_key(key: str, blocks) -> str:
    """`unet.<diffusers module>.lora_A.weight` -> the module's SGM name."""
    module, _, tail = key.removeprefix("unet.").partition(".lora_")
    return f"unet.{sgm_unet_module(module, blocks)}.lora_{tail}"


def peft_to_kohya(tensors: dict[str, torch.Tensor], alpha: float,
                  family: str | None = None, blocks=None) -> dict[str, torch.Tensor]:
    """Peft -> kohya through diffusers' converter. SDXL's UNet modules take
    their SGM names (`lora_unet_input_blocks_4_1_…`), as kohya's sd-scripts
    write them, numbered by ``blocks`` (the model's UNet config; default
    SDXL 1.0's); diffusers' converter would keep the diffusers names."""
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    sdxl = (family or family_of(tensors)) == SDXL
    if sdxl:
        blocks = blocks or blocks_from_header(None)
        tensors = {(_sgm_key(k, blocks) if k.startswith("unet.") else k): v
                   for k, v in tensors.items()}
    kohya = convert_state_dict_to_kohya(tensors)
    out = {}
    for key, value in kohya.items():
        if not sdxl and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]  # SD 1.x names its one encoder lora_te
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))  # diffusers writes the rank; keep the real alpha
        out[key] = value.contiguous()
    return out


def lycoris_to_kohya(peft: dict[str, torch.Tensor], rank: int, alpha: float, family: str,
                     blocks, dst: Path) -> dict[str, torch.Tensor]:
    """LoKr/LoHa under kohya's module names (`lora_unet_…`, `lora_te_…`,
    SDXL's SGM names), each module's parts as the clients read them
    (formats.lycoris.to_clients)."""
    modules = lycoris.modules({canonical_key(k): v for k, v in peft.items()})
    # each module's kohya name: peft_to_kohya's, on a stand-in LoRA tagged
    # with the module's index
    order = sorted(modules)
    stand_in = {f"{m}.lora_{ab}.weight": torch.full((1, 1), float(i))
                for i, m in enumerate(order) for ab in "AB"}
    kohya = {order[int(v)]: k.removesuffix(".lora_down.weight")
             for k, v in peft_to_kohya(stand_in, alpha, family, blocks).items()
             if k.endswith(".lora_down.weight")}
    out = {}
    for module, parts in modules.items():
        try:
            out.update({f"{kohya[module]}.{p}": v.contiguous()
                        for p, v in lycoris.to_clients(parts, alpha, rank).items()})
        except ValueError as e:
            raise UserError(f"{dst}: not written: {module}: {e}") from None
    return out


def kohya_to_peft(tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Through diffusers' own kohya reader (what load_lora_weights does)."""
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    renamed = {("lora_te1_" + k[len("lora_te_"):] if k.startswith("lora_te_") else k): v
               for k, v in tensors.items()}
    # SGM block names (SDXL's kohya files) are renumbered by diffusers from the
    # layers per level: the file's recorded UNet blocks, else SDXL 1.0's
    reader = StableDiffusionXLPipeline if family_of(tensors) == SDXL else StableDiffusionPipeline
    try:
        legacy, alphas = reader.lora_state_dict(dict(renamed),
                                                unet_config=blocks_from_header(header))
    except (ValueError, KeyError) as e:
        raise UserError(f"kohya file: cannot be read ({first_line(e, 120)})") from None
    values = {float(v) for v in (alphas or {}).values()}
    if len(values) > 1:
        raise UserError(f"kohya file: modules use different alphas {sorted(values)}; "
                        "only one alpha per file is supported")
    rank = next(v.shape[0] for k, v in tensors.items() if "lora_down" in k)
    return diffusers_to_peft(legacy), values.pop() if values else rank


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
                                f"({tuple(down.shape)} vs "
                                f"{tuple(up.shape) if up is not None else 'missing'})")
            ranks.add(down.shape[0])
    if len(ranks) > 1:
        raise UserError(f"{where}: mixed ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def adapter_header(tensors_peft: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers reads to rebuild rank and alpha
    (LoKr/LoHa: peft's config of that kind, which lorabooth's loader reads)."""
    kind = lycoris.lycoris_kind(tensors_peft)
    if kind:
        meta = {f"{part}.{k}": (sorted(v) if isinstance(v, set) else v)
                for part in ("unet", *TEXT_PARTS) if any(k.startswith(part + ".") for k in tensors_peft)
                for k, v in PEFT_CONFIGS[kind](r=rank, alpha=alpha).to_dict().items()}
        return {"format": "pt",
                "lora_adapter_metadata": to_json(meta, sort_keys=True, default=str)}
    meta = {}
    transformer = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
                          for k in tensors_peft if k.startswith("transformer.") and ".lora_" in k})
    for part, targets in (("transformer", transformer), ("unet", unet_targets(tensors_peft)),
                          ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        if any(k.startswith(part + ".") for k in tensors_peft):
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                use_dora=is_dora(tensors_peft)).to_dict()
            meta.update({f"{part}.{k}": (list(v) if isinstance(v, set) else v)
                         for k, v in config.items()})
    return {"format": "pt", "lora_adapter_metadata": to_json(meta, sort_keys=True, default=str)}


def unet_targets(tensors_peft: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The narrowest --targets list naming every UNet module of the file
    (the attention's for every file before --targets), else the modules."""
    modules = {k.removeprefix("unet.").rsplit(".lora_", 1)[0]
               for k in tensors_peft if k.startswith("unet.") and ".lora_" in k}
    for targets in TARGETS.values():
        if all(any(m == t or m.endswith("." + t) for t in targets) for m in modules):
            return targets
    return tuple(sorted(modules))


def kohya_metadata(header: dict[str, str]) -> dict[str, str]:
    """kohya's `ss_*` training fields from our header, so UIs show them."""
    def get(key: str, default: str = "") -> str:
        value = header.get(f"lorabooth.{key}", default)
        try:
            return str(parse_json(value, key))
        except UserError:
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


def read_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """A file's trained token embeddings (--train-token): {word: (pieces, D)}."""
    return split_embeddings(read_lora(Path(path))[0])[1]


def read_as_peft(path: str | Path) -> tuple[dict[str, torch.Tensor], int, float, dict[str, str]]:
    """Any LoRA file in any layout and spelling -> (peft tensors with the
    canonical names, rank, alpha, header). Trained token embeddings are left
    out (``read_embeddings`` reads them)."""
    path = Path(path)
    tensors, header = read_lora(path)
    tensors = split_embeddings(tensors)[0]
    layout = detect_layout(tensors, str(path))
    if family_of(tensors, header) in FLUX_FAMILIES:
        return (*_read_flux(tensors, header, layout, str(path)), header)
    if kind := lycoris.lycoris_kind(tensors):
        if layout == "kohya":
            raise UserError(f"{path}: a kohya {kind} file: {KOHYA_LYCORIS_READ}")
        meta = parse_json(header.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata")
        rank = meta.get("unet.r") if isinstance(meta, dict) else None
        if not isinstance(rank, int):
            raise UserError(f"{path}: a {kind} file without its rank in "
                            "lora_adapter_metadata (lorabooth writes it)")
        peft = {canonical_key(k): v for k, v in tensors.items()}
        return peft, rank, alpha_from_header(header, float(rank)), header
    rank = check_ranks(tensors, str(path))
    if layout == "kohya":
        if is_dora(tensors):  # diffusers' kohya reader drops dora_scale with a warning
            raise UserError(f"{path}: a kohya DoRA file (dora_scale): lorabooth reads DoRA only "
                            "in the diffusers or peft layout")
        peft, alpha = kohya_to_peft(tensors, header)
    else:
        alpha = alpha_from_header(header, float(rank))
        peft = ({peft_magnitude_key(canonical_key(k)): v for k, v in tensors.items()}
                if layout == "peft" else diffusers_to_peft(tensors))
    return peft, rank, alpha, header


def _read_flux(tensors: dict[str, torch.Tensor], header: dict[str, str], layout: str,
               where: str) -> tuple[dict[str, torch.Tensor], int, float]:
    """A FLUX file -> (peft tensors, rank, alpha); kohya's fused modules split
    back exactly (formats.flux)."""
    if layout == "kohya":
        if is_dora(tensors):
            raise UserError(f"{where}: a kohya DoRA file (dora_scale): lorabooth reads DoRA only "
                            "in the diffusers or peft layout")
        text = {k: v for k, v in tensors.items() if k.startswith("lora_te1_")}
        peft, alpha = from_bfl_kohya(family_of(tensors, header),
                                     {k: v for k, v in tensors.items() if k not in text}, where)
        if text:  # FLUX.1's CLIP-L
            text_peft, text_alpha = kohya_to_peft(text, header)
            if text_alpha != alpha:
                raise UserError(f"{where}: the text encoder's alpha {text_alpha:g} differs from "
                                f"the transformer's {alpha:g}; only one alpha per file is supported")
            peft.update(text_peft)
        return peft, check_ranks(peft, where), alpha
    rank = check_ranks(tensors, where)
    peft = {peft_magnitude_key(k): v for k, v in tensors.items()}
    return peft, rank, alpha_from_header(header, float(rank))


def _flux_kohya(peft: dict[str, torch.Tensor], alpha: float, family: str,
                dst: Path) -> dict[str, torch.Tensor]:
    """The transformer in BFL's kohya names (formats.flux) and FLUX.1's CLIP-L
    as kohya's sd-scripts writes it for FLUX, `lora_te1_text_model_…`."""
    text = {k: v for k, v in peft.items() if k.startswith("text_encoder.")}
    other = sorted(k for k in peft if not k.startswith(("transformer.", "text_encoder.")))
    if other:
        raise UserError(f"{dst}: not written: kohya's {FLUX_NAMES[family]} layout holds the "
                        f"transformer and CLIP-L only (found {other[0]}); use the diffusers file")
    transformer = {k: v for k, v in peft.items() if k.startswith("transformer.")}
    out = to_bfl_kohya(family, transformer, alpha, str(dst))
    if text:  # lora_te1_, as SDXL's first encoder is spelled (SD 1.x's lora_te_ is not read)
        out.update(peft_to_kohya(text, alpha, SDXL))
    return out


def write_lora(dst: Path, peft: dict[str, torch.Tensor], rank: int, alpha: float,
               header: dict[str, str], to: str = "diffusers",
               embeddings: dict[str, torch.Tensor] | None = None) -> Path:
    """Write peft tensors in layout ``to`` atomically, with the metadata each
    reader needs (diffusers: rank and alpha; UIs: kohya's `ss_*` fields) and
    our own `lorabooth.*` fields; ``embeddings`` (--train-token's rows) in
    that layout's spelling."""
    ours = {k: v for k, v in header.items() if k.startswith(("lorabooth.", "ss_"))}
    family = family_of(peft, header)
    if family == SDXL or family in FLUX_FAMILIES:  # a small model's LoRA may not show it
        ours[FAMILY_KEY] = HEADER_FAMILY[family]
    if to == "kohya":
        if is_dora(peft):
            raise UserError(f"{dst}: not written: {KOHYA_DORA_REFUSAL}")
        flux = family in FLUX_FAMILIES
        out = (_flux_kohya(peft, alpha, family, dst) if flux
               else lycoris_to_kohya(peft, rank, alpha, family, blocks_from_header(header), dst)
               if lycoris.lycoris_kind(peft)
               else peft_to_kohya(peft, alpha, family, blocks_from_header(header)))
        meta = {"format": "pt", **kohya_metadata({**header, **ours}),
                **(SDXL_KOHYA_META if family == SDXL else FLUX_KOHYA_META.get(family, {}))}
        if kind := lycoris.lycoris_kind(peft):  # what LyCORIS's own kohya files say
            meta.update(ss_network_module="lycoris.kohya",
                        ss_network_args=to_json({"algo": kind}))
    else:
        out = ({canonical_key(k): v for k, v in peft.items()} if to == "peft"
               else dict(peft) if family in FLUX_FAMILIES else peft_to_diffusers(peft))
        meta = {**adapter_header(peft, rank, alpha), **ours}
    out.update(embedding_keys(embeddings or {}, to))
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=meta)
    return dst


def convert_file(src: str | Path, dst: str | Path, to: str) -> Path:
    """Any layout in, ``to`` out; metadata carried over. Files with the old
    text-encoder spelling come out with the canonical one."""
    if to not in LAYOUTS:
        raise UserError(f"--to: must be one of {', '.join(LAYOUTS)} (got {to!r})")
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        dst = dst / (KOHYA_WEIGHT_NAME if to == "kohya" else WEIGHT_NAME)
    peft, rank, alpha, header = read_as_peft(src)
    if to == "kohya" and is_dora(peft):
        raise UserError(f"{src}: cannot convert to kohya: {KOHYA_DORA_REFUSAL}")
    return write_lora(dst, peft, rank, alpha, header, to, read_embeddings(src))


def alpha_from_header(header: dict[str, str], default: float | None) -> float | None:
    """The alpha diffusers' adapter metadata records, or ``default``."""
    try:
        meta = parse_json(header.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata")
        value = next((meta[k] for k in ("unet.lora_alpha", "transformer.lora_alpha",
                                        "text_encoder.lora_alpha", "unet.alpha") if k in meta),
                     None)
        return float(value) if value is not None else default
    except (UserError, ValueError, TypeError, AttributeError):
        return default


def module_lora(module: torch.nn.Module, prefix: str, adapter: str = "default",
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A peft-injected module's adapter as canonical peft tensors, fp32, CPU;
    read from ``state`` (its parameters by name, e.g. gathered from FSDP's
    shards) when given, else from the module's own state dict."""
    peft = get_peft_model_state_dict(module, state_dict=state, adapter_name=adapter)
    return {canonical_key(f"{prefix}.{k}"): v.detach().float().cpu().contiguous()
            for k, v in peft.items()}


def save_lora(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
              metadata: dict[str, str], layouts: tuple[str, ...] = ("diffusers",),
              embeddings: dict[str, torch.Tensor] | None = None,
              text_encoder_2: torch.nn.Module | None = None, family: str | None = None,
              states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a trained adapter into ``folder`` in each of ``layouts``
    (diffusers -> pytorch_lora_weights.safetensors, kohya ->
    lora_kohya.safetensors), with the trained token ``embeddings`` if any;
    returns the first file written. SDXL: pass its second encoder and
    ``family="sdxl"`` (kohya then names the UNet modules as sd-scripts does).
    ``states``: each module's adapter parameters by name ("unet",
    "text_encoder", "text_encoder_2"), read instead of the module's own
    (a sharded module holds only its shard)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    states = states or {}
    # a FLUX family's ``unet`` is its transformer
    peft = module_lora(unet, "transformer" if family in FLUX_FAMILIES else "unet",
                       state=states.get("unet"))
    for part, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None:
            peft.update(module_lora(module, part, state=states.get(part)))
    if family:
        metadata = {**metadata, FAMILY_KEY: HEADER_FAMILY[family]}
    if family == SDXL:  # kohya's SGM names follow the model's own blocks
        metadata = {**metadata, UNET_BLOCKS_KEY: unet_blocks(unet.config)}
    config = unet.peft_config["default"]
    alpha = float(config.lora_alpha if isinstance(config, LoraConfig) else config.alpha)
    paths = [write_lora(folder / (KOHYA_WEIGHT_NAME if to == "kohya" else WEIGHT_NAME), peft,
                        config.r, alpha, metadata, to, embeddings)
             for to in layouts]
    return paths[0]


def _modules(peft: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in peft if ".lora_A." in k} | set(lycoris.modules(peft))


def load_into_pipeline(pipe: StableDiffusionPipeline, run: str | Path) -> tuple[str, ...]:
    """Load a run's LoRA with diffusers' own loader; returns the text encoders
    that hold a part of it (`text_encoder`, SDXL's `text_encoder_2`; empty:
    UNet only). Then compare what the pipeline holds with what the
    file holds: diffusers loads a partly matching file without a word (and
    may even create adapter layers the file has no weights for)."""
    path = find_lora(run)
    peft, rank, alpha, _ = read_as_peft(path)
    tensors, embeddings = split_embeddings(read_lora(path)[0])
    # diffusers skips our diffusers-layout key but refuses a kohya file's
    # bundled embedding: such a file goes in without it (alphas are in its keys)
    kohya = embeddings and detect_layout(tensors, str(path)) == "kohya"
    source = tensors if kohya else str(path.parent)
    try:
        if kind := lycoris.lycoris_kind(peft):  # diffusers' loader builds LoRA only
            attach_state(pipe, peft, kind, rank, alpha)
        else:
            with diffusers_warnings_off():  # its partial-load chatter; checked below instead
                pipe.load_lora_weights(source, weight_name=path.name, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: does not fit this base model ({first_line(e, 200)})") from None
    held = set()
    for part in ("unet", "transformer", *TEXT_PARTS):
        if ADAPTER in (getattr(getattr(pipe, part, None), "peft_config", None) or {}):
            held |= _modules(module_lora(getattr(pipe, part), part, ADAPTER))
    wanted = _modules(peft)
    if not held & wanted:
        raise UserError(f"{path}: none of its {len(wanted)} LoRA modules fit this base model")
    for what, keys in (("not loaded (no such module in this base model)", wanted - held),
                       ("created without weights in the file", held - wanted)):
        if keys:
            log.warning("%s: %d of its modules %s, e.g. %s: the LoRA acts only in part",
                        path, len(keys), what, min(keys))
    write_rows(pipe.tokenizer, pipe.text_encoder, embeddings, str(path))  # --train-token's rows
    return tuple(part for part in TEXT_PARTS if any(k.startswith(part + ".") for k in held))
