"""The fidelity-vs-preservation picture: one point per setting and seed,
identity similarity up, PRES (drift of the bare class towards the subject)
right, so the good corner is top left. Pure string building (SVG)."""

from __future__ import annotations

import html

from ..reports.lossplot import style
from ..reports.scatter import MARKERS, marker, pres_axes

WIDTH, HEIGHT = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 56, 270, 14, 44


def frontier_svg(points: list[tuple[str, float, float]]) -> str:
    """``points``: (setting, pres, fidelity), several per setting (its seeds).
    Each setting gets its own colour and marker and a legend line."""
    if not points:
        return "<p>No runs measured.</p>"
    names = list(dict.fromkeys(name for name, _, _ in points))
    sx, sy, parts = pres_axes([p for _, p, _ in points], [f for _, _, f in points], WIDTH,
                              HEIGHT, (LEFT, RIGHT, TOP, BOTTOM), "identity similarity")
    for i, name in enumerate(names):
        colour, _ = style(i)
        kind = MARKERS[i // 10 % len(MARKERS)]  # 10 colours, then the next marker
        for setting, pres, fid in points:
            if setting == name:
                parts.append(marker(kind, sx(pres), sy(fid), colour,
                                     f"{name}: PRES {pres:.3f}, identity {fid:.3f}"))
        y = TOP + 8 + 16 * i
        parts.append(marker(kind, WIDTH - RIGHT + 20, y, colour, name))
        parts.append(f'<text x="{WIDTH - RIGHT + 32}" y="{y + 4}">{html.escape(name)}</text>')
    height = max(HEIGHT, TOP + 16 * len(names) + 8)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="frontier" role="img" '
            f'aria-label="identity similarity against PRES" width="{WIDTH}" height="{height}" '
            f'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>\n")
