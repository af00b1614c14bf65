"""Atomic writes: a temp name in the same folder, fsync, then rename, so a
kill at any moment leaves either the old file or the new one, never half.
And the one folder relation checked before writing anywhere: nesting.
And strict JSON: every JSON lorabooth writes goes through ``to_json``.
And the one way lorabooth reads a file the user handed it (``read_bytes_file``
and the helpers over it): regular files only, never more than a cap."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .errors import UserError, first_line


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    mode = tmp.stat().st_mode & 0o777  # 0666 less the umask, as any new file gets
    try:
        try:
            yield tmp
        except Exception as e:  # a full disk or a size limit, however the writer says it
            failure = write_failure(e, path)
            if failure is None:
                raise
            raise failure from None
        # writers that replace the file (safetensors writes it 0600) lose that mode
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _new_temp(path: Path) -> Path:
    """Create an empty temp file beside ``path``. Not mkstemp: its files are
    mode 0600 whatever the umask, and the rename would keep that mode. The
    name holds at most 32 characters of ``path``'s, so a 250-character file
    name still gets a temp name under the 255-byte limit."""
    stem = path.name[:32]
    while True:
        tmp = path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
            return tmp
        except FileExistsError:
            continue


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def nan_to_none(data: Any) -> Any:
    """``data`` with every NaN and infinity, however deep, turned into None:
    an undefined figure (CLIP-T of real photos) is JSON's null, which strict
    readers accept; the NaN token Python writes by default they reject."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: nan_to_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [nan_to_none(v) for v in data]
    return data


def to_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``nan_to_none(data)`` that refuses to write a NaN token."""
    return json.dumps(nan_to_none(data), allow_nan=False, **kwargs)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order: each a JSON object with an
    integer ``step``, one a line. A torn last line (a writer killed mid-line,
    or one still writing) and any line that is not such a record are
    skipped; a missing file, or one that is not a regular file, has none."""
    path = Path(path)
    try:
        if not path.is_file():  # a FIFO would block the read
            return []
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.split("\n")[:-1]:  # the piece after the last newline is torn
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, to_json(data, indent=2, sort_keys=True) + "\n")


def save_png(image: Image.Image, path: str | Path, pnginfo: Any = None) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)


def inside(a: str | Path, b: str | Path) -> bool:
    """True when folder ``a`` is ``b`` or lies within it, symlinks resolved
    (neither need exist)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def nested(a: str | Path, b: str | Path) -> bool:
    """True when folders ``a`` and ``b`` are the same or one holds the other."""
    return inside(a, b) or inside(b, a)


# Folders whose whole tree belongs to the system: nothing of lorabooth's goes
# anywhere inside them.
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot",
                "/dev", "/proc", "/sys")
# Folders shared by everything: a subfolder is fine, the folder itself (or one
# holding it) is not.
SHARED_FOLDERS = ("/", "/var", "/var/tmp", "/var/lib", "/var/log", "/var/cache", "/var/spool",
                  "/var/mail", "/opt", "/srv", "/run", "/tmp", "/home", "/mnt", "/media", "/root",
                  "/snap", "/lost+found")


def system_folder(path: str | Path) -> str | None:
    """Why ``path`` must not become a folder lorabooth owns (a workspace, an
    output folder it fills or serves), or None when it may. Refused: the
    filesystem root, the home folder, the temp folder and the shared system
    folders themselves or any folder holding one of them, and anything inside
    the system's own trees (/etc, /usr, ...). ``path`` is judged both as
    written and with symlinks resolved; it need not exist. Pure: reads only
    the file system's links and $HOME."""
    if "\x00" in str(path):
        return "holds a NUL character"
    given = Path(os.path.abspath(os.path.expanduser(path)))
    home = os.path.expanduser("~")
    homes = _both((home,)) if os.path.isabs(home) else []
    for candidate in dict.fromkeys((given, Path(os.path.realpath(given)))):
        if candidate == Path("/"):
            return "is the filesystem root"
        for tree in _both(SYSTEM_TREES):
            if _under(candidate, tree):
                return f"is {'' if candidate == tree else 'inside '}the system folder {tree}"
        for folder in _both((*SHARED_FOLDERS, tempfile.gettempdir())) + homes:
            if _under(folder, candidate):
                what = "your home folder" if folder in homes else "the system folder"
                return f"{'is' if folder == candidate else 'holds'} {what} {folder}"
    return None


def _both(folders: tuple[str, ...]) -> list[Path]:
    """Each folder as written and with its symlinks resolved (/bin -> /usr/bin)."""
    return list(dict.fromkeys(p for f in folders for p in (Path(f), Path(os.path.realpath(f)))))


