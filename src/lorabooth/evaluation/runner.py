"""`lorabooth evaluate RUN`: DINO, CLIP-I, CLIP-T, PRES and DIV as in the
DreamBooth paper, on its prompts, with baselines; images cached on disk so a
second evaluation with other judges draws nothing."""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

from ..adapters.lora import lora_metadata
from ..config import EvaluateConfig, config_of
from ..config.templates import fill_template, prompt_templates, read_prompts_file
from ..core.errors import UserError
from ..core.fileio import save_png, write_json, write_text
from ..generation import (
    Setting,
    cache_name,
    default_guidance,
    draw_cached,
    load_pipeline,
    prompt_slug,
)
from ..models.tokenwindow import check_prompt, pipeline_tokenizers
from ..photos.imagefiles import Rejected, decode
from ..reports.grid import make_grid
from ..training.data import readable_images
from .embedders import Judges, default_judges
from .metrics import (
    cosine_matrix,
    diversity,
    mean_pairwise,
    mean_pairwise_within,
    summarise,
    text_alignment,
)
from .report import render_report
from .snapshots import evaluate_snapshots, scored_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPrompt:
    full: str  # with the identifier: what the model is asked to draw
    clean: str  # without it: what CLIP-T compares against
    slug: str


def load_prompts(kind: str, prompts_file: str, identifier: str,
                 class_noun: str) -> list[EvalPrompt]:
    """The paper's prompts (``{0}`` identifier, ``{1}`` class noun) of
    ``kind`` (one of KINDS, as the config checked), or the user's."""
    if prompts_file:
        templates = read_prompts_file(prompts_file)
    else:
        templates = prompt_templates((resources.files("lorabooth") / "assets" / "dreambench" /
                                      f"prompts_{kind}.txt").read_text(encoding="utf-8"), kind)
    out = []
    for i, t in enumerate(templates):
        where = f"--prompts {prompts_file}: prompt {i + 1}"
        full = fill_template(t, {"0": identifier, "1": class_noun}, where)
        clean = re.sub(r"\s+", " ", fill_template(t, {"0": "", "1": class_noun}, where)).strip()
        out.append(EvalPrompt(full, clean, prompt_slug(i, clean)))
    return out


def real_images_of(folder: str) -> list[Image.Image]:
    """The readable photos of ``folder`` (at least 2), decoded as `prepare` does."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--real {folder}: no such folder")
    images = []
    for p in readable_images(path):
        try:
            images.append(decode(p)[0])
        except Rejected:
            continue
    if len(images) < 2:
        raise UserError(f"--real {folder}: needs at least 2 readable photos (found {len(images)})")
    return images


def _defaults_from_run(run: str | Path, identifier: str,
                       class_noun: str) -> tuple[str, str, str]:
    meta = lora_metadata(run)
    identifier = identifier or str(meta.get("identifier", "")).strip()
    if not identifier:
        raise UserError("--identifier: the run does not record one; pass it")
    if not class_noun:
        words = str(meta.get("instance_prompt", "")).split()
        after = [words[i + 1] for i, w in enumerate(words[:-1]) if w == identifier.split()[-1]]
        class_noun = after[0] if after else ""
    if not class_noun:
        raise UserError("--class-noun: cannot tell it from the run; pass it")
    class_prompt = str(meta.get("class_prompt", "")) or f"a photo of a {class_noun}"
    return identifier, class_noun, class_prompt


def _score(judges: Judges, images: dict[str, list[Image.Image]], prompts: list[EvalPrompt],
           real_id, real_img, class_images: list[Image.Image]) -> tuple[dict, list[dict]]:
    """Per-prompt figures and their summary for one row (a model setting)."""
    per_prompt = []
    for p in prompts:
        ims = images[p.slug]
        ident = judges.identity(ims)
        per_prompt.append({
            "prompt": p.full, "dino": mean_pairwise(ident, real_id),
            "clip_i": mean_pairwise(judges.image(ims), real_img),
            "clip_t": text_alignment(judges.text_image(ims), judges.text([p.clean] * len(ims))),
            "div": diversity(ident),
        })
    # PRES: the personalised model's bare-class images against the subject
    pres = cosine_matrix(judges.identity(class_images), real_id).mean(dim=1).tolist()
    summary = {m: summarise([r[m] for r in per_prompt]) for m in ("dino", "clip_i", "clip_t", "div")}
    summary["pres"] = summarise(pres)
    return summary, per_prompt


def _real_row(judges: Judges, real: list[Image.Image]) -> dict:
    """The paper's ceiling: real photos against each other, leave-one-out."""
    ident, img = judges.identity(real), judges.image(real)

    def loo(x):
        sims = cosine_matrix(x, x)
        n = x.shape[0]
        return [((sims[i].sum() - sims[i, i]) / (n - 1)).item() for i in range(n)]

    nan = {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"dino": summarise(loo(ident)), "clip_i": summarise(loo(img)), "clip_t": nan,
            "pres": nan, "div": {**summarise([1 - mean_pairwise_within(ident)]), "std": 0.0}}


