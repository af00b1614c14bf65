"""LoRA adapters: attach with peft, read files, load
into a pipeline and set the UNet / text-encoder scales separately."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import StableDiffusionPipeline
from peft import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from ..core.errors import UserError
from ..core.fileio import check_regular_file, load_pickle_safely, parse_json
from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME, flux
from ..formats.lycoris import is_adapter_parameter
from .pivotal import scale_rows

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# --targets: the feed-forward Linears of each transformer block, then (LoCon,
# as kohya's sd-scripts and LyCORIS add it) the ResNet blocks' convolutions
# and time projection and the transformers' 1x1/Linear in and out projections
UNET_MLP_TARGETS = UNET_TARGETS + ("ff.net.0.proj", "ff.net.2")
UNET_ALL_TARGETS = UNET_MLP_TARGETS + ("proj_in", "proj_out", "conv1", "conv2",
                                       "conv_shortcut", "time_emb_proj")
TARGETS = {"attn": UNET_TARGETS, "attn-mlp": UNET_MLP_TARGETS, "all": UNET_ALL_TARGETS}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "lorabooth"


def denoiser_targets(family: str, flow: bool, which: str = "attn") -> tuple[str, ...] | str:
    """--targets for a family: UNet module-name suffixes (SD 1.x, SDXL) or a
    FLUX family's regular expression (``all``: every block Linear)."""
    if flow:
        return flux.target_modules(family, mlp=which != "attn", every=which == "all")
    return TARGETS[which]


def lora_config(rank: int, alpha: float, targets: tuple[str, ...] | str,
                dora: bool = False, kind: str = "lora") -> PeftConfig:
    """``targets``: module-name suffixes, or one regular expression matched
    against whole names (the FLUX families', formats/flux.target_modules).
    ``kind``: lora (``dora`` for DoRA), lokr or loha."""
    modules = targets if isinstance(targets, str) else list(targets)
    if kind == "lokr":  # peft zeros w1 (or w1_a): a no-op at step 0 too
        return LoKrConfig(r=rank, alpha=alpha, target_modules=modules)
    if kind == "loha":  # peft zeros w2_a: a no-op at step 0 too
        return LoHaConfig(r=rank, alpha=alpha, target_modules=modules)
    # Gaussian init of A, zeros for B (peft's default for B): the adapter starts
    # as an exact no-op, so step 0 draws the base model's images. DoRA's
    # magnitude starts at the weight's row norms, so it starts as a no-op too.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=modules, use_dora=dora)


def adapter_kind(adapter: str) -> tuple[bool, str]:
    """--adapter -> (DoRA or not, peft's adapter kind: lora, lokr or loha)."""
    return adapter == "dora", "lora" if adapter in ("lora", "dora") else adapter


def add_unet_lora(unet: torch.nn.Module, rank: int, alpha: float, dora: bool = False,
                  targets: tuple[str, ...] | str = UNET_TARGETS, kind: str = "lora") -> None:
    """LoRA (or ``kind`` lokr/loha) on the denoiser: the UNet's attention (SD
    1.x, SDXL) or ``targets``, a transformer's with the family's."""
    unet.add_adapter(lora_config(rank, alpha, targets, dora, kind))


def add_text_lora(text_encoder: torch.nn.Module, rank: int, alpha: float,
                  dora: bool = False, kind: str = "lora") -> None:
    # peft's injector directly: transformers' own add_adapter needs a newer
    # peft than is released for some transformers versions.
    inject_adapter_in_model(lora_config(rank, alpha, TEXT_TARGETS, dora, kind), text_encoder)


def attach_state(pipe, peft: dict[str, torch.Tensor], kind: str, rank: int, alpha: float) -> None:
    """A LoKr/LoHa file's tensors (peft's names, `unet.…`, `text_encoder.…`)
    into the pipeline's parts as adapter ``ADAPTER``, on exactly the modules
    the file names: diffusers' `load_lora_weights` builds LoRA layers only."""
    for part in ("unet", "text_encoder", "text_encoder_2"):
        state = {k[len(part) + 1:]: v for k, v in peft.items() if k.startswith(part + ".")}
        module = getattr(pipe, part, None)
        if not state or module is None:
            continue
        if part != "unet" and not hasattr(module, "text_model"):  # transformers 5's names
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        names = tuple(sorted({k.rpartition(".")[0] for k in state}))
        config = lora_config(rank, alpha, names, kind=kind)
        if part == "unet":
            module.add_adapter(config, adapter_name=ADAPTER)
        else:
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        set_peft_model_state_dict(module, state, adapter_name=ADAPTER)


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_adapter_parameter(n)]


