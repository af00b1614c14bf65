"""`lorabooth toyworld claims`: the seed's and the paper's claims measured on
the toy world, over several seeds, with spreads; written to a markdown
report with image grids. A claim "holds" only where the difference between
the compared settings exceeds the spread (max - min) of both over seeds."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..drawing import Setting, draw, load_pipeline
from ..evaluation.metrics import cosine_matrix, mean_pairwise_within
from ..fileio import save_png, write_json
from ..grid import make_grid
from ..training import train
from .judges import ToyJudge
from .world import HELD_OUT, render, subject_views

log = logging.getLogger(__name__)
SUBJECT = HELD_OUT[0]  # purple striped ball
NEW_CONTEXTS = ("snow", "room")  # never in the subject's photos (grass, beach)
OTHER_CLASSES = ("mug", "car", "kite")


@dataclass(frozen=True)
class Variant:
    name: str
    identifier: str = "sks"
    prior: bool = False
    text_encoder: bool = False


VARIANTS = (
    Variant("unet"),
    Variant("unet+prior", prior=True),
    Variant("unet+te", text_encoder=True),
    Variant("common-word", identifier="red"),
)


@dataclass
class Study:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    images: int = 16  # per prompt
    variants: tuple[Variant, ...] = VARIANTS
    scales: bool = True
    results: dict = field(default_factory=dict)


def subject_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(subject_views(SUBJECT)):
        save_png(render(spec, 1000 + i), folder / f"view_{i}.png")
    return folder


def train_variant(study: Study, variant: Variant, seed: int, photos: Path) -> Path:
    out = study.out / "runs" / f"{variant.name}-seed{seed}"
    if (out / "pytorch_lora_weights.safetensors").is_file():
        return out
    train(TrainConfig(
        model="toy", instance_dir=str(photos), output=str(out), seed=seed, steps=study.steps,
        instance_prompt=f"a photo of {variant.identifier} ball",
        class_prompt="a photo of a ball", prior_preservation=variant.prior,
        num_class_images=64, class_dir=str(study.out / f"class_images-seed{seed}"),
        class_draw_steps=20, class_draw_batch=16, batch_size=4, lr=1e-3, lr_text=1e-4,
        train_text_encoder=variant.text_encoder, rank=4,
    ))
    return out


def _entropy(labels: list[str]) -> float:
    counts = Counter(labels)
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def score(pipe, has_text: bool, judge: ToyJudge, subject, identifier: str, setting: Setting,
          n: int, keep: dict | None = None) -> dict:
    """Fidelity, context, drift and variety figures for one model setting."""
    seeds = list(range(n))
    fid, subj, ctx = [], [], []
    for context in NEW_CONTEXTS:
        prep = "in the" if context == "room" else "on the"
        images = draw(pipe, has_text, f"a photo of {identifier} ball {prep} {context}", setting,
                      seeds, 20)
        if keep is not None:
            keep[context] = images
        fid.append(cosine_matrix(judge.identity(images), subject).mean().item())
        preds = judge.predict(images)
        subj += [p["colour"] == SUBJECT[1] and p["pattern"] == SUBJECT[2] for p in preds]
        ctx += [p["context"] == context for p in preds]
    bare = draw(pipe, has_text, "a photo of a ball", setting, seeds, 20)
    bare_preds = judge.predict(bare)
    bare_id = judge.identity(bare)
    others = []
    for cls in OTHER_CLASSES:  # does the identifier word leak into other prompts?
        preds = judge.predict(draw(pipe, has_text, f"a photo of a red {cls}", setting, seeds[:8], 20))
        others += [p["colour"] == "red" for p in preds]
    return {
        "fidelity": sum(fid) / len(fid), "subject_rate": sum(subj) / len(subj),
        "context_acc": sum(ctx) / len(ctx),
        "pres": cosine_matrix(bare_id, subject).mean().item(),
        "div": 1 - mean_pairwise_within(bare_id),
        "class_subject_rate": sum(p["colour"] == SUBJECT[1] and p["pattern"] == SUBJECT[2]
                                  for p in bare_preds) / len(bare_preds),
        "class_colour_entropy": _entropy([p["colour"] for p in bare_preds]),
        "red_other_classes": sum(others) / len(others),
    }


def run_study(study: Study) -> dict:
    t0 = time.perf_counter()
    judge = ToyJudge.load(_judges_path())
    photos = subject_photos(study.out / "subject")
    subject = judge.identity([render(s, 1000 + i) for i, s in enumerate(subject_views(SUBJECT))])
    results: dict = {"base": [], **{v.name: [] for v in study.variants}, "scales": []}
    for seed in study.seeds:
        for variant in study.variants:
            run = train_variant(study, variant, seed, photos)
            pipe, has_text = load_pipeline(run)
            keep: dict = {}
            results[variant.name].append(
                score(pipe, has_text, judge, subject, variant.identifier, Setting(1, 1, 5.0),
                      study.images, keep))
            if variant.name == "unet":
                base_keep: dict = {}
                results["base"].append(score(pipe, has_text, judge, subject, "sks",
                                             Setting(0, 0, 5.0), study.images, base_keep))
                if seed == study.seeds[0]:
                    _grid_base_vs_lora(study, base_keep, keep)
            if variant.name == "unet+te" and study.scales:
                results["scales"].append(_scale_sweep(study, pipe, has_text, judge, subject))
                if seed == study.seeds[0]:
                    _grid_scales(study, pipe, has_text)
    results["seconds"] = round(time.perf_counter() - t0)
    write_json(study.out / "claims.json", results)
    return results


def _scale_sweep(study: Study, pipe, has_text, judge, subject) -> dict:
    out = {}
    for u in (0.0, 0.25, 0.5, 0.75, 1.0):
        out[f"unet={u:g},text=1"] = score(pipe, has_text, judge, subject, "sks",
                                          Setting(u, 1.0, 5.0), study.images // 2)
    for t in (0.0, 0.5):
        out[f"unet=1,text={t:g}"] = score(pipe, has_text, judge, subject, "sks",
                                          Setting(1.0, t, 5.0), study.images // 2)
    return out


def _grid_base_vs_lora(study: Study, base: dict, lora: dict) -> None:
    rows, labels = [], []
    for context in NEW_CONTEXTS:
        rows += [base[context][:6], lora[context][:6]]
        labels += [f"base, {context}", f"LoRA, {context}"]
    save_png(make_grid(rows, labels, [f"seed {i}" for i in range(6)],
                       title="a photo of sks ball on the snow / in the room", min_cell=64),
             study.out / "grid_base_vs_lora.png")


def _grid_scales(study: Study, pipe, has_text) -> None:
    settings = [Setting(u, t, g) for g in (2.0, 5.0) for u, t in ((0, 0), (0.5, 0.5), (1, 0), (0, 1), (1, 1))]
    rows = [draw(pipe, has_text, "a photo of sks ball on the snow", s, list(range(6)), 20)
            for s in settings]
    save_png(make_grid(rows, [s.label for s in settings], [f"seed {i}" for i in range(6)],
                       title="a photo of sks ball on the snow (UNet+text LoRA)", min_cell=64),
             study.out / "grid_scales_guidance.png")


def _judges_path() -> Path:
    from ..models import toy_model_dir

    return toy_model_dir() / "judges.safetensors"


def claims(out: str | Path, report: str | Path | None = None, quick: bool = False) -> dict:
    """Run the study; with ``report``, write the markdown and its pictures.
    ``quick``: one seed, the fidelity claim only, a few minutes."""
    import json
    import shutil

    from ..fileio import write_text
    from ..models import toy_model_dir
    from .claims_report import render_claims

    study = Study(Path(out))
    if quick:
        study = Study(Path(out), seeds=(0,), steps=150, images=8, variants=(VARIANTS[0],),
                      scales=False)
    results = run_study(study)
    if report:
        report = Path(report)
        record = json.loads((toy_model_dir() / "toyworld.json").read_text())
        write_text(report, render_claims(results, record, study.seeds, study.steps, study.images))
        pictures = report.parent / "toyworld"
        pictures.mkdir(parents=True, exist_ok=True)
        for name in ("grid_base_vs_lora.png", "grid_scales_guidance.png"):
            if (study.out / name).is_file():
                shutil.copy(study.out / name, pictures / name)
    return results
