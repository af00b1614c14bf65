"""The calibrated toy world: fit the identifier salience, then measure on
subjects the fit never saw, then the levers. Every run's raw scores are kept
under OUT (cached: an interrupted phase redoes nothing) and gathered per seed
into the JSON files under docs/ that the markdown is rendered from.

    PYTHONPATH=src python benchmarks/calibrated_world.py fit OUT [--grid 1,2,4] [--seeds 0]
    PYTHONPATH=src python benchmarks/calibrated_world.py refit OUT   # fit.json from the runs so far
    PYTHONPATH=src python benchmarks/calibrated_world.py subjects OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py levers OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py priors OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py precision OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py masked OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py snapshots OUT [--seeds 0,1,2]
    PYTHONPATH=src python benchmarks/calibrated_world.py distances
    PYTHONPATH=src python benchmarks/calibrated_world.py report

`subjects` and `levers` run at the salience `fit` chose
(docs/calibration/fit.json). `report` writes docs/toyworld/calibrated.md
from docs/calibration/fit.json and docs/toyworld/{subjects,levers}.json."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lorabooth.core.fileio import write_json, write_text
from lorabooth.toyworld.calibrate import FIT_METHODS, fit
from lorabooth.toyworld.calibrated_report import fit_table, lever_table, subject_tables
from lorabooth.toyworld.subject_study import (
    LEVERS,
    MASK_VARIANTS,
    METHODS,
    PRECISION_VARIANTS,
    PRIOR_VARIANTS,
    Cell,
    Harness,
)
from lorabooth.toyworld.subjects import CALIBRATION, EVALUATION

DOCS = Path(__file__).resolve().parent.parent / "docs"
FIT_JSON = DOCS / "calibration" / "fit.json"
FIT_RECORDS = DOCS / "calibration" / "fit_records.json"
SUBJECTS_JSON = DOCS / "toyworld" / "subjects.json"
LEVERS_JSON = DOCS / "toyworld" / "levers.json"
STEPS_JSON = DOCS / "toyworld" / "step_curves.json"
DISTANCE_JSON = DOCS / "calibration" / "salience_distance.json"
DISTANCE_GRID = (0, 1, 2, 3, 4, 6, 8)
# Levers need a baseline that learns: the mug and the yellow kite, whose
# class-image runs beat the base model's identity on every seed. Not the
# ball: at 200 steps no method learned its colour and pattern (identity <= 0.03
# on every seed); its earlier lever runs are kept in levers.json all the same.
LEVER_SUBJECTS = (EVALUATION[1], EVALUATION[3])


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def gather(out: Path, subjects, methods, saliences=None) -> list[dict]:
    """Every scored run under OUT of these subjects and methods (and
    saliences): what every process of a phase has finished, read from disk,
    so phases split over processes (e.g. one seed each) write one file."""
    names = {s.name for s in subjects}
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("s*/*/*/score.json"))]
    return sorted((r for r in records if r["subject"] in names and r["method"] in methods
                   and (saliences is None or r["salience"] in saliences)),
                  key=lambda r: (r["salience"], r["subject"], r["method"], r["seed"]))


def _save(path: Path, records: list[dict], **extra) -> None:
    write_json(path, {**extra, "run_seconds_total": round(sum(r.get("seconds", 0) for r in records)),
                      "records": records})


def phase_fit(h: Harness, grid: list[float], seeds: list[int]) -> None:
    for seed in seeds:
        for subject in CALIBRATION:  # one subject's whole grid first
            for salience in grid:
                for method in FIT_METHODS:
                    h.run(Cell(subject, method, METHODS[method], salience, seed))
                    refit(h.out)


def refit(out: Path) -> None:
    """fit_records.json and fit.json from every calibration run under OUT."""
    records = gather(out, CALIBRATION, FIT_METHODS)
    grid = sorted({r["salience"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    _save(FIT_RECORDS, records, grid=grid, seeds=seeds)
    write_json(FIT_JSON, {**fit(records), "grid_values": grid, "seeds": seeds,
                          "subjects": sorted({r["subject"] for r in records}),
                          "runs": len(records)})


def _chosen() -> float:
    return json.loads(FIT_JSON.read_text())["chosen_salience"]


def phase_subjects(h: Harness, seeds: list[int]) -> None:
    s = _chosen()
    for seed in seeds:
        for subject in EVALUATION:
            for method, train in METHODS.items():
                h.run(Cell(subject, method, train, s, seed))
                if seed == 0 and method == "no-prior":  # the base model reads that run
                    h.base_record(subject, s)
                _save_subjects(h.out, s)


def _save_subjects(out: Path, s: float) -> None:
    bases = [json.loads(p.read_text()) for p in sorted((out / "base").glob("*.json"))]
    _save(SUBJECTS_JSON, gather(out, EVALUATION, METHODS, {s}), salience=s,
          base=[b for b in bases if b["salience"] == s])


def phase_levers(h: Harness, seeds: list[int], subjects=LEVER_SUBJECTS) -> None:
    """Each lever on the class-image recipe (the baseline too, shared with
    `subjects`), on the learning baselines."""
    _study(h, seeds, subjects, {"class-image-prior": METHODS["class-image-prior"], **LEVERS})


def phase_priors(h: Harness, seeds: list[int], subjects=LEVER_SUBJECTS) -> None:
    """The image-free prior as ai-toolkit builds it (dop) beside lorabooth's
    (model), on the learning baselines; dop's records go to levers.json."""
    _study(h, seeds, subjects, {"image-free-prior": METHODS["image-free-prior"],
                                **PRIOR_VARIANTS})


