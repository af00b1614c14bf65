"""`lorabooth prepare SRC OUT`: a folder of phone photos -> a clean, square,
captioned training set, with a report accounting for every file."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError

from .config import PrepareConfig
from .errors import UserError
from .grid import font
from .images import (
    FORMATS, Box, center_box, crop_with_reflection, dhash, face_box, hamming, resize_short_side,
    resize_square, upright_rgb,
)
from .io import save_png, write_json, write_text

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One source file's fate, as written to prepare.json."""

    source: str
    kept: bool = False
    reason: str = ""
    format: str = ""
    size: tuple[int, int] | None = None
    crop: str = ""
    crop_box: Box | None = None
    output: str = ""
    caption: str = ""
    duplicate_of: str = ""
    warnings: list[str] = field(default_factory=list)


class Rejected(Exception):
    """A source file that cannot be used; the message is the one-line reason."""


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
    """Open by content, first frame, EXIF-upright, RGB. Raises Rejected."""
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
    except Rejected:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(f"truncated or corrupt image ({str(e).splitlines()[0][:80]})") from None


_FACE_DETECTOR = None


def find_faces(im: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal faces (x, y, w, h), largest first, with OpenCV's Haar cascade."""
    import cv2
    import numpy as np

    global _FACE_DETECTOR
    if _FACE_DETECTOR is None:
        _FACE_DETECTOR = cv2.CascadeClassifier(
            str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
    gray = cv2.equalizeHist(np.asarray(im.convert("L")))
    min_side = max(24, min(im.size) // 12)
    faces = _FACE_DETECTOR.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                            minSize=(min_side, min_side))
    return sorted((tuple(int(v) for v in f) for f in faces), key=lambda f: -f[2] * f[3])


def crop_box_for(im: Image.Image, mode: str, margin: float, entry: Entry) -> Box:
    w, h = im.size
    if mode == "none":
        return 0, 0, w, h
    if mode == "face":
        faces = find_faces(im)
        if faces:
            entry.crop = "face"
            return face_box(faces[0], margin)
        entry.warnings.append("no face found; centre crop instead")
    entry.crop = "center"
    return center_box(w, h)


def caption_for(config: PrepareConfig) -> str:
    if not config.caption:
        return ""
    try:
        return config.caption.format(**{"identifier": config.identifier, "class": config.class_noun})
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--caption: bad template {config.caption!r}; use {{identifier}} and "
                        f"{{class}} ({e})") from None


def _output_name(source: Path, taken: set[str]) -> str:
    name, n = f"{source.stem}.png", 2
    while name in taken:
        name, n = f"{source.stem}-{n}.png", n + 1
    taken.add(name)
    return name


def prepare(config: PrepareConfig) -> list[Entry]:
    """Process every file in SRC; write the kept images, captions, report and
    contact sheet into OUT. Raises UserError when nothing could be kept."""
    src, out = Path(config.src), Path(config.out)
    if not src.is_dir():
        raise UserError(f"SRC {src}: no such folder")
    if out.resolve() == src.resolve():
        raise UserError(f"OUT {out}: must differ from SRC (prepare never writes into SRC)")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out}: is a file, not a folder")
    caption = caption_for(config)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"SRC {src}: the folder is empty")
    entries, kept = [], []
    exact: dict[str, str] = {}
    hashes: list[tuple[int, str]] = []
    taken: set[str] = set()
    for path in files:
        entry = Entry(source=path.name)
        entries.append(entry)
        try:
            im, entry.format = decode(path)
            entry.size = im.size
            if min(im.size) < config.min_size_px:
                raise Rejected(f"too small: {im.size[0]}x{im.size[1]} px, "
                               f"--min-size is {config.min_size_px} px")
            digest = hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()
            if digest in exact:
                entry.duplicate_of = exact[digest]
                raise Rejected(f"exact duplicate of {exact[digest]} (same pixels)")
            fingerprint = dhash(im)
            near = [(hamming(fingerprint, h), name) for h, name in hashes]
            close = min(near, default=(99, ""))
            if close[0] <= config.dedupe_threshold:
                entry.duplicate_of = close[1]
                raise Rejected(f"near-duplicate of {close[1]} (hash distance {close[0]} "
                               f"<= --dedupe-threshold {config.dedupe_threshold})")
        except Rejected as e:
            entry.reason = str(e)
            log.warning("rejected %s: %s", path.name, entry.reason)
            continue
        exact[digest] = path.name
        hashes.append((fingerprint, path.name))
        box = crop_box_for(im, config.crop, config.face_margin, entry)
        entry.crop_box = box
        cropped = crop_with_reflection(im, box)
        final = (resize_short_side(cropped, config.resolution) if config.crop == "none"
                 else resize_square(cropped, config.resolution))
        entry.output = _output_name(path, taken)
        save_png(final, out / entry.output)
        if caption:
            entry.caption = caption
            write_text((out / entry.output).with_suffix(".txt"), caption + "\n")
        entry.kept, entry.reason = True, "kept"
        for w in entry.warnings:
            log.warning("%s: %s", path.name, w)
        kept.append((im, entry))
    write_json(out / "prepare.json", {"config": asdict(config),
                                      "files": [asdict(e) for e in entries],
                                      "kept": len(kept), "rejected": len(entries) - len(kept)})
    if not kept:
        raise UserError(f"SRC {src}: none of {len(entries)} files could be used; "
                        f"reasons in {out / 'prepare.json'}")
    save_png(contact_sheet(kept), out / "contact_sheet.png")
    log.info("kept %d of %d files into %s", len(kept), len(entries), out)
    return entries


def contact_sheet(kept: list[tuple[Image.Image, Entry]], cell: int = 192,
                  per_row: int = 5) -> Image.Image:
    """The kept originals, each with its crop box drawn, names underneath."""
    face = font(13)
    label_h = 20
    rows = -(-len(kept) // per_row)
    cols = min(per_row, len(kept))
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + label_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, entry) in enumerate(kept):
        left, top, right, bottom = entry.crop_box
        # the view spans the image and the crop box (which may leave the image)
        vx0, vy0 = min(0, left), min(0, top)
        vx1, vy1 = max(im.width, right), max(im.height, bottom)
        scale = cell / max(vx1 - vx0, vy1 - vy0)
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                          Image.Resampling.LANCZOS, reducing_gap=3.0)
        x0 = 8 + (i % per_row) * (cell + 8)
        y0 = 8 + (i // per_row) * (cell + label_h + 8)
        ox, oy = x0 - round(vx0 * scale), y0 - round(vy0 * scale)
        sheet.paste(thumb, (ox, oy))
        draw.rectangle((ox + left * scale, oy + top * scale, ox + right * scale - 1,
                        oy + bottom * scale - 1), outline=(255, 0, 0), width=2)
        draw.text((x0, y0 + cell + 3), entry.source[:28], fill=(20, 20, 20), font=face)
    return sheet
