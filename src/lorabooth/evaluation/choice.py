"""Which setting to recommend among several scored ones: the rule `tune`
states in its report and `evaluate --snapshots` uses for the best step.
Each point is (fidelity, prompt following, class drift): the first two
higher is better, the third (PRES) lower is better. Pure."""

from __future__ import annotations

import statistics
from typing import Sequence

Point = Sequence[float]  # (fidelity, CLIP-T, PRES)


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` in every figure and better in one."""
    at_least = a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2]
    return at_least and (a[0] > b[0] or a[1] > b[1] or a[2] < b[2])


def pareto_front(points: list[Point]) -> list[int]:
    """The indices of the points no other point dominates, in order."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def recommend(points: list[Point], front: list[int] | None = None) -> int | None:
    """Among the front's points whose PRES is at most the median PRES of all
    the points, the highest fidelity (then the highest CLIP-T); the whole
    front when none is that tame. ``front``: the indices of the Pareto front
    (computed here when not given). None for no points."""
    if not points:
        return None
    front = pareto_front(points) if front is None else front
    if not front:
        return None
    median = statistics.median(p[2] for p in points)
    tame = [i for i in front if points[i][2] <= median] or front
    return max(tame, key=lambda i: (points[i][0], points[i][1]))
