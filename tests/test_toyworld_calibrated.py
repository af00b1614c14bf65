"""The calibrated toy world: instance marks, the attribute-twin check, the
identifier-salience knob, the fit and the lever statistics."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from lorabooth.toyworld.calibrate import TARGETS, fit
from lorabooth.toyworld.calibrated_report import fit_table, lever_table
from lorabooth.toyworld.subjects import CALIBRATION, EVALUATION
from lorabooth.toyworld.world import MARKS, random_spec, render

# docs/toyworld/calibrated.md states this margin for the shipped instance judge
TWIN_MARGIN = 0.2


def test_a_mark_changes_pixels_on_the_object_only_and_unmarked_renders_are_unchanged():
    rng = random.Random(4)
    for _ in range(8):
        spec = random_spec(rng, exclude_held_out=False)
        plain = np.asarray(render(spec, 9)).astype(int)
        assert (np.asarray(render(dataclasses.replace(spec, mark=0), 9)) == plain).all()
        marks = [np.asarray(render(dataclasses.replace(spec, mark=m), 9)).astype(int)
                 for m in range(1, len(MARKS) + 1)]
        for marked in marks:
            changed = np.abs(marked - plain).sum(-1) > 30
            assert 2 <= changed.sum() <= 60  # a few pixels, not the background
            ys, xs = np.nonzero(changed)
            assert abs(xs.mean() - spec.x * 32) < 8 and abs(ys.mean() - spec.y * 32) < 8


def test_subjects_fitted_on_are_not_measured_on_and_twins_differ():
    assert not {s.combo for s in CALIBRATION} & {s.combo for s in EVALUATION}
    assert len({s.cls for s in EVALUATION}) >= 2 and len(EVALUATION) >= 4
    for s in CALIBRATION + EVALUATION:
        own, twin = s.held_out_views(2), s.held_out_views(2, mark=s.twin_mark)
        assert own[0].tobytes() != twin[0].tobytes()


@pytest.fixture(scope="module")
def judges():
    from lorabooth.models.loading import toy_model_dir
    from lorabooth.toyworld.instance import InstanceJudge
    from lorabooth.toyworld.judges import ToyJudge

    judge = ToyJudge.load(toy_model_dir() / "judges.safetensors")
    return judge, InstanceJudge.load(toy_model_dir() / "instance.safetensors", judge)


def test_instance_judge_tells_each_subject_from_its_attribute_twin(judges):
    from lorabooth.toyworld.twin import twin_check

    check = twin_check(*judges)
    for name, row in check["instance (instance judge)"].items():
        assert row["own_held_out_views"] - row["twin_views"] >= TWIN_MARGIN, (name, row)
        assert row["own_held_out_views"] - row["class_images"] >= TWIN_MARGIN, (name, row)
    # the attribute-level embedding cannot: why the instance judge exists
    identity = check["identity (judges' embedding)"]
    assert any(r["twin_views"] >= r["own_held_out_views"] - 0.05 for r in identity.values())


def test_salience_moves_only_rare_words_and_scales_their_distinctness():
    from lorabooth.models.loading import load_base
    from lorabooth.toyworld.calibration import prompt_distance
    from lorabooth.toyworld.salience import apply_salience

    base = load_base("toy")
    te, tok = base.text_encoder.float().eval(), base.tokenizer
    table = te.get_input_embeddings().weight
    before = table.detach().clone()
    sks, ball = (tok(w, add_special_tokens=False).input_ids[0] for w in ("sks", "ball"))
    assert apply_salience(te, tok, 1.0) > 50
    assert torch.equal(table, before)
    d1 = prompt_distance(tok, te, "a photo of sks ball")
    apply_salience(te, tok, 2.0)
    assert torch.equal(table[ball], before[ball]) and not torch.equal(table[sks], before[sks])
    assert prompt_distance(tok, te, "a photo of sks ball") > 1.5 * d1
    table.data.copy_(before)
    apply_salience(te, tok, 0.0)
    assert prompt_distance(tok, te, "a photo of sks ball") < 1e-5  # the class prompt's 'a'


def _records(salience, dino_ratio, pres_ratio, t1_dino, t1_clip):
    rows = []
    for subject in ("a", "b"):
        for seed in (0, 1):
            common = {"subject": subject, "salience": salience, "seed": seed,
                      "real_instance": 1.0, "real_identity": 1.0}
            rows.append({**common, "method": "no-prior", "instance": t1_dino / dino_ratio,
                         "pres": 0.5, "identity": 0.5})
            rows.append({**common, "method": "class-image-prior", "instance": t1_dino,
                         "pres": 0.5 * pres_ratio, "identity": t1_clip})
    return rows


def test_fit_picks_the_grid_point_nearest_the_published_ratios():
    t = list(TARGETS.values())
    records = (_records(1.0, 0.3, 0.3, 0.3, 0.5) + _records(2.0, *t)
               + _records(4.0, 1.2, 1.0, 0.95, 0.95))
    result = fit(records)
    assert result["chosen_salience"] == 2.0
    assert result["grid"]["2"]["loss"] < 1e-9 < result["grid"]["4"]["loss"]


def test_lever_table_pairs_runs_by_subject_and_seed_and_uses_the_verdict_rule():
    def rows(method, values, subject="a"):
        return [{"method": method, "subject": subject, "seed": i, "identity": v, "instance": v,
                 "pres": 0.2, "context_acc": 1.0} for i, v in enumerate(values)]
    records = rows("base", [0.1, 0.12, 0.11]) + rows("lever", [0.6, 0.62, 0.61])
    records += rows("base", [0.5, 0.5, 0.5], subject="b")  # no lever runs on b: left out
    table = lever_table(records, "base", ["lever", "absent"])
    line = next(x for x in table.splitlines() if x.startswith("| lever | 3 |"))
    assert "**higher**: +0.500" in line and "3 seeds, paired" in line
    assert "**no difference shown**: +0.000" in line  # pres, context
    assert "absent" not in table


def test_fit_table_columns_hold_their_own_figures():
    import json

    from lorabooth.core.fileio import to_json

    t = list(TARGETS.values())
    records = _records(2.0, *t) + _records(4.0, 0.5, 0.9, 0.2, 0.7)
    result = json.loads(to_json(fit(records), sort_keys=True))  # as write_json stores it
    table = fit_table(result)
    head, _, _, row4 = table.splitlines()[:4]
    columns = [c.strip() for c in head.split("|")[3:-1]]
    values = [c.strip() for c in row4.split("|")[3:-1]]
    expected = {"T3 DINO with/without prior": 0.5, "T3 PRES with/without prior": 0.9,
                "T1 DINO generated/real": 0.2, "T1 CLIP-I generated/real": 0.7}
    for column, value in zip(columns, values):
        name = column.split(" (target")[0]
        assert value == f"{expected[name]:.3f} / {expected[name]:.3f}", (column, value)


def test_step_curve_recommends_by_the_snapshot_rule():
    """The toy world's step curve: the seeds' means per step, and the step
    evaluate --snapshots would name (evaluation/choice.py) on identity,
    context accuracy and PRES."""
    from lorabooth.evaluation.choice import recommend
    from lorabooth.toyworld.step_curve import curve, curve_svg, render_curves

    def rec(subject, seed, step, identity, ctx, pres):
        return {"subject": subject, "seed": seed, "step": step, "identity": identity,
                "instance": identity / 2, "context_acc": ctx, "pres": pres}

    records = []
    for seed, jitter in ((0, 0.0), (1, 0.02)):
        # likeness rises, prompt following falls past step 100, drift rises
        for step, (i, c, p) in zip((50, 100, 150, 200), ((0.2, 0.9, 0.1), (0.5, 0.9, 0.2),
                                                         (0.6, 0.6, 0.5), (0.62, 0.4, 0.7))):
            records.append(rec("kite", seed, step, i + jitter, c, p + jitter))
    steps, means, best = curve(records, "kite")
    assert steps == [50, 100, 150, 200] and means["identity"][1] == pytest.approx(0.51)
    points = list(zip(means["identity"], means["context_acc"], means["pres"]))
    assert best == steps[recommend(points)] == 100
    page = "\n".join(render_curves(records, lambda s: f"curve-{s}.svg"))
    assert "Recommended: **step 100**" in page and "| 100 (recommended) | 0.510 |" in page
    assert "(2 seeds: 0, 1)" in page and "](curve-kite.svg)" in page
    assert curve_svg(records, "kite").count("<circle") == 4 * 3


def test_the_subjects_masks_lie_over_the_object_in_its_photos():
    """--masked-loss in the toy world reads the renderer's exact masks: inside
    one the photo's pixels are the subject's colour (or its pattern's white),
    outside the background's."""
    from lorabooth.toyworld.world import COLOURS

    for subject in EVALUATION:
        assert subject.photo_contexts == {"grass", "beach"}
        for photo, mask in zip(subject.views(), subject.masks()):
            pixels, inside = np.asarray(photo).astype(float), np.asarray(mask) > 250
            assert mask.size == photo.size and 30 < inside.sum() < 600
            far = np.minimum(*(np.abs(pixels - np.array(c)).sum(-1)  # colour, or its pattern
                               for c in (COLOURS[subject.colour], (250, 250, 245))))
            assert np.median(far[inside]) < 60 < np.median(far[np.asarray(mask) < 5])
