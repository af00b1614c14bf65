"""Resumable training checkpoints: LoRA tensors, optimizer, lr scheduler,
step and every RNG state, in one folder that appears atomically (written
under a temp name, fsynced, then renamed)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .io import atomic_path, fsync_dir, to_json

log = logging.getLogger(__name__)

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(output: Path, step: int, modules: dict[str, torch.nn.Module],
                    training_state: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically. Its ``manifest.json`` (checksums
    of the other files) is written last; a folder without a manifest that
    verifies is never used. On a write error (disk full) the partial folder is
    removed and the previous checkpoints stay as they were."""
    final = checkpoint_dir(output, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with atomic_path(tmp / "lora.safetensors") as f:  # keeps the umask's mode
            save_file(trainable_state(modules), f)
        torch.save({"step": step, **training_state}, tmp / "state.pt")
        manifest = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(to_json({"step": step, "sha256": manifest}))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        raise UserError(f"step {step}: could not write the checkpoint ({e.strerror or e}); "
                        f"{kept}; free disk space and rerun with --resume") from None
    return final


def verify(path: Path) -> bool:
    """True when the folder's files match its manifest."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())["sha256"]
        return bool(manifest) and all(_sha256(path / name) == digest
                                      for name, digest in manifest.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))


def latest_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that verifies (broken newer ones are skipped)."""
    for _, path in reversed(checkpoints(output)):
        if verify(path):
            return path
        log.warning("checkpoint %s does not verify against its manifest; skipping it", path)
    return None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    load_trainable_state(modules, load_file(path / "lora.safetensors"))
    return torch.load(path / "state.pt", weights_only=True)
