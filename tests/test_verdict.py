"""The one verdict rule (evaluation/verdict.py) on made-up numbers."""

from __future__ import annotations

import itertools
import math

import pytest

from lorabooth.evaluation.verdict import compare, steps, trend

# The toy world's DIV with and without prior preservation (docs/toyworld.md:
# 0.439 [0.34-0.61] vs 0.184 [0.12-0.24]; each middle seed is 3 x mean - min - max).
DIV_PRIOR, DIV_NO_PRIOR = [0.34, 0.367, 0.61], [0.12, 0.192, 0.24]


def test_full_separation_over_three_seeds_reads_higher_paired_or_not():
    a, b = [0.80, 0.85, 0.90], [0.30, 0.35, 0.40]
    assert compare(a, b).word == "higher" and compare(b, a).word == "lower"
    unpaired = compare({0: 0.80, 1: 0.85, 2: 0.90}, {7: 0.30, 8: 0.35, 9: 0.40})
    assert not unpaired.paired and unpaired.word == "higher"
    assert unpaired.difference == pytest.approx(0.5)


def test_the_prior_preservation_div_example_reads_higher_under_any_pairing():
    """The old "gap larger than the larger range" rule said "does not hold"
    (gap 0.255 < range 0.27) though the ranges do not even touch."""
    for order in itertools.permutations(DIV_NO_PRIOR):
        assert compare(DIV_PRIOR, list(order)).word == "higher", order
    assert compare(dict(zip((0, 1, 2), DIV_PRIOR)), dict(zip((3, 4, 5), DIV_NO_PRIOR))).word == "higher"


def test_overlapping_ranges_with_a_mean_gap_depend_on_the_interval():
    consistent = compare([0.50, 0.62, 0.71, 0.80], [0.45, 0.58, 0.66, 0.74])  # every seed +0.04..0.06
    assert consistent.word == "higher" and consistent.low > 0
    one_reversed = compare([0.50, 0.62, 0.71, 0.80], [0.45, 0.58, 0.66, 0.90])  # mean gap still > 0
    assert one_reversed.difference > 0 and one_reversed.low < 0 < one_reversed.high
    assert one_reversed.word == "no difference shown"


def test_a_paired_fall_on_every_seed_reads_lower_though_the_ranges_overlap():
    a, b = [0.30, 0.60, 0.90], [0.36, 0.65, 0.95]
    result = compare(a, b)
    assert result.paired and result.word == "lower" and result.high < 0
    assert result.standardised < -5  # d_z: -0.053 / sd 0.0058
    # the same numbers from different seeds cannot be paired: no difference shown
    assert compare(a, {5: 0.36, 6: 0.65, 7: 0.95}).word == "no difference shown"


def test_fewer_than_three_seeds_are_too_few_whatever_the_gap():
    assert compare([0.9, 0.95], [0.1, 0.15]).word == "too few seeds"
    assert compare([0.9], [0.1]).word == "too few seeds"
    assert compare([0.9, 0.95, 0.97], [0.1, 0.15]).word == "too few seeds"  # unpaired: 2 in B
    assert "CI" not in compare([0.9, 0.95], [0.1, 0.15]).text()
    with pytest.raises(ValueError):
        compare([], [0.1])


def test_the_effect_sizes():
    paired = compare([1.0, 2.0, 4.0], [0.0, 0.0, 1.0])  # differences 1, 2, 3
    assert paired.difference == pytest.approx(2.0) and paired.standardised == pytest.approx(2.0)
    unpaired = compare({0: 1.0, 1: 3.0}, {2: 0.0, 3: 2.0, 4: 4.0})  # pooled sd sqrt(10/3)
    assert unpaired.standardised == pytest.approx(0.0)
    assert compare({0: 2.0, 1: 4.0}, {2: 0.0, 3: 2.0}).standardised == pytest.approx(2 / math.sqrt(2))
    same = compare([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert (same.word, same.standardised, same.low, same.high) == ("no difference shown", 0.0, 0.0, 0.0)
    assert compare([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]).standardised == math.inf


def test_the_interval_is_deterministic():
    a, b = [0.5, 0.62, 0.71, 0.8, 0.4], [0.45, 0.6, 0.75, 0.7, 0.5]
    assert compare(a, b) == compare(a, b)
    assert compare(a, b, seed=1) != compare(a, b)  # another generator seed: another interval
    assert compare(a, b).text() == compare(list(a), tuple(b)).text()


def test_a_series_that_falls_on_its_last_step_does_not_rise():
    """Identity over UNet scales 0, 0.25, 0.5, 0.75, 1 (docs/toyworld.md's
    means 0.11 -> 0.23 -> 0.57 -> 0.75 -> 0.66): the last step falls on every
    seed; the old rule, which forgave any fall up to the largest spread,
    said the rise held."""
    series = [[0.10, 0.11, 0.13], [0.19, 0.23, 0.27], [0.56, 0.57, 0.58], [0.74, 0.75, 0.77],
              [0.60, 0.66, 0.72]]
    each = steps(series)
    assert [c.word for c in each] == ["higher", "higher", "higher", "lower"]
    assert each[1] == compare(series[2], series[1])  # a step is the one rule on its pair
    assert trend(each) == "not monotone" and trend(each[:3]) == "rises"
    assert trend(steps([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]]), rising=False) == "falls"
    flat = steps([[0.5, 0.6, 0.7], [0.6, 0.5, 0.7]])
    assert trend(flat) == "no difference shown"
    assert trend(steps([[0.1, 0.2], [0.5, 0.6]])) == "too few seeds"


def test_the_committed_docs_print_what_the_rule_gives_on_the_committed_per_seed_data():
    """docs/toyworld.md's lever table and claims and docs/tune.md's verdicts
    are what the reports' own code and the one rule make of the per-seed
    numbers in the repository. (docs/calibration.md is now the new fit's page,
    its tables drawn from docs/calibration/*.json: tests/test_toyworld_calibrated.py.)"""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("remade", root / "scripts" / "verdicts_from_figures.py")
    remade = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remade)
    toyworld = (root / "docs" / "toyworld.md").read_text()
    rows = [line for line in remade.toyworld() if line.startswith("| ")]
    assert len(rows) == 1 + 7 and all(row in toyworld for row in rows)
    assert all(line.split(": ", 1)[1] in toyworld for line in remade.toyworld()[:5])
    tune = (root / "docs" / "tune.md").read_text()
    assert all(line.rstrip(".") in tune for line in remade.tune())
