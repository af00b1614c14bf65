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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import UserError, first_line
from ..core.fileio import atomic_path, fsync_dir, to_json

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
FILES = ("lora.safetensors", "state.pt")  # what a manifest vouches for
MAX_MANIFEST_BYTES = 1 << 20  # a few hundred bytes of checksums and settings


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
                    training_state: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically. Its ``manifest.json`` (checksums
    of the other files, and the ``settings`` it was trained with: what a
    --resume from it is checked against) is written last; a folder without a
    manifest that verifies is never used. On a write error (disk full) the
    partial folder is removed and the previous checkpoints stay as they were."""
    final = checkpoint_dir(output, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with atomic_path(tmp / "lora.safetensors") as f:  # keeps the umask's mode
            save_file(trainable_state(modules), f)
        torch.save({"step": step, **training_state}, tmp / "state.pt")
        manifest = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(to_json({"step": step, "sha256": manifest,
                                                    "config": settings}))
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


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint folder's manifest.json when it has the shape this module
    writes (a step, a sha256 string for each of FILES, and optionally the
    settings as a table); None for anything else: missing, not a regular
    file, too large, not JSON, nested too deeply, or of other types."""
    file = path / "manifest.json"
    try:
        if not file.is_file():  # a FIFO would block the read, /dev/zero never end
            return None
        with file.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        manifest = json.loads(data) if len(data) <= MAX_MANIFEST_BYTES else None
    except (OSError, ValueError, RecursionError):  # RecursionError: [[[[...]]]]
        return None
    if not isinstance(manifest, dict):
        return None
    sums, settings = manifest.get("sha256"), manifest.get("config", {})
    if (type(manifest.get("step")) is not int or not isinstance(sums, dict)
            or sorted(sums) != sorted(FILES) or not all(isinstance(v, str) for v in sums.values())
            or not isinstance(settings, dict)):
        return None
    return manifest


def verify(path: Path) -> bool:
    """True when the folder's files match its manifest."""
    manifest = read_manifest(path)
    try:
        return manifest is not None and all(
            (path / name).is_file() and _sha256(path / name) == digest
            for name, digest in manifest["sha256"].items())
    except OSError:
        return False


def checkpoint_settings(path: Path) -> dict[str, Any] | None:
    """The settings the checkpoint was trained with; None for one written
    before manifests held them (or one whose manifest is unreadable)."""
    manifest = read_manifest(path)
    return manifest.get("config") if manifest else None


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    try:
        names = [p.name for p in root.iterdir()]
    except OSError as e:
        raise UserError(f"--output {output}: cannot list {root} ({e.strerror})") from None
    return sorted((int(m.group(1)), root / name) for name in names if (m := STEP_DIR.match(name)))


def _verified(output: Path, skipped: list[str] | None = None) -> Iterator[Path]:
    """Checkpoints that verify, newest first. Broken ones are skipped and
    named: in ``skipped`` when given, else in a warning each."""
    for _, path in reversed(checkpoints(output)):
        if verify(path):
            yield path
        elif skipped is not None:
            skipped.append(f"checkpoint {path} does not verify against its manifest")
        else:
            log.warning("checkpoint %s does not verify against its manifest; skipping it", path)


def latest_checkpoint(output: Path, skipped: list[str] | None = None) -> Path | None:
    """The newest checkpoint that verifies."""
    return next(_verified(output, skipped), None)


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


def latest_loadable(output: Path, modules: dict[str, torch.nn.Module], skipped: list[str]
                    ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that verifies and reads. A file replaced along
    with its manifest passes the checksums but not the reading: it is skipped
    like one that fails them, and the next older one is tried. Each skipped
    one is named in ``skipped``."""
    for path in _verified(output, skipped):
        try:
            return (path, *read_checkpoint(path, modules))
        except Exception as e:  # noqa: BLE001 - torch.load and safetensors raise many kinds on bad bytes
            skipped.append(f"checkpoint {path} does not load ({first_line(e, 120)})")
    return None
