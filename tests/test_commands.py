"""The config tree: every command's options come from one dataclass, which
the CLI, --config TOML files and the Python API (`lorabooth.run`) share."""

import argparse
import dataclasses

import pytest
import tomli_w

from lorabooth.commands import (
    COMMANDS,
    EvaluateConfig,
    GenerateConfig,
    IdentifierConfig,
    MergeConfig,
    run,
)
from lorabooth.commands.cli import build_parser
from lorabooth.config import SweepEvaluate, SweepGenerate, build_config, option_name, to_toml_dict
from lorabooth.core.errors import UserError

# values for the fields a config cannot be built without
REQUIRED = {"run": "runs/x", "file": "f.toml", "src": "in", "dst": "out", "to": "kohya",
            "out": "o", "real": "photos", "prompt": ["a photo of sks dog"], "loras": ["a", "b"],
            "instance_dir": "photos", "instance_prompt": "a photo of sks dog", "photos": "photos",
            "class_noun": "dog"}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in name.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _sample(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in REQUIRED.items() if k in names})


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_field_has_an_option_a_toml_key_and_help(name, tmp_path):
    cls, help_text, _ = COMMANDS[name]
    parser = _subparser(name)
    # the visible option for each field (a hidden alias, --no-prior-preservation, shares its dest)
    by_dest = {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}
    assert help_text and "config" in by_dest
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}: {f.name} has no help text"
        action = by_dest.get(f.name)
        assert action is not None, f"{name}: no command-line argument for {f.name}"
        assert f.metadata["help"].replace("%", "%%") in action.help  # argparse %-formats help
        if not f.metadata.get("positional"):
            assert option_name(f.name) in action.option_strings
    # every field is a TOML key: the whole config written and read back
    config = _sample(cls)
    (tmp_path / "c.toml").write_text(tomli_w.dumps(to_toml_dict(config)))
    assert build_config(cls, tmp_path / "c.toml", {}) == config


def test_command_line_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "g.toml").write_text('unet_scale = [0, 0.5]\nsteps = 3\nprompt = ["a", "b"]\n')
    args = build_parser().parse_args(["generate", "runs/x", "--unet-scale", "0,0.5", "--steps", "3",
                                      "--prompt", "a", "--prompt", "b"])
    from_cli = build_config(GenerateConfig, None, {f.name: getattr(args, f.name)
                                                   for f in dataclasses.fields(GenerateConfig)})
    from_toml = build_config(GenerateConfig, tmp_path / "g.toml", {"run": "runs/x"})
    assert from_cli == from_toml and from_cli.unet_scale == [0.0, 0.5]


def test_configs_check_their_values():
    with pytest.raises(UserError, match="--prompt"):
        GenerateConfig(run="r")
    with pytest.raises(UserError, match="--guidance: must be a finite number"):
        GenerateConfig(run="r", prompt=["x"], guidance=[7.5, float("nan")])
    with pytest.raises(UserError, match="--weights: must be a finite number"):
        MergeConfig(loras=["a", "b"], out="o", weights=[float("inf"), 1.0])
    with pytest.raises(UserError, match="--n: must be at least 1"):
        IdentifierConfig(n=-5)
    with pytest.raises(UserError, match="--num-images: must be between 1 and 1000"):
        GenerateConfig(run="r", prompt=["x"], num_images=10**9)
    with pytest.raises(UserError, match="--width: must be a positive multiple of 8"):
        GenerateConfig(run="r", prompt=["x"], width=30)
    with pytest.raises(UserError, match="--images-per-prompt: at least 2"):
        EvaluateConfig(run="r", real="p", images_per_prompt=1)
    with pytest.raises(UserError, match="--kind: must be one of live, object"):
        EvaluateConfig(run="r", real="p", kind="x")


def test_python_api_takes_the_same_objects(trained_run, tmp_path, capsys):
    import lorabooth

    images = lorabooth.run(lorabooth.GenerateConfig(
        run=str(trained_run), prompt=["a photo of sks dog"], num_images=1, steps=2,
        width=32, height=32, output=str(tmp_path / "g")))
    assert len(images) == 1 and images[0].size == (32, 32)
    assert len(run(IdentifierConfig(n=3))) == 3
    assert "round-trips" in capsys.readouterr().out
    with pytest.raises(TypeError, match="not a lorabooth command config"):
        run(object())


@pytest.mark.parametrize("cls", [SweepGenerate, SweepEvaluate])
def test_sweep_file_tables_are_in_the_tree(cls, tmp_path):
    """A sweep file's [generate] and [evaluate] tables: every field has help
    text and is a key the file may hold."""
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}: {f.name} has no help text"
    values = {"prompts": ["a photo of sks dog"]} if cls is SweepGenerate else {"real": str(tmp_path)}
    config = cls(**values)
    (tmp_path / "t.toml").write_text(tomli_w.dumps(to_toml_dict(config)))
    assert build_config(cls, tmp_path / "t.toml", {}) == config
