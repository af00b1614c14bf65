"""Load a diffusers model's frozen weights straight into the compute dtype,
one tensor at a time, so no full-precision copy of the model is ever resident.

diffusers' ``from_pretrained(torch_dtype=bf16)`` converts from a
memory-mapped file: every page it reads stays in the process's RSS until
the mapping closes, so the 3.44 GB fp32 SD 1.5 UNet sits next to its
1.72 GB bf16 copy at the peak (benchmarks/RESULTS.md). Here the module is
built empty (meta device), every tensor is read with plain ``pread(2)``
(safetensors' "pread" backend: no mapping, nothing left behind), cast and
put in place, and the full-precision tensor is freed before the next one
is read. Any ``ModelMixin`` whose config builds it works (SD 1.5's and
SDXL's ``UNet2DConditionModel`` alike).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open

from ..core.errors import UserError
from ..core.fileio import load_json

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"  # sharded checkpoints (an fp32 SDXL UNet is 10.3 GB)


def weight_files(folder: Path) -> dict[Path, set[str] | None] | None:
    """Each safetensors file of a diffusers component folder -> the keys to
    read from it (None: all of them); None when the folder keeps its weights
    some other way (``.bin``, only a ``.fp16`` variant)."""
    if (folder / WEIGHTS).is_file():
        return {folder / WEIGHTS: None}
    if not (folder / INDEX).is_file():
        return None
    try:
        weight_map = load_json(folder / INDEX, "--model")["weight_map"]
    except (KeyError, TypeError) as e:
        raise UserError(f"--model: {folder / INDEX} is not a safetensors index ({e})") from None
    files: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(folder / name, set()).add(key)
    return files


def load_streamed(cls, folder: Path, dtype: torch.dtype, name_or_path: str | Path = "",
                  precision: str = "auto"):
    """``cls`` (a diffusers ``ModelMixin``) from ``folder``, floating-point
    weights in ``dtype``, read one tensor at a time. None where this cannot
    be done the same way ``from_pretrained`` would (no safetensors weights;
    a class that keeps some modules fp32): the caller falls back to it.
    A quantised ``precision`` (--base-precision) quantises each Linear as
    soon as its tensors are in (quantise.py)."""
    from .quantise import mark_quantised, streamed_quantiser

    files = weight_files(folder)
    if files is None or getattr(cls, "_keep_in_fp32_modules", None):
        return None
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    missing = set(model.state_dict())
    after = streamed_quantiser(precision)
    for path, keys in files.items():
        missing -= _fill(model, path, keys, dtype, after)
    if missing:
        raise UserError(f"--model: {folder} lacks {len(missing)} of the model's weights "
                        f"(e.g. {sorted(missing)[0]}): not a {cls.__name__} of this config")
    # what from_pretrained leaves behind, so configs and saved files match
    model.register_to_config(_name_or_path=name_or_path or folder)
    mark_quantised(model, precision)
    return model.eval()


def _fill(model: torch.nn.Module, path: Path, keys: set[str] | None,
          dtype: torch.dtype, after=None) -> set[str]:
    """Put the tensors ``keys`` (None: all) of ``path`` into ``model``, each
    cast to ``dtype`` as it is read, then ``after(model, key)`` if given;
    returns the names set."""
    wanted = set(model.state_dict())
    done = set()
    try:
        with safe_open(path, framework="pt", backend="pread") as f:
            # file order: the reads walk the file front to back
            for key in [k for k in f.offset_keys() if keys is None or k in keys]:
                if key not in wanted:
                    log.warning("%s: %s is not a weight of %s; ignored", path, key,
                                type(model).__name__)
                    continue
                # the full-precision tensor lives only for this call: nothing
                # keeps it, and the cast copy replaces the meta parameter
                set_module_tensor_to_device(model, key, "cpu", value=f.get_tensor(key),
                                            dtype=dtype, clear_cache=False)
                if after is not None:
                    after(model, key)
                done.add(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--model: cannot read {path} ({str(e).splitlines()[0]})") from None
    return done


def load_unet(folder: Path, dtype: torch.dtype, name_or_path: str | Path,
              precision: str = "auto"):
    """The UNet of a diffusers model folder in ``dtype``: streamed when that
    is not fp32 or when --base-precision quantises it (the fp32 path, which
    copies nothing, stays diffusers' own)."""
    from diffusers import UNet2DConditionModel

    unet = None
    if dtype != torch.float32 or precision != "auto":
        unet = load_streamed(UNet2DConditionModel, folder, dtype, name_or_path, precision)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(folder.parent, subfolder=folder.name,
                                                    torch_dtype=dtype)
    return unet
