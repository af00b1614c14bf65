"""How far a flow model's text features tell two prompts apart, and how far
its transformer's prediction follows them: the relative distance between
the encoded contexts of two captions of another class and place
(|c0 - c1| / |c0|), and between the predictions for the same noisy latents
under each (|v0 - v1| / |v0|). The flow toy model's README paragraph quotes it.

    PYTHONPATH=src python benchmarks/flow_text_separation.py flow-toy
"""

from __future__ import annotations

import json
import sys

import torch

from lorabooth.models.families import Conditioning
from lorabooth.models.loading import load_base

PROMPTS = ("a photo of a ball on the grass", "a photo of a kite in the room")


def separation(model: str, seed: int = 0) -> dict:
    base = load_base(model)
    family = base.family
    ids = family.tokenize([base.tokenizer], list(PROMPTS))
    with torch.no_grad():
        c = family.encode([base.text_encoder], ids).hidden
        x = torch.randn((1, base.unet.config.in_channels, 8, 8),
                        generator=torch.Generator().manual_seed(seed))
        v = [family.predict(base.unet, x, torch.tensor([0.7]), Conditioning(c[i:i + 1]))
             for i in range(2)]
    return {"model": model, "prompts": PROMPTS,
            "context": round(((c[0] - c[1]).norm() / c[0].norm()).item(), 4),
            "prediction": round(((v[0] - v[1]).norm() / v[0].norm()).item(), 4)}


if __name__ == "__main__":
    print(json.dumps(separation(sys.argv[1] if len(sys.argv) > 1 else "flow-toy")))
