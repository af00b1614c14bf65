"""Which step to keep, in the calibrated toy world (issue 29 §5): the
class-image recipe trained past its usual length with `--save-every`, every
saved step scored by the harness's judges (identity, prompt following as
context accuracy, class drift as PRES), and the step `evaluate --snapshots`
would recommend (evaluation/choice.py) read off the seeds' means."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..core.fileio import write_json
from ..evaluation.choice import recommend
from ..generation import Setting, load_pipeline
from ..reports.curves import step_curves_svg
from ..training.loop import train
from ..training.snapshots import list_snapshots
from .subject_study import METHODS, Cell, Harness
from .subjects import Subject

log = logging.getLogger(__name__)
CURVE_STEPS, SAVE_EVERY = 400, 50  # twice the harness's 200 steps, a point every 50
FIGURES = ("identity", "instance", "context_acc", "pres")


def step_records(h: Harness, subject: Subject, salience: float, seed: int) -> list[dict]:
    """Train once (with snapshots), score each saved step and the last once;
    the records, cached beside the run."""
    train_over = {"steps": CURVE_STEPS, "save_every": SAVE_EVERY}
    cell = Cell(subject, "step-curve", {**METHODS["class-image-prior"], **train_over}, salience,
                seed)
    config = h.config(cell)
    folder = Path(config.output)
    done = folder / "step_scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not (folder / "train_seconds.json").is_file():
        t0 = time.perf_counter()
        train(config)
        write_json(folder / "train_seconds.json", {"seconds": round(time.perf_counter() - t0, 1)})
    records = []
    for step, where in {**list_snapshots(folder), CURVE_STEPS: folder}.items():
        pipe, has_text = load_pipeline(where)
        records.append({"subject": subject.name, "seed": seed, "salience": salience,
                        "step": step, **h.score(pipe, has_text, subject, Setting(1, 1, 5.0))})
        log.info("%s step %d: %s", cell.name, step,
                 {k: round(records[-1][k], 3) for k in FIGURES})
    write_json(done, records)
    return records


def curve(records: list[dict], subject: str) -> tuple[list[int], dict[str, list[float]], int]:
    """(steps, figure -> its mean over seeds at each step, recommended step)
    for one subject; the recommendation by choice.recommend on (identity,
    context accuracy, PRES)."""
    mine = [r for r in records if r["subject"] == subject]
    steps = sorted({r["step"] for r in mine})
    means = {k: [_mean([r[k] for r in mine if r["step"] == s]) for s in steps] for k in FIGURES}
    points = list(zip(means["identity"], means["context_acc"], means["pres"]))
    return steps, means, steps[recommend(points)]


def render_curves(records: list[dict], svg_name) -> list[str]:
    """The report's section: per subject a table of the seeds' means at each
    step, the recommended step, and its plot (written by the caller as
    ``svg_name(subject)``)."""
    lines = []
    for subject in sorted({r["subject"] for r in records}):
        steps, means, best = curve(records, subject)
        seeds = sorted({r["seed"] for r in records if r["subject"] == subject})
        lines += [f"#### {subject} ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n",
                  f"Recommended: **step {best}**.\n",
                  f"![figures against the step]({svg_name(subject)})\n",
                  "| step | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
        for i, s in enumerate(steps):
            lines.append(f"| {s}{' (recommended)' if s == best else ''} | "
                         + " | ".join(f"{means[k][i]:.3f}" for k in FIGURES) + " |")
        lines.append("")
    return lines


def curve_svg(records: list[dict], subject: str) -> str:
    steps, means, best = curve(records, subject)
    names = {"identity": "identity (likeness)", "context_acc": "context accuracy "
             "(prompt following)", "pres": "PRES (class drift)"}
    return step_curves_svg(steps, {names[k]: means[k] for k in names}, best)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
