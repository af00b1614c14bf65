"""The configs of the commands around training: `prepare` and `identifier`."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import MAX_PHOTO_SIDE, MAX_SEED, MAX_SIDE
from .fields import _help, bad, check_numbers

CROPS = ("center", "face", "none", "bucket")
MASKS = ("none", "face")


@dataclass(frozen=True)
class PrepareConfig:
    src: str = _help("Folder of the user's photos (never modified).", "", positional=True)
    out: str = _help("Folder for the training set.", "", positional=True)
    resolution: int = _help("Side of the square output images in pixels (0: --model's native "
                            "size: SD 1.x 512, SDXL and FLUX 1024; 512 without --model); "
                            "--crop bucket: about this squared in area.", 0)
    model: str = _help("The base model the set is for (as for train): --resolution defaults to "
                       "its native size.", "")
    crop: str = _help("center, face (largest face, OpenCV Haar cascade), none (the short side "
                      "resized, the aspect kept) or bucket (the aspect-ratio bucket nearest the "
                      "photo's, as train --buckets picks it: sides multiples of 64, 1:4 to 4:1; "
                      "the least centred crop to it; recorded in prepare.json).", "center",
                      choices=CROPS)
    min_size: int = _help("Reject images whose short side is below this (0: half the resolution).", 0)
    face_margin: float = _help("Space around the face on each side, in face sizes "
                               "(0.75: a head-and-shoulders portrait).", 0.75)
    mask: str = _help("Write NAME.mask.png beside each image for train --masked-loss: face "
                      "(an ellipse around the largest face, soft edge) or none. A photo's own "
                      "NAME.mask.png in SRC is cropped with it either way.", "none",
                      choices=MASKS)
    caption: str = _help("Caption template written beside each image, e.g. "
                         "'a photo of {identifier} {class}'.", "")
    identifier: str = _help("The identifier for {identifier} in --caption.", "sks")
    class_noun: str = _help("The class noun for {class} in --caption.", "")
    dedupe_threshold: int = _help("Near-duplicate when the 64-bit perceptual hashes differ in at "
                                  "most this many bits (-1: only exact duplicates).", 5)

    def __post_init__(self) -> None:
        check_numbers(self)
        if not 0 <= self.resolution <= MAX_SIDE or self.resolution % 8:
            raise bad(self, "resolution", f"must be a positive multiple of 8, at most {MAX_SIDE} "
                                           "(0: the model's own)")
        if not 0 <= self.min_size <= MAX_PHOTO_SIDE:
            raise bad(self, "min_size", f"must be between 0 and {MAX_PHOTO_SIDE}")
        if self.face_margin < 0:
            raise bad(self, "face_margin", "must be 0 or more")
        if not -1 <= self.dedupe_threshold <= 64:
            raise bad(self, "dedupe_threshold", "must be between -1 and 64")
        if "{class}" in self.caption and not self.class_noun:
            raise bad(self, "class_noun", "is required when --caption uses {class}")
        if "{identifier}" in self.caption and not self.identifier:
            raise bad(self, "identifier", "is required when --caption uses {identifier}")

    @property
    def min_size_px(self) -> int:
        return self.min_size or self.resolution // 2



@dataclass(frozen=True)
class IdentifierConfig:
    model: str = _help("Whose tokenizer (tiny = CLIP's; tiny-flux2 = a small byte-level BPE as "
                       "Qwen3's; FLUX.1: candidates from T5's unigram vocabulary, --check shows "
                       "CLIP's and T5's tokens).", "tiny")
    n: int = _help("How many candidates to show.", 10)
    seed: int | None = _help("Draw --n at random from the rarest candidates instead of the top.",
                             None)
    check: str = _help("Show how this prompt tokenises (under each of the model's tokenizers) "
                       "and warn about its identifier.", "")

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.n < 1:
            raise bad(self, "n", "must be at least 1")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise bad(self, "seed", f"must be between 0 and {MAX_SEED}")
