"""The one folder the page may touch: every path a user types or uploads is
resolved inside it or refused, and uploads pass prepare's decoder first.

A browser is an untrusted client even on 127.0.0.1 (any page the user
visits can post to it), so the checks here do not rely on the page's own
widgets: `..`, absolute paths elsewhere and symlinks that leave are refused.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..commands.guard import RUN_CONFIGS
from ..core import fileio
from ..core.errors import UserError
from ..core.fileio import (
    atomic_path,
    load_json,
    load_toml,
    system_folder,
)
from ..photos.imagefiles import Rejected, decode

# Far above a phone photo (~10 MB); a larger "photo" is a mistake or an attack
# that would only be read into memory to be refused.
MAX_UPLOAD_BYTES = 25 << 20
UPLOADS = ".ui-uploads"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Workspace:
    root: Path
    max_upload: int = MAX_UPLOAD_BYTES  # bytes

    @classmethod
    def open(cls, folder: str | Path, max_upload: int = MAX_UPLOAD_BYTES) -> "Workspace":
        reason = system_folder(folder)
        if reason:  # the page serves and writes what is in it: never the machine's own folders
            raise UserError(f"--workspace {folder}: {reason}; give a folder of its own, e.g. "
                            f"~/lorabooth-runs")
        root = Path(folder).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--workspace {folder}: cannot create the folder ({e.strerror})") from None
        return cls(root.resolve(), max_upload)

    def path(self, user_path: str | Path, what: str = "path") -> Path:
        """``user_path`` (relative to the workspace, or absolute inside it)
        as a real path inside the workspace; anything else is a UserError.
        `..` is refused even when it would land inside: a path that climbs
        is never what the page offers."""
        text = str(user_path).strip()
        if not text:
            raise UserError(f"{what}: empty")
        if "\x00" in text:
            raise UserError(f"{what}: holds a NUL character")
        candidate = Path(text).expanduser()
        if ".." in candidate.parts:
            raise UserError(f"{what} {text!r}: '..' is not allowed; give a folder inside the "
                            f"workspace {self.root}")
        if not candidate.is_absolute():
            candidate = self.root / candidate
        # resolve() follows every symlink: a link that leaves lands outside here
        real = candidate.resolve()
        if real != self.root and self.root not in real.parents:
            raise UserError(f"{what} {text!r}: outside the workspace {self.root} "
                            f"(or a symlink out of it)")
        if self.holds_uploads(real):  # what lands there is served to any browser
            raise UserError(f"{what} {text!r}: inside {UPLOADS}, the page's own upload folder")
        return real

    @property
    def uploads(self) -> Path:
        """Gradio's upload and cache folder: the only one its file routes serve."""
        return self.root / UPLOADS

    def holds_uploads(self, path: Path) -> bool:
        """``path`` (under ``root`` as it is written) is ``uploads`` or in it."""
        return path == self.uploads or self.uploads in path.parents

    def make_uploads(self) -> Path:
        """``uploads``, created; refused when it is a symlink or a file (a
        link to / there would have Gradio serve every file on the machine)."""
        if self.uploads.is_symlink() or (self.uploads.exists() and not self.uploads.is_dir()):
            raise UserError(f"--workspace {self.root}: {UPLOADS} is not a folder of its own "
                            f"(a symlink or a file); remove it, the page recreates it")
        try:
            self.uploads.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"--workspace {self.root}: cannot create {UPLOADS} ({e.strerror})") \
                from None
        return self.uploads

    def publish(self, path: str | Path) -> str:
        """A copy of ``path`` (a file in the workspace the page shows or
        offers for download) in ``uploads``, where the browser may fetch it.
        The copy is named by the file's path, size and time, so a picture
        shown every second is copied once per change."""
        real = self.path(path, "file")  # never one in uploads: a copy is made of others only
        if not real.is_file():
            raise UserError(f"{self.relative(real)}: not a file")
        info = real.stat()
        key = hashlib.sha256(f"{real}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()
        target = self.uploads / "page" / key[:20] / real.name
        if not target.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(real, tmp)
        return str(target)

    def relative(self, path: Path) -> str:
        """How the page names a path: relative to the workspace."""
        return str(Path(path).resolve().relative_to(self.root))

    def save_upload(self, temp_file: str | Path, name: str, folder: Path) -> Path:
        """Copy one uploaded file into ``folder`` (inside the workspace) under
        a cleaned name, after prepare's decoder accepted it. Raises Rejected
        with the reason otherwise; the name never chooses the folder."""
        source = Path(temp_file)
        size = source.stat().st_size
        if size > self.max_upload:
            raise Rejected(f"{size} bytes is over the upload limit of {self.max_upload}")
        decode(source)  # the same check prepare makes: refuses non-images and bombs
        stem = _SAFE_NAME.sub("_", Path(name).name).strip("._") or "photo"
        target = self.path(folder, "upload folder") / stem[:100]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def runs(self) -> list[Path]:
        """Every run folder under the workspace (one holding config.toml, or a
        ui-job.json of a training that has not written one yet), newest first;
        none among the uploads, which any browser may name."""
        found = {p.parent for pattern in ("config.toml", "ui-job.json")
                 for p in self.root.rglob(pattern)
                 if not p.is_symlink() and not self.holds_uploads(p) and not _is_job_only(p)}
        found = {p for p in found if self.root in p.resolve().parents}
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _is_job_only(path: Path) -> bool:
    """A ui-job.json that belongs to a drawing or measuring job, not a run."""
    if path.name != "ui-job.json":
        return False
    try:
        data = load_json(path)
    except UserError:
        return True
    return not isinstance(data, dict) or data.get("kind") != "train"


def read_run_config(run: Path) -> dict:
    """The run's config.toml (written when training starts), or the one the
    page queued it with, or {}."""
    for name in RUN_CONFIGS:
        try:
            return load_toml(run / name)
        except UserError:
            continue
    return {}


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records (fileio.read_metrics: a torn or broken line is
    skipped) that also hold a finite loss, so a live run reads cleanly and a
    hand-made file cannot break the page's plot."""
    return [r for r in fileio.read_metrics(run / "metrics.jsonl")
            if _number(r.get("loss"), (int, float))]


def _number(value: object, types: type | tuple[type, ...]) -> bool:
    """A finite JSON number of ``types`` (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, types):
        return False
    return not isinstance(value, float) or math.isfinite(value)
