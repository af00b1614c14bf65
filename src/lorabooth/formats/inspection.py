"""`lorabooth inspect FILE`: what a LoRA file holds and whether the clients
users draw with would load every key of it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.lora import read_lora
from ..adapters.pivotal import split_embeddings
from ..core.errors import UserError
from ..core.visible import visible
from .clients import CLIENTS, FluxNames, ModelNames, sd15_names, sdxl_names, unloaded_by_client
from .flux import FLUX_FAMILIES, FLUX_NAMES
from .layouts import alpha_from_header, check_ranks, detect_layout, old_text_keys, read_as_peft
from .lycoris import modules as lycoris_modules
from .sdxl import FAMILY_NAMES, SDXL, family_of

# cross-attention width (the text encoder's hidden size) -> base family
CROSS_ATTENTION = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}
SHOWN_KEYS = 10


@dataclass
class Summary:
    path: str
    layout: str
    architecture: str
    groups: dict[str, tuple[int, int, float | None]]  # group -> (modules, rank, alpha)
    old_spelling: int                                 # keys without `text_model`
    metadata: dict[str, str]
    unloaded: dict[str, list[str]] = field(default_factory=dict)  # client -> keys
    checked_against: str = ""
    embeddings: dict[str, tuple[int, ...]] = field(default_factory=dict)  # trained token -> shape
    unchecked: str = ""  # why the clients were not checked, where no base was at hand


def _module_and_group(key: str) -> tuple[str, str] | None:
    """(module name, group) for the key holding a module's down/A matrix."""
    m = re.match(r"(.+?)(?:\.lora_down\.weight|\.lora_A\.weight|_lora\.down\.weight|"
                 r"\.lora\.down\.weight|\.lora_linear_layer\.down\.weight)$", key)
    return (m[1], _group(m[1])) if m else None


def _group(module: str) -> str:
    """The table's group of a module name: a text encoder, or the denoiser's part."""
    text = re.match(r"(text_encoder_2|text_encoder|lora_te2|lora_te1|lora_te)[._]", module)
    if text:
        return {"lora_te": "text_encoder", "lora_te1": "text_encoder",
                "lora_te2": "text_encoder_2"}.get(text[1], text[1])
    if stream := re.match(r"transformer\.(single_transformer_blocks|transformer_blocks)", module):
        return ("transformer single-stream" if stream[1].startswith("single")
                else "transformer double-stream")
    block = re.search(r"(down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks)",
                      module)
    return f"unet {block[1] if block else 'other'}"


def _lycoris_rank(parts: dict[str, torch.Tensor]) -> int:
    """A LyCORIS module's rank: its low-rank factor's (``hada_w1_b``,
    ``lokr_w2_b``, ``lokr_w1_b``); 0 for a LoKr whose factors are whole."""
    for factor in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if factor in parts:
            return parts[factor].shape[0]
    return 0


def _group_table(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, float | None]]:
    """group -> (modules, largest rank, alpha or None where mixed or absent);
    LoRA modules by their down matrix, LyCORIS ones by their parts."""
    ranks = {found[0]: down.shape[0] for key, down in tensors.items()
             if (found := _module_and_group(key))}
    ranks |= {module: _lycoris_rank(parts) for module, parts in lycoris_modules(tensors).items()}
    groups: dict[str, list] = {}
    for module, rank in ranks.items():
        alpha = tensors.get(module + ".alpha")
        entry = groups.setdefault(_group(module), [0, set(), set()])
        entry[0] += 1
        entry[1].add(rank)
        entry[2].add(float(alpha) if alpha is not None else None)
    return {g: (n, max(ranks), next(iter(alphas)) if len(alphas) == 1 else None)
            for g, (n, ranks, alphas) in sorted(groups.items())}