def freeze_all_but_lora(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter_parameter(name))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such LoRA file")
    check_regular_file(path, "LoRA file")  # before safetensors opens it: a FIFO would block
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data = load_pickle_safely(path)
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise UserError(f"{path}: not a LoRA state dict (expected names -> tensors)")
        return data, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise UserError(f"{path}: no such LoRA file") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors LoRA file ({e})") from None


def find_lora(run: str | Path) -> Path:
    """A LoRA file, or the one in a run folder (diffusers layout first, then kohya)."""
    run = Path(run)
    if run.exists() and not run.is_dir():  # a file (read_lora refuses a FIFO or device)
        return run
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        if (run / name).is_file():
            return run / name
    raise UserError(f"{run}: no LoRA here (expected {WEIGHT_NAME}; did training finish?)")


def lora_fingerprint(run: str | Path) -> str:
    """The first 12 hex digits of the LoRA file's sha256: images cached under
    a name holding it are drawn afresh when a run is retrained in place."""
    digest = hashlib.sha256()
    with find_lora(run).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def lora_metadata(run: str | Path) -> dict[str, Any]:
    """Our header fields (values were stored as strings; JSON ones decoded)."""
    _, header = read_lora(find_lora(run))
    out: dict[str, Any] = {}
    for k, v in header.items():
        if k.startswith("lorabooth."):
            try:
                out[k.removeprefix("lorabooth.")] = parse_json(v, k)
            except UserError:
                out[k.removeprefix("lorabooth.")] = v
    return out


@contextmanager
def fused(pipe: StableDiffusionPipeline, unet_scale: float, text_scale: float,
          text_parts: tuple[str, ...], text2_scale: float | None = None) -> Iterator[None]:
    """The adapters merged into the base weights at these scales while the
    block runs, then taken out again: drawing at fixed scales then costs what
    the base model costs (no extra LoRA matmuls per layer). Unfusing
    subtracts what fusing added, so the weights come back to within float
    rounding. A component at scale 0 is not fused: its adapter is off."""
    weights = set_scales(pipe, unet_scale, text_scale, text_parts, text2_scale)
    merged = [part for part, scale in weights.items() if scale]
    if merged:
        pipe.fuse_lora(components=merged, lora_scale=1.0, adapter_names=[ADAPTER])
    try:
        yield
    finally:
        if merged:
            pipe.unfuse_lora(components=merged)


def set_scales(pipe: StableDiffusionPipeline, unet_scale: float, text_scale: float,
               text_parts: tuple[str, ...], text2_scale: float | None = None) -> dict[str, float]:
    """Scale the UNet and text-encoder adapters independently; returns the
    scale of each component. ``text_parts``: the text encoders holding LoRA
    (diffusers' names); ``text_scale`` applies to each, SDXL's second
    (`text_encoder_2`) takes ``text2_scale`` when given. --train-token's
    rows follow ``text_scale``.

    Scale 0 is the base model: a component at 0 has its adapter switched
    off, not multiplied by 0 (a DoRA layer at scale 0 would still apply its
    trained magnitudes), and the identifier's rows are the base model's."""
    per_encoder = {"text_encoder_2": text_scale if text2_scale is None else text2_scale}
    weights = {denoiser_name(pipe): unet_scale, **{part: per_encoder.get(part, text_scale)
                                                   for part in text_parts}}
    pipe.set_adapters([ADAPTER], adapter_weights=[weights])
    for part, scale in weights.items():
        switch_adapters(getattr(pipe, part), bool(scale))
    scale_rows(pipe.text_encoder, text_scale)
    return weights


def denoiser_name(pipe) -> str:
    """The pipeline's denoiser component: ``unet`` (SD 1.x, SDXL) or
    ``transformer`` (FLUX); --unet-scale scales either."""
    return "transformer" if "transformer" in pipe.components else "unet"


def switch_adapters(module: torch.nn.Module, on: bool) -> None:
    """Every peft adapter layer in ``module`` on, or off (the base layer's
    output, whatever the adapter holds)."""
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(on)
