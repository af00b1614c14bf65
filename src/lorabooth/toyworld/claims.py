"""`lorabooth toyworld claims`: the seed's and the paper's claims measured on
the toy world, over several seeds, with spreads; written to a markdown
report with image grids. Each claim compares two settings by the one
verdict rule (evaluation/verdict.py, docs/verdict.md)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..core.fileio import save_png, write_json
from ..evaluation.metrics import cosine_matrix, mean_pairwise_within
from ..generation import Setting, draw, load_pipeline
from ..reports.grid import make_grid
from ..training.loop import train
from .judges import ToyJudge, toy_judge
from .world import HELD_OUT, render, subject_views

log = logging.getLogger(__name__)
SUBJECT = HELD_OUT[0]  # purple striped ball
NEW_CONTEXTS = ("snow", "room")  # never in the subject's photos (grass, beach)
OTHER_CLASSES = ("mug", "car", "kite")


# The toy-scaled training every row starts from (the seed's 300 steps at
# batch 1 and lr 5e-4 are one row of their own).
TOY_TRAIN = {"steps": 400, "batch_size": 4, "lr": 1e-3, "lr_text": 1e-4, "rank": 4}
PRIOR = {"prior_preservation": True, "num_class_images": 64, "prior_loss_weight": 1.0}
CLASS_PROMPT = "a photo of a ball"


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    identifier: str = "sks"
    train: dict = field(default_factory=dict)  # TrainConfig fields over TOY_TRAIN

    @property
    def prior(self) -> bool:
        return bool(self.train.get("prior_preservation"))


VARIANTS = (
    Variant("unet", "UNet LoRA"),
    Variant("unet+prior", "UNet LoRA + prior preservation (weight 1, 64 class images)", train=PRIOR),
    Variant("unet+te", "UNet + text-encoder LoRA (lr 1e-3 / 1e-4)", train={"train_text_encoder": True}),
    Variant("common-word", "UNet LoRA, identifier 'red' (a common word)", identifier="red"),
    Variant("seed-recipe", "**the seed's recipe**: prior + text-encoder LoRA, lr 5e-4 / 1e-4, "
            "300 steps, batch 1", train={**PRIOR, "train_text_encoder": True, "lr": 5e-4,
                                         "steps": 300, "batch_size": 1}),
    Variant("seed-recipe-toy", "prior + text-encoder LoRA, toy-scaled (lr 1e-3 / 1e-4, 400 steps, "
            "batch 4)", train={**PRIOR, "train_text_encoder": True}),
    Variant("prior-w0.3", "UNet LoRA + prior, weight 0.3", train={**PRIOR, "prior_loss_weight": 0.3}),
    Variant("prior-w0.1", "UNet LoRA + prior, weight 0.1", train={**PRIOR, "prior_loss_weight": 0.1}),
    Variant("prior-16", "UNet LoRA + prior, 16 class images", train={**PRIOR, "num_class_images": 16}),
)
# Each lever on the same baseline, "unet+prior"; does it move the frontier?
LEVERS = (
    Variant("model-prior", "image-free prior (`--prior-preservation model`)",
            train={**PRIOR, "prior_preservation": "model"}),
    Variant("snr-gamma", "+ min-SNR-γ 5 (`--snr-gamma 5`)", train={**PRIOR, "snr_gamma": 5.0}),
    Variant("noise-offset", "+ noise offset 0.05 (`--noise-offset 0.05`)",
            train={**PRIOR, "noise_offset": 0.05}),
    Variant("dora", "+ DoRA (`--adapter dora`)", train={**PRIOR, "adapter": "dora"}),
    Variant("train-token", "+ pivotal tuning (`--train-token`)", train={**PRIOR, "train_token": True}),
    Variant("caption-dropout", "+ caption dropout 0.1 (`--caption-dropout 0.1`)",
            train={**PRIOR, "caption_dropout": 0.1}),
    Variant("ema", "+ EMA of the LoRA weights 0.99 (`--ema-decay 0.99`)",
            train={**PRIOR, "ema_decay": 0.99}),
)


# The flow toy model (FLUX.2 [klein]-shaped): the settings that apply to a
# transformer whose text encoder stays frozen (no text-encoder LoRA, no
# pivotal tuning, no min-SNR-γ on a flow model), drawn at the family's
# guidance. Fewer rows than the UNet world's (each row is 3 trainings on a
# shared 2-core machine): the three the claims compare, and two levers the
# calibrated UNet world measured moving its figures (docs/toyworld/
# calibrated.md): the image-free prior and EMA.
FLOW_VARIANTS = (
    Variant("unet", "transformer LoRA"),
    Variant("unet+prior", "transformer LoRA + prior preservation (weight 1, 64 class images)",
            train=PRIOR),
    Variant("common-word", "transformer LoRA, identifier 'red' (a common word)", identifier="red"),
)
FLOW_LEVERS = tuple(v for v in LEVERS if v.name in ("model-prior", "ema"))
FLOW_GUIDANCE = 4.0  # the flux2 family's (Flux2KleinPipeline's default guidance_scale)


@dataclass
class Study:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    images: int = 16  # per prompt
    variants: tuple[Variant, ...] = VARIANTS + LEVERS
    scales: bool = True
    grid_seed: int = 0  # the seed whose images make the report's pictures
    model: str = "toy"  # or "flow-toy"
    guidance: float = 5.0


def subject_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(subject_views(SUBJECT)):
        save_png(render(spec, 1000 + i), folder / f"view_{i}.png")
    return folder


def train_config(study: Study, variant: Variant, seed: int, photos: Path) -> TrainConfig:
    return TrainConfig(**{
        "model": study.model, "instance_dir": str(photos), "seed": seed,
        "output": str(study.out / "runs" / f"{variant.name}-seed{seed}"),
        "instance_prompt": f"a photo of {variant.identifier} ball", "class_prompt": CLASS_PROMPT,
        "class_dir": str(study.out / f"class_images-seed{seed}"), "class_draw_steps": 20,
        "class_draw_batch": 16, **TOY_TRAIN, **variant.train})


def draw_class_images_timed(study: Study, seed: int, photos: Path) -> float:
    """Seconds to draw the seed's class images, as training would draw them
    (it finds them present afterwards): the cost the image-free prior saves."""
    from ..models.loading import load_base, pipeline_from_parts
    from ..training.prior import class_image_seed, draw_class_images, missing_indices

    config = train_config(study, VARIANTS[1], seed, photos)
    todo = missing_indices(config.class_path, config.num_class_images)
    if not todo:
        return float("nan")
    base = load_base(config.model)
    pipe = pipeline_from_parts(base)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    draw_class_images(pipe, config.class_path, config.class_prompt, todo, base.native_resolution,
                      seed=class_image_seed(config.seed),
                      steps=config.class_draw_steps, batch=config.class_draw_batch, progress=False)
    return time.perf_counter() - t0


def train_variant(study: Study, variant: Variant, seed: int, photos: Path) -> tuple[Path, float]:
    """The run folder and its training seconds (class images already drawn)."""
    config = train_config(study, variant, seed, photos)
    out = Path(config.output)
    done = out / "train_seconds.json"
    if done.is_file():
        return out, json.loads(done.read_text())["seconds"]
    t0 = time.perf_counter()
    train(config)
    seconds = round(time.perf_counter() - t0, 1)
    write_json(done, {"seconds": seconds})
    return out, seconds


def _preposition(context: str) -> str:
    return "in the" if context == "room" else "on the"


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
        prompt = f"a photo of {identifier} ball {_preposition(context)} {context}"
        images = draw(pipe, has_text, prompt, setting, seeds, 20)
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
    """Every variant x seed, each run's scores cached beside it (score.json),
    so an interrupted or extended study redoes nothing."""
    t0 = time.perf_counter()
    judge = toy_judge()
    photos = subject_photos(study.out / "subject")
    subject = judge.identity([render(s, 1000 + i) for i, s in enumerate(subject_views(SUBJECT))])
    results: dict = {"base": [], **{v.name: [] for v in study.variants}, "scales": [],
                     "train_seconds": {v.name: [] for v in study.variants},
                     "class_draw_seconds": [],
                     "calibration": _calibration() if study.model == "toy" else {}}
    for seed in study.seeds:
        if any(v.train.get("prior_preservation") is True for v in study.variants):
            drew = draw_class_images_timed(study, seed, photos)
            if drew == drew:  # not NaN: drawn now, not by an earlier invocation
                write_json(study.out / f"class_draw_seconds-seed{seed}.json", {"seconds": drew})
            cached = study.out / f"class_draw_seconds-seed{seed}.json"
            if cached.is_file():
                results["class_draw_seconds"].append(json.loads(cached.read_text())["seconds"])
        for variant in study.variants:
            run, seconds = train_variant(study, variant, seed, photos)
            results["train_seconds"][variant.name].append(seconds)
            results[variant.name].append(_scored(run / "score.json", lambda: _score_run(
                study, variant, seed, run, judge, subject)))
            if variant.name == "unet":
                results["base"].append(_scored(run / "score_base.json", lambda: _score_base(
                    study, seed, run, judge, subject)))
            if variant.name == "unet+te" and study.scales:
                results["scales"].append(_scored(run / "score_scales.json", lambda: _score_scales(
                    study, seed, run, judge, subject)))
    results["seconds"] = round(time.perf_counter() - t0)  # this invocation
    results["work_seconds"] = round(_work_seconds(results))
    write_json(study.out / "claims.json", results)
    return results


def _work_seconds(results: dict) -> float:
    """Training, scoring and class drawing summed over every run, whichever
    invocation did them."""
    train_s = sum(sum(v) for v in results["train_seconds"].values())
    scored = [r.get("seconds", 0.0) for name, rows in results.items()
              if isinstance(rows, list) and rows and isinstance(rows[0], dict) for r in rows]
    return train_s + sum(scored) + sum(results["class_draw_seconds"])


def _scored(path: Path, compute) -> dict:
    """A run's scores, computed once; "seconds" is what scoring took."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(path, result)
    return result


