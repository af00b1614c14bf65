"""Markdown tables from the calibrated studies' raw per-seed records
(docs/calibration/*.json, docs/toyworld/*.json): the fit's grid, the
per-subject rows, and the lever table with effect sizes and 95% bootstrap
intervals over seeds."""

from __future__ import annotations

import random
from statistics import mean

from .calibrate import TARGETS

FIGURES = (("identity", "identity sim. ↑"), ("instance", "instance sim. ↑"),
           ("pres", "PRES ↓"), ("pres_instance", "PRES (instance) ↓"), ("div", "DIV ↑"),
           ("context_acc", "context acc. ↑"))


def _cell(vals: list[float]) -> str:
    if not vals:
        return "–"
    return f"{mean(vals):.3f} [{min(vals):.2f}–{max(vals):.2f}]"


def fit_table(fit: dict) -> str:
    subjects = sorted(next(iter(fit["grid"].values()))["figures"])
    head = ["salience", "loss"] + [f"{k} (target {v:.3f})" for k, v in fit["targets"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, row in fit["grid"].items():
        cells = [("**" + s + "**") if float(s) == fit["chosen_salience"] else s, f"{row['loss']:.3f}"]
        for k in TARGETS:
            cells.append(" / ".join(f"{row['figures'][n][k]:.3f}" for n in subjects))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nEach figure: {' / '.join(subjects)}.\n"


def subject_tables(records: list[dict], methods: list[str], base: list[dict]) -> str:
    """One table per subject: methods as rows, mean [min–max] over seeds."""
    out = []
    for subject in sorted({r["subject"] for r in records}):
        head = ["method", "seeds"] + [t for _, t in FIGURES] + ["train s"]
        lines = [f"#### {subject}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for b in base:
            if b["subject"] == subject:
                lines.append("| base model (LoRA scale 0) | – | "
                             + " | ".join(f"{b[k]:.3f}" for k, _ in FIGURES) + " | – |")
        for method in methods:
            rows = [r for r in records if r["subject"] == subject and r["method"] == method]
            if rows:
                lines.append(f"| {method} | {len(rows)} | "
                             + " | ".join(_cell([r[k] for r in rows]) for k, _ in FIGURES)
                             + f" | {mean(r['train_seconds'] for r in rows):.0f} |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def bootstrap_diff(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple:
    """mean(a) - mean(b) and its 95% percentile bootstrap interval, seeds
    resampled with replacement within each arm."""
    rng = random.Random(seed)
    diffs = sorted(mean(rng.choices(a, k=len(a))) - mean(rng.choices(b, k=len(b)))
                   for _ in range(n))
    return mean(a) - mean(b), diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]


def lever_table(records: list[dict], baseline: str, levers: list[str],
                keys=("identity", "instance", "pres", "context_acc")) -> str:
    """Each lever against the baseline, paired by subject: effect = lever
    minus baseline, per figure, with the interval."""
    head = ["lever", "seeds"] + [f"Δ {k} [95% CI]" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = [r for r in records if r["method"] == baseline]
    for lever in levers:
        rows = [r for r in records if r["method"] == lever]
        if not rows:
            continue
        cells = []
        for k in keys:
            d, lo, hi = bootstrap_diff([r[k] for r in rows], [r[k] for r in base])
            mark = "**" if lo > 0 or hi < 0 else ""
            cells.append(f"{mark}{d:+.3f} [{lo:+.2f}, {hi:+.2f}]{mark}")
        lines.append(f"| {lever} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
