"""Loss curves as inline SVG for the sweep report: per run a smoothed curve
(the trend) over its raw per-step losses drawn faint (the noise), each run in
its own colour and dash pattern, with a legend. Runs that share a seed trace
the same curve; the dashes let both show through. Pure string building."""

from __future__ import annotations

from .markdown import html_text

SMOOTHING = 0.9  # EMA weight of the past: about the last 10 steps count
# Tableau 10, distinct for the usual colour-vision deficiencies
COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
DASHES = ("", "6 3", "2 2", "8 3 2 3")
WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 190, 12, 40  # margins: axis labels left/below, legend right


def ema(values: list[float], smoothing: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as in Adam and TensorBoard: the
    running sum starts at 0 and is divided by the weight it has gathered, so
    the first value is the first loss, not a fraction of it."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1) (got {smoothing})")
    out, running, weight = [], 0.0, 0.0
    for v in values:
        running = smoothing * running + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(running / weight)
    return out


def style(index: int) -> tuple[str, str]:
    """Colour and dash pattern of the index-th run: all pairs differ for the
    first 20 runs (10 colours x 4 dashes, stepped together)."""
    return COLOURS[index % len(COLOURS)], DASHES[index % len(DASHES)]


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0  # a flat series still gets a line
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _path(xs: list[float], ys: list[float]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in
                    enumerate(zip(xs, ys)))


def _axes(steps: tuple[int, int], losses: tuple[float, float]) -> list[str]:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    parts = [f'<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="#444" fill="none"/>']
    for value, y in ((losses[0], y0), (losses[1], y1)):
        parts.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{value:.4g}</text>')
    for value, x in ((steps[0], x0), (steps[1], x1)):
        parts.append(f'<text x="{x}" y="{y0 + 16}" text-anchor="middle">{value}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 6}" text-anchor="middle">step</text>')
    parts.append(f'<text x="14" y="{(y0 + y1) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(y0 + y1) / 2})">loss</text>')
    return parts


def loss_svg(runs: list[tuple[str, list[int], list[float]]]) -> str:
    """``runs``: (name, steps, losses) each. One faint raw path and one
    smoothed path per run (classes ``raw`` and ``smooth``), axes, legend."""
    runs = [r for r in runs if r[1]]
    if not runs:
        return "<p>No losses recorded.</p>"
    all_steps = [s for _, steps, _ in runs for s in steps]
    all_losses = [v for _, _, losses in runs for v in losses]
    lo, hi = min(all_losses), max(all_losses)
    sx = _scale(min(all_steps), max(all_steps), LEFT, WIDTH - RIGHT)
    sy = _scale(lo, hi, HEIGHT - BOTTOM, TOP)
    parts = _axes((min(all_steps), max(all_steps)), (lo, hi))
    for i, (name, steps, losses) in enumerate(runs):
        colour, dash = style(i)
        xs, title = [sx(s) for s in steps], f"<title>{html_text(name)}</title>"
        parts.append(f'<path class="raw" d="{_path(xs, [sy(v) for v in losses])}" '
                     f'stroke="{colour}" stroke-opacity="0.3" stroke-width="1" fill="none">'
                     f"{title}</path>")
        parts.append(f'<path class="smooth" d="{_path(xs, [sy(v) for v in ema(losses)])}" '
                     f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" '
                     f'fill="none">{title}</path>')
        y = TOP + 8 + 16 * i
        parts.append(f'<path d="M{WIDTH - RIGHT + 12},{y} l24,0" stroke="{colour}" '
                     f'stroke-width="2" stroke-dasharray="{dash}"/>'
                     f'<text x="{WIDTH - RIGHT + 42}" y="{y + 4}">{html_text(name)}</text>')
    height = max(HEIGHT, TOP + 16 * len(runs) + 8)  # a long legend grows the picture
    return (f'<svg class="loss-curves" role="img" aria-label="loss curves" width="{WIDTH}" '
            f'height="{height}" font-family="sans-serif" font-size="11">'
            + "".join(parts) + "</svg>")