def _score_run(study: Study, variant: Variant, seed: int, run: Path, judge, subject) -> dict:
    pipe, has_text = load_pipeline(run)
    keep: dict = {}
    result = score(pipe, has_text, judge, subject, variant.identifier,
                   Setting(1, 1, study.guidance), study.images, keep)
    if variant.name == "unet" and seed == study.grid_seed:
        _grid_base_vs_lora(study, pipe, has_text, keep)
    return result


def _score_base(study: Study, seed: int, run: Path, judge, subject) -> dict:
    pipe, has_text = load_pipeline(run)
    return score(pipe, has_text, judge, subject, "sks", Setting(0, 0, study.guidance), study.images)


def _score_scales(study: Study, seed: int, run: Path, judge, subject) -> dict:
    pipe, has_text = load_pipeline(run)
    if seed == study.grid_seed:
        _grid_scales(study, pipe, has_text)
    return _scale_sweep(study, pipe, has_text, judge, subject)


def frontier_points(results: dict, study: Study) -> list[tuple[str, float, float]]:
    """(setting, PRES, identity) per run, the base model first."""
    rows = [("base", "base model")] + [(v.name, v.name) for v in study.variants]
    return [(label, r["pres"], r["fidelity"]) for name, label in rows for r in results.get(name, [])]


