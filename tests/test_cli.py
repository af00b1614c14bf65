"""The command line: smoke runs on the tiny model and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorabooth.commands.cli import main
from lorabooth.config import EvaluateConfig, GenerateConfig, TuneConfig, build_config, to_argv


def _run(env, *args):
    # the timeout only keeps a hung child from hanging the suite; nothing is timed
    return subprocess.run([sys.executable, "-m", "lorabooth", *args], capture_output=True,
                          text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1"})


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
    (["--prior-preservation", "model"], "--class-prompt"),
    (["--prior-preservation", "maybe", "--class-prompt", "a dog"], "--prior-preservation"),
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


def test_real_process_no_traceback_and_no_network(photos, tmp_path, no_network_env):
    """As a user sees it: a hub id that is not here fails in one line, without
    trying the network (blocked in the child; every attempt would be logged)."""
    env, attempts = no_network_env
    p = _run(env, "train", "--model", "someone/not-downloaded", "--instance-dir", str(photos),
             "--instance-prompt", "a photo of sks dog", "--output", str(tmp_path / "r"))
    assert p.returncode == 2, p.stderr
    # one error line; before it at most lorabooth's own progress lines (the photos it read)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and "someone/not-downloaded" in errors[0], p.stderr
    assert all(line.startswith("lorabooth") for line in lines) and "Traceback" not in p.stderr
    assert attempts.read_text() == ""  # the blocker ran (it creates the file); nothing connected


def test_console_entry_point_help():
    exe = Path(sys.executable).parent / "lorabooth"
    p = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True,
                       timeout=600)  # a hang guard, not a speed limit
    assert p.returncode == 0 and "--prior-loss-weight" in p.stdout and "--lr-text" in p.stdout


@pytest.fixture(scope="module")
def no_unet_model(tmp_path_factory):
    import shutil

    from lorabooth.models.loading import build_tiny, save_base

    folder = save_base(build_tiny(), tmp_path_factory.mktemp("m") / "model")
    shutil.rmtree(folder / "unet")
    return folder


def _bad_input(kind, tmp_path, photos, no_unet_model, trained_run):
    """(argv, text the one error line must contain) for each kind of bad input."""
    base = ["train", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
            "--output", str(tmp_path / "out")]
    junk = tmp_path / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "a.jpg").write_text("text, not a photo")
    (tmp_path / "file").write_text("x")
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.001\n")
    (tmp_path / "wrongtype.toml").write_text('steps = "many"\n')
    bad_lora = tmp_path / "badlora"
    bad_lora.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    from lorabooth.adapters.lora import read_lora
    from lorabooth.formats import WEIGHT_NAME
    tensors, header = read_lora(trained_run / WEIGHT_NAME)
    save_file({k: (v[:, :2] if k.endswith("down.weight") else v).contiguous()
               for k, v in tensors.items()},
              bad_lora / WEIGHT_NAME, metadata=header)
    return {
        "only non-images": (["train", "--instance-dir", str(junk), "--instance-prompt", "a b",
                             "--output", str(tmp_path / "o")], "no readable images"),
        "unknown model name": (base + ["--model", "sd15"], "built-in models"),
        "model folder without unet": (base + ["--model", str(no_unet_model)], "missing unet/"),
        "hub id offline": (base + ["--model", "someone/absent"], "not in the local Hugging Face"),
        "toml unknown key": (base + ["--config", str(tmp_path / "unknown.toml")],
                             "unknown key `learning_rate`"),
        "toml wrong type": (base + ["--config", str(tmp_path / "wrongtype.toml")],
                            "`steps` must be an integer"),
        "output is a file": (base[:-1] + [str(tmp_path / "file")], "is a file"),
        "lora does not fit": (["generate", str(bad_lora), "--prompt", "x", "--num-images", "1"],
                              "does not fit this base model"),
        "bad scale list": (["generate", str(trained_run), "--prompt", "x", "--unet-scale", "a"],
                           "--unet-scale"),
        "bad scheduler": (["generate", str(trained_run), "--prompt", "x", "--scheduler", "x"],
                          "--scheduler"),
    }[kind]


@pytest.mark.parametrize("kind", [
    "only non-images", "unknown model name", "model folder without unet", "hub id offline",
    "toml unknown key", "toml wrong type", "output is a file", "lora does not fit",
    "bad scale list", "bad scheduler",
])
def test_more_bad_inputs_one_line_exit_2(kind, tmp_path, photos, no_unet_model, trained_run,
                                         capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, needle = _bad_input(kind, tmp_path, photos, no_unet_model, trained_run)
    code = main(argv)
    assert needle in _one_line_error(capsys, code, "")
    assert no_network == []  # refused from what is here, not after a wait on the network


def test_unwritable_output_folder(photos, tmp_path, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else
                        real_access(p, mode))
    (tmp_path / "ro").mkdir()
    code = main(["train", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                 "--output", str(tmp_path / "ro")])
    assert "not writable" in _one_line_error(capsys, code, "--output")


def test_bf16_without_cpu_support_falls_back_with_a_warning(photos, tmp_path, monkeypatch, caplog):
    import torch

    from lorabooth import TrainConfig, train
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    train(TrainConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog", steps=1,
                      mixed_precision="bf16", output=str(tmp_path / "r")))
    assert any("no bf16 support; training in fp32" in r.getMessage() for r in caplog.records)


def test_fewer_class_images_than_present_keeps_them_and_says_so(photos, tmp_path, caplog):
    from PIL import Image

    from lorabooth import TrainConfig, train
    caplog.set_level("INFO")
    cls = tmp_path / "cls"
    cls.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(cls / f"mine_{i}.png")
    train(TrainConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog", steps=1,
                      prior_preservation=True, class_prompt="a photo of a dog", class_dir=str(cls),
                      num_class_images=3, output=str(tmp_path / "r")))
    assert len(list(cls.iterdir())) == 5
    assert any("holds 5 images; using 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args,mode", [
    ([], None), (["--prior-preservation"], "images"), (["--prior-preservation", "images"], "images"),
    (["--prior-preservation", "model"], "model"), (["--prior-preservation=off"], "off"),
    (["--no-prior-preservation"], "off"), (["--prior-preservation", "--steps", "2"], "images"),
])
def test_prior_preservation_bare_flag_value_or_no(args, mode):
    """The bare flag keeps its old meaning (class images); a value picks the mode."""
    from lorabooth.commands.cli import build_parser

    parsed = build_parser().parse_args(["train", *args])
    assert parsed.prior_preservation == mode


def test_prior_preservation_command_line_beats_the_file(tmp_path):
    from dataclasses import fields

    from lorabooth.commands.cli import build_parser
    from lorabooth.config import TrainConfig, build_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('instance_dir = "p"\ninstance_prompt = "a photo of sks dog"\n'
                   'class_prompt = "a photo of a dog"\nprior_preservation = true\n')
    for args, mode in (([], "images"), (["--prior-preservation", "model"], "model"),
                       (["--no-prior-preservation"], "off")):
        parsed = build_parser().parse_args(["train", *args])
        overrides = {f.name: getattr(parsed, f.name) for f in fields(TrainConfig)}  # as main
        assert build_config(TrainConfig, cfg, overrides).prior_preservation == mode


def _both_spellings():
    from dataclasses import fields

    from lorabooth.commands import COMMANDS

    for name, (cls, _, _) in COMMANDS.items():
        keys = {f.name: f for f in fields(cls)}
        for key in ("out", "output"):
            if key in keys and not keys[key].metadata.get("positional"):
                yield name, cls, key


@pytest.mark.parametrize("name,cls,key", list(_both_spellings()))
def test_out_and_output_give_the_same_config(name, cls, key, capsys):
    """Every command with an output option reads --out and --output alike,
    into the same field: the alias adds no option to the config, and the
    option's --help names the other spelling."""
    from dataclasses import fields

    from lorabooth.commands.cli import build_parser

    parser = build_parser()
    positionals = ["p" for f in fields(cls) if f.metadata.get("positional")]
    parsed = [parser.parse_args([*name.split(), *positionals, flag, "somewhere"])
              for flag in ("--out", "--output")]
    overrides = [{f.name: getattr(args, f.name) for f in fields(cls)} for args in parsed]
    assert overrides[0] == overrides[1] and overrides[0][key] == "somewhere"
    assert set(vars(parsed[0])) - {f.name for f in fields(cls)} <= {
        "command", "subcommand", "config", "config_class"}
    with pytest.raises(SystemExit):
        parser.parse_args([*name.split(), "--help"])
    other = "--output" if key == "out" else "--out"
    assert f"Also spelled {other}." in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("make", [
    lambda: GenerateConfig(run="r", prompt=["-a dog", "b"], unet_scale=[-1.0, 0.25],
                           guidance=[5.0], seed=3, output="o", width=64),
    lambda: EvaluateConfig(run="r", real="p", class_noun="dog", baselines=True, text2_scale=0.1,
                           out="o"),
    lambda: TuneConfig(photos="p", class_noun="ball", budget=3, model="toy", out="o",
                       judges="toy", steps=[10, 20]),
], ids=["generate", "evaluate", "tune"])
def test_a_config_as_argv_parses_back_to_itself(make):
    """The web page queues jobs as to_argv(config): the CLI must read the
    same config back (negative numbers and a prompt starting with '-' too)."""
    from dataclasses import fields

    from lorabooth.commands import COMMANDS
    from lorabooth.commands.cli import build_parser

    config = make()
    name = next(n for n, (cls, _, _) in COMMANDS.items() if cls is type(config))
    args = build_parser().parse_args([name, *to_argv(config)])
    overrides = {f.name: getattr(args, f.name) for f in fields(config)}
    assert build_config(type(config), None, overrides) == config
