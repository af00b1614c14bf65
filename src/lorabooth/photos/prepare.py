"""`lorabooth prepare SRC OUT`: a folder of phone photos -> a clean, captioned
training set, square (or each photo at its aspect-ratio bucket: --crop
bucket), with a report accounting for every file."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..config import PrepareConfig
from ..config.templates import fill_template
from ..core.errors import UserError
from ..core.fileio import inside, load_json, save_png, write_json, write_text
from ..core.locks import locked, terminate_as_interrupt
from ..reports.grid import font
from .buckets import bucket_box, bucket_sizes, nearest_bucket
from .imagefiles import REPORT_NAME, SHEET_NAME, Rejected, decode, is_mask, mask_path
from .images import (
    Box,
    center_box,
    crop_with_reflection,
    dhash,
    face_box,
    hamming,
    resize_short_side,
    resize_to,
    upright_rgb,
)
from .masking import face_mask, follow_crop

log = logging.getLogger(__name__)
DEFAULT_RESOLUTION = 512  # without --model: SD 1.x's size, as always


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
    bucket: tuple[int, int] | None = None  # --crop bucket: the output's (width, height)
    output: str = ""
    caption: str = ""
    duplicate_of: str = ""
    mask: str = ""  # NAME.mask.png written beside the output (--mask face, or the photo's own)
    warnings: list[str] = field(default_factory=list)


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


def crop_box_for(im: Image.Image, mode: str, margin: float, entry: Entry,
                 resolution: int = DEFAULT_RESOLUTION) -> Box:
    w, h = im.size
    if mode == "none":
        return 0, 0, w, h
    if mode == "bucket":  # the least centred crop to the aspect of the photo's bucket
        entry.crop, entry.bucket = "bucket", nearest_bucket(w, h, bucket_sizes(resolution))
        return bucket_box(w, h, entry.bucket)
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
    return fill_template(config.caption, {"identifier": config.identifier,
                                          "class": config.class_noun}, "--caption")


def _output_name(source: Path, taken: set[str]) -> str:
    # at most 200 bytes of the source's name: with '-N.png' it stays a legal name
    stem = source.stem.encode()[:200].decode(errors="ignore")
    name, n = f"{stem}.png", 2
    while name in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def _check_folders(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise UserError(f"SRC {src}: no such folder")
    if inside(out, src):
        raise UserError(f"OUT {out}: must differ from SRC and lie outside it (prepare never writes into SRC)")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out}: is a file, not a folder")


def previous_outputs(out: Path) -> set[str]:
    """The names of the files an earlier `prepare` wrote (or was about to
    write) into ``out``, from its prepare.json: a finished report, or the
    record of one that was stopped. Refuses a non-empty folder without one:
    those files are not ours to replace or remove."""
    if not out.is_dir() or not any(not p.name.startswith(".") for p in out.iterdir()):
        return set()
    if not (out / "prepare.json").exists():
        raise UserError(f"OUT {out}: the folder holds files and no prepare.json of an earlier "
                        f"`lorabooth prepare`; choose a new or empty folder")
    report = load_json(out / "prepare.json")
    try:
        files = report["files"]
        images = [f["output"] for f in files if f.get("output")]
        texts = [_caption_name(f["output"]) for f in files if f.get("output") and f.get("caption")]
        texts += [str(f["mask"]) for f in files if f.get("output") and f.get("mask")]
        recorded = [str(n) for n in report.get("outputs", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{out / REPORT_NAME}: not the report of an earlier "
                        f"`lorabooth prepare`; choose a new or empty folder") from None
    # only plain names of the kinds prepare writes: a doctored prepare.json
    # cannot point outside OUT
    return {n for n in images + texts + recorded if Path(n).name == n and not n.startswith(".")
            and n.endswith((".png", ".txt"))} | {SHEET_NAME}


class Record:
    """Every name this run may have written into OUT, kept in OUT/prepare.json
    while it runs, rewritten (atomically) BEFORE each new file is written: a
    run stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, power loss) leaves a
    record of every file it wrote, so the rerun can remove the ones it no
    longer keeps. The finished report replaces it."""

    def __init__(self, out: Path, names: set[str]):
        self.path, self.names = out / REPORT_NAME, set(names)
        self._save()

    def add(self, *names: str) -> None:
        if not set(names) <= self.names:
            self.names |= set(names)
            self._save()

    def _save(self) -> None:
        # "files" stays a list: readers of a finished report can parse this one
        write_json(self.path, {"running": True, "outputs": sorted(self.names), "files": [],
                               "kept": 0, "rejected": 0})


def _caption_name(image_name: str) -> str:
    return str(Path(image_name).with_suffix(".txt"))


def with_resolution(config: PrepareConfig) -> PrepareConfig:
    """``config`` with --resolution 0 made the size the set is for: --model's
    native size (FLUX and SDXL 1024, SD 1.x 512), 512 without --model."""
    if config.resolution:
        return config
    from ..models.loading import model_resolution

    side = model_resolution(config.model) if config.model else DEFAULT_RESOLUTION
    return dataclasses.replace(config, resolution=side)


def prepare(config: PrepareConfig) -> list[Entry]:
    """Process every file in SRC; write the kept images, captions, report and
    contact sheet into OUT, and remove what an earlier run into OUT wrote and
    this one does not. OUT is locked while it runs; SIGTERM stops it as
    Ctrl-C does. Raises UserError when nothing could be kept."""
    config = with_resolution(config)
    src, out = Path(config.src), Path(config.out)
    _check_folders(src, out)
    caption = caption_for(config)
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not is_mask(p))
    if not files:
        raise UserError(f"SRC {src}: the folder is empty")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"OUT {out}: cannot create the folder ({e.strerror})") from None
    try:
        with terminate_as_interrupt(), locked(out, "OUT"):
            return _prepare_locked(config, files, caption)
    except UserError:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _prepare_locked(config: PrepareConfig, files: list[Path], caption: str) -> list[Entry]:
    src, out = Path(config.src), Path(config.out)
    for junk in out.glob(".*.tmp"):  # temp files of a run killed mid-write
        junk.unlink(missing_ok=True)
    record = Record(out, previous_outputs(out))
    entries = [Entry(source=path.name) for path in files]
    thumbs = _process(config, files, entries, caption, record)
    kept = [e for e in entries if e.kept]
    written = {e.output for e in kept} | {_caption_name(e.output) for e in kept if e.caption} \
        | {e.mask for e in kept if e.mask}
    if kept:
        record.add(SHEET_NAME)
        save_png(contact_sheet(thumbs, len(kept)), out / SHEET_NAME)
        written.add(SHEET_NAME)
    for name in sorted(record.names - written):  # gone from SRC, or rejected now
        (out / name).unlink(missing_ok=True)
    write_json(out / REPORT_NAME, {"config": asdict(config),
                                   "files": [asdict(e) for e in entries],
                                   "kept": len(kept), "rejected": len(entries) - len(kept)})
    if not kept:
        raise UserError(f"SRC {src}: none of {len(entries)} files could be used; "
                        f"reasons in {out / REPORT_NAME}")
    log.info("kept %d of %d files into %s", len(kept), len(entries), out)
    return entries


def _process(config: PrepareConfig, files: list[Path], entries: list[Entry],
             caption: str, record: Record) -> list[Thumb]:
    """Judge, crop and write each file in turn; returns the contact sheet's
    thumbnails (made as it goes: the originals are not held)."""
    out = Path(config.out)
    exact: dict[str, str] = {}
    hashes: list[tuple[int, str]] = []
    taken: set[str] = set()
    thumbs = []
    for path, entry in zip(files, entries):
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
        box = crop_box_for(im, config.crop, config.face_margin, entry, config.resolution)
        entry.crop_box = box
        cropped = crop_with_reflection(im, box)
        if config.crop == "none":
            final = resize_short_side(cropped, config.resolution)
        else:
            final = resize_to(cropped, entry.bucket or (config.resolution, config.resolution))
        entry.output = _output_name(path, taken)
        record.add(entry.output, *([_caption_name(entry.output)] if caption else []))
        save_png(final, out / entry.output)
        if caption:
            entry.caption = caption
            write_text(out / _caption_name(entry.output), caption + "\n")
        mask = _mask_for(config, path, im, entry)
        if mask is not None:
            entry.mask = mask_path(Path(entry.output)).name
            record.add(entry.mask)
            save_png(follow_crop(mask, box, final.size), out / entry.mask)
        entry.kept, entry.reason = True, "kept"
        for w in entry.warnings:
            log.warning("%s: %s", path.name, w)
        if len(thumbs) < SHEET_MAX:
            thumbs.append(thumbnail(im, box, entry.source))
    return thumbs


def _mask_for(config: PrepareConfig, path: Path, im: Image.Image,
              entry: Entry) -> Image.Image | None:
    """The photo's subject mask at its own size (L): --mask face's from the
    largest face, else the user's NAME.mask.png beside it; None (and a
    warning for one that cannot be used) without one."""
    if config.mask == "face":
        faces = find_faces(im)
        if faces:
            return face_mask(im.size, faces[0])
        entry.warnings.append("no face found; no mask")
        return None
    own = mask_path(path)
    if not own.is_file():
        return None
    try:
        with Image.open(own) as m:
            m.load()
            grey = upright_rgb(m).convert("L")
    except (OSError, ValueError):
        entry.warnings.append(f"{own.name}: not a readable image; no mask")
        return None
    if grey.size != im.size:
        entry.warnings.append(f"{own.name} is {grey.size[0]}x{grey.size[1]} px, the photo "
                              f"{im.size[0]}x{im.size[1]}: no mask")
        return None
    return grey


SHEET_MAX = 100  # cells: bounds the sheet (5 x 20 cells, 1 x 4.4 kpx) and the thumbnails held
CELL = 192  # a cell's side in pixels


@dataclass
class Thumb:
    """One kept photo as the contact sheet draws it."""

    image: Image.Image  # the photo scaled so that it and its crop box fit a cell
    offset: tuple[int, int]  # where the photo's top-left corner sits in the cell
    box: tuple[float, float, float, float]  # the crop box in cell pixels
    name: str


def thumbnail(im: Image.Image, box: Box, name: str) -> Thumb:
    left, top, right, bottom = box
    # the view spans the image and the crop box (which may leave the image)
    vx0, vy0 = min(0, left), min(0, top)
    vx1, vy1 = max(im.width, right), max(im.height, bottom)
    scale = CELL / max(vx1 - vx0, vy1 - vy0)
    small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                      Image.Resampling.LANCZOS, reducing_gap=3.0)
    ox, oy = -round(vx0 * scale), -round(vy0 * scale)
    return Thumb(small, (ox, oy), (ox + left * scale, oy + top * scale,
                                   ox + right * scale - 1, oy + bottom * scale - 1), name)


def contact_sheet(thumbs: list[Thumb], total: int, per_row: int = 5) -> Image.Image:
    """The kept photos (the first SHEET_MAX), each with its crop box drawn,
    names underneath."""
    thumbs = thumbs[:SHEET_MAX]
    if total > len(thumbs):
        log.info("contact sheet: the first %d of %d kept images", len(thumbs), total)
    face = font(13)
    label_h = 20
    rows = -(-len(thumbs) // per_row)
    cols = min(per_row, len(thumbs))
    sheet = Image.new("RGB", (cols * (CELL + 8) + 8, rows * (CELL + label_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, thumb in enumerate(thumbs):
        x0 = 8 + (i % per_row) * (CELL + 8)
        y0 = 8 + (i // per_row) * (CELL + label_h + 8)
        sheet.paste(thumb.image, (x0 + thumb.offset[0], y0 + thumb.offset[1]))
        left, top, right, bottom = thumb.box
        draw.rectangle((x0 + left, y0 + top, x0 + right, y0 + bottom), outline=(255, 0, 0),
                       width=2)
        draw.text((x0, y0 + CELL + 3), thumb.name[:28], fill=(20, 20, 20), font=face)
    return sheet