# the keywords `evaluate` has always taken -> EvaluateConfig's fields
_KEYWORDS = {"prompts_file": "prompts"}


def evaluate(run: str | Path | EvaluateConfig, real: str | None = None, *,
             judges: Judges | None = None, **options) -> dict:
    """Score a run as in the paper's Table 1; returns what metrics.json holds.

    ``evaluate(EvaluateConfig(...), judges=None)``, or its keywords:
    ``evaluate(run, real, class_noun=, kind=, prompts_file=, identifier=,
    images_per_prompt=, pres_images=, seed=, unet_scale=, text_scale=,
    text2_scale=, guidance=, steps=, out=, baselines=, dino=, clip=,
    model=)``; the defaults and checks are EvaluateConfig's. ``judges``:
    embedders to score with instead of ``dino`` and ``clip``."""
    c = config_of(EvaluateConfig, "evaluate", {"run": run, "real": real, **options}, _KEYWORDS)
    if c.snapshots:
        scored_steps(c.run)  # one line before the judges load when the run saved none
        return evaluate_snapshots(c, judges or default_judges(c.dino, c.clip), evaluate)
    identifier, class_noun, class_prompt = _defaults_from_run(c.run, c.identifier, c.class_noun)
    prompts = load_prompts(c.kind, c.prompts, identifier, class_noun)
    real_images = real_images_of(c.real)
    judges = judges or default_judges(c.dino, c.clip)  # fails fast before any drawing
    out = Path(c.out) if c.out else Path(c.run) / "eval"
    seeds = [c.seed + i for i in range(c.images_per_prompt)]
    pipe, has_text = load_pipeline(c.run, c.model)
    for p in prompts:  # the run's class prompt too: PRES draws it
        check_prompt(pipeline_tokenizers(pipe), p.full, identifier.split(),
                     f"--prompts {c.prompts}" if c.prompts else f"--kind {c.kind}")
    check_prompt(pipeline_tokenizers(pipe), class_prompt, [], "the run's class prompt")

    guidance = default_guidance(pipe) if c.guidance is None else c.guidance
    settings = {"lorabooth": Setting(c.unet_scale, c.text_scale, guidance, c.text2_scale)}
    if c.baselines:
        settings = {"base model (no LoRA)": Setting(0.0, 0.0, guidance), **settings}
    drawn: dict[str, dict[str, list[Image.Image]]] = {}
    for row, setting in settings.items():
        cache = out / "images" / cache_name(setting, c.steps, c.run)  # retrained: drawn afresh
        drawn[row] = {p.slug: draw_cached(pipe, has_text, p.full, setting, seeds, c.steps,
                                          cache / p.slug) for p in prompts}
        drawn[row]["_class"] = draw_cached(pipe, has_text, class_prompt, setting,
                                           [c.seed + i for i in range(c.pres_images)], c.steps,
                                           cache / "_class")
    real_id, real_img = judges.identity(real_images), judges.image(real_images)
    rows, per_prompt_rows = {}, []
    for row in settings:
        rows[row], per_prompt = _score(judges, drawn[row], prompts, real_id, real_img,
                                       drawn[row]["_class"])
        per_prompt_rows += [{"row": row, **r} for r in per_prompt]
    if c.baselines:
        rows["real images"] = _real_row(judges, real_images)
    result = {
        "run": c.run, "identifier": identifier, "class_noun": class_noun,
        "class_prompt": class_prompt, "prompts": c.prompts or c.kind,
        "images_per_prompt": c.images_per_prompt, "seeds": seeds, "steps": c.steps,
        "unet_scale": c.unet_scale, "text_scale": c.text_scale, "text2_scale": c.text2_scale,
        "guidance": guidance,
        "judges": judges.names, "rows": rows,
    }
    write_json(out / "metrics.json", result)
    _write_csv(out / "per_prompt.csv", per_prompt_rows)
    write_text(out / "report.md", render_report(result))
    for p in prompts:
        grid = make_grid([drawn[r][p.slug] for r in settings], list(settings),
                         [f"seed {s}" for s in seeds], title=p.full)
        save_png(grid, out / "grids" / f"{p.slug}.png")
    log.info("report: %s", out / "report.md")
    return result


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["row", "prompt", "dino", "clip_i", "clip_t", "div"])
    writer.writeheader()
    writer.writerows({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    write_text(path, buf.getvalue())
