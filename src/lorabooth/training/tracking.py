"""`train --report-to`: the per-step metrics also go to TensorBoard or Weights
& Biases, through accelerate's trackers (the loop's metrics.jsonl stays the
record; a tracker is a view of it). Importing this module loads no torch:
the config checks --report-to with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

# accelerate's name for the run: TensorBoard's subfolder of RUN/logs, W&B's project
PROJECT = "lorabooth"


def logs_dir(output: str | Path) -> Path:
    return Path(output) / "logs"


def accelerator_options(report_to: str, output: str | Path) -> dict[str, Any]:
    """What `Accelerator(...)` needs to know of the trackers: none, or one
    writing under RUN/logs."""
    if not report_to:
        return {}
    return {"log_with": report_to, "project_dir": str(logs_dir(output))}


def start_trackers(accelerator, config: Any, output: Path, start: int) -> None:
    """Open the trackers (main process only, as accelerate does) with the run's
    settings as hyperparameters. TensorBoard hides what an earlier run into
    this folder logged after step ``start`` (a resume logs it again), as
    metrics.jsonl drops those lines."""
    if not accelerator.log_with:
        return
    if accelerator.is_main_process:  # W&B falls back to a temp folder when its dir is missing
        logs_dir(output).mkdir(exist_ok=True)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    accelerator.init_trackers(PROJECT, config=settings, init_kwargs={
        "tensorboard": {"purge_step": start + 1},
        "wandb": {"dir": str(logs_dir(output)), "name": output.name}})


def log_record(accelerator, record: dict[str, Any]) -> None:
    """One metrics.jsonl line to the trackers, at its step (unset terms left out)."""
    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None},
                    step=record["step"])
