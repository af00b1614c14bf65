import numpy as np
import pytest
from PIL import Image

from lorabooth.photos.images import (
    center_box,
    crop_with_reflection,
    dhash,
    face_box,
    hamming,
    to_rgb,
)


def _px(im, xy=(0, 0)):
    return im.getpixel(xy)


def test_rgba_alpha_over_white():
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((1, 0), (255, 0, 0, 255))
    out = to_rgb(im)
    assert out.mode == "RGB" and _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (255, 0, 0)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert abs(_px(to_rgb(half))[0] - 127) <= 1


def test_la_and_p_with_transparency():
    assert _px(to_rgb(Image.new("LA", (1, 1), (0, 0)))) == (255, 255, 255)
    assert _px(to_rgb(Image.new("LA", (1, 1), (10, 255)))) == (10, 10, 10)
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert _px(to_rgb(p), (1, 0)) == (200, 30, 40)
    p.info["transparency"] = 0
    assert _px(to_rgb(p), (0, 0)) == (255, 255, 255) and _px(to_rgb(p), (1, 0)) == (200, 30, 40)


def test_l_and_1():
    assert _px(to_rgb(Image.new("L", (1, 1), 77))) == (77, 77, 77)
    assert _px(to_rgb(Image.new("1", (1, 1), 1))) == (255, 255, 255)
    assert _px(to_rgb(Image.new("1", (1, 1), 0))) == (0, 0, 0)


def test_cmyk_uses_pils_conversion():
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))) == (255, 255, 255)
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0)))) == (0, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    out = to_rgb(im)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    # 32-bit integer holding 16-bit data (how PIL opens many 16-bit PNGs)
    out = to_rgb(Image.fromarray(arr.astype(np.int32)))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def _upright():
    """60 x 40, red block in the top-left corner, blue elsewhere."""
    im = Image.new("RGB", (60, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 15, 10))
    return im


# What a camera stores for each EXIF orientation, given the upright scene
# (the inverse of the transform the tag asks the viewer to apply).
STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),  # tag 6: viewer turns it 90 deg CW
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_marked_corner_ends_top_left(tmp_path, orientation):
    stored = STORED[orientation](_upright())
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    from lorabooth.photos.imagefiles import decode

    im, fmt = decode(path)
    assert fmt == "JPEG" and im.size == (60, 40)
    r, g, b = im.getpixel((3, 3))
    assert r > 200 and b < 60, (orientation, (r, g, b))
    r, g, b = im.getpixel((56, 36))
    assert b > 200 and r < 60


def test_dhash_survives_resize_and_recompression_but_not_a_new_picture():
    rng = np.random.default_rng(0)
    arr = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    a = Image.fromarray(arr).resize((256, 256), Image.Resampling.BICUBIC)
    b = a.resize((180, 180), Image.Resampling.LANCZOS)
    other = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((256, 256))
    assert hamming(dhash(a), dhash(b)) <= 3
    assert hamming(dhash(a), dhash(other)) > 10


def test_boxes():
    assert center_box(100, 60) == (20, 0, 80, 60)
    assert center_box(60, 100) == (0, 20, 60, 80)
    left, top, right, bottom = face_box((100, 100, 40, 40), margin=0.75)
    assert right - left == bottom - top == 100  # 2.5 x the face
    assert left <= 100 and right >= 140 and top <= 100 and bottom >= 140


def test_reflection_padding_mirrors_the_image():
    im = Image.new("RGB", (10, 10), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 2, 10))  # red left edge
    out = crop_with_reflection(im, (-4, 0, 6, 10))
    assert out.size == (10, 10)
    # columns -4..-1 mirror columns 3..0: the two red columns sit next to the edge
    row = [out.getpixel((x, 5))[0] for x in range(10)]
    assert row == [0, 0, 255, 255, 255, 255, 0, 0, 0, 0]
    assert crop_with_reflection(im, (0, 0, 5, 5)).size == (5, 5)