def _scale_sweep(study: Study, pipe, has_text, judge, subject) -> dict:
    out = {}
    for u in (0.0, 0.25, 0.5, 0.75, 1.0):
        out[f"unet={u:g},text=1"] = score(pipe, has_text, judge, subject, "sks",
                                          Setting(u, 1.0, 5.0), study.images // 2)
    for t in (0.0, 0.5):
        out[f"unet=1,text={t:g}"] = score(pipe, has_text, judge, subject, "sks",
                                          Setting(1.0, t, 5.0), study.images // 2)
    return out


def _grid_base_vs_lora(study: Study, pipe, has_text, lora: dict) -> None:
    """The LoRA's first 6 images per new context beside the base model's (the
    same seeds, LoRA scale 0): only those are drawn again, not a whole score."""
    rows, labels = [], []
    for context in NEW_CONTEXTS:
        base = draw(pipe, has_text, f"a photo of sks ball {_preposition(context)} {context}",
                    Setting(0, 0, study.guidance), list(range(6)), 20)
        rows += [base, lora[context][:6]]
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


def _calibration() -> dict:
    from ..models.loading import load_base
    from .calibration import identifier_distances

    base = load_base("toy")
    return identifier_distances(base.tokenizer, base.text_encoder)


def claims(out: str | Path, report: str | Path | None = None, quick: bool = False,
           model: str = "toy") -> dict:
    """Run the study; with ``report``, write the markdown and its pictures
    (in a folder named after the report, beside it). ``quick``: one seed,
    the fidelity claim only, a few minutes. ``model``: "toy" (the UNet) or
    "flow-toy" (the FLUX.2 [klein]-shaped transformer)."""
    import shutil

    from ..core.fileio import write_text
    from ..models.loading import flow_toy_model_dir, toy_model_dir
    from .claims_report import render_claims, render_flow_claims
    from .frontier import frontier_svg

    flow = model == "flow-toy"
    study = Study(Path(out))
    if flow:
        study = Study(Path(out), variants=FLOW_VARIANTS + FLOW_LEVERS, scales=False,
                      model=model, guidance=FLOW_GUIDANCE)
    if quick:
        quick_unet = Variant("unet", "UNet LoRA", train={"steps": 150})
        study = Study(Path(out), seeds=(0,), images=8, variants=(quick_unet,), scales=False,
                      model=study.model, guidance=study.guidance)
    results = run_study(study)
    if report:
        report = Path(report)
        record = json.loads(((flow_toy_model_dir() if flow else toy_model_dir())
                             / "toyworld.json").read_text())
        pictures = report.parent / report.stem  # docs/toyworld.md -> docs/toyworld/
        if flow:
            write_text(report, render_flow_claims(results, record, study, FLOW_VARIANTS,
                                                  FLOW_LEVERS, TOY_TRAIN, pictures.name))
        else:
            write_text(report, render_claims(results, record, study, VARIANTS, LEVERS, TOY_TRAIN))
        pictures.mkdir(parents=True, exist_ok=True)
        write_json(pictures / "claims_per_seed.json", results)  # the page's raw data, beside it
        write_text(pictures / "frontier.svg", frontier_svg(frontier_points(results, study)))
        for name in ("grid_base_vs_lora.png", "grid_scales_guidance.png"):
            if (study.out / name).is_file():
                shutil.copy(study.out / name, pictures / name)
    return results
