"""The write guard is one mechanism every command goes through: each command
in commands.COMMANDS has a plan in plans.PLANS, a command without one does
not run, and every option that names a file or folder is in its plan."""

from dataclasses import fields
from pathlib import Path

import pytest

from lorabooth import commands
from lorabooth.commands.guard import OWNERS, PAGE_RECORDS, Plan, Write, check
from lorabooth.commands.plans import PLANS

# options whose help names a folder or file but that are not paths lorabooth
# opens: hub ids are declared through --model when they exist locally
NOT_PATHS = {"save_format", "storage", "dino", "clip", "single_file", "captions", "yes", "to",
             "adapter"}
# options that are paths whatever their help says
PATHS = {"out", "output", "dst", "src", "run", "file", "report", "workspace", "photos", "real",
         "prompts", "space", "loras", "reuse", "init", "model", "model_config", "instance_dir",
         "class_dir"}


def _path_options(cls: type) -> list[str]:
    """Every str (or list of str) option whose help speaks of a file or folder;
    an option with a closed set of choices names no path."""
    out = []
    for f in fields(cls):
        text = f.metadata["help"].lower()
        if "choices" in f.metadata:
            continue
        if f.name in PATHS or f.name not in NOT_PATHS and ("folder" in text or "file" in text) \
                and "str" in str(f.type):
            out.append(f.name)
    return out


def _config(cls: type, tmp: Path):
    """``cls`` with every path option pointed at its own name under ``tmp``
    (none of them exists, so the plan is built from the options alone)."""
    values = {}
    for f in fields(cls):
        if f.name in _path_options(cls):
            values[f.name] = [str(tmp / "a"), str(tmp / "b")] if "list" in str(f.type) \
                else str(tmp / f.name)
    if "prompts" in values:  # read (and checked) when the config is built
        (tmp / "prompts").write_text("a photo of {0} {1}\n")
    for key, value in {"prompt": ["p"], "instance_prompt": "a photo of sks dog",
                       "class_noun": "dog", "real": str(tmp / "real"), "to": "kohya",
                       "class_prompt": "a photo of a dog"}.items():
        if key in {f.name for f in fields(cls)}:
            values.setdefault(key, value)
    return cls(**values)


def test_every_command_declares_a_plan():
    assert set(PLANS) == set(commands.COMMANDS)


def test_a_command_without_a_plan_does_not_run(monkeypatch):
    ran = []
    monkeypatch.setitem(commands.COMMANDS, "new", (commands.DemoConfig, "x", ran.append))
    monkeypatch.delitem(commands.COMMANDS, "demo")
    with pytest.raises(TypeError, match="declares no plan"):
        commands.run(commands.DemoConfig())
    assert ran == []


@pytest.mark.parametrize("name", [n for n in commands.COMMANDS if n != "sweep"])
def test_every_path_option_is_in_the_plan(name, tmp_path):
    """A new path option that the plan forgets fails here (sweep's paths
    live in its TOML file, tested by the hostile rows)."""
    cls = commands.COMMANDS[name][0]
    config = _config(cls, tmp_path)
    plan = PLANS[name](config)
    declared = {Path(p.path) for p in (*plan.reads, *plan.writes)}
    for option in _path_options(cls):
        value = getattr(config, option)
        for path in value if isinstance(value, list) else [value]:
            assert any(Path(path) == d or Path(path) in d.parents for d in declared), \
                (name, option)


def test_an_empty_folder_and_a_dead_lock_count_as_empty(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / ".lock").write_text("123\n")
    check(Plan((), (Write("--output", str(out), "folder", "generate"),)))
    (out / "a" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="did not write"):
        check(Plan((), (Write("--output", str(out), "folder", "generate"),)))


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_the_pages_job_record_leaves_an_output_folder_empty(owner, tmp_path):
    """The page writes its job's state and log into the output folder before
    it starts the command; every command must still take that folder."""
    out = tmp_path / "out"
    out.mkdir()
    for name in PAGE_RECORDS:
        (out / name).write_text("{}")
    check(Plan((), (Write("--output", str(out), "folder", owner),)))
