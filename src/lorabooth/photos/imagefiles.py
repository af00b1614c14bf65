"""The user's image files: which files of a photo folder are its photos
(one answer for train, evaluate --real, tune, sweep and the UI), and opening
them by content: one check shared by `prepare` (which rejects a bad file and
goes on) and `train` (which refuses to start)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..core.errors import UserError, first_line
from ..core.fileio import load_json
from .images import FORMATS, upright_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MASK_SUFFIX = ".mask.png"  # IMAGE.mask.png beside IMAGE: its subject mask, not a photo


def mask_path(photo: Path) -> Path:
    """Where ``photo``'s mask lies (--masked-loss): ``NAME.mask.png`` beside it."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)
REPORT_NAME = "prepare.json"  # what `lorabooth prepare` wrote into its OUT, and why
SHEET_NAME = "contact_sheet.png"  # prepare's overview of its crops: not a photo


class Rejected(Exception):
    """A file that cannot be used as an image; the message is the one-line reason."""


SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF",
              b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def sniff(path: Path) -> str:
    """The image format a file's first bytes claim, or ''."""
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in SIGNATURES.items() if head.startswith(magic)), "")


def decode(path: Path) -> tuple[Image.Image, str]:
    """Open by content and decode every pixel (``verify()`` alone passes a
    truncated JPEG), first frame, EXIF-upright, RGB. Raises Rejected."""
    if path.stat().st_size == 0:
        raise Rejected("empty file")
    try:
        with Image.open(path) as im:
            fmt = im.format or "?"
            if fmt not in FORMATS:
                raise Rejected(f"unsupported image format {fmt}")
            im.seek(0)  # GIF/TIFF/MPO: the first frame
            im.load()
            return upright_rgb(im), fmt
    except UnidentifiedImageError:
        kind = sniff(path)
        if kind:
            raise Rejected(f"truncated or corrupt image ({kind} header, unreadable content)") from None
        raise Rejected("not an image (content is no known image format)") from None
    except Image.DecompressionBombError as e:
        # PIL refuses before allocating: the header declares billions of pixels
        raise Rejected(f"too large to open safely: {str(e).split(',')[0]}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(f"truncated or corrupt image ({first_line(e, 80)})") from None


def problem(path: Path) -> str:
    """Why ``path`` cannot be used as an image, or '' when it can."""
    try:
        decode(path)
    except Rejected as e:
        return str(e)
    return ""


def image_files(folder: Path) -> list[Path]:
    """The photos of ``folder``, sorted. A `prepare` output (it holds
    prepare.json): exactly the kept images its report lists that still exist
    (the user may delete one to drop it). Any other folder: the files that
    look like images by name, less dot-files and a contact sheet. Raises
    UserError for a report that is unreadable or from an unfinished prepare."""
    if not folder.is_dir():
        return []
    named = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p))
    if not (folder / REPORT_NAME).is_file():
        return [p for p in named if p.name != SHEET_NAME]
    listed = prepared_images(folder / REPORT_NAME)
    others = [p.name for p in named if p.name not in listed and p.name != SHEET_NAME]
    if others:
        log.warning("%s: %d image file(s) not listed in its %s left out (%s); rerun "
                    "`lorabooth prepare` to take them in", folder, len(others), REPORT_NAME,
                    ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""))
    return [p for p in named if p.name in listed]


def prepared_images(report: Path) -> set[str]:
    """The names of the images a finished `prepare` kept, from its report:
    plain names only (a doctored report cannot point outside its folder)."""
    try:
        data = load_json(report)  # a regular file, capped, nesting bounded
        running = data.get("running")
        names = {f["output"] for f in data["files"] if f.get("kept") and f.get("output")}
    except (UserError, KeyError, TypeError, AttributeError) as e:
        why = str(e).removeprefix(f"{report}: ")  # load_json names the file itself
        raise UserError(f"{report}: not a readable report of `lorabooth prepare` "
                        f"({first_line(ValueError(why), 80)}); rerun prepare, or remove the "
                        f"file") from None
    if running:
        raise UserError(f"{report}: the `lorabooth prepare` that wrote this folder did not "
                        f"finish (interrupted, or still running); rerun it first")
    return {n for n in names if isinstance(n, str) and Path(n).name == n
            and not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES}
