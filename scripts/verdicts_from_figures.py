"""The verdicts of docs/toyworld.md and docs/tune.md remade from the only
per-seed numbers committed for those runs: the points of their figures
(docs/toyworld/frontier.svg: identity and PRES per setting and seed;
docs/tune/figure.svg: fidelity and PRES per arm and repeat), each written
with 3 decimals in its tooltip, in seed (repeat) order. Prints the markdown
lines the reports' own code makes from them; the other figures of those runs
(DIV, context accuracy, 'red' still red, the scale sweep, CLIP-T) were not
committed per seed, and the docs say so. docs/calibration.md's "before"
column is docs/toyworld/claims.json, the run before the calibration.

    PYTHONPATH=src python scripts/verdicts_from_figures.py
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

from lorabooth.evaluation.verdict import compare
from lorabooth.toyworld.claims import LEVERS, VARIANTS
from lorabooth.toyworld.claims_report import BASELINE, both_at_once, claim, lever_rows, spread_text
from lorabooth.toyworld.tune_study import ARMS, TITLES, verdict_lines

DOCS = Path(__file__).resolve().parents[1] / "docs"
POINT = re.compile(r"<title>([^<]+): PRES (-?[\d.]+), identity (-?[\d.]+)</title>")


def points(svg: Path) -> dict[str, list[dict[str, float]]]:
    """setting -> its runs in the order drawn (seed order), PRES and identity."""
    out: dict[str, list[dict[str, float]]] = {}
    for name, pres, fid in POINT.findall(svg.read_text()):
        out.setdefault(html.unescape(name), []).append({"pres": float(pres), "fidelity": float(fid)})
    return out


def toyworld() -> list[str]:
    results = points(DOCS / "toyworld" / "frontier.svg")
    results["base"] = results.pop("base model")
    titles = {v.name: v.title for v in VARIANTS + LEVERS}
    return [
        "claim 1, identity, LoRA - base: " + claim(results, "unet", "base", "fidelity", "higher"),
        "claim 2, PRES, without - with: " + claim(results, "unet", BASELINE, "pres", "higher"),
        "claim 2, identity, without - with: "
        + claim(results, "unet", BASELINE, "fidelity", "higher"),
        "claim 5, identity, UNet + text - UNet: "
        + claim(results, "unet+te", "unet", "fidelity", "higher"),
        "claim 6: " + "; ".join(titles[n] for n in both_at_once(results, VARIANTS + LEVERS)),
        "", *lever_rows(results, LEVERS)]


def settings_table() -> list[str]:
    """docs/toyworld.md's settings table: identity and PRES, mean [min–max]
    over the three seeds, from the frontier picture's points."""
    results = points(DOCS / "toyworld" / "frontier.svg")
    titles = {"base model": "base model (LoRA scale 0)",
              **{v.name: v.title for v in VARIANTS + LEVERS}}
    lines = ["| setting | seeds | identity sim. ↑ | PRES ↓ |", "|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {titles[name]} | {len(runs)} | {spread_text([r['fidelity'] for r in runs])} | "
                     f"{spread_text([r['pres'] for r in runs])} |")
    return lines


def calibration() -> list[str]:
    """docs/calibration.md's before and after, paired by training seed: before
    from docs/toyworld/claims.json (the run before the calibration, seeds 0, 1,
    2, full precision), after from the frontier picture (3 decimals)."""
    before = json.loads((DOCS / "toyworld" / "claims.json").read_text())
    after = points(DOCS / "toyworld" / "frontier.svg")
    return [f"{row}, {key}, after - before: " + compare(
        [r[key] for r in after[row]], [r[key] for r in before[row]]).text()
        for row in ("unet", BASELINE) for key in ("fidelity", "pres")]


def tune() -> list[str]:
    drawn = points(DOCS / "tune" / "figure.svg")
    col = {arm: {key: dict(enumerate(run[key] for run in drawn[TITLES[arm].replace("`", "")]))
                 for key in ("fidelity", "pres")} for arm in ARMS}
    return verdict_lines(col)


if __name__ == "__main__":
    sys.stdout.write("\n".join(["## docs/toyworld.md", *settings_table(), "",
                                *toyworld(), "", "## docs/calibration.md",
                                *calibration(), "", "## docs/tune.md", *tune()])
                     + "\n")
