"""The pieces of a PRES-against-fidelity scatter plot as SVG strings: the
markers and the framed axes. Used by `tune`'s Pareto plot and the toy
world's frontier. Pure string building."""

from __future__ import annotations

import html

MARKERS = ("circle", "square", "diamond", "triangle")


def marker(kind: str, x: float, y: float, colour: str, title: str) -> str:
    tip = f"<title>{html.escape(title)}</title>"
    if kind == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}">{tip}</circle>'
    if kind == "square":
        return (f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}">'
                f"{tip}</rect>")
    points = {"diamond": ((0, -5.5), (5.5, 0), (0, 5.5), (-5.5, 0)),
              "triangle": ((0, -5.5), (5.5, 4.5), (-5.5, 4.5))}[kind]
    coords = " ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in points)
    return f'<polygon points="{coords}" fill="{colour}">{tip}</polygon>'


def pres_axes(xs: list[float], ys: list[float], width: int, height: int,
              margins: tuple[int, int, int, int], y_label: str):
    """The white frame, axes, ticks and labels of a PRES (x) against
    fidelity (y) plot, both axes spanning at least 0..1; returns the two
    scale functions and the SVG parts."""
    left, right, top, bottom = margins
    x_lo, x_hi = min(0.0, min(xs)), max(1.0, max(xs))
    y_lo, y_hi = min(0.0, min(ys)), max(1.0, max(ys))
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def sx(v: float) -> float:
        return x0 + (v - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def sy(v: float) -> float:
        return y0 - (v - y_lo) / (y_hi - y_lo) * (y0 - y1)

    parts = [f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="#444" fill="none"/>']
    for v in (x_lo, (x_lo + x_hi) / 2, x_hi):
        parts.append(f'<text x="{sx(v):.1f}" y="{y0 + 16}" text-anchor="middle">{v:.2g}</text>')
    for v in (y_lo, (y_lo + y_hi) / 2, y_hi):
        parts.append(f'<text x="{x0 - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2g}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 8}" text-anchor="middle">PRES: the bare '
                 "class drifts to the subject (lower is better) →</text>")
    parts.append(f'<text x="14" y="{(y0 + y1) / 2}" text-anchor="middle" transform="rotate(-90 14 '
                 f'{(y0 + y1) / 2})">{y_label} (higher is better) →</text>')
    return sx, sy, parts
