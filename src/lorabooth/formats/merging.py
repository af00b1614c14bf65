"""Combine LoRAs trained on one base (`lorabooth merge`) and bake one into the
base weights (`lorabooth fuse`).

A LoRA module adds delta = (alpha / r) * B @ A to a weight (A: (r, in), B:
(out, r)). Merging by concatenation along the rank reproduces sum_i w_i *
delta_i exactly; ``rank=R`` re-factorises that sum by truncated SVD."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..adapters.lora import find_lora, read_lora
from ..adapters.pivotal import TRAINED_TOKENS
from ..config import MergeConfig, config_of
from ..config.checks import check_tensors
from ..core.errors import UserError
from ..core.fileio import to_json, write_json
from .flux import FLUX_FAMILIES
from .layouts import check_ranks, is_dora, read_as_peft, read_embeddings, write_lora
from .lycoris import lycoris_kind
from .sdxl import FAMILY_KEY, FAMILY_NAMES, HEADER_FAMILY, SD, SDXL, family_of

log = logging.getLogger(__name__)


def load_as_peft(path: str | Path) -> tuple[dict[str, torch.Tensor], float, dict[str, str]]:
    """Any LoRA file -> (peft-layout tensors, alpha, header)."""
    path = find_lora(path)
    peft, _, alpha, header = read_as_peft(path)
    if is_dora(peft):
        raise UserError(f"{path}: a DoRA adapter cannot be merged: DoRA rescales each merged "
                        "weight by its own magnitude, so adding or concatenating the low-rank "
                        "parts of two DoRA adapters is not DoRA; fuse each into its base instead")
    if kind := lycoris_kind(peft):
        raise UserError(f"{path}: a {'LoKr' if kind == 'lokr' else 'LoHa'} adapter cannot be "
                        "merged: its weight is a product of its factors, so adding or "
                        "concatenating the factors of two is not their sum; fuse each into its "
                        "base instead")
    check_tensors(peft, str(path))  # a NaN input would make a NaN merge (or fail the SVD)
    return peft, alpha, header


def merged_embeddings(inputs: list[str]) -> dict[str, torch.Tensor]:
    """The one input's trained token embeddings (--train-token), carried
    over unweighted: two sets of rows for the same tokens have no sum that
    means both subjects."""
    found = [(p, e) for p in inputs if (e := read_embeddings(find_lora(p)))]
    if len(found) > 1:
        raise UserError(f"merge: {found[0][0]} and {found[1][0]} both carry trained token "
                        f"embeddings (--train-token); merge at most one such LoRA")
    if found:
        log.info("%s: its trained token embeddings %s are carried over unweighted",
                 found[0][0], ", ".join(found[0][1]))
    return found[0][1] if found else {}


def modules_of(peft: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_A.", 1)[0] for k in peft if ".lora_A." in k})


def delta(peft: dict[str, torch.Tensor], module: str, alpha: float) -> torch.Tensor:
    """The weight change one module's LoRA makes: (out, in)."""
    a, b = peft[f"{module}.lora_A.weight"].float(), peft[f"{module}.lora_B.weight"].float()
    return (alpha / a.shape[0]) * b @ a


