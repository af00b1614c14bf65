"""Opening the user's image files by content: one check shared by `prepare`
(which rejects a bad file and goes on) and `train` (which refuses to start)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import first_line
from .images import FORMATS, upright_rgb


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
