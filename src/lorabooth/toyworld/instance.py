"""The instance-level judge: tells one object from its attribute twin.

The judges' identity embedding was trained to tell (class, colour, pattern)
combinations apart, so it scores "is a purple striped ball", not "is this
ball": a twin with the same attributes and another mark scores as high as
the subject itself (docs/toyworld.md, the twin check). This small head reads
the frozen judge backbone's 8 x 8 feature map (the judges are not retrained)
and is trained to tell instances (combination x mark) apart across contexts,
places, sizes and sides: the toy world's DINO at the instance level."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from .judges import COMBOS, JudgeNet, ToyJudge, _pixels
from .schedule import schedule
from .world import MARKS, random_spec, render

log = logging.getLogger(__name__)
INSTANCES = len(COMBOS) * (len(MARKS) + 1)
FEATURE_LAYERS = 9  # the backbone's first three blocks: 128 channels at 8 x 8


class InstanceHead(nn.Module):
    def __init__(self, channels: int = 128, width: int = 48, embed: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width),
                                  nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1),
                                  nn.GroupNorm(8, width), nn.SiLU(), nn.Flatten())
        self.embed = nn.Linear(width * 16, embed)
        self.centres = nn.Parameter(torch.randn(INSTANCES, embed) * 0.1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.conv(features)), dim=-1)


def _features(net: JudgeNet, x: torch.Tensor) -> torch.Tensor:
    return net.backbone[:FEATURE_LAYERS](x)


def instance_label(spec) -> int:
    return COMBOS.index(spec.combo) * (len(MARKS) + 1) + spec.mark


def random_instance(rng: random.Random):
    """A random render spec carrying a random mark (or none)."""
    spec = random_spec(rng, exclude_held_out=False)
    return spec.__class__(**{**spec.__dict__, "mark": rng.randrange(len(MARKS) + 1)})


def _pool(judge: ToyJudge, n: int, rng: random.Random, blur) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-backbone features of ``n`` fresh renders (half through ``blur``)
    and their instance labels: rendered once, the head then trains on them."""
    feats, labels = [], []
    for start in range(0, n, 64):
        specs = [random_instance(rng) for _ in range(min(64, n - start))]
        x = _pixels([render(s, rng.randrange(1 << 30)) for s in specs])
        if blur is not None:
            x[: len(specs) // 2] = blur(x[: len(specs) // 2])
        with torch.no_grad():
            feats.append(_features(judge.net, x + 0.03 * torch.randn_like(x)))
        labels += [instance_label(s) for s in specs]
    return torch.cat(feats), torch.tensor(labels)


def train_instance_judge(path: str | Path, judge: ToyJudge, seed: int = 0, steps: int = 1500,
                         batch: int = 128, renders: int = 6000, blur=None) -> dict:
    """Train the head (the judge backbone frozen) on the features of
    ``renders`` fresh pictures; ``blur`` as in `train_judges`: half of them
    go through the VAE, so the head also reads generated images' softness."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    feats, labels = _pool(judge, renders, random.Random(seed + 11), blur)
    log.info("instance judge: %d renders' features in %.0f s", renders, time.perf_counter() - t0)
    head = InstanceHead()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = schedule(opt, steps, warmup=steps // 20)
    for step in range(steps):
        pick = torch.randint(0, len(labels), (batch,))
        emb = head(feats[pick])
        loss = F.cross_entropy(16 * emb @ F.normalize(head.centres, dim=-1).T, labels[pick])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            log.info("instance judge step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    head.eval()
    state = {k: v.detach().half().contiguous() for k, v in head.state_dict().items()
             if k != "centres"}  # the centres are training's only: not shipped
    save_file(state, str(path))
    return {"instance_steps": steps, "instance_renders": renders,
            "instance_seconds": round(time.perf_counter() - t0)}


class InstanceJudge:
    """Instance embeddings of pictures: the judge's frozen backbone, then the head."""

    def __init__(self, judge: ToyJudge, head: InstanceHead):
        self.judge, self.head = judge, head.eval()

    @classmethod
    def load(cls, path: str | Path, judge: ToyJudge) -> "InstanceJudge":
        head = InstanceHead()
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        state["centres"] = head.centres.detach()
        head.load_state_dict(state)
        return cls(judge, head)

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        return self.head(_features(self.judge.net, _pixels(images)))