def merge_concat(loras: list[tuple[dict, float]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Stack the factors along the rank; the scale w_i * alpha_i / r_i goes
    into B, so the merged LoRA has alpha = its rank (scale 1)."""
    out = {}
    for module in sorted({m for peft, _ in loras for m in modules_of(peft)}):
        downs, ups = [], []
        for (peft, alpha), w in zip(loras, weights):
            if f"{module}.lora_A.weight" not in peft:
                continue  # this LoRA leaves the module alone: contributes zero
            a, b = peft[f"{module}.lora_A.weight"].float(), peft[f"{module}.lora_B.weight"].float()
            downs.append(a)
            ups.append(b * (w * alpha / a.shape[0]))
        out[f"{module}.lora_A.weight"] = torch.cat(downs)  # (sum r_i, in)
        out[f"{module}.lora_B.weight"] = torch.cat(ups, dim=1)  # (out, sum r_i)
    return _pad_ranks(out)


def _pad_ranks(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Modules that only some inputs touched get fewer rows; pad with zeros so
    every module shares one rank (diffusers' loader needs one)."""
    rank = max(v.shape[0] for k, v in peft.items() if ".lora_A." in k)
    for module in modules_of(peft):
        a, b = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"]
        if a.shape[0] < rank:
            pad = rank - a.shape[0]
            peft[f"{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            peft[f"{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return peft


def merge_svd(loras: list[tuple[dict, float]], weights: list[float],
              rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Truncated SVD of the summed delta to ``rank``; returns the factors
    (alpha = rank) and the relative Frobenius error over all modules."""
    out, err2, total2 = {}, 0.0, 0.0
    for module in sorted({m for peft, _ in loras for m in modules_of(peft)}):
        full = sum(w * delta(peft, module, alpha) for (peft, alpha), w in zip(loras, weights)
                   if f"{module}.lora_A.weight" in peft)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        r = min(rank, s.shape[0])
        b, a = u[:, :r] * s[:r], vh[:r]
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
        err2 += (full - b @ a).pow(2).sum().item()
        total2 += full.pow(2).sum().item()
    return _pad_ranks(out), (err2 / total2) ** 0.5 if total2 else 0.0


def check_shapes(peft_by_input: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every LoRA that touches a module must agree on its (out, in) shape;
    LoRAs of other bases differ there and cannot be added."""
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, peft in peft_by_input.items():
        for module in modules_of(peft):
            a, b = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"]
            shape = (b.shape[0], a.shape[-1])
            first, expected = seen.setdefault(module, (name, shape))
            if shape != expected or b.shape[1] != a.shape[0]:
                raise UserError(f"merge: {name} and {first} differ in shape at {module} "
                                f"({shape[0]}x{shape[1]} vs {expected[0]}x{expected[1]}); "
                                f"LoRAs of different base models cannot be merged")


def merge(inputs: list[str] | MergeConfig, weights: list[float] | None = None,
          out: str | Path | None = None, rank: int | None = None) -> dict:
    """Add LoRAs trained on the same base, weighted (default: equally), into
    one file: exactly (ranks concatenated) or re-factorised to ``rank``.
    ``merge(MergeConfig(...))`` or ``merge(inputs, weights, out, rank=)``;
    the checks are MergeConfig's."""
    c = config_of(MergeConfig, "merge", {"loras": inputs, "weights": weights, "out": out,
                                         "rank": rank})
    inputs, rank, out = c.loras, c.rank, Path(c.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a .safetensors file name")
    weights = c.weights or [1.0 / len(inputs)] * len(inputs)
    loaded = [load_as_peft(p) for p in inputs]
    families = [family_of(peft, h) for peft, _, h in loaded]
    if len(set(families)) > 1:
        other = next(i for i, f in enumerate(families) if f != families[0])
        raise UserError(f"merge: {inputs[0]} is a{'n' if families[0] == SDXL else ''} "
                        f"{FAMILY_NAMES[families[0]]} LoRA and {inputs[other]} a"
                        f"{'n' if families[other] == SDXL else ''} {FAMILY_NAMES[families[other]]} "
                        "one; LoRAs of different model families cannot be merged")
    bases = {h.get("lorabooth.base_model") for _, _, h in loaded} - {None}
    if len(bases) > 1:
        raise UserError(f"merge: the LoRAs were trained on different bases {sorted(bases)}")
    check_shapes({str(p): peft for p, (peft, _, _) in zip(inputs, loaded)})
    embeddings = merged_embeddings(inputs)
    loras = [(peft, alpha) for peft, alpha, _ in loaded]
    if rank is None:
        merged, error, method = merge_concat(loras, weights), 0.0, "concat"
    else:
        (merged, error), method = merge_svd(loras, weights, rank), f"svd-{rank}"
    check_tensors(merged, f"--out {out}")
    r = check_ranks(merged, "merged")
    meta = {"lorabooth.merge": to_json({"inputs": [str(p) for p in inputs], "weights": weights,
                                           "method": method, "relative_error": error})}
    if bases:
        meta["lorabooth.base_model"] = next(iter(bases))
    if families[0] != SD:  # a small model's LoRA may not show its family in its keys
        meta[FAMILY_KEY] = HEADER_FAMILY[families[0]]
    tokens = [h[TRAINED_TOKENS] for _, _, h in loaded if TRAINED_TOKENS in h]
    if embeddings and tokens:
        meta[TRAINED_TOKENS] = tokens[0]
    out = write_lora(Path(out), merged, r, float(r), meta, embeddings=embeddings)
    log.info("merged %d LoRAs by %s into %s (rank %d, relative error %.2e)", len(inputs),
             method, out, r, error)
    return {"method": method, "rank": r, "relative_error": error, "path": str(out)}


def _base_family(model: str) -> str | None:
    """The family of a base model ("sd1", "sdxl", "flux1", "flux2", as
    family_of names a LoRA's), without loading it."""
    from ..models.loading import model_family

    return model_family(model)


def _an(family: str) -> str:
    return f"{'an' if family == SDXL else 'a'} {FAMILY_NAMES[family]}"


def _loaded_pipeline(run: str | Path, model: str, text_scale: float = 1.0):
    """(the base with the LoRA loaded, its text encoders holding LoRA, the
    family), through drawing's own loader; a LoRA of one family and a base
    of another are refused before anything is loaded."""
    from ..adapters.lora import lora_metadata
    from ..generation import load_pipeline

    path = find_lora(run)
    tensors, header = read_lora(path)
    family = family_of(tensors, header)
    base = model or lora_metadata(path).get("base_model")
    if family != SD and not base:
        raise UserError(f"{run}: {_an(family)} LoRA that does not record its base model; pass "
                        f"--model ({_an(family)} model)")
    if base and (other := _base_family(base)) not in (None, family):
        raise UserError(f"--model {base}: {_an(other)} model; {run} is {_an(family)} LoRA; "
                        f"it fuses only into {_an(family)} model")
    if family in FLUX_FAMILIES and text_scale != 1.0 and not any(
            k.startswith(("text_encoder", "lora_te")) for k in tensors):
        raise UserError(f"--text-scale: {run} is {_an(family)} LoRA of the transformer only; "
                        "there is no text-encoder part to scale (leave --text-scale out)")
    return (*load_pipeline(run, model), family)


def fuse(run: str | Path, out: str | Path, unet_scale: float = 1.0, text_scale: float = 1.0,
         model: str = "", single_file: bool = False) -> Path:
    """A full diffusers model folder with the LoRA baked into its weights, or
    with ``single_file`` one `.safetensors` in the original layout: SD's or
    SDXL's whole checkpoint, FLUX's transformer in Black Forest Labs' names
    (what model sites distribute; its VAE and text encoders stay the base's)."""
    from ..adapters.lora import set_scales

    out = Path(out)
    if single_file and out.is_dir():
        raise UserError(f"--out {out}: is a folder; --single-file writes one .safetensors file")
    if not single_file and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; fuse writes a model folder there")
    pipe, has_text, family = _loaded_pipeline(run, model, text_scale)
    weights = set_scales(pipe, unet_scale, text_scale, has_text)  # the rows too
    components = list(weights)  # the denoiser and the text encoders holding LoRA
    if merged := [part for part in components if weights[part]]:  # scale 0: the base weights
        pipe.fuse_lora(components=merged, lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    for name in components:
        check_tensors(getattr(pipe, name).state_dict(), f"--out {out}: the fused {name}")
    if single_file and family in FLUX_FAMILIES:
        from ..models.flux_singlefile import save_bfl_transformer

        record = {"lora": str(run), "scale": unet_scale, "model": model}
        save_bfl_transformer(pipe.transformer, family, out, {"lorabooth.fuse": to_json(record)})
    elif single_file and family == SDXL:
        from .sdxl import save_sdxl_single_file

        save_sdxl_single_file(pipe, out)
    elif single_file:
        from ..models.loading import BaseModel
        from .singlefile import save_single_file

        save_single_file(BaseModel("fused", pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                                   pipe.scheduler), out)
    else:
        pipe.save_pretrained(out)
        # fuse's own record: how the folder is recognised as fuse's (plans.py)
        write_json(out / "lorabooth_fuse.json", {"lora": str(run), "unet_scale": unet_scale,
                                                  "text_scale": text_scale, "model": model})
    denoiser = "transformer" if family in FLUX_FAMILIES else "UNet"
    texts = f", text scale {text_scale:g}" if has_text else ""
    log.info("fused model (%s scale %g%s) written to %s", denoiser, unet_scale, texts, out)
    return out
