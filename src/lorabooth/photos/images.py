"""Pure image helpers: the one conversion of any photo to upright RGB that
training, `prepare` and `evaluate` share (so all three see the same pixels),
perceptual hashes, square crop boxes, reflection padding. No files, no models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # prepare and the CLI use this module without torch
    import torch

# Formats recognised by content (PIL sniffs the bytes; the extension is ignored).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited over white, 16/32-bit
    integer images scaled to 0-255, CMYK through PIL's own conversion."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV


def orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (1-8) so the pixels stand upright."""
    return ImageOps.exif_transpose(im)


def upright_rgb(im: Image.Image) -> Image.Image:
    """A photo as every command sees it: EXIF-upright, then ``to_rgb``."""
    return to_rgb(orient(im))


def dhash(im: Image.Image, size: int = 8) -> int:
    """Difference hash: a 64-bit fingerprint that survives resizing,
    recompression and small colour changes (Krawetz, 'Kind of like that')."""
    small = im.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    px = np.asarray(small, dtype=np.int16)  # (size, size + 1)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


Box = tuple[int, int, int, int]  # left, top, right, bottom; may leave the image


def center_box(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def face_box(face: tuple[int, int, int, int], margin: float) -> Box:
    """A square around a detected face ``(x, y, w, h)``: side = face size x
    (1 + 2 * margin), centred a little below the face so that with the default
    margin (0.75: side 2.5x the face) the crop is a head-and-shoulders portrait."""
    x, y, w, h = face
    size = max(w, h)
    side = int(round(size * (1 + 2 * margin)))
    cx, cy = x + w / 2, y + h / 2 + 0.2 * h  # shoulders below, not sky above
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    return left, top, left + side, top + side


def crop_with_reflection(im: Image.Image, box: Box) -> Image.Image:
    """Crop ``box``; where it leaves the image, fill by mirroring the image."""
    left, top, right, bottom = box
    w, h = im.size
    pad_l, pad_t = max(0, -left), max(0, -top)
    pad_r, pad_b = max(0, right - w), max(0, bottom - h)
    if not (pad_l or pad_t or pad_r or pad_b):
        return im.crop(box)
    arr = np.asarray(im)  # (H, W, 3), or (H, W) for a mask
    pads = ((pad_t, pad_b), (pad_l, pad_r)) + ((0, 0),) * (arr.ndim - 2)
    arr = np.pad(arr, pads, mode="symmetric")
    return Image.fromarray(arr).crop((left + pad_l, top + pad_t, right + pad_l, bottom + pad_t))


def resize_to(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``im`` resized to ``size`` (width, height)."""
    # reducing_gap: a fast box-filter pre-shrink, then Lanczos; same quality as
    # plain Lanczos at a fraction of the cost on 12-megapixel phone photos.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def resize_short_side(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def chw_uint8(im: Image.Image) -> torch.Tensor:
    """An RGB picture as a (3, H, W) uint8 tensor."""
    import torch

    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return pixels.view(im.height, im.width, 3).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1], the range the VAE and the judges take."""
    return pixels.float() / 127.5 - 1.0
