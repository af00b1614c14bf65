"""What `tune` writes when its study holds its trials: report.md and a
self-contained report.html (images inline, every user string escaped), the
Pareto scatter (pareto.svg), the front's images side by side (front.png),
and the recommended trial's LoRA in best/."""

from __future__ import annotations

import base64
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.fileio import save_png, write_text
from ..evaluation import choice
from ..formats import WEIGHT_NAME
from ..reports.grid import make_grid
from ..reports.htmlpage import IMAGES_LOADED_SCRIPT
from ..reports.markdown import code, html_text, text
from ..reports.scatter import marker, pres_axes
from .tune_pruning import steps_saved

log = logging.getLogger(__name__)
FRONT_PROMPTS = 3  # prompts shown per front trial in front.png, then the class prompt
RULE = ("the highest fidelity among the Pareto trials whose PRES is at most the median PRES "
        "of all completed trials (ties: the highest CLIP-T)")


def completed(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def recommend(trials: list[Any], front: list[Any]) -> Any | None:
    """The rule the report states (evaluation/choice.py, which `evaluate
    --snapshots` uses for the best step too): among the Pareto trials whose
    PRES is at most the median PRES of all completed trials, the highest
    fidelity (then the highest CLIP-T)."""
    numbers = {t.number for t in front}
    index = choice.recommend([t.values for t in trials],
                             [i for i, t in enumerate(trials) if t.number in numbers])
    return None if index is None else trials[index]


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.2e}" if abs(v) < 0.01 and v else f"{v:.3g}"
    return str(v)


def table(trials: list[Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: trial, the three scores, then every setting (the
    union over the trials, in the order they were suggested)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.user_attrs["settings"]))
    head = ["trial", "fidelity", "CLIP-T", "PRES", *keys]
    rows = [[str(t.number), *(f"{v:.4f}" for v in t.values),
             *(_cell(t.user_attrs["settings"].get(k, "–")) for k in keys)] for t in trials]
    return head, rows


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(text(c) for c in r) + " |" for r in rows)]


