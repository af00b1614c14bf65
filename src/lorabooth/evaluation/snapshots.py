"""`evaluate RUN --snapshots`: every LoRA the run saved (train --save-every)
and its final one, each scored as `evaluate` scores a run (its drawings
cached in its own folder), then likeness, prompt following and class drift
against the step as a table and a plot, and the step to keep named by the
rule `tune` recommends with (evaluation/choice.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from ..adapters.lora import lora_metadata
from ..core.errors import UserError
from ..core.fileio import load_json, write_json, write_text
from ..reports import markdown as md
from ..reports.curves import step_curves_svg
from ..reports.markdown import html_text
from ..training.snapshots import list_snapshots
from .choice import pareto_front, recommend

log = logging.getLogger(__name__)
# figure -> (its title, higher is better)
FIGURES = {"dino": ("DINO (likeness)", True), "clip_i": ("CLIP-I", True),
           "clip_t": ("CLIP-T (prompt following)", True), "pres": ("PRES (class drift)", False),
           "div": ("DIV", True)}


def scored_steps(run: str | Path) -> dict[int, Path]:
    """Step -> the folder holding that step's LoRA: the snapshots and the
    run's own (its last step). One line when the run saved none."""
    snapshots = list_snapshots(run)
    if not snapshots:
        raise UserError(f"--snapshots: {run} holds no snapshots (train with --save-every N)")
    final = int(lora_metadata(run).get("steps") or max(snapshots) + 1)
    return {**snapshots, final: Path(run)}


def evaluate_snapshots(config, judges, evaluate: Callable[..., dict]) -> dict:
    """Score each step's LoRA with ``evaluate`` (runner's, passed in) under
    ``config`` (an EvaluateConfig) in OUT/snapshots/step-N/; write
    OUT/snapshots.json, snapshots.md and snapshots.svg. Returns what
    snapshots.json holds."""
    out = Path(config.out) if config.out else Path(config.run) / "eval"
    steps = scored_steps(config.run)
    rows = []
    for step, folder in steps.items():
        log.info("--snapshots: step %d (%s)", step, folder)
        one = dataclasses.replace(config, run=str(folder), snapshots=False, baselines=False,
                                  out=str(out / "snapshots" / f"step-{step:06d}"))
        result = evaluate(one, judges=judges)
        rows.append({"step": step, **{k: result["rows"]["lorabooth"][k]["mean"] for k in FIGURES}})
    points = [(r["dino"], r["clip_t"], r["pres"]) for r in rows]
    front = pareto_front(points)
    best = recommend(points, front)
    summary = {"run": config.run, "rows": rows, "pareto_steps": [rows[i]["step"] for i in front],
               "recommended_step": None if best is None else rows[best]["step"],
               "rule": "among the Pareto steps (DINO and CLIP-T up, PRES down) whose PRES is at "
                       "most the median PRES of all steps, the highest DINO, then CLIP-T"}
    svg = summary_svg(summary)
    write_json(out / "snapshots.json", summary)
    write_text(out / "snapshots.svg", svg)
    write_text(out / "snapshots.md", render_snapshots(summary))
    log.info("snapshots: %s; recommended step %s", out / "snapshots.md",
             summary["recommended_step"])
    return summary


def summary_svg(summary: dict) -> str:
    """Likeness, prompt following and class drift against the step, the
    recommended step marked: snapshots.svg, and the sweep report's plot."""
    rows = summary["rows"]
    return step_curves_svg([r["step"] for r in rows],
                           {FIGURES[k][0]: [r[k] for r in rows] for k in ("dino", "clip_t", "pres")},
                           summary["recommended_step"])


def curves_html(name: str, run: Path) -> str:
    """An HTML section (the sweep report, the web page's run view): the run's
    kept step and its curves, rebuilt from RUN/eval/snapshots.json with every
    value read as a number, so nothing from the file reaches the page
    unchecked; "" for a run never scored with --snapshots, a line for a file
    that cannot be read."""
    path = run / "eval" / "snapshots.json"
    if not path.is_file():
        return ""
    try:
        summary = load_json(path)
        rows = [{k: int(v) if k == "step" else float(v) for k, v in row.items()}
                for row in summary["rows"]]
        best = summary.get("recommended_step")
        best = None if best is None else int(best)
        svg = summary_svg({"rows": rows, "recommended_step": best})
    except (UserError, ValueError, KeyError, TypeError, AttributeError):
        return f"<p>{html_text(name)}: its eval/snapshots.json could not be read.</p>"
    return f"<section><h3>{html_text(name)}: keep step {best}</h3>{svg}</section>"


def render_snapshots(summary: dict) -> str:
    best, front = summary["recommended_step"], set(summary["pareto_steps"])
    head = "| step | " + " | ".join(t for t, _ in FIGURES.values()) + " | |"
    lines = [f"# Which step to keep: {md.code(summary['run'])}", "",
             f"Each saved step's LoRA scored as `evaluate` scores a run. Recommended: "
             f"**step {best}** ({summary['rule']}).", "",
             "![figures against the step](snapshots.svg)", "", head,
             "|---|" + "---|" * (len(FIGURES) + 1)]
    for r in summary["rows"]:
        mark = "**recommended**" if r["step"] == best else ("Pareto" if r["step"] in front else "")
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.3f}" for k in FIGURES)
                     + f" | {mark} |")
    lines += ["", "Per step: `snapshots/step-N/report.md` (its figures and grids); "
              "`lorabooth generate RUN --step N` draws with that step's LoRA."]
    return "\n".join(lines) + "\n"
