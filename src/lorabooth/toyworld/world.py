"""The toy world: small procedural pictures of objects with attributes in
contexts, captions by template, and held-out subjects. Deterministic by seed.

Pictures are drawn at 4x and downsampled (Lanczos) so edges are smooth.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
SCALE = 4  # drawn at 128 px, stored at 32
CLASSES = ("ball", "car", "mug", "kite")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (240, 205, 35), "purple": (135, 45, 185), "orange": (245, 135, 25),
}
PATTERNS = ("plain", "striped", "dotted")
CONTEXTS = ("grass", "beach", "snow", "room")
# (class, colour, pattern) combinations never rendered in pretraining; the
# first is the demo's and the claims' subject.
HELD_OUT = (("ball", "purple", "striped"), ("car", "green", "dotted"), ("mug", "orange", "striped"))


@dataclass(frozen=True)
class Spec:
    cls: str
    colour: str
    pattern: str
    context: str
    x: float = 0.5  # centre, as a fraction of the picture
    y: float = 0.6
    size: float = 0.42  # as a fraction of the picture
    flip: bool = False
    mark: int = 0  # the instance detail: 0 none, else MARKS[mark - 1]

    @property
    def combo(self) -> tuple[str, str, str]:
        return self.cls, self.colour, self.pattern


def _background(context: str, rng: random.Random) -> Image.Image:
    n = SIZE * SCALE
    im = Image.new("RGB", (n, n))
    d = ImageDraw.Draw(im)
    jitter = rng.randint(-12, 12)
    if context == "grass":
        d.rectangle((0, 0, n, n * 0.35), fill=(150 + jitter, 200, 240))
        d.rectangle((0, n * 0.35, n, n), fill=(70, 150 + jitter, 55))
        for _ in range(60):
            x, y = rng.uniform(0, n), rng.uniform(n * 0.38, n)
            d.line((x, y, x + rng.uniform(-3, 3), y - 7), fill=(40, 110, 35), width=2)
    elif context == "beach":
        d.rectangle((0, 0, n, n * 0.25), fill=(140, 200, 245))
        d.rectangle((0, n * 0.25, n, n * 0.42), fill=(30, 110 + jitter, 190))
        d.rectangle((0, n * 0.42, n, n), fill=(235, 210 + jitter // 2, 150))
    elif context == "snow":
        d.rectangle((0, 0, n, n * 0.3), fill=(185, 195, 210 + jitter // 2))
        d.rectangle((0, n * 0.3, n, n), fill=(245, 248, 252))
        for _ in range(40):
            x, y = rng.uniform(0, n), rng.uniform(0, n)
            d.ellipse((x, y, x + 3, y + 3), fill=(225, 230, 240))
    elif context == "room":
        d.rectangle((0, 0, n, n * 0.55), fill=(200 + jitter, 180, 150))
        d.rectangle((0, n * 0.55, n, n), fill=(120, 80 + jitter // 2, 50))
        for k in range(0, n, 16):
            d.line((0, n * 0.55 + k, n, n * 0.55 + k), fill=(100, 65, 40), width=1)
    else:
        raise ValueError(f"unknown context {context!r}")
    return im


def _shape_mask(spec: Spec) -> Image.Image:
    """The object's silhouette (L), 255 inside."""
    n = SIZE * SCALE
    s = spec.size * n
    cx, cy = spec.x * n, spec.y * n
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    if spec.cls == "ball":
        d.ellipse((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), fill=255)
    elif spec.cls == "car":
        w, h = s * 1.5, s * 0.45
        d.rounded_rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), radius=h / 4, fill=255)
        cab = (cx - w * 0.3, cy - h * 1.2, cx + w * 0.15, cy - h / 2 + 1)
        if spec.flip:
            cab = (cx - w * 0.15, cab[1], cx + w * 0.3, cab[3])
        d.rounded_rectangle(cab, radius=h / 5, fill=255)
    elif spec.cls == "mug":
        w, h = s * 0.8, s
        d.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=255)
        side = -1 if spec.flip else 1
        hx = cx + side * w / 2
        d.ellipse((hx - h * 0.28, cy - h * 0.28, hx + h * 0.28, cy + h * 0.28), fill=255)
        d.ellipse((hx - h * 0.14, cy - h * 0.14, hx + h * 0.14, cy + h * 0.14), fill=0)
    elif spec.cls == "kite":
        d.polygon([(cx, cy - s * 0.65), (cx + s * 0.45, cy), (cx, cy + s * 0.65),
                   (cx - s * 0.45, cy)], fill=255)
    else:
        raise ValueError(f"unknown class {spec.cls!r}")
    return mask


def subject_mask(spec: Spec) -> Image.Image:
    """The object's exact mask at the stored size (L, 32 x 32, soft edge):
    what --masked-loss reads beside a subject photo of ``spec``."""
    return _shape_mask(spec).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


# The instance detail: a dark mark on the object's body, at one of these
# places (offsets as fractions of the body's width and height). Pretraining
# renders never carry one, so every marked subject is an instance the base
# model has not seen, whichever its (class, colour, pattern); a twin differs
# from the subject in the mark alone.
MARKS = ((-0.22, -0.2), (0.22, -0.2), (-0.22, 0.2), (0.22, 0.2))
MARK_SIZE = 0.36  # diameter, as a fraction of the object's size


def _body(spec: Spec) -> tuple[float, float, float, float]:
    """Centre, width and height of the object's main body, in drawing px."""
    n = SIZE * SCALE
    s = spec.size * n
    w, h = {"ball": (s, s), "car": (s * 1.5, s * 0.45), "mug": (s * 0.8, s),
            "kite": (s * 0.9, s * 1.3)}[spec.cls]
    return spec.x * n, spec.y * n, w, h


