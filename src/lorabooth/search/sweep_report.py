"""report.html for a sweep: one self-contained page (images inline as data
URIs, loss curves as inline SVG, no scripts or styles from the network),
every user string escaped."""

from __future__ import annotations

import base64
from pathlib import Path

from ..config import to_toml_dict
from ..core.fileio import read_metrics, read_text_file, write_text
from ..generation import prompt_slug
from ..reports.htmlpage import IMAGES_LOADED_SCRIPT
from ..reports.lossplot import loss_svg
from ..reports.markdown import html_text

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _losses(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if isinstance(r.get("loss"), float)]


def loss_plot(results: list[dict]) -> str:
    """Every run's loss curve, smoothed over its faint raw losses, as inline SVG."""
    runs = []
    for r in results:
        rows = _losses(r["run"])
        runs.append((r["name"], [x["step"] for x in rows], [x["loss"] for x in rows]))
    return loss_svg(runs)


def _cell(metrics: dict | None, key: str) -> str:
    try:
        stat = metrics["rows"]["lorabooth"][key]
        return f"{stat['mean']:.3f}"
    except (KeyError, TypeError):
        return "–"


def step_curves(results: list[dict]) -> str:
    """Per run that `[evaluate] snapshots` scored: its kept step and its
    figures against the step."""
    from ..evaluation.snapshots import curves_html

    parts = [curves_html(r["name"], Path(r["run"])) for r in results]
    if not any(parts):
        return ""
    return ("<h2>Which step to keep</h2><p>Each saved step scored as the run is; the step "
            "named is the one `tune`'s rule recommends (among the Pareto steps whose PRES is "
            "at most the median, the highest DINO).</p>" + "".join(parts))


def render(sweep, results: list[dict]) -> str:
    e = html_text
    varying = list(sweep.train_grid)
    head = "".join(f"<th>{e(k)}</th>" for k in varying)
    head += "<th>final loss</th>" + "".join(f"<th>{m.upper().replace('_', '-')}</th>"
                                            for m in METRICS)
    rows = []
    for r in results:
        cfg = to_toml_dict(r["config"])
        losses = _losses(r["run"])
        final = f"{losses[-1]['loss']:.4f}" if losses else "–"
        cells = "".join(f"<td>{e(str(cfg[k]))}</td>" for k in varying)
        cells += f"<td>{final}</td>" + "".join(f"<td>{_cell(r['metrics'], m)}</td>"
                                               for m in METRICS)
        rows.append(f"<tr><th>{e(r['name'])}</th>{cells}</tr>")
    sections = []
    for p, prompt in enumerate(sweep.prompts):
        slug = prompt_slug(p, prompt)
        imgs = [f'<figure><img alt="{e(prompt)}: all runs" '
                f'src="{_data_uri(sweep.output / "grids" / f"{slug}.png")}">'
                f"<figcaption>all runs, seed {sweep.seeds[0]}</figcaption></figure>"]
        for r in results:
            imgs.append(f'<figure><img alt="{e(r["name"])}: {e(prompt)}" '
                        f'src="{_data_uri(r["run"] / "sweep" / slug / "grid.png")}">'
                        f"<figcaption>{e(r['name'])}</figcaption></figure>")
        sections.append(f"<section><h3>{e(prompt)}</h3>{''.join(imgs)}</section>")
    source = read_text_file(sweep.source, "sweep file")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>lorabooth sweep: {e(str(sweep.output))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
img {{ max-width: 100%; image-rendering: pixelated; }} figure {{ display: inline-block; margin: 0 1em 1em 0; }}
pre {{ background: #f4f4f4; padding: 1em; }}
</style></head>
<body>
<h1>Sweep: {e(str(sweep.output))}</h1>
<h2>Runs</h2>
<table><tr><th>run</th>{head}</tr>
{''.join(rows)}
</table>
<h2>Loss curves</h2>
<p>Thick: the loss smoothed (exponential moving average); faint: the loss of each step.</p>
{loss_plot(results)}
{step_curves(results)}
<h2>Grids</h2>
{''.join(sections)}
<h2>The sweep file</h2>
<pre>{e(source)}</pre>
{IMAGES_LOADED_SCRIPT}</body></html>
"""


def write_report(sweep, results: list[dict], path: Path) -> Path:
    write_text(path, render(sweep, results))
    return path
