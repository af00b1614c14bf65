"""The toy-world study of `tune` against fixed settings: its equal-CPU rule,
its pick, and its report (the runs themselves are faked here; the study
itself is `lorabooth toyworld tune-study`, recorded in docs/tune.md)."""

from __future__ import annotations

import itertools
import json

import pytest

from lorabooth.core.fileio import write_json
from lorabooth.evaluation.verdict import compare
from lorabooth.toyworld import tune_study
from lorabooth.toyworld.tune_study import Plan, render, run_fixed, verdict_lines


def test_verdict_lines_are_the_one_rule_paired_by_repeat():
    """Each figure's text is `verdict.compare` on the repeats (tune - fixed),
    with better or worse by the figure's direction (lower PRES is better)."""
    col = {"tune": {"fidelity": {0: 0.9, 1: 0.8, 2: 0.85}, "pres": {0: 0.2, 1: 0.3, 2: 0.25}},
           "defaults": {"fidelity": {0: 0.7, 1: 0.6, 2: 0.75}, "pres": {0: 0.6, 1: 0.7, 2: 0.8}},
           "seed-recipe": {"fidelity": {0: 0.95, 1: 0.5, 2: 0.9}, "pres": {0: 0.1, 1: 0.2, 2: 0.1}}}
    defaults, recipe = verdict_lines(col)
    fid = compare(col["tune"]["fidelity"], col["defaults"]["fidelity"])
    assert f"fidelity {fid.text()} (better)" in defaults and fid.word == "higher"
    pres = compare(col["tune"]["pres"], col["defaults"]["pres"])
    assert f"PRES {pres.text()} (better)" in defaults and pres.word == "lower"
    assert "PRES **higher**" in recipe and recipe.endswith("(worse).")
    assert "fidelity **no difference shown**" in recipe and "CLIP-T" not in recipe


def test_a_fixed_setting_runs_seed_after_seed_until_it_used_the_tunes_cpu_time(
        tmp_path, monkeypatch):
    """Each fake run costs 10 CPU seconds on a fake clock: a 25 s budget buys
    three runs (the last one crosses it), each with its own training seed, and
    the pick is the one `tune`'s rule takes."""
    clock = itertools.count(0, 10)  # each run reads the clock twice: 10 s apart
    monkeypatch.setattr(tune_study.time, "process_time", lambda: next(clock))
    trained = []
    monkeypatch.setattr("lorabooth.training.loop.train", lambda config: trained.append(config))
    scores = iter([{"fidelity": 0.5, "clip_t": 0.2, "pres": 0.3},
                   {"fidelity": 0.9, "clip_t": 0.2, "pres": 0.9},  # drifts: not picked
                   {"fidelity": 0.7, "clip_t": 0.3, "pres": 0.2}])
    monkeypatch.setattr(tune_study, "_evaluate", lambda *a, **k: next(scores))
    result = run_fixed(Plan(tmp_path), "seed-recipe", 2, 25.0, judges=None)
    assert result["runs"] == 3 and result["cpu_s"] == 30
    assert [c.seed for c in trained] == [2000, 2001, 2002]
    assert all(c.prior_preservation == "images" and c.train_text_encoder for c in trained)
    assert result["pick"]["run"].endswith("seed2002")
    # cached: a second call (a resumed study) trains nothing again
    assert run_fixed(Plan(tmp_path), "seed-recipe", 2, 25.0, judges=None)["runs"] == 3
    assert len(trained) == 3


def _repeat(fid: dict[str, float]) -> dict:
    arm = {a: {"cpu_s": 100.0, "runs": 3, "pick": {"scores": {"fidelity": f}},
               "held_out": {"fidelity": f, "clip_t": 0.3, "pres": 0.2}} for a, f in fid.items()}
    arm["tune"].update(completed=8, pruned=2, failed=0, steps_saved=300, steps_planned=2000)
    arm["tune"]["pick"]["settings"] = {"lr": 1e-3, "steps": 200, "prior_preservation": "model"}
    return arm


@pytest.mark.parametrize("tune_fid, word", [((0.9, 0.95, 0.92), "higher"),
                                             ((0.4, 0.7, 0.65), "no difference shown"),
                                             ((0.9, 0.95), "too few seeds")])
def test_the_report_states_the_verdict_and_the_tunes(tune_fid, word):
    results = {r: _repeat({"tune": f, "defaults": 0.6 + r / 100, "seed-recipe": 0.2})
               for r, f in enumerate(tune_fid)}
    text, svg = render(results, Plan(tune_study.Path("x"), budget=8))
    found = compare(list(tune_fid), [0.6 + r / 100 for r in range(len(tune_fid))])
    assert found.word == word
    assert f"- vs `train`'s defaults: fidelity {found.text()}" in text
    assert f"- vs the seed's recipe: fidelity **{'too few seeds' if len(tune_fid) < 3 else 'higher'}" in text
    mean = sum(tune_fid) / len(tune_fid)
    assert f"| `tune` (its recommended trial) | 3.0 | 100 | {mean:.3f}" in text
    assert "| 1 | 8 | 2 | 0 | 100 | 300 of 2000 | lr 0.001, steps 200, prior_preservation model |" in text
    assert svg.startswith("<svg") and all(a in text for a in ("defaults", "seed's recipe"))


def test_the_study_writes_each_repeats_raw_data_beside_its_page(tmp_path):
    """Every figure of docs/tune.md is rendered from repeats.json, which the
    study writes beside the page: rendering that file again gives the page."""
    out = tmp_path / "study"
    out.mkdir()
    for r, f in enumerate((0.9, 0.95, 0.92)):
        write_json(out / f"repeat-{r}.json",  # as run_repeat writes it
                   _repeat({"tune": f, "defaults": 0.6, "seed-recipe": 0.2}))
    page = tune_study.tune_study(out, tmp_path / "docs" / "tune.md", [], 8, tune_config=None)
    data = json.loads((page.parent / "tune" / "repeats.json").read_text())
    again, _ = render({int(k): v for k, v in data.items()}, Plan(out, budget=8))
    assert again == page.read_text()
