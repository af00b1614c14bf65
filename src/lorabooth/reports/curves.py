"""Figures against the training step as inline SVG: one small panel per
figure (each on its own scale), a point per scored step joined by a line,
the recommended step marked in every panel. Pure string building."""

from __future__ import annotations

from .lossplot import COLOURS
from .markdown import html_text

WIDTH, PANEL = 520, 120
LEFT, RIGHT, TOP, GAP = 64, 16, 16, 34


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def step_curves_svg(steps: list[int], series: dict[str, list[float]],
                    marked: int | None = None) -> str:
    """``series``: figure name -> its value at each of ``steps``; ``marked``:
    a step to draw a dashed line at (the recommended one)."""
    if not steps or not series:
        return "<p>No steps scored.</p>"
    x0, x1 = min(steps), max(steps)

    def sx(s: float) -> float:
        return LEFT + (s - x0) / (x1 - x0 or 1) * (WIDTH - LEFT - RIGHT)

    parts = []
    for k, (name, values) in enumerate(series.items()):
        top = TOP + k * (PANEL + GAP)
        lo, hi = min(values), max(values)

        def sy(v: float, top=top, lo=lo, hi=hi) -> float:
            return top + PANEL - (v - lo) / (hi - lo or 1) * PANEL

        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(steps, values))
        parts.append(f'<text x="{LEFT}" y="{top - 4}" font-weight="bold">{html_text(name)}</text>')
        parts.append(f'<path d="M{LEFT},{top} V{top + PANEL} H{WIDTH - RIGHT}" stroke="#888" '
                     'fill="none"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{top + 4}" text-anchor="end">{_fmt(hi)}</text>'
                     f'<text x="{LEFT - 6}" y="{top + PANEL}" text-anchor="end">{_fmt(lo)}</text>')
        parts.append(f'<polyline class="curve" points="{points}" stroke="{colour}" '
                     'stroke-width="2" fill="none"/>')
        for s, v in zip(steps, values):
            parts.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}">'
                         f"<title>{html_text(name)} at step {s}: {_fmt(v)}</title></circle>")
        if marked is not None:
            parts.append(f'<path class="marked" d="M{sx(marked):.1f},{top} V{top + PANEL}" '
                         'stroke="#c00" stroke-dasharray="4 3"/>')
    bottom = TOP + len(series) * (PANEL + GAP) - GAP + 16
    parts.append(f'<text x="{LEFT}" y="{bottom}">step {x0}</text>'
                 f'<text x="{WIDTH - RIGHT}" y="{bottom}" text-anchor="end">step {x1}</text>')
    if marked is not None:
        parts.append(f'<text x="{sx(marked):.1f}" y="{bottom}" text-anchor="middle" '
                     f'fill="#c00">recommended: {marked}</text>')
    return (f'<svg class="step-curves" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="figures against the training step" width="{WIDTH}" '
            f'height="{bottom + 8}" font-family="sans-serif" font-size="11">'
            + "".join(parts) + "</svg>")
