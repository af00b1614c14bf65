"""The run folder's records without training: metrics.jsonl read past a torn
line, checkpoints that carry their settings, --overwrite's place among the
options, and what start_run writes and removes."""

import json
import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from lorabooth.config import TrainConfig
from lorabooth.core.errors import UserError
from lorabooth.core.fileio import read_metrics
from lorabooth.search.sweep import NEUTRAL, config_hash
from lorabooth.training.checkpoint import checkpoint_settings, save_checkpoint, verify
from lorabooth.training.runfiles import (
    RESUME_NEUTRAL,
    check_resume_config,
    check_run_folder,
    run_settings,
    start_run,
)


def _config(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(instance_dir=str(tmp_path / "photos"), instance_prompt="a photo of sks dog",
                       output=str(tmp_path / "run"), **kw)


def _checkpoint(run: Path, step: int, settings: dict) -> Path:
    return save_checkpoint(run, step, {"m": torch.nn.Linear(2, 2)}, {"step": step}, settings)


def test_read_metrics_skips_a_torn_last_line_and_what_is_no_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 0.5}\n\xff\xfe\n[1]\n{"loss": 2}\n{"step": true}\n'
                     b'{"step": 2, "loss": 0.25}\n' + b"[" * 100000 + b"\n" + b'{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert read_metrics(tmp_path / "absent.jsonl") == []
    os.mkfifo(tmp_path / "fifo")
    assert read_metrics(tmp_path / "fifo") == []  # not opened: that would wait for a writer


def test_a_checkpoint_holds_its_settings_and_resume_is_checked_against_them(tmp_path):
    """config.toml may say what it likes: the checkpoint's own settings decide."""
    run = tmp_path / "run"
    trained = _config(tmp_path, seed=0, resume=True)
    step = _checkpoint(run, 1, run_settings(trained))
    assert verify(step) and checkpoint_settings(step) == run_settings(trained)
    (run / "config.toml").write_text(tomli_w.dumps(run_settings(_config(tmp_path, seed=5))))
    check_resume_config(run, trained)  # same as the checkpoint
    with pytest.raises(UserError, match="--seed 0 -> 5"):
        check_resume_config(run, _config(tmp_path, seed=5, resume=True))
    with pytest.raises(UserError, match="--instance-prompt 'a photo of sks dog' -> 'a zwx'"):
        check_resume_config(run, TrainConfig(**{**vars(trained), "instance_prompt": "a zwx"}))


def test_resume_without_settings_in_the_checkpoint_reads_config_toml(tmp_path):
    run = tmp_path / "run"
    step = _checkpoint(run, 1, {})
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["config"]  # as lorabooth wrote it before
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert verify(step) and checkpoint_settings(step) is None
    (run / "config.toml").write_text(tomli_w.dumps(run_settings(_config(tmp_path, seed=5))))
    with pytest.raises(UserError, match="--seed 5 -> 0"):
        check_resume_config(run, _config(tmp_path, resume=True))
    (run / "config.toml").write_text("seed = [")
    with pytest.raises(UserError, match=r"config.toml: not valid TOML.*cannot check"):
        check_resume_config(run, _config(tmp_path, seed=5, resume=True))


def test_verify_does_not_open_a_fifo(tmp_path):
    step = _checkpoint(tmp_path / "run", 1, {})
    (step / "state.pt").unlink()
    os.mkfifo(step / "state.pt")
    assert not verify(step)


def test_overwrite_changes_no_runs_identity(tmp_path):
    config = _config(tmp_path)
    replacing = _config(tmp_path, overwrite=True)
    assert "overwrite" in RESUME_NEUTRAL and "overwrite" in NEUTRAL
    # one declaration: what a sweep ignores, a --resume may change too (not the reverse)
    assert NEUTRAL < RESUME_NEUTRAL and "steps" in RESUME_NEUTRAL - NEUTRAL
    assert config_hash(config) == config_hash(replacing)
    assert run_settings(replacing) == run_settings(config) and "overwrite" not in run_settings(config)
    with pytest.raises(UserError, match="--overwrite: cannot be combined with --resume"):
        _config(tmp_path, overwrite=True, resume=True)


def test_a_finished_or_interrupted_run_is_refused_without_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text("")
    check_run_folder(run, _config(tmp_path))  # stopped before its first checkpoint: started again
    _checkpoint(run, 3, {})
    with pytest.raises(UserError, match="interrupted run .checkpoints up to step 3"):
        check_run_folder(run, _config(tmp_path))
    (run / "lora_kohya.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds a finished run \(lora_kohya.safetensors\)"):
        check_run_folder(run, _config(tmp_path))
    check_run_folder(run, _config(tmp_path, overwrite=True))


def test_start_run_with_overwrite_removes_the_earlier_runs_records_only(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 3, {})
    for name in ("pytorch_lora_weights.safetensors", "README.md", "notes.txt",
                 "samples/step-000003.png", "logs/events", "class_images/0000.png"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("old")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "config.toml").write_text('seed = 5\n')
    start_run(run, _config(tmp_path, overwrite=True), 0).close()
    assert sorted(p.name for p in run.iterdir()) == ["class_images", "config.toml",
                                                     "metrics.jsonl", "notes.txt"]
    assert (run / "metrics.jsonl").read_text() == ""
    assert "overwrite" not in tomllib.loads((run / "config.toml").read_text())


def test_start_run_on_resume_keeps_the_metrics_up_to_its_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    start_run(run, _config(tmp_path, resume=True), 2).close()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
