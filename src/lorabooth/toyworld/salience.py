"""Identifier salience: the toy world's calibration knob (docs/calibration.md).

How distinct a rare identifier ('sks', ...) reaches the UNet decides whether
prior preservation with class images lets the subject be learned; real text
encoders give rare tokens weak meanings of their own, of a strength no toy
pretraining pins down. So the strength is a world parameter, applied when the
toy model is loaded for a study, with no re-pretraining: every rare word's
input embedding e moves to a + s (e - a), where a is the embedding of the
word it stands in for in a DreamBooth prompt ('a photo of sks ball' against
'a photo of a ball'). s = 1 is the shipped model, s = 0 makes the identifier
the class prompt's 'a', s > 1 makes it more distinct."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..core.fileio import write_json
from ..models.loading import load_base, save_base
from .pretrain import rare_words

log = logging.getLogger(__name__)
ANCHOR = "a"


def _token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0]


@torch.no_grad()
def apply_salience(text_encoder, tokenizer, salience: float) -> int:
    """Move every single-token rare word's input embedding; returns how many moved."""
    table = text_encoder.get_input_embeddings().weight
    anchor = table[_token(tokenizer, ANCHOR)].clone()
    moved = 0
    for word in rare_words(tokenizer):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            table[ids[0]] = anchor + salience * (table[ids[0]] - anchor)
            moved += 1
    return moved


def calibrated_model(folder: str | Path, salience: float) -> Path:
    """The shipped toy model with ``salience`` applied, written to ``folder``
    once (a diffusers folder `train --model FOLDER` loads); reused after."""
    folder = Path(folder)
    stamp = folder / "salience.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("salience") == salience:
        return folder
    base = load_base("toy")
    moved = apply_salience(base.text_encoder, base.tokenizer, salience)
    save_base(base, folder)
    write_json(stamp, {"salience": salience, "rare_words_moved": moved})
    log.info("toy model at identifier salience %g written to %s", salience, folder)
    return folder
