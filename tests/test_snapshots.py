"""--save-every, `evaluate --snapshots` and `generate --step` (issue 29 §5):
a snapshot is the LoRA the run had at that step, bit for bit; every
snapshot is scored and the step to keep is tune's rule's pick."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorabooth import TrainConfig, evaluate, train
from lorabooth.adapters.lora import lora_metadata
from lorabooth.commands.cli import main
from lorabooth.evaluation.choice import pareto_front, recommend
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.reports.curves import step_curves_svg
from lorabooth.training.snapshots import due, list_snapshots


def _config(photos, out, steps, **kw):
    return TrainConfig(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                       class_prompt="a photo of a dog", steps=steps, lr=1e-2, rank=4, seed=0,
                       output=str(out), **kw)


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, module_photos):
    out = tmp_path_factory.mktemp("snap") / "run"
    return train(_config(module_photos, out, 6, save_every=2))


def test_snapshots_are_the_lora_of_that_step(snapshot_run, module_photos, tmp_path):
    """Step 4's snapshot of a 6-step run is a 4-step run's LoRA (the
    constant schedule makes the first 4 steps the same), in both layouts."""
    assert list(list_snapshots(snapshot_run)) == [2, 4]  # not 6: the run's own file is step 6
    four = train(_config(module_photos, tmp_path / "four", 4))
    snap = list_snapshots(snapshot_run)[4]
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        got, want = load_file(snap / name), load_file(four / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert lora_metadata(snap)["step"] == 4 and "step" not in lora_metadata(snapshot_run)
    final = load_file(snapshot_run / WEIGHT_NAME)
    assert not all(torch.equal(final[k], load_file(snap / WEIGHT_NAME)[k]) for k in final)


def test_due_never_at_the_last_step():
    assert [s for s in range(1, 11) if due(s, 3, 10)] == [3, 6, 9]
    assert [s for s in range(1, 11) if due(s, 5, 10)] == [5]
    assert not any(due(s, 0, 10) for s in range(1, 11))


def test_generate_draws_with_a_snapshot_and_names_the_saved_steps(snapshot_run, capsys):
    args = ["generate", str(snapshot_run), "--prompt", "a photo of sks dog", "--num-images", "1",
            "--steps", "2"]
    assert main(args + ["--step", "2"]) == 0
    images = list((snapshot_run / "generated-step-2").rglob("*_s0.png"))
    assert len(images) == 1
    from PIL import Image

    assert json.loads(Image.open(images[0]).text["lorabooth"])["lora"].endswith("step-000002")
    capsys.readouterr()
    assert main(args + ["--step", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--step 3: " + str(snapshot_run) + " has no snapshot of that step "
                            "(saved: 2, 4; the run's own LoRA is step 6)")
    assert not (snapshot_run / "generated-step-3").exists()


def test_evaluate_snapshots_scores_every_step_and_picks_by_tunes_rule(
        snapshot_run, module_photos, tiny_judges, tmp_path):
    dino, clip = tiny_judges
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    out = tmp_path / "eval"
    summary = evaluate(snapshot_run, str(module_photos), prompts_file=str(prompts),
                       images_per_prompt=2, steps=2, pres_images=2, out=out, dino=dino,
                       clip=clip, snapshots=True)
    assert [r["step"] for r in summary["rows"]] == [2, 4, 6]
    points = [(r["dino"], r["clip_t"], r["pres"]) for r in summary["rows"]]
    assert summary["recommended_step"] == summary["rows"][recommend(points)]["step"]
    for step in (2, 4, 6):  # each step scored as evaluate scores a run, in its own folder
        metrics = json.loads((out / "snapshots" / f"step-{step:06d}" / "metrics.json").read_text())
        row = next(r for r in summary["rows"] if r["step"] == step)
        assert metrics["rows"]["lorabooth"]["dino"]["mean"] == pytest.approx(row["dino"])
    page = (out / "snapshots.md").read_text()
    assert f"**step {summary['recommended_step']}**" in page and "snapshots.svg" in page
    assert (out / "snapshots.svg").read_text().count("<circle") == 3 * 3
    assert json.loads((out / "snapshots.json").read_text()) == summary


def test_evaluate_snapshots_of_a_run_that_saved_none(trained_run, module_photos, tmp_path, capsys):
    code = main(["evaluate", str(trained_run), "--real", str(module_photos), "--snapshots",
                 "--out", str(tmp_path / "e")])
    assert code == 2
    assert "holds no snapshots (train with --save-every N)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_recommend_is_the_highest_likeness_among_tame_pareto_points():
    points = [(0.9, 0.2, 0.9), (0.7, 0.2, 0.3), (0.6, 0.3, 0.1), (0.5, 0.1, 0.5), (0.4, 0.1, 0.6)]
    assert pareto_front(points) == [0, 1, 2]
    assert recommend(points) == 1  # point 0 drifts above the median PRES 0.5
    assert recommend([(0.5, 0.5, 0.5)]) == 0 and recommend([]) is None
    assert recommend([(0.9, 0.2, 0.9), (0.8, 0.2, 0.95)]) == 0  # none tame: the whole front


def test_step_curves_mark_the_recommended_step():
    svg = step_curves_svg([10, 20, 30], {"DINO": [0.1, 0.5, 0.6], "PRES": [0.2, 0.3, 0.7]}, 20)
    assert svg.count("<circle") == 6 and svg.count('class="marked"') == 2
    assert "recommended: 20" in svg and "DINO at step 30: 0.600" in svg
