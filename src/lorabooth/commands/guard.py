"""The write guard: every command declares what it reads and what it will
write (a ``Plan``, built in ``plans.py``), and ``check`` refuses the plan
before anything is written. One mechanism for every command:

- a path holding a NUL byte, or one that lies under an existing file;
- an input that is not a regular file or a folder (a FIFO, a device);
- an output that is an input, or lies inside the subject's photos (or holds them);
- an existing output file, unless ``--overwrite`` (and never an input, even then);
- an output folder that is neither new, nor empty, nor one this same
  command wrote (each command's folder is recognised by what it always
  writes: ``OWNERS``); the filesystem root, the home folder and system folders;
- an output whose nearest existing folder cannot be written.

Failures while writing (a full disk, a file-size limit, a read-only
filesystem) are turned into one line by ``fileio.write_failure``; atomic
writes keep every earlier file whole.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import UserError
from ..core.fileio import file_kind, system_folder
from ..formats import LORA_FILES


@dataclass(frozen=True)
class Read:
    """An input path. ``kind``: "photos" (no output may lie in or around it),
    "run" (output folders may lie inside it, as RUN/generated does, output
    files may not: a run's files go together), "file" (any input file or folder)."""
    option: str
    path: str
    kind: str = "file"


@dataclass(frozen=True)
class Write:
    """An output path: a "file" or a "folder" that command ``owner`` writes,
    or a "report": a file the command rewrites by design on every run (the
    toy world's studies rewrite their page in docs/)."""
    option: str
    path: str
    kind: str
    owner: str


@dataclass(frozen=True)
class Plan:
    reads: tuple[Read, ...] = ()
    writes: tuple[Write, ...] = ()
    overwrite: bool = False


def _has(folder: Path, *names: str) -> bool:
    return any((folder / n).exists() for n in names)


def _toml_keys(path: Path, *keys: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return False
    return all(k in data for k in keys)


def _json_keys(path: Path, *keys: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


# A run's settings: config.toml, written when training starts, and the one
# the web page writes into the run folder before it queues the training.
RUN_CONFIGS = ("config.toml", "ui-train.toml")


def _run_folder(folder: Path) -> bool:
    """A training run: its config (train then refuses a finished run without
    --resume or --overwrite, and names a config.toml that no longer reads),
    its LoRA file, or checkpoints of an interrupted one."""
    return (any(_toml_keys(folder / n, "instance_prompt", "instance_dir") for n in RUN_CONFIGS)
            or _has(folder, *LORA_FILES.values())
            or (folder / "checkpoints").is_dir())


def _generated(folder: Path) -> bool:
    """generate's output: one NN-slug folder of PNGs per prompt."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(
        p.is_dir() and p.name[:2].isdigit() and p.name[2:3] == "-" for p in entries)


# command -> how its own output folder is recognised (a folder it wrote
# before may be written again; any other non-empty folder is the user's)
OWNERS: dict[str, Callable[[Path], bool]] = {
    "train": lambda f: _run_folder(f) or _has(f, "sweep_hash.txt"),
    "demo": _run_folder,
    "generate": _generated,
    "evaluate": lambda f: _json_keys(f / "metrics.json", "rows", "judges")
    or (f / "images").is_dir(),
    "prepare": lambda f: (f / "prepare.json").is_file(),
    # the user's own class images are an input that train tops up; only
    # their place (never in or around the photos) is checked
    "class-images": lambda f: True,
    "fuse": lambda f: _json_keys(f / "lorabooth_fuse.json", "lora"),
    "sweep": lambda f: _has(f, "report.html", "grids") or any(
        (p / "sweep_hash.txt").is_file() for p in f.iterdir() if p.is_dir()),
    "tune": lambda f: _has(f, "tune.toml", "study.db"),
    "pretrain": lambda f: _has(f, "judges.safetensors"),
    "claims": lambda f: True,  # research outputs of the toy world, under runs/
    "tune-study": lambda f: True,
    "ui": lambda f: True,  # the workspace holds the user's photos too; the page writes subfolders
}

# The web page's record of a job it queued (ui/jobs.py): its state and log,
# written into the job's output folder before the command starts.
PAGE_RECORDS = ("ui-job.json", "ui-job.log")
# A folder holding only these (and empty folders) counts as empty: what a
# killed lorabooth process leaves behind, and the page's record of the job.
_LEFTOVERS = (".lock", *PAGE_RECORDS)

def _holds_files(folder: Path) -> bool:
    """Whether anything but empty folders and a dead process's lock lies below."""
    for root, _, files in os.walk(folder):
        if any(f not in _LEFTOVERS for f in files):
            return True
    return False


def _bad(option: str, path: str, why: str) -> UserError:
    return UserError(f"{option} {path}: {why}")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_path(option: str, path: str) -> None:
    if "\0" in path:
        raise UserError(f"{option}: the path holds a NUL byte ({path!r})")
    ancestor = _existing_ancestor(Path(path))
    if ancestor != Path(path).absolute() and not ancestor.is_dir():
        raise _bad(option, path, f"{ancestor} is a file, not a folder")


def _check_read(r: Read) -> None:
    _check_path(r.option, r.path)
    try:
        mode = os.stat(r.path).st_mode
    except OSError:
        return  # missing: the command's own check names what it needed
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _bad(r.option, r.path, f"not a regular file ({file_kind(mode)}: opening it "
                                     f"could wait forever or never end)")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_against_reads(w: Write, reads: tuple[Read, ...]) -> None:
    out = Path(w.path)
    for r in reads:
        src = Path(r.path)
        if not src.exists() or r.kind == "file" and not src.is_dir() and not _same(out, src):
            continue
        if _same(out, src) or (src.is_dir() and _inside(src, out)):
            raise _bad(w.option, w.path, f"is or holds the input {r.option} {r.path}; "
                                         f"choose an output of its own")
        if r.kind == "photos" and _inside(out, src):
            raise _bad(w.option, w.path, f"lies inside {r.option} {r.path}; lorabooth never "
                                         f"writes into the photos")
        if r.kind == "run" and w.kind != "folder" and _inside(out, src):
            raise _bad(w.option, w.path, f"lies inside the input {r.option} {r.path} (a run's "
                                         f"files go together); choose a path outside it")


def _check_write(w: Write, plan: Plan) -> None:
    _check_path(w.option, w.path)
    out = Path(w.path)
    why = system_folder(out) if w.kind == "folder" else None
    if why:
        raise _bad(w.option, w.path, why)
    _check_against_reads(w, plan.reads)
    if w.kind in ("file", "report"):
        if out.is_dir():
            raise _bad(w.option, w.path, "is a folder; give a file name")
        if w.kind == "file" and out.exists() and not plan.overwrite:
            raise _bad(w.option, w.path, "exists; add --overwrite to replace it")
    else:
        if out.exists() and not out.is_dir():
            raise _bad(w.option, w.path, "is a file, not a folder")
        if out.is_dir() and _holds_files(out) and not OWNERS[w.owner](out):
            raise _bad(w.option, w.path, f"holds files that lorabooth {w.owner} did not write; "
                                         f"choose a new or empty folder")
    # atomic writes put a temp file beside the output: its folder must be writable
    target = out if out.is_dir() else _existing_ancestor(out.parent)
    if not os.access(target, os.W_OK | os.X_OK):
        raise _bad(w.option, w.path, f"{target} is not writable")


def check(plan: Plan) -> None:
    """Refuse ``plan`` (one UserError naming the option) before any write."""
    for r in plan.reads:
        if r.path:
            _check_read(r)
    for w in plan.writes:
        if w.path:
            if w.kind == "folder" and w.owner not in OWNERS:
                raise TypeError(f"no owner rule for {w.owner!r}")
            _check_write(w, plan)