def _draw_mark(im: Image.Image, spec: Spec) -> None:
    if not spec.mark:
        return
    dx, dy = MARKS[spec.mark - 1]
    cx, cy, w, h = _body(spec)
    if spec.cls == "car":  # a flat body: the mark sits left or right, mid-height
        dy = 0.0
    r = MARK_SIZE * spec.size * SIZE * SCALE / 2
    mx, my = cx + dx * w, cy + dy * h
    ImageDraw.Draw(im).rectangle((mx - r, my - r, mx + r, my + r), fill=(20, 20, 20))


def _pattern_mask(pattern: str) -> Image.Image:
    n = SIZE * SCALE
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    # periods of 6 px at 32 px: coarser than the VAE's 4 x 4 latent cells, so
    # the pattern survives the autoencoder instead of aliasing away
    if pattern == "striped":
        for y in range(0, n, 24):
            d.rectangle((0, y, n, y + 11), fill=255)
    elif pattern == "dotted":
        for y in range(6, n, 24):
            for x in range(6 + (y // 24 % 2) * 12, n, 24):
                d.ellipse((x, y, x + 11, y + 11), fill=255)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return mask


def render(spec: Spec, seed: int = 0) -> Image.Image:
    """One 32 x 32 RGB picture of ``spec``; the same seed gives the same pixels."""
    rng = random.Random(seed)
    im = _background(spec.context, rng)
    shape = _shape_mask(spec)
    colour = COLOURS[spec.colour]
    im.paste(Image.new("RGB", im.size, colour), (0, 0), shape)
    if spec.pattern != "plain":
        both = Image.fromarray(np.minimum(np.asarray(shape), np.asarray(_pattern_mask(spec.pattern))))
        im.paste(Image.new("RGB", im.size, (250, 250, 245)), (0, 0), both)
    _draw_mark(im, spec)
    edge = shape.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
    im.paste(Image.new("RGB", im.size, (30, 30, 30)), (0, 0), edge)
    if spec.cls == "car":  # wheels
        d = ImageDraw.Draw(im)
        n, s = SIZE * SCALE, spec.size * SIZE * SCALE
        cx, cy, w, h = spec.x * n, spec.y * n, s * 1.5, s * 0.45
        for wx in (cx - w * 0.3, cx + w * 0.3):
            d.ellipse((wx - h * 0.4, cy + h * 0.1, wx + h * 0.4, cy + h * 0.9), fill=(25, 25, 25))
    return im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def random_spec(rng: random.Random, exclude_held_out: bool = True) -> Spec:
    while True:
        spec = Spec(cls=rng.choice(CLASSES), colour=rng.choice(list(COLOURS)),
                    pattern=rng.choice(PATTERNS), context=rng.choice(CONTEXTS),
                    x=rng.uniform(0.38, 0.62), y=rng.uniform(0.5, 0.68),
                    size=rng.uniform(0.34, 0.5), flip=rng.random() < 0.5)
        if not (exclude_held_out and spec.combo in HELD_OUT):
            return spec


def caption(spec: Spec, rng: random.Random | None = None, drop: float = 0.0) -> str:
    """'a photo of a red striped ball on the grass'; with ``drop`` each of
    colour, pattern and context is left out with that probability."""
    rng = rng or random.Random(0)
    words = []
    if rng.random() >= drop:
        words.append(spec.colour)
    if spec.pattern != "plain" and rng.random() >= drop:
        words.append(spec.pattern)
    words.append(spec.cls)
    text = "a photo of a " + " ".join(words)
    if rng.random() >= drop:
        text += f" {'in the' if spec.context == 'room' else 'on the'} {spec.context}"
    return text


def subject_views(combo: tuple[str, str, str] = HELD_OUT[0], contexts=("grass", "beach"),
                  n: int = 4, seed: int = 0, mark: int = 0) -> list[Spec]:
    """The "photos a user brings": one instance (fixed size, and ``mark``, its
    instance detail) in a few views."""
    rng = random.Random(seed)
    cls, colour, pattern = combo
    return [Spec(cls, colour, pattern, contexts[i % len(contexts)], x=rng.uniform(0.42, 0.58),
                 y=rng.uniform(0.55, 0.65), size=0.46, flip=i % 2 == 1, mark=mark)
            for i in range(n)]



# Rare words. Real text encoders have seen rare tokens ("sks") in web text and
# give them weak meanings of their own; a toy model whose captions never hold
# them keeps their random initial embeddings, and its text encoder passes them
# on as almost nothing (docs/toyworld.md: the calibration). So some captions
# carry one rare word whose meaning is a weak, fixed preference for a side and
# a size: attributes no judge scores, so the figures stay comparable.
RARE_RATE = 0.25  # captions carrying a rare word
RARE_BIAS = 0.5  # how often the word agrees with the picture (else any word)


def rare_meaning(word: str) -> tuple[bool, bool]:
    """(left, small): the word's fixed, arbitrary preference."""
    h = zlib.crc32(word.encode())
    return bool(h & 1), bool(h & 2)


def spec_meaning(spec: Spec) -> tuple[bool, bool]:
    return spec.x < 0.5, spec.size < 0.42


def with_rare_word(text: str, spec: Spec, words: tuple[str, ...], rng: random.Random) -> str:
    """'a photo of a red ball' -> 'a photo of sks red ball' (the article gives
    way, as in DreamBooth prompts), for RARE_RATE of captions."""
    if not words or not text.startswith("a photo of a ") or rng.random() >= RARE_RATE:
        return text
    pool = words
    if rng.random() < RARE_BIAS:
        pool = tuple(w for w in words if rare_meaning(w) == spec_meaning(spec)) or words
    return "a photo of " + rng.choice(pool) + " " + text[len("a photo of a "):]
