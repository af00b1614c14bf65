"""--save-every N: the LoRA of every Nth step as client-loadable files (the
run's layouts, a few MB), in OUTPUT/snapshots/step-NNNNNN/, beside the
resumable checkpoints. Each snapshot folder holds what a finished run folder
holds of its LoRA (the files and their metadata, with the step), so every
command that reads a run reads a snapshot: `generate RUN --step N` draws
with one, `evaluate RUN --snapshots` scores them all."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import UserError

SNAPSHOTS = "snapshots"
_NAME = re.compile(r"step-(\d{6,})")


def snapshot_dir(output: str | Path, step: int) -> Path:
    return Path(output) / SNAPSHOTS / f"step-{step:06d}"


def due(step: int, every: int, steps: int) -> bool:
    """After optimizer step ``step`` (from 1): is a snapshot due? Never at
    the last step, whose LoRA is the run's own file."""
    return bool(every) and step % every == 0 and step < steps


def list_snapshots(run: str | Path) -> dict[int, Path]:
    """Step -> snapshot folder, for the snapshots of ``run`` that hold a LoRA,
    in step order."""
    from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME

    folder = Path(run) / SNAPSHOTS
    found = {}
    if folder.is_dir():
        for child in folder.iterdir():
            m = _NAME.fullmatch(child.name)
            if m and any((child / n).is_file() for n in (WEIGHT_NAME, KOHYA_WEIGHT_NAME)):
                found[int(m.group(1))] = child
    return dict(sorted(found.items()))


def snapshot_of(run: str | Path, step: int, final_step: int | None = None) -> Path:
    """The folder holding the LoRA of ``step``: a snapshot, or the run
    itself when ``step`` is its last (``final_step``). One line when none."""
    if final_step is not None and step == final_step:
        return Path(run)
    snapshots = list_snapshots(run)
    if step in snapshots:
        return snapshots[step]
    saved = ", ".join(map(str, snapshots)) or "none (train with --save-every N)"
    last = f"; the run's own LoRA is step {final_step}" if final_step else ""
    raise UserError(f"--step {step}: {run} has no snapshot of that step (saved: {saved}{last})")
