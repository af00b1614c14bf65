"""One rule for "did this setting move this figure?", used by every study
(the toy world's claims and levers, the calibration, the tune study).

Given one figure measured over seeds for two arms A and B:

- the arms are **paired** when they were measured on the same seeds (a list
  is read as seeds 0, 1, 2, ... in order), else unpaired;
- the **effect** is mean(A) - mean(B), and a standardised one: paired, the
  mean difference over the standard deviation of the per-seed differences
  (d_z); unpaired, over the pooled standard deviation (Cohen's d);
- the **interval** is a 95% percentile bootstrap of that mean difference
  over seeds (10,000 resamples from a fixed generator seed, so the same
  numbers give the same interval): paired, the per-seed differences are
  resampled; unpaired, each arm is resampled on its own;
- the **word**: "too few seeds" when fewer than 3 seeds (pairs) were
  measured, else "higher" when the whole interval lies above 0, "lower" when
  it lies below 0, and "no difference shown" when it holds 0.

With 3 seeds the paired rule reads "higher" only when A beats B on every
seed: resampling the one contrary seed three times has probability 1/27,
above the 2.5% tail. An ordered series (LoRA scales) is judged step by step:
each consecutive pair by the same rule; it "rises" only when no step is
"lower" and at least one is "higher" (``trend``). docs/verdict.md says the
same for readers of the reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SEEDS = 3
RESAMPLES = 10_000
LEVEL = 0.95
WORDS = ("higher", "lower", "no difference shown", "too few seeds")
Values = Mapping[int, float] | Sequence[float]


@dataclass(frozen=True)
class Comparison:
    word: str
    difference: float  # mean(A) - mean(B)
    standardised: float  # d_z when paired, Cohen's d when not
    low: float  # the bootstrap interval of the difference
    high: float
    n: int  # seeds: pairs when paired, the smaller arm when not
    paired: bool

    def text(self) -> str:
        """'**higher**: +0.255 [95% CI +0.140, +0.375], d 3.10; 3 seeds, paired'."""
        interval = (f" [95% CI {self.low:+.3f}, {self.high:+.3f}]"
                    if self.n >= MIN_SEEDS else "")
        return (f"**{self.word}**: {self.difference + 0.0:+.3f}{interval}, "
                f"d {_number(self.standardised)}; {self.n} seed{'s' * (self.n != 1)}, "
                f"{'paired' if self.paired else 'unpaired'}")


def _number(x: float) -> str:
    if math.isinf(x):
        return "-∞" if x < 0 else "+∞"
    return "–" if math.isnan(x) else f"{x + 0.0:.2f}"


def _by_seed(values: Values) -> dict:
    return dict(values) if isinstance(values, Mapping) else dict(enumerate(values))


def _standardised(difference: float, spread: float) -> float:
    if math.isnan(spread):
        return float("nan")
    if spread == 0:
        return 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return difference / spread


def _pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    dof = len(a) + len(b) - 2
    if dof < 1:
        return float("nan")
    squares = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
    return math.sqrt(squares / dof)


def _interval(means: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def compare(a: Values, b: Values, seed: int = 0) -> Comparison:
    """A against B by the module's rule: effect, interval and word."""
    a, b = _by_seed(a), _by_seed(b)
    if not a or not b:
        raise ValueError("compare needs at least one value in each arm")
    rng = np.random.default_rng(seed)
    paired = a.keys() == b.keys()
    if paired:
        seeds = sorted(a)
        d = np.array([a[s] - b[s] for s in seeds], dtype=float)
        n, difference = len(d), float(d.mean())
        sd = float(d.std(ddof=1)) if n > 1 else float("nan")
        means = d[rng.integers(0, n, (RESAMPLES, n))].mean(axis=1)  # (RESAMPLES,)
    else:
        x = np.array(list(a.values()), dtype=float)
        y = np.array(list(b.values()), dtype=float)
        n, difference, sd = min(len(x), len(y)), float(x.mean() - y.mean()), _pooled_sd(x, y)
        means = (x[rng.integers(0, len(x), (RESAMPLES, len(x)))].mean(axis=1)
                 - y[rng.integers(0, len(y), (RESAMPLES, len(y)))].mean(axis=1))
    low, high = _interval(means)
    if n < MIN_SEEDS:
        word = "too few seeds"
    else:
        word = "higher" if low > 0 else "lower" if high < 0 else "no difference shown"
    return Comparison(word, difference, _standardised(difference, sd), low, high, n, paired)


def steps(series: Sequence[Values], seed: int = 0) -> list[Comparison]:
    """Each setting of an ordered series against the one before it."""
    return [compare(b, a, seed) for a, b in zip(series, series[1:])]


def trend(comparisons: Sequence[Comparison], rising: bool = True) -> str:
    """The series' word from its steps: "rises" ("falls" when ``rising`` is
    False) when no step goes the other way and at least one goes this way;
    "not monotone" when a step goes the other way; "too few seeds" when any
    step had too few; else "no difference shown"."""
    words = [c.word for c in comparisons]
    want, against = ("higher", "lower") if rising else ("lower", "higher")
    if not words or "too few seeds" in words:
        return "too few seeds"
    if against in words:
        return "not monotone"
    return ("rises" if rising else "falls") if want in words else "no difference shown"
