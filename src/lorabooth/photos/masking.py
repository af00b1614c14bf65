"""Subject masks for `prepare`: one made from the face it finds (--mask
face), or the user's own ``NAME.mask.png`` beside a photo carried through
the photo's crop, so that training (--masked-loss) reads a mask that lies
exactly over its output image."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFilter

from .images import Box, crop_with_reflection, resize_to

FACE_MASK_MARGIN = 0.3  # face sizes added around the face box: hair, ears, chin
FACE_MASK_SOFTNESS = 0.15  # the edge's blur radius, in face sizes


def face_mask(size: tuple[int, int], face: tuple[int, int, int, int],
              margin: float = FACE_MASK_MARGIN) -> Image.Image:
    """(L, ``size``) white over an ellipse around ``face`` (x, y, w, h)
    widened by ``margin`` face sizes on each side, its edge blurred."""
    x, y, w, h = face
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((x - margin * w, y - margin * h,
                                  x + w + margin * w, y + h + margin * h), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(FACE_MASK_SOFTNESS * max(w, h)))


def follow_crop(mask: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """``mask`` (L, the photo's size) cropped and resized exactly as its
    photo is: the same box (mirrored where the box leaves the image), then
    the output image's ``size`` (square, its bucket, or its short side's)."""
    return resize_to(crop_with_reflection(mask.convert("L"), box), size)