def _under(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it, both taken as they are (no resolving)."""
    return a == b or b in a.parents


_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "the disk quota is exceeded",
                 errno.EFBIG: "the file is larger than the file-size limit allows",
                 errno.EROFS: "the filesystem is read-only",
                 errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied",
                 errno.ENAMETOOLONG: "the file name is too long"}
_WRITE_TEXTS = {"No space left": errno.ENOSPC, "File too large": errno.EFBIG,
                "Disk quota": errno.EDQUOT, "Read-only file system": errno.EROFS}


def write_failure(error: BaseException, path: str | Path | None = None) -> UserError | None:
    """A UserError for a write that failed for want of space or permission
    (however the library raising it spells it), or None for any other error."""
    code = getattr(error, "errno", None)
    if code not in _WRITE_ERRORS:
        text = str(error)
        code = next((c for t, c in _WRITE_TEXTS.items() if t in text), None)
    if code not in _WRITE_ERRORS:
        return None
    where = path or getattr(error, "filename", None) or "an output file"
    return UserError(f"cannot write {where}: {_WRITE_ERRORS[code]}; files written before "
                     f"are kept whole")
# --- reading what the user handed us -------------------------------------------------------

# Far above any real file of each kind; a larger one is a mistake (a model, a
# log, /dev/zero) that would only be read into memory to fail.
MAX_TEXT_BYTES = 1 << 20  # a prompts file, a caption, a TOML config
MAX_JSON_BYTES = 64 << 20  # prepare.json of a large photo folder, manifests, job state
# Deeper than any file lorabooth reads or writes; deeper data would reach the
# interpreter's recursion limit in whatever walks it next.
MAX_DEPTH = 32


def _label(path: Path, what: str) -> str:
    return f"{what} {path}" if what and what != str(path) else str(path)


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _refuse_irregular(path: Path, what: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise UserError(f"{_label(path, what)}: not a regular file ({file_kind(mode)})")


def check_regular_file(path: str | Path, what: str = "") -> None:
    """Refuse (one line naming ``what`` and ``path``) anything but an existing
    regular file, without opening it: opening a FIFO waits for a writer, and a
    device such as /dev/zero never ends. Symlinks are followed."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{_label(path, what)}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{_label(path, what)}: cannot read ({_reason(e)})") from None
    _refuse_irregular(path, what, mode)


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def read_bytes_file(path: str | Path, what: str = "", cap: int = MAX_TEXT_BYTES) -> bytes:
    """At most ``cap`` bytes of a regular file; a larger file, or anything not
    a regular file, is one line naming ``what`` (the option) and ``path``."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        # O_NONBLOCK: were the file swapped for a FIFO since the stat, opening it
        # still returns at once (and fstat below refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"{_label(path, what)}: cannot read ({_reason(e)})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        _refuse_irregular(path, what, info.st_mode)
        if info.st_size > cap:
            raise UserError(f"{_label(path, what)}: {info.st_size} bytes is too large "
                            f"(at most {cap})")
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise UserError(f"{_label(path, what)}: cannot read ({_reason(e)})") from None
    if len(data) > cap:  # grew since the fstat
        raise UserError(f"{_label(path, what)}: more than {cap} bytes is too large")
    return data


def read_text_file(path: str | Path, what: str = "", cap: int = MAX_TEXT_BYTES) -> str:
    """``read_bytes_file`` decoded as UTF-8 (a leading BOM dropped)."""
    data = read_bytes_file(path, what, cap)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{_label(Path(path), what)}: not UTF-8 text (byte {e.start}); "
                        f"save it as UTF-8") from None


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` whose every failure, nesting too deep for the parser
    included, is one line naming ``where``."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{where}: not valid JSON ({first_line(e)})") from None
    _check_depth(data, where, "JSON")
    return data


def load_json(path: str | Path, what: str = "", cap: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read through ``read_text_file``."""
    return parse_json(read_text_file(path, what, cap), _label(Path(path), what))


def load_toml(path: str | Path, what: str = "", cap: int = MAX_TEXT_BYTES) -> dict[str, Any]:
    """A TOML file read through ``read_text_file``; bad or too deeply nested
    TOML is one line naming the file."""
    text = read_text_file(path, what, cap)
    where = _label(Path(path), what)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise UserError(f"{where}: TOML nested too deeply (at most {MAX_DEPTH} levels)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {first_line(e)}") from None
    _check_depth(data, where, "TOML")
    return data


def _check_depth(data: Any, where: str, kind: str) -> None:
    """Refuse lists and tables nested deeper than ``MAX_DEPTH`` (walked
    without recursion, so the check itself cannot overflow)."""
    level = [data]
    for _ in range(MAX_DEPTH + 1):
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    raise UserError(f"{where}: {kind} nested too deeply (at most {MAX_DEPTH} levels)")


def load_pickle_safely(path: Path) -> dict:
    """A pickle can run code when loaded. Only torch's safe loader
    (weights_only: tensors and plain containers) is used; anything needing
    more is refused, with the reason."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        first = first_line(e, 100)
        raise UserError(
            f"{path}: refused: this pickle file needs more than tensors to load ({first}); "
            "pickles can run arbitrary code, so lorabooth only loads plain tensors from them. "
            "Convert it to .safetensors with a tool you trust, or get a .safetensors release"
        ) from None