def guess_architecture(tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> str:
    family = family_of(tensors, header)
    if family == SDXL:
        return "SDXL"
    if family in FLUX_FAMILIES:
        return FLUX_NAMES[family]
    for key, value in tensors.items():
        if re.search(r"attn2[._](processor[._])?to_k", key) and value.ndim == 2 and (
                "down" in key.rsplit("attn2", 1)[1] or "lora_A" in key):
            width = value.shape[1]
            return CROSS_ATTENTION.get(width, f"unknown (cross-attention width {width}; "
                                              "e.g. lorabooth's tiny or toy model)")
    return "unknown (no cross-attention LoRA to tell by)"


def inspect_lora(path: str | Path, names: ModelNames | None = None,
                 names_label: str = "") -> Summary:
    """Read ``path``; check it against ``names`` (a model's weights) or, for SD
    1.x and SDXL files, against Stable Diffusion 1.5's or SDXL 1.0's."""
    path = Path(path)
    raw, header = read_lora(path)
    tensors, embeddings = split_embeddings(raw)  # --train-token's rows: no LoRA module
    layout = detect_layout(tensors, str(path))
    if family_of(tensors, header) in FLUX_FAMILIES:
        # kohya's fused qkv holds rank n*r: the groups as the modules trained them
        peft, _, alpha, _ = read_as_peft(path)
        groups = _group_table({k.replace(".lora_A.", ".lora_down."): v for k, v in peft.items()
                               if ".lora_A." in k})
    else:
        check_ranks(tensors, str(path))
        groups = _group_table(tensors)
        alpha = alpha_from_header(header, None)
    if alpha is not None:
        groups = {g: (n, r, a if a is not None else alpha) for g, (n, r, a) in groups.items()}
    summary = Summary(str(path), layout, guess_architecture(tensors, header), groups,
                      len(old_text_keys(tensors)),
                      {k: v for k, v in header.items() if k != "lora_adapter_metadata"},
                      embeddings={w: tuple(v.shape) for w, v in embeddings.items()})
    if names is None and summary.architecture == "Stable Diffusion 1.x":
        names, names_label = sd15_names(), "Stable Diffusion 1.5"
    elif names is None and summary.architecture == "SDXL":
        names, names_label = sdxl_names(), "SDXL 1.0"
    elif names is None and (flux := family_of(tensors, header)) in FLUX_FAMILIES:
        names, names_label, summary.unchecked = _published_flux(flux, peft)
    if names is not None:
        summary.unloaded = unloaded_by_client(
            tensors if isinstance(names, FluxNames) else list(tensors), names)
        summary.checked_against = names_label
    return summary


# The published transformers a FLUX LoRA is checked against without --model
PUBLISHED_FLUX = {"flux1": "FLUX.1 [dev]", "flux2": "FLUX.2 [klein] 4B"}


def _published_flux(family: str, peft: dict[str, torch.Tensor]):
    """(names, label, "") of the family's published transformer (its
    configs on the meta device: no weights), or (None, "", why not) when the
    LoRA's width is not that model's (a small or random model's LoRA)."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    from ..models.flux_architecture import FLUX1_DEV_TRANSFORMER, FLUX2_KLEIN_TRANSFORMER
    from .clients import flux_names

    config = FLUX2_KLEIN_TRANSFORMER if family == "flux2" else FLUX1_DEV_TRANSFORMER
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    # every double-stream attention projection reads the hidden width
    widths = {v.shape[1] for k, v in peft.items()
              if re.search(r"\.transformer_blocks\.\d+\.attn\..+\.lora_A\.", k)}
    if widths and widths != {hidden}:
        return None, "", (f"its width {min(widths)} is not {PUBLISHED_FLUX[family]}'s "
                          f"{hidden}: a smaller model's LoRA")
    cls = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
    with init_empty_weights():
        transformer = cls.from_config(config)
    return flux_names(transformer), PUBLISHED_FLUX[family], ""


def names_for_model(file: str | Path, model: str) -> tuple[ModelNames | FluxNames, str]:
    """--model's weight names to check ``file`` against; a base of another
    family than the LoRA's is refused in one line before it loads."""
    from ..models.loading import load_base, model_family
    from .clients import is_sdxl_folder, model_names, sdxl_folder_names

    tensors, header = read_lora(Path(file))
    lora = family_of(split_embeddings(tensors)[0], header)
    base = model_family(model)
    if base is not None and base != lora:
        a = {f: "an" if f == SDXL else "a" for f in (base, lora)}
        raise UserError(f"--model {model}: {a[base]} {FAMILY_NAMES[base]} model; {file} is "
                        f"{a[lora]} {FAMILY_NAMES[lora]} LoRA: check it against a model of its "
                        "own family")
    if is_sdxl_folder(model):
        return sdxl_folder_names(model), model
    loaded = load_base(model)
    return model_names(loaded.unet, loaded.text_encoder, loaded.text_encoder_2), model


def render(s: Summary) -> str:
    lines = [f"file: {s.path}", f"layout: {s.layout}", f"base architecture (guessed): {s.architecture}"]
    denoiser = ("transformer", "transformer") if any(
        g.startswith("transformer") for g in s.groups) else ("unet", "UNet")
    unet = sum(n for g, (n, _, _) in s.groups.items() if g.startswith(denoiser[0]))
    text = sum(n for g, (n, _, _) in s.groups.items() if not g.startswith(denoiser[0]))
    lines.append(f"modules: {unet} {denoiser[1]}, {text} text encoder")
    encoders = [g for g in s.groups if not g.startswith(denoiser[0])]
    lines.append(f"text encoders with LoRA: {', '.join(encoders) if encoders else 'none'}")
    for group, (n, rank, alpha) in s.groups.items():
        lines.append(f"  {group}: {n} modules, rank {rank or 'full (Kronecker factors)'}, alpha "
                     f"{'mixed or unknown' if alpha is None else f'{alpha:g}'}")
    if s.old_spelling:
        lines.append(f"text-encoder names: {s.old_spelling} keys lack `text_model` (transformers 5 "
                     "spelling); clients drop them: `lorabooth convert` repairs the file")
    if s.layout != "kohya" and any(a is not None and a != r for _, r, a in s.groups.values()):
        lines.append("alpha: kept in the header only, which diffusers reads and other clients "
                     "ignore (they apply alpha = rank); use the kohya file there")
    for word, shape in sorted(s.embeddings.items()):
        lines.append(f"trained token {word!r}: {shape[0]} embedding vector(s) of {shape[-1]} "
                     f"(--train-token); lorabooth generate and AUTOMATIC1111 (kohya file) use "
                     f"them, ComfyUI skips them, diffusers: see the run's README")
    for key, value in sorted(s.metadata.items()):
        lines.append(f"meta {key}: {value[:200]}")
    if not s.checked_against:
        why = s.unchecked or ("the ComfyUI/AUTOMATIC1111 rules here are SD 1.x's, SDXL's and "
                              "FLUX's")
        lines.append(f"clients: not checked ({why}; --model names a base to check against)")
    for client in CLIENTS:
        if client not in s.unloaded:
            continue
        missing = s.unloaded[client]
        lines.append(f"{client} ({s.checked_against}): "
                     + ("every key maps to a weight" if not missing else
                        f"{len(missing)} keys would not load"))
        lines += [f"  not loaded: {k}" for k in missing[:SHOWN_KEYS]]
        if len(missing) > SHOWN_KEYS:
            lines.append(f"  … and {len(missing) - SHOWN_KEYS} more")
    # the path, keys and metadata come from a downloaded file: show its control
    # characters (a line break inside a value too) instead of sending them
    return "\n".join(visible(line) for line in lines)


def check_summary(s: Summary) -> None:
    """One line, exit 2, when a client would drop keys."""
    bad = {c: len(keys) for c, keys in s.unloaded.items() if keys}
    if bad:
        counts = ", ".join(f"{n} keys in {c}" for c, n in bad.items())
        raise UserError(f"{s.path}: would not load completely ({counts}); "
                        f"`lorabooth convert {s.path} OUT --to kohya` repairs files "
                        "written with the old text-encoder names")