def _colour(v: float) -> str:
    """viridis, 0 -> dark purple, 1 -> yellow (five stops, linear between)."""
    stops = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
    v = min(1.0, max(0.0, v)) * (len(stops) - 1)
    i = min(int(v), len(stops) - 2)
    a, b, f = stops[i], stops[i + 1], v - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def pareto_svg(points: list[tuple[str, float, float, float, str]]) -> str:
    """``points``: (label, PRES, fidelity, CLIP-T, kind) with kind one of
    "other", "front", "recommended": fidelity up, PRES right, CLIP-T as the
    colour (scale beside the plot), the front as squares, the recommended
    trial as a diamond."""
    if not points:
        return "<p>No completed trials.</p>"
    w, h, right, top = 640, 380, 150, 14
    sx, sy, parts = pres_axes([p[1] for p in points], [p[2] for p in points], w, h,
                              (56, right, top, 44), "fidelity")
    cs = [p[3] for p in points]
    c_lo, c_hi = min(cs), max(cs)
    shape = {"other": "circle", "front": "square", "recommended": "diamond"}
    for label, pres, fid, clip_t, kind in sorted(points, key=lambda p: p[4] != "other"):
        colour = _colour((clip_t - c_lo) / ((c_hi - c_lo) or 1.0))
        parts.append(marker(shape[kind], sx(pres), sy(fid), colour,
                            f"{label} ({kind}): PRES {pres:.3f}, fidelity {fid:.3f}, "
                            f"CLIP-T {clip_t:.3f}"))
    bar_x = w - right + 24
    for i in range(20):  # the colour scale, high CLIP-T on top
        parts.append(f'<rect x="{bar_x}" y="{top + 10 + i * 8}" width="12" height="8" '
                     f'fill="{_colour(1 - i / 19)}"/>')
    parts += [f'<text x="{bar_x + 18}" y="{top + 18}">CLIP-T {c_hi:.3f}</text>',
              f'<text x="{bar_x + 18}" y="{top + 170}">{c_lo:.3f}</text>']
    for i, kind in enumerate(("other", "front", "recommended")):
        y = top + 200 + 18 * i
        parts.append(marker(shape[kind], bar_x + 6, y, "#888", kind))
        parts.append(f'<text x="{bar_x + 18}" y="{y + 4}">'
                     f'{"Pareto front" if kind == "front" else kind}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="pareto" role="img" '
            f'aria-label="fidelity against PRES, coloured by CLIP-T" width="{w}" height="{h}" '
            f'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>\n")


def front_grid(out: Path, front: list[Any]) -> Image.Image | None:
    """Each front trial's first image for its first prompts and for the
    bare class prompt, one row per trial (the images its evaluation drew)."""
    rows, labels, cols = [], [], None
    for t in front:
        drawn = sorted((out / t.user_attrs["run"] / "eval" / "images").glob("*/*/"))
        prompts = [d for d in drawn if d.name != "_class"][:FRONT_PROMPTS]
        prompts += [d for d in drawn if d.name == "_class"]
        firsts = [min(d.glob("seed*.png"), default=None) for d in prompts]
        if not firsts or None in firsts:
            continue
        names = [d.name.split("-", 1)[-1] if d.name != "_class" else "class prompt"
                 for d in prompts]
        if cols is not None and names != cols:
            continue  # another prompt set: not comparable side by side
        cols = names
        rows.append([Image.open(p).convert("RGB") for p in firsts])
        labels.append(f"trial {t.number}")
    return make_grid(rows, labels, cols, title="The Pareto front, first seed") if rows else None


def _png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(head: list[str], rows: list[list[str]], marks: dict[str, str]) -> str:
    e = html_text
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    trs = "".join(f'<tr class="{marks.get(r[0], "")}">' + "".join(f"<td>{e(c)}</td>" for c in r)
                  + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _pruning_lines(study: Any) -> list[str]:
    from optuna.trial import TrialState

    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if not pruned:
        return ["No trial was pruned."]
    saved, planned = steps_saved(study.get_trials(deepcopy=False))
    at = ", ".join(f"{t.number} at step {t.user_attrs.get('pruned_at', '?')}" for t in pruned)
    return [f"{len(pruned)} trials pruned ({at}): {saved} of {planned} planned training "
            f"steps not trained ({saved / max(planned, 1):.0%})."]


def render_html(out: Path, trials: list[Any], front: list[Any], best: Any | None,
                svg: str, grid: Image.Image | None, pruning: list[str], options: str) -> str:
    e = html_text
    head, rows = table(sorted(trials, key=lambda t: t.number))
    marks = {str(t.number): "front" for t in front}
    if best is not None:
        marks[str(best.number)] = "recommended"
    grid_html = (f'<img alt="the Pareto front\'s images" src="{_png_uri(grid)}">' if grid
                 else "<p>No images.</p>")
    best_html = (f"<p>Trial {best.number}: its LoRA and config are in {e(str(out / 'best'))}."
                 "</p>" if best is not None else "<p>No completed trial yet.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>lorabooth tune: {e(str(out))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
tr.front td {{ background: #eef4ff; }} tr.recommended td {{ background: #ffe9a8; font-weight: bold; }}
img {{ max-width: 100%; image-rendering: pixelated; }} pre {{ background: #f4f4f4; padding: 1em; }}
</style></head>
<body>
<h1>Tune: {e(str(out))}</h1>
<p>{len(trials)} completed trials. Objectives: fidelity (identity similarity to the photos) up,
CLIP-T (prompt following) up, PRES (the bare class drifting towards the subject) down.</p>
<h2>Recommended</h2>
<p>Rule: {e(RULE)}.</p>
{best_html}
<h2>Fidelity against drift</h2>
{svg}
<h2>The Pareto front side by side</h2>
{grid_html}
<h2>All completed trials</h2>
<p>Blue: on the Pareto front; yellow: recommended.</p>
{_html_table(head, rows, marks)}
<h2>Pruning</h2>
<p>{e(" ".join(pruning))}</p>
<h2>The tune's options</h2>
<pre>{e(options)}</pre>
{IMAGES_LOADED_SCRIPT}</body></html>
"""


def _copy_best(out: Path, best: Any) -> Path:
    run, dest = out / best.user_attrs["run"], out / "best"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in (WEIGHT_NAME, "config.toml"):
        shutil.copy2(run / name, dest / name)
    return dest


def write_outputs(study: Any, out: Path) -> Path:
    """report.md, report.html, pareto.svg, front.png and best/; returns report.md."""
    trials = completed(study)
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    best = recommend(trials, front)
    on_front = {t.number for t in front}
    svg = pareto_svg([(f"trial {t.number}", t.values[2], t.values[0], t.values[1],
                       "recommended" if best and t.number == best.number else
                       "front" if t.number in on_front else "other") for t in trials])
    write_text(out / "pareto.svg", svg)
    grid = front_grid(out, front)
    if grid is not None:
        save_png(grid, out / "front.png")
    pruning = _pruning_lines(study)
    lines = [f"# lorabooth tune: {text(str(out))}", "",
             f"{len(trials)} completed trials of {len(study.trials)}; objectives: fidelity "
             "(identity similarity to the photos) up, CLIP-T (prompt following) up, PRES (the "
             "bare class drifting towards the subject) down.", "",
             "## Pareto front", "", *_markdown_table(*table(front)), "",
             "## Recommended", "", f"Rule: {RULE}.", ""]
    if best is not None:
        dest = _copy_best(out, best)
        s = best.user_attrs["settings"]
        scales = " ".join(f"--{k.replace('_', '-')} {s[k]:.2f}"
                          for k in ("unet_scale", "text_scale", "guidance") if k in s)
        lines += [*_markdown_table(*table([best])), "",
                  f"Its LoRA and config: {code(str(dest))}; draw with `{scales}`.", ""]
    lines += ["![fidelity against PRES, coloured by CLIP-T](pareto.svg)", ""]
    if grid is not None:
        lines += ["![the Pareto front's images](front.png)", ""]
    lines += ["## Pruning", "", *pruning, "", "The whole study: [report.html](report.html).", ""]
    options = (out / "tune.toml").read_text(encoding="utf-8") if (out / "tune.toml").is_file() \
        else ""
    write_text(out / "report.html", render_html(out, trials, front, best, svg, grid, pruning,
                                                options))
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    log.info("report: %s", report)
    return report
