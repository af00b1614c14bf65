"""How distinct rare identifiers are to a model's text encoder (the toy
world's calibration, docs/calibration.md): per model, the mean L2 per position
between 'a photo of W ball' and 'a photo of a ball' for rare W, reference
edits for scale, and input-embedding norms.

    python benchmarks/identifier_distance.py toy [/path/to/another/toy-model ...]
"""

from __future__ import annotations

import argparse
import json

from common import machine
from lorabooth.models.loading import load_base
from lorabooth.toyworld.calibration import identifier_distances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="built-in name or diffusers folder")
    args = parser.parse_args()
    print(json.dumps({"machine": machine()}))
    for model in args.models:
        base = load_base(model)
        print(json.dumps({"model": model, **identifier_distances(base.tokenizer, base.text_encoder)}))


if __name__ == "__main__":
    main()
