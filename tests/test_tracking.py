"""`train --report-to`: the per-step metrics also reach TensorBoard through
accelerate's trackers, the same numbers as metrics.jsonl."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lorabooth.config.train
from lorabooth.commands.cli import main


def _train(photos, out, *extra):
    return main(["train", "--model", "tiny", "--instance-dir", str(photos), "--instance-prompt",
                 "a photo of sks dog", "--class-prompt", "a photo of a dog",
                 "--prior-preservation", "model", "--train-text-encoder", "--steps", "4",
                 "--checkpoint-every", "2", "--output", str(out), *extra])


def _scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "logs" / "lorabooth"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _jsonl(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_losses_of_metrics_jsonl(photos, tmp_path):
    out = tmp_path / "run"
    assert _train(photos, out, "--report-to", "tensorboard") == 0
    lines = _jsonl(out)
    logged = _scalars(out)
    for key in ("loss", "loss_instance", "loss_prior", "lr", "lr_text"):
        assert [s for s, _ in logged[key]] == [1, 2, 3, 4], key
        # TensorBoard stores float32
        assert [v for _, v in logged[key]] == pytest.approx([r[key] for r in lines], rel=1e-6), key
    assert "step" not in logged

    # a resume from step 2 logs steps 3 and 4 again: TensorBoard shows each step once
    assert _train(photos, out, "--report-to", "tensorboard", "--resume") == 0
    assert len(list((out / "logs" / "lorabooth").glob("events.out.tfevents.*"))) == 2
    logged = _scalars(out)
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in logged["loss"]] == pytest.approx([r["loss"] for r in _jsonl(out)],
                                                           rel=1e-6)


def test_no_report_to_writes_no_logs(trained_run):
    assert (trained_run / "metrics.jsonl").is_file()
    assert not (trained_run / "logs").exists()


def test_a_tracker_that_is_not_installed_is_one_line(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lorabooth.config.train, "installed", lambda package: False)
    out = tmp_path / "run"
    assert _train(photos, out, "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--report-to tensorboard" in err and "`tensorboard`" in err, err
    assert _train(photos, out, "--report-to", "wandb") == 2
    assert "`wandb` package is not installed" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_an_unknown_tracker_is_refused(photos, tmp_path, capsys):
    assert _train(photos, tmp_path / "run", "--report-to", "mlflow") == 2
    assert "--report-to: must be one of tensorboard, wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_flux_run_reports_its_losses_too(photos, tmp_path):
    out = tmp_path / "flux"
    assert main(["train", "--model", "tiny-flux2", "--resolution", "32", "--instance-dir",
                 str(photos), "--instance-prompt", "a photo of sks dog", "--class-prompt",
                 "a photo of a dog", "--prior-preservation", "model", "--steps", "3",
                 "--output", str(out), "--report-to", "tensorboard"]) == 0
    logged = _scalars(out)
    assert [v for _, v in logged["loss_prior"]] == pytest.approx(
        [r["loss_prior"] for r in _jsonl(out)], rel=1e-6)
