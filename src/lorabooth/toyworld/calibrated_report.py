"""Markdown tables from the calibrated studies' raw per-seed records
(docs/calibration/*.json, docs/toyworld/*.json): the fit's grid, the
per-subject rows, and the lever table (effects, 95% bootstrap intervals
and words by `evaluation.verdict`)."""

from __future__ import annotations

from statistics import mean

from ..evaluation.verdict import compare
from .calibrate import PUBLISHED, TARGETS

FIGURES = (("identity", "identity sim. ↑"), ("instance", "instance sim. ↑"),
           ("pres", "PRES ↓"), ("pres_instance", "PRES (instance) ↓"), ("div", "DIV ↑"),
           ("context_acc", "context acc. ↑"))


def _cell(vals: list[float]) -> str:
    if not vals:
        return "–"
    return f"{mean(vals):.3f} [{min(vals):.2f}–{max(vals):.2f}]"


def fit_table(fit: dict) -> str:
    subjects = sorted(next(iter(fit["grid"].values()))["figures"])
    head = ["salience", "loss"] + [f"{k} (target {fit['targets'][k]:.3f})" for k in TARGETS]
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


def lever_table(records: list[dict], baseline: str, levers: list[str],
                keys=("identity", "instance", "pres", "context_acc")) -> str:
    """Each lever against the baseline by the project's one rule
    (`evaluation.verdict.compare`): runs paired by (subject, seed), effect =
    lever minus baseline, 95% bootstrap interval, and its word."""
    head = ["lever", "runs"] + [f"{k}: lever − baseline" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lever in levers:
        rows = {(r["subject"], r["seed"]): r for r in records if r["method"] == lever}
        base = {(r["subject"], r["seed"]): r for r in records
                if r["method"] == baseline and (r["subject"], r["seed"]) in rows}
        if not rows or not base:
            continue
        cells = [compare({k: v[key] for k, v in rows.items()},
                         {k: v[key] for k, v in base.items()}).text() for key in keys]
        lines.append(f"| {lever} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def twin_table(instance_judge: dict) -> str:
    """The attribute-twin check (docs/toyworld/instance_judge.json): each
    judge's similarity to the subject's photos of its own held-out views,
    its twin's, unmarked ones and the class in other combinations."""
    judges = instance_judge["twin_check"]
    cols = ("own_held_out_views", "twin_views", "unmarked_views", "class_images")
    lines = ["| subject | judge | own held-out views | twin | unmarked | class |",
             "|---|---|---|---|---|---|"]
    for subject in next(iter(judges.values())):
        for i, (judge, rows) in enumerate(judges.items()):
            name = subject if i == 0 else ""
            lines.append(f"| {name} | {judge} | "
                         + " | ".join(f"{rows[subject][c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def distance_table(distances: dict) -> str:
    """How far 'a photo of sks ball' reaches from 'a photo of a ball' at each
    salience (docs/calibration/salience_distance.json)."""
    grid = distances["distance"]
    return ("| salience s | " + " | ".join(grid) + " |\n|---|" + "---|" * len(grid) + "\n"
            "| distance | " + " | ".join(f"{v:.3f}" for v in grid.values()) + " |\n")


def kept_table(records: list[dict], base: list[dict]) -> str:
    """Instance similarity kept by the class-image prior as a share of the
    no-prior run's, per held-out subject (means over seeds)."""
    lines = ["| subject | seeds | base | no prior | class-image prior | kept | "
             "PRES no prior → class images |", "|---|---|---|---|---|---|---|"]
    for subject in sorted({r["subject"] for r in records}):
        def of(method, key):
            return [r[key] for r in records if r["subject"] == subject and r["method"] == method]
        none, prior = of("no-prior", "instance"), of("class-image-prior", "instance")
        if not none or not prior:
            continue
        b = next((x["instance"] for x in base if x["subject"] == subject), float("nan"))
        lines.append(f"| {subject} | {len(none)} / {len(prior)} | {b:.3f} | {mean(none):.3f} | "
                     f"{mean(prior):.3f} | {mean(prior) / mean(none):.0%} | "
                     f"{mean(of('no-prior', 'pres')):.3f} → "
                     f"{mean(of('class-image-prior', 'pres')):.3f} |")
    return "\n".join(lines) + "\n"


def targets_table() -> str:
    """The published figures the fit aims at (calibrate.PUBLISHED) and the
    toy figure each is compared with."""
    toy = {"T3 DINO with/without prior": "instance sim., class-image prior / no prior",
           "T3 PRES with/without prior": "PRES (identity embedding), class-image prior / no prior",
           "T1 DINO generated/real": "instance sim. (class-image prior) / the photos' own "
                                     "leave-one-out instance sim.",
           "T1 CLIP-I generated/real": "identity sim. (class-image prior) / the photos' own "
                                       "leave-one-out identity sim."}
    lines = ["| published figure | value | toy figure |", "|---|---|---|"]
    lines += [f"| {what} | {a:.3f} / {b:.3f} = {a / b:.3f} | {toy[k]} |"
              for k, (a, b, what) in PUBLISHED.items()]
    return "\n".join(lines) + "\n"
