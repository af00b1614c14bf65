"""The command line: smoke runs on the tiny model and one-line errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabooth.cli import main


def _run(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "lorabooth", *args], capture_output=True,
                       text=True, timeout=timeout, env=env)
    return p, time.perf_counter() - t0


def _one_line_error(capsys, code, option):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and option in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_train_and_generate_from_the_command_line(photos, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 99\nrank = 2\nclass_prompt = "a photo of a dog"\n')
    code = main(["train", "--model", "tiny", "--instance-dir", str(photos), "--instance-prompt",
                 "a photo of sks dog", "--prior-preservation", "--num-class-images", "2",
                 "--class-draw-steps", "2", "--steps", "2", "--config", str(cfg),
                 "--output", str(out)])
    assert code == 0
    toml = (out / "config.toml").read_text()
    assert "steps = 2" in toml and "rank = 2" in toml  # CLI beats file; file beats default
    code = main(["generate", str(out), "--prompt", "a photo of sks dog", "--prompt", "a dog",
                 "--unet-scale", "0,1", "--num-images", "1", "--steps", "2"])
    assert code == 0
    assert (out / "generated" / "00-a-photo-of-sks-dog" / "grid.png").is_file()
    assert (out / "generated" / "01-a-dog" / "u0_t1_g7.5_s0.png").is_file()


@pytest.mark.parametrize("args,option", [
    (["--lr", "0"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--rank", "0"], "--rank"),
    (["--alpha", "-1"], "--alpha"),
    (["--resolution", "100"], "--resolution"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--prior-preservation"], "--class-prompt"),
    (["--no-such-option", "1"], "--no-such-option"),
])
def test_bad_options_one_line_exit_2(photos, tmp_path, capsys, args, option):
    code = main(["train", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                 "--output", str(tmp_path / "r"), *args])
    _one_line_error(capsys, code, option)
    assert not (tmp_path / "r").exists()


def test_missing_and_empty_instance_dirs(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        code = main(["train", "--instance-dir", str(folder), "--instance-prompt", "a photo of sks dog",
                     "--output", str(tmp_path / "r")])
        _one_line_error(capsys, code, "--instance-dir")


def test_generate_on_a_folder_without_a_lora(tmp_path, capsys):
    code = main(["generate", str(tmp_path), "--prompt", "x"])
    assert "no LoRA here" in _one_line_error(capsys, code, str(tmp_path))


def test_real_process_no_traceback_and_fast(photos, tmp_path):
    """As a user sees it: a hub id that is not here fails in seconds, one line."""
    p, seconds = _run("train", "--model", "someone/not-downloaded", "--instance-dir", str(photos),
                      "--instance-prompt", "a photo of sks dog", "--output", str(tmp_path / "r"))
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "someone/not-downloaded" in lines[0] and "Traceback" not in p.stderr
    assert seconds < 30


def test_console_entry_point_help():
    exe = Path(sys.executable).parent / "lorabooth"
    p = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--prior-loss-weight" in p.stdout and "--lr-text" in p.stdout
