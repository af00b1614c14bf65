"""Resumable training checkpoints: LoRA tensors, optimizer, lr scheduler,
step and every RNG state, in one folder that appears atomically (written
under a temp name, fsynced, then renamed)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .io import _fsync_dir

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step-{step:06d}"


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor, keyed ``component/parameter name``."""
    return {f"{name}/{p_name}": p.detach().float().cpu().contiguous()
            for name, module in modules.items()
            for p_name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(modules: dict[str, torch.nn.Module],
                         state: dict[str, torch.Tensor]) -> None:
    for name, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in state.items():
            component, p_name = key.split("/", 1)
            if component == name:
                with torch.no_grad():
                    params[p_name].copy_(value)


def save_checkpoint(output: Path, step: int, modules: dict[str, torch.nn.Module],
                    training_state: dict[str, Any]) -> Path:
    final = checkpoint_dir(output, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(modules), tmp / "lora.safetensors")
    torch.save({"step": step, **training_state}, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    root = output / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.pt").is_file()
             and (p / "lora.safetensors").is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    load_trainable_state(modules, load_file(path / "lora.safetensors"))
    return torch.load(path / "state.pt", weights_only=True)