def phase_precision(h: Harness, seeds: list[int], subjects=LEVER_SUBJECTS) -> None:
    """The class-image recipe on a quantised frozen base (int8, nf4) beside
    the unquantised one, on the learning baselines; records to levers.json."""
    _study(h, seeds, subjects, {"class-image-prior": METHODS["class-image-prior"],
                                **PRECISION_VARIANTS})


def phase_masked(h: Harness, seeds: list[int], subjects=LEVER_SUBJECTS) -> None:
    """--masked-loss (and its masked prior) on the renderer's exact masks
    beside the class-image recipe, on the learning baselines; the baseline's
    runs scored before background leakage was measured are scored again
    (the same drawings: every other figure must come out equal)."""
    for subject in subjects:
        for seed in seeds:
            _with_leakage(h, Cell(subject, "class-image-prior", METHODS["class-image-prior"],
                                  _chosen(), seed))
    _study(h, seeds, subjects, {"class-image-prior": METHODS["class-image-prior"],
                                **MASK_VARIANTS})


def _with_leakage(h: Harness, cell: Cell) -> None:
    record = h.run(cell)
    if "leakage" in record:
        return
    from lorabooth.generation import Setting, load_pipeline

    pipe, has_text = load_pipeline(h.config(cell).output)
    again = h.score(pipe, has_text, cell.subject, Setting(1, 1, 5.0))
    for key, value in record.items():  # deterministic drawings: the old figures again
        if key in again and abs(again[key] - value) > 1e-3:  # float sums in another order
            raise RuntimeError(f"{cell.name}: {key} scored {again[key]} now, {value} before")
    write_json(Path(h.config(cell).output) / "score.json", {**again, **record})  # the old kept


def phase_snapshots(h: Harness, seeds: list[int], subjects=LEVER_SUBJECTS) -> None:
    """The class-image recipe for 400 steps with a snapshot every 50, every
    step scored: the curve `evaluate --snapshots` reads, on the learning
    baselines; records to docs/toyworld/step_curves.json, a plot per subject."""
    from lorabooth.toyworld.step_curve import curve_svg, step_records

    s, records = _chosen(), []
    for subject in subjects:
        for seed in seeds:
            records += step_records(h, subject, s, seed)
            _save(STEPS_JSON, records, salience=s)
            write_text(DOCS / "toyworld" / _curve_name(subject.name), curve_svg(records, subject.name))


def _curve_name(subject: str) -> str:
    return f"step-curve-{subject}.svg"


def _study(h: Harness, seeds: list[int], subjects, methods: dict) -> None:
    s = _chosen()
    for subject in subjects:
        for method, train in methods.items():
            # a method's seeds one after another: a stopped study leaves whole methods
            for seed in seeds:
                h.run(Cell(subject, method, train, s, seed))
                _save(LEVERS_JSON, gather(h.out, EVALUATION,
                                          {**LEVERS, **PRIOR_VARIANTS, **PRECISION_VARIANTS,
                                           **MASK_VARIANTS}, {s}),
                      salience=s)
                if method in METHODS:  # a subjects-phase seed it lacked, filled in
                    _save_subjects(h.out, s)


def distances() -> None:
    """How far 'a photo of sks ball' reaches from 'a photo of a ball' (mean
    L2 over the 77 positions of the last hidden states) at each salience."""
    from lorabooth.models.loading import load_base
    from lorabooth.toyworld.calibration import CLASS_PROMPT, prompt_distance
    from lorabooth.toyworld.salience import apply_salience

    grid = {}
    for s in DISTANCE_GRID:
        base = load_base("toy")
        apply_salience(base.text_encoder, base.tokenizer, s)
        encoder = base.text_encoder.float().eval()
        grid[f"{s:g}"] = round(prompt_distance(base.tokenizer, encoder, "a photo of sks ball"), 4)
    write_json(DISTANCE_JSON, {"prompt": "a photo of sks ball", "reference": CLASS_PROMPT,
                               "distance": grid})


