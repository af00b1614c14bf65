"""Resumable training checkpoints: LoRA tensors, optimizer, lr scheduler,
step and every RNG state, in one folder that appears atomically (written
under a temp name, fsynced, then renamed)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError, first_line
from .fileio import atomic_path, check_regular_file, fsync_dir, load_json, to_json

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
    """True when the folder's files match its manifest (every file named
    there a plain regular file of the folder: a FIFO would block the hash)."""
    try:
        manifest = load_json(path / "manifest.json", "checkpoint manifest")["sha256"]
        for name in manifest:
            if Path(name).name != name:
                return False
            check_regular_file(path / name)
        return bool(manifest) and all(_sha256(path / name) == digest
                                      for name, digest in manifest.items())
    except UserError as e:
        log.warning("%s", e)
        return False
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))


def _verified(output: Path) -> Iterator[Path]:
    """Checkpoints that verify, newest first (broken ones are named and skipped)."""
    for _, path in reversed(checkpoints(output)):
        if verify(path):
            yield path
        else:
            log.warning("checkpoint %s does not verify against its manifest; skipping it", path)


def latest_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that verifies."""
    return next(_verified(output), None)


STATE_KEYS = ("step", "optimizer", "lr_scheduler", "noise_rng", "torch_rng", "instance_order",
              "class_order")


def read_checkpoint(path: Path, modules: dict[str, torch.nn.Module]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One checkpoint's LoRA tensors and training state, checked against this
    run's LoRA before anything is loaded into it; ValueError when they do
    not fit."""
    tensors = load_file(path / "lora.safetensors")
    expected = {k: v.shape for k, v in trainable_state(modules).items()}
    if {k: v.shape for k, v in tensors.items()} != expected:
        raise ValueError("its LoRA tensors are not this run's (names or shapes differ)")
    state = torch.load(path / "state.pt", weights_only=True)
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"state.pt lacks some of {', '.join(STATE_KEYS)}")
    if not isinstance(state["step"], int) or not all(
            isinstance(state[k], torch.Tensor) for k in ("noise_rng", "torch_rng")):
        raise ValueError("state.pt holds values of the wrong types")
    return tensors, state


def latest_loadable(output: Path, modules: dict[str, torch.nn.Module]
                    ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that verifies and reads. A file replaced along
    with its manifest passes the checksums but not the reading: it is skipped
    like one that fails them, and the next older one is tried."""
    for path in _verified(output):
        try:
            return (path, *read_checkpoint(path, modules))
        except Exception as e:  # noqa: BLE001 - torch.load and safetensors raise many kinds on bad bytes
            first = first_line(e, 120)
            log.warning("checkpoint %s does not load (%s); skipping it", path, first)
    return None
