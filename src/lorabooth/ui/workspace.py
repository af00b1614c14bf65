"""The one folder the page may touch: every path a user types or uploads is
resolved inside it or refused, and uploads pass prepare's decoder first.

A browser is an untrusted client even on 127.0.0.1 (any page the user
visits can post to it), so the checks here do not rely on the page's own
widgets: `..`, absolute paths elsewhere and symlinks that leave are refused.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import MAX_JSON_BYTES, load_json, load_toml, parse_json, read_bytes_file
from ..imagefiles import Rejected, decode

# Far above a phone photo (~10 MB); a larger "photo" is a mistake or an attack
# that would only be read into memory to be refused.
MAX_UPLOAD_BYTES = 25 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Workspace:
    root: Path
    max_upload: int = MAX_UPLOAD_BYTES  # bytes

    @classmethod
    def open(cls, folder: str | Path, max_upload: int = MAX_UPLOAD_BYTES) -> "Workspace":
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
        return real

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
        ui-job.json of a training that has not written one yet), newest first."""
        found = {p.parent for pattern in ("config.toml", "ui-job.json")
                 for p in self.root.rglob(pattern)
                 if not p.is_symlink() and not _is_job_only(p)}
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
    for name in ("config.toml", "ui-train.toml"):
        try:
            return load_toml(run / name)
        except UserError:
            continue
    return {}


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records; a line being written (no newline yet) or
    broken is skipped, so a live run reads cleanly."""
    try:
        text = read_bytes_file(run / "metrics.jsonl", "", MAX_JSON_BYTES).decode("utf-8", "replace")
    except UserError:
        return []
    records = []
    for line in text.split("\n")[:-1]:  # the last piece has no newline yet
        try:
            record = parse_json(line, "metrics.jsonl")
        except UserError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