def render() -> str:
    """docs/toyworld/calibrated.md from the committed JSON alone (a test
    checks the committed page equals this)."""
    parts = ["# The calibrated toy world: measured\n",
             "Made by `PYTHONPATH=src python benchmarks/calibrated_world.py report` from the raw "
             "per-seed records in docs/calibration/ and docs/toyworld/; see "
             "[calibration.md](../calibration.md) for what the figures mean.\n"]
    if FIT_JSON.is_file():
        parts += ["## The fit (calibration subjects only)\n", fit_table(json.loads(FIT_JSON.read_text()))]
    if SUBJECTS_JSON.is_file():
        data = json.loads(SUBJECTS_JSON.read_text())
        parts += [f"## Subjects the fit never saw (salience {data['salience']:g})\n",
                  "mean [min–max] over seeds.\n",
                  subject_tables(data["records"], list(METHODS), data["base"])]
        recs = data["records"]
        if LEVERS_JSON.is_file():
            recs = recs + json.loads(LEVERS_JSON.read_text())["records"]
        parts += ["## Levers on the calibrated class-image recipe\n",
                  "Each lever against the class-image prior by [the one verdict rule]"
                  "(../verdict.md) (`evaluation.verdict.compare`): runs paired by seed, the "
                  "mean difference, its 95% bootstrap interval, d, and the word.\n"]
        parts += _per_subject(recs, LEVERS, "class-image-prior",
                              ["no-prior", "image-free-prior", "pivotal", *LEVERS])
        if any(r["method"] in PRIOR_VARIANTS for r in recs):
            parts += ["## The image-free prior, two ways\n",
                      "`--prior-preservation dop` (ai-toolkit's differential output preservation: "
                      "the instance rows' own noisy latents and timesteps, each caption without "
                      "the identifier) against `model` (a fresh noise and timestep, the class "
                      "prompt), by the same rule.\n"]
            parts += _per_subject(recs, PRIOR_VARIANTS, "image-free-prior", list(PRIOR_VARIANTS))
        if any(r["method"] in PRECISION_VARIANTS for r in recs):
            parts += ["## What a quantised frozen base costs\n",
                      "The class-image recipe with the frozen UNet and text encoder stored int8 "
                      "(torchao weight-only) or nf4 (bitsandbytes), the LoRA fp32 on top "
                      "(`--base-precision`), against the same recipe on the unquantised base, "
                      "same seeds, by the same rule (context accuracy is the toy world's "
                      "prompt following, its CLIP-T).\n"]
            parts += _per_subject(recs, PRECISION_VARIANTS, "class-image-prior",
                                  list(PRECISION_VARIANTS))
        if any(r["method"] in MASK_VARIANTS for r in recs):
            parts += ["## Masked loss\n",
                      "`--masked-loss` on the renderer's exact subject masks (0.1 outside, "
                      "OneTrainer's default), and with `--masked-prior-weight 1`, against the "
                      "class-image recipe, same seeds, by the same rule. Leakage is the share "
                      "of drawings asked for a new context (snow, room) that the judge sees "
                      "on a photo's background (grass, beach): lower is better.\n"]
            parts += _per_subject(recs, MASK_VARIANTS, "class-image-prior", list(MASK_VARIANTS),
                                  keys=("identity", "instance", "pres", "context_acc",
                                        "leakage"))
    if STEPS_JSON.is_file():
        from lorabooth.toyworld.step_curve import CURVE_STEPS, SAVE_EVERY, render_curves

        parts += ["## Which step to keep\n",
                  f"The class-image recipe trained {CURVE_STEPS} steps (twice the levers' 200) "
                  f"with `--save-every {SAVE_EVERY}`, every saved step scored; the figures are "
                  "the seeds' means; the recommended step is the one `evaluate --snapshots` "
                  "names by tune's rule (evaluation/choice.py) on identity, context accuracy "
                  "and PRES.\n"]
        parts += render_curves(json.loads(STEPS_JSON.read_text())["records"], _curve_name)
    return "\n".join(parts)


def _per_subject(recs: list[dict], measured, baseline: str, methods: list[str],
                 **table) -> list[str]:
    """One lever table per subject that has runs of a ``measured`` method."""
    parts = []
    for subject in sorted({r["subject"] for r in recs if r["method"] in measured}):
        parts += [f"#### {subject}\n", lever_table(
            [r for r in recs if r["subject"] == subject], baseline, methods, **table)]
    return parts


def report() -> None:
    write_text(DOCS / "toyworld" / "calibrated.md", render())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("fit", "refit", "subjects", "levers", "priors", "precision",
                                           "masked", "snapshots", "distances", "report"))
    ap.add_argument("out", nargs="?")
    ap.add_argument("--grid", default="1,2,4")
    ap.add_argument("--seeds", default="")
    ap.add_argument("--subjects", default="",
                    help="levers, priors: comma names (default: LEVER_SUBJECTS)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: the harness, 200)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.phase == "report":
        return report()
    if args.phase == "distances":
        return distances()
    if args.phase == "refit":
        return refit(Path(args.out))
    h = Harness(Path(args.out), train_over={"steps": args.steps} if args.steps else {})
    if args.phase == "fit":
        phase_fit(h, _floats(args.grid), [int(x) for x in (args.seeds or "0").split(",")])
    elif args.phase == "subjects":
        phase_subjects(h, [int(x) for x in (args.seeds or "0,1,2").split(",")])
    else:
        chosen = [t for t in LEVER_SUBJECTS if not args.subjects or t.name in args.subjects.split(",")]
        phase = {"priors": phase_priors, "precision": phase_precision,
                 "masked": phase_masked, "snapshots": phase_snapshots}.get(args.phase, phase_levers)
        phase(h, [int(x) for x in (args.seeds or "0,1,2").split(",")], chosen)


if __name__ == "__main__":
    main()
