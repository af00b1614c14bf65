"""Train the toy world's instance-level judge (src/lorabooth/toyworld/instance.py)
on the shipped judges' frozen backbone and the shipped VAE, and run the
attribute-twin check on it and on the judges' identity embedding.

    PYTHONPATH=src python benchmarks/instance_judge.py OUT.safetensors [RENDERS]

The shipped src/lorabooth/assets/toy/instance.safetensors was made with the
defaults; its record is docs/toyworld/instance_judge.json."""

from __future__ import annotations

import json
import logging
import sys

import torch

from lorabooth.models.loading import load_base, toy_model_dir
from lorabooth.toyworld.instance import InstanceJudge, train_instance_judge
from lorabooth.toyworld.judges import ToyJudge
from lorabooth.toyworld.twin import twin_check


def main(out: str, renders: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    judge = ToyJudge.load(toy_model_dir() / "judges.safetensors")
    vae = load_base("toy").vae.float().eval()

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    record = train_instance_judge(out, judge, renders=renders, blur=reconstruct)
    instance = InstanceJudge.load(out, judge)
    record["twin_check"] = twin_check(judge, instance)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6000)
