"""How distinct a rare identifier is to the text encoder: the measurement
behind the toy world's calibration (docs/calibration.md). If 'a photo of sks
ball' reaches the UNet almost as 'a photo of a ball' does, prior preservation
trains both prompts towards the same picture and the subject is not learned."""

from __future__ import annotations

import torch

from ..models.families import tokenize
from ..photos.identifier import candidates

CLASS_PROMPT = "a photo of a ball"
# same length as the class prompt where a word replaces its "a", as the identifier does
REFERENCES = ("a photo of red ball", "a photo of striped ball", "a photo of a ball on the snow")
CAPTION_WORDS = ("ball", "car", "mug", "kite", "red", "purple", "striped", "dotted", "snow", "room")


@torch.no_grad()
def prompt_distance(tokenizer, text_encoder, prompt: str, reference: str = CLASS_PROMPT) -> float:
    """Mean over the 77 positions of the L2 distance between the two
    prompts' last hidden states: what the UNet's cross-attention reads."""
    states = text_encoder(tokenize(tokenizer, [prompt, reference]))[0]  # (2, 77, D)
    return (states[0] - states[1]).norm(dim=-1).mean().item()


def _norm(tokenizer, text_encoder, word: str) -> float:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight[ids[0]].float().norm().item()


def identifier_distances(tokenizer, text_encoder, count: int = 5) -> dict:
    """'sks' and the ``count`` rarest identifier candidates against the class
    prompt, reference edits for scale, and mean input-embedding norms."""
    words = ["sks"] + [c.token for c in candidates(tokenizer)[:count]]
    text_encoder = text_encoder.float().eval()
    return {
        "identifiers": {w: round(prompt_distance(tokenizer, text_encoder, f"a photo of {w} ball"), 3)
                        for w in words},
        "references": {p: round(prompt_distance(tokenizer, text_encoder, p), 3) for p in REFERENCES},
        "rare_norm": round(sum(_norm(tokenizer, text_encoder, w) for w in words) / len(words), 3),
        "word_norm": round(sum(_norm(tokenizer, text_encoder, w) for w in CAPTION_WORDS)
                           / len(CAPTION_WORDS), 3),
    }
