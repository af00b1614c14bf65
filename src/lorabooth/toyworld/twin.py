"""The attribute-twin check: does a judge score *this* instance, or only its
attributes? A twin (same class, colour and pattern, another mark) must score
clearly below the subject's own held-out views."""

from __future__ import annotations

import random

from ..evaluation.metrics import cosine_matrix
from .subjects import CALIBRATION, EVALUATION, Subject
from .world import random_spec, render


def class_images(subject: Subject, n: int = 8, seed: int = 3) -> list:
    """Renders of the subject's class in other combinations, unmarked."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        spec = random_spec(rng, exclude_held_out=False)
        if spec.cls == subject.cls and spec.combo != subject.combo:
            out.append(render(spec, rng.randrange(1 << 30)))
    return out


def _row(embed, subject: Subject) -> dict[str, float]:
    ref = embed(subject.views())
    def sim(images):
        return round(cosine_matrix(embed(images), ref).mean().item(), 3)
    return {"own_held_out_views": sim(subject.held_out_views()),
            "twin_views": sim(subject.held_out_views(mark=subject.twin_mark)),
            "unmarked_views": sim(subject.held_out_views(mark=0)),
            "class_images": sim(class_images(subject))}


def twin_check(judge, instance=None, subjects=CALIBRATION + EVALUATION) -> dict:
    """Similarity to the subject's photos, per judge and subject."""
    judges = {"identity (judges' embedding)": judge.identity}
    if instance is not None:
        judges["instance (instance judge)"] = instance.embed
    return {name: {s.name: _row(embed, s) for s in subjects} for name, embed in judges.items()}
