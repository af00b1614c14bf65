"""The toy world's judges: one small CNN with heads for class, colour,
pattern and context, and an identity embedding trained to tell instances
(class x colour x pattern) apart: the toy world's DINO."""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ..evaluation.embedders import Judges
from ..photos.images import chw_uint8, signed_unit
from .schedule import schedule
from .world import CLASSES, COLOURS, CONTEXTS, PATTERNS, Spec, random_spec, render

log = logging.getLogger(__name__)
HEADS = {"cls": CLASSES, "colour": tuple(COLOURS), "pattern": PATTERNS, "context": CONTEXTS}
COMBOS = [(c, k, p) for c in CLASSES for k in COLOURS for p in PATTERNS]


class JudgeNet(nn.Module):
    def __init__(self, width: int = 64, embed: int = 64):
        super().__init__()
        chans = [3, width // 2, width, 2 * width, 2 * width]
        layers = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, b), nn.SiLU()]
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        feat = chans[-1]
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in HEADS.items()})
        self.embed = nn.Linear(feat, embed)
        self.identity = nn.Parameter(torch.randn(len(COMBOS), embed) * 0.1)  # class centres

    def forward(self, x: torch.Tensor):
        h = self.backbone(x)
        return {k: head(h) for k, head in self.heads.items()}, F.normalize(self.embed(h), dim=-1)


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return signed_unit(torch.stack([chw_uint8(im.convert("RGB").resize((32, 32)))
                                    for im in images]))


def _labels(specs: list[Spec]) -> dict[str, torch.Tensor]:
    out = {k: torch.tensor([v.index(getattr(s, k)) for s in specs]) for k, v in HEADS.items()}
    out["combo"] = torch.tensor([COMBOS.index(s.combo) for s in specs])
    return out


def train_judges(path: str | Path, seed: int = 0, steps: int = 1500, batch: int = 128,
                 blur=None) -> dict:
    """Train on fresh renders of every combination (held-out ones included: the
    judge must know the subject). ``blur``, if given, maps a batch of pixels to
    a degraded copy (the VAE's reconstruction) so judges also read generated
    images' softness."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 7)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = schedule(opt, steps, warmup=steps // 20)
    t0 = time.perf_counter()
    for step in range(steps):
        specs = [random_spec(rng, exclude_held_out=False) for _ in range(batch)]
        x = _pixels([render(s, rng.randrange(1 << 30)) for s in specs])
        if blur is not None:
            x[: batch // 2] = blur(x[: batch // 2])
        x = x + 0.03 * torch.randn_like(x)
        labels = _labels(specs)
        logits, emb = net(x)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        loss = loss + F.cross_entropy(16 * emb @ F.normalize(net.identity, dim=-1).T, labels["combo"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            log.info("judges step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    net.eval()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    accuracy = judge_accuracy(ToyJudge(net), seed=seed + 99)
    log.info("judge accuracy on fresh renders: %s", accuracy)
    return {"judge_steps": steps, "judge_seconds": round(time.perf_counter() - t0),
            "judge_accuracy_fresh": accuracy}


class ToyJudge:
    """The toy world's judge net; `toy_judge()` loads the toy model's own."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path) -> "ToyJudge":
        net = JudgeNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.inference_mode()
    def probabilities(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        logits, _ = self.net(_pixels(images))
        return {k: v.softmax(-1) for k, v in logits.items()}

    def predict(self, images: list[Image.Image]) -> list[dict[str, str]]:
        probs = self.probabilities(images)
        return [{k: HEADS[k][int(probs[k][i].argmax())] for k in HEADS} for i in range(len(images))]

    @torch.inference_mode()
    def identity(self, images: list[Image.Image]) -> torch.Tensor:
        return self.net(_pixels(images))[1]

    def attributes(self, images: list[Image.Image]) -> torch.Tensor:
        """Predicted attribute probabilities, concatenated: (N, 17)."""
        probs = self.probabilities(images)
        return torch.cat([probs[k] for k in HEADS], dim=-1)

    def judges(self) -> Judges:
        """The toy world's stand-ins for DINO, CLIP-I and CLIP-T in `evaluate`."""
        return Judges(identity=self.identity, image=self.identity, text_image=self.attributes,
                      text=prompt_attributes, names={"dino": "toy identity judge",
                                                     "clip": "toy attribute judge"})


def prompt_attributes(prompts: list[str]) -> torch.Tensor:
    """The attributes a prompt names as one-hot groups (unnamed groups zero),
    in the same space as ``ToyJudge.attributes``: the toy CLIP text side."""
    rows = []
    for prompt in prompts:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        row = []
        for values in HEADS.values():
            row += [1.0 if v in words else 0.0 for v in values]
        rows.append(row)
    return torch.tensor(rows)


def judge_accuracy(judge: ToyJudge, n: int = 512, seed: int = 123) -> dict[str, float]:
    rng = random.Random(seed)
    specs = [random_spec(rng, exclude_held_out=False) for _ in range(n)]
    preds = judge.predict([render(s, rng.randrange(1 << 30)) for s in specs])
    return {k: round(sum(p[k] == getattr(s, k) for p, s in zip(preds, specs)) / n, 4)
            for k in HEADS}


def toy_judge() -> ToyJudge:
    """The judge trained with the toy model (`toyworld pretrain`)."""
    from ..models.loading import toy_model_dir

    return ToyJudge.load(toy_model_dir() / "judges.safetensors")


def toy_judges() -> Judges:
    """The toy judge as `evaluate`'s judges: what `--judges toy` loads."""
    return toy_judge().judges()
