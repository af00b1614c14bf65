"""Fit the toy world's identifier salience to the DreamBooth paper's figures,
on the calibration subjects only (`subjects.CALIBRATION`), and nothing else.

Toy figures map to the paper's as: DINO -> the instance judge (it tells
this object from its attribute twin, as DINO tells one dog from another);
CLIP-I -> the judges' identity embedding (attributes: class, colour,
pattern, as CLIP's image embedding is the more semantic). PRES is taken on
the judges' identity embedding: the instance judge scores every unmarked
class picture near 0 (docs/toyworld/instance_judge.json), so a ratio of two
instance-PRES figures would divide noise by noise. A fidelity figure
relative to real photos is generated-vs-photos over the photos' own
leave-one-out similarity, as Table 1's method rows over its 'real images'
row. Targets, from /work/shared/dreambench/README.md:

- Table 3 (prior-preservation ablation): DINO with prior / without
  = 0.684 / 0.712; PRES with / without = 0.493 / 0.664.
- Table 1 (DreamBooth, Stable Diffusion, which trains with the prior):
  DINO 0.668 over real 0.774; CLIP-I 0.803 over real 0.885.

The loss is the mean squared log ratio of measured to target over the four
figures and the calibration subjects; the grid point with the least loss is
the world's salience. No method other than these two (without prior, with
class images) enters the fit, so the fit cannot favour any lever."""

from __future__ import annotations

import math
from statistics import mean

# The published figures (../shared/dreambench/README.md): numerator,
# denominator, and what they are in the paper.
PUBLISHED = {
    "T3 DINO with/without prior": (0.684, 0.712, "Table 3 (prior ablation): DINO with prior / without"),
    "T3 PRES with/without prior": (0.493, 0.664, "Table 3: PRES with prior / without"),
    "T1 DINO generated/real": (0.668, 0.774, "Table 1: DreamBooth (SD) DINO / real images' DINO"),
    "T1 CLIP-I generated/real": (0.803, 0.885,
                                 "Table 1: DreamBooth (SD) CLIP-I / real images' CLIP-I"),
}
TARGETS = {k: a / b for k, (a, b, _) in PUBLISHED.items()}
FIT_METHODS = ("no-prior", "class-image-prior")


def _mean(records: list[dict], subject: str, method: str, salience: float, key: str) -> float:
    vals = [r[key] for r in records
            if r["subject"] == subject and r["method"] == method and r["salience"] == salience]
    return mean(vals) if vals else float("nan")


def figures(records: list[dict], subject: str, salience: float) -> dict[str, float]:
    """The four toy figures for one subject at one salience (means over seeds)."""
    def m(method, key):
        return _mean(records, subject, method, salience, key)
    prior, none = "class-image-prior", "no-prior"
    return {
        "T3 DINO with/without prior": m(prior, "instance") / m(none, "instance"),
        "T3 PRES with/without prior": m(prior, "pres") / m(none, "pres"),
        "T1 DINO generated/real": m(prior, "instance") / m(prior, "real_instance"),
        "T1 CLIP-I generated/real": m(prior, "identity") / m(prior, "real_identity"),
    }


def log_error(measured: float, target: float) -> float:
    """Squared log ratio; a figure at or below zero (no likeness at all, or
    the sign wrong) is as far off as a ratio of 1/e^2."""
    if not measured > 0:
        return 4.0
    return math.log(measured / target) ** 2


def fit(records: list[dict]) -> dict:
    """Per salience: the figures per subject and the loss; and the best salience."""
    saliences = sorted({r["salience"] for r in records})
    subjects = sorted({r["subject"] for r in records})
    grid = {}
    for s in saliences:
        per_subject = {name: figures(records, name, s) for name in subjects}
        loss = mean(log_error(f[k], TARGETS[k]) for f in per_subject.values() for k in TARGETS)
        grid[f"{s:g}"] = {"loss": round(loss, 4),
                          "figures": {n: {k: round(v, 3) for k, v in f.items()}
                                      for n, f in per_subject.items()}}
    best = min(grid, key=lambda k: grid[k]["loss"])
    return {"targets": {k: round(v, 3) for k, v in TARGETS.items()}, "grid": grid,
            "chosen_salience": float(best)}
