"""report.md for `evaluate`: a table laid out like the DreamBooth paper's
Table 1, the paper's own rows beside ours, and the conventions used."""

from __future__ import annotations

import math

from ..reports import markdown as md

COLUMNS = [("dino", "DINO ↑"), ("clip_i", "CLIP-I ↑"), ("clip_t", "CLIP-T ↑"),
           ("pres", "PRES ↓"), ("div", "DIV ↑")]

# Table 1 of Ruiz et al. 2023 (arXiv 2208.12242): DINO / CLIP-I / CLIP-T,
# averaged over DreamBench's 30 subjects x 25 prompts x 4 images.
PAPER_ROWS = {
    "Real Images (paper)": (0.774, 0.885, None),
    "DreamBooth, Imagen (paper)": (0.696, 0.812, 0.306),
    "DreamBooth, Stable Diffusion (paper)": (0.668, 0.803, 0.305),
    "Textual Inversion, Stable Diffusion (paper)": (0.569, 0.780, 0.255),
}


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "–"
    std = stat.get("std", 0.0)
    return f"{stat['mean']:.3f} ± {std:.3f}" if std and not math.isnan(std) else f"{stat['mean']:.3f}"


def render_report(result: dict) -> str:
    header = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [
        f"# Evaluation of {md.code(result['run'])}",
        "",
        f"Subject: identifier {md.code(result['identifier'])}, class "
        f"{md.code(result['class_noun'])}; prompts: {md.text(str(result['prompts']))}; "
        f"{result['images_per_prompt']} images per prompt "
        f"(seeds {result['seeds'][0]}-{result['seeds'][-1]}), {result['steps']} sampler steps, "
        f"UNet scale {result['unet_scale']:g}, text scale {result['text_scale']:g}, "
        f"guidance {result['guidance']:g}.",
        "",
        "## This run (mean ± standard deviation over prompts)",
        "",
        header, rule,
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(m)) for m, _ in COLUMNS) + " |")
    lines += ["", "## The paper's Table 1, for comparison", "", header, rule]
    for name, (dino, clip_i, clip_t) in PAPER_ROWS.items():
        cells = [f"{v:.3f}" if v is not None else "–" for v in (dino, clip_i, clip_t)]
        lines.append(f"| {name} | " + " | ".join(cells + ["–", "–"]) + " |")
    judges = result.get("judges", {})
    lines += [
        "",
        "## How each figure is computed",
        "",
        f"- **DINO**: cosine similarity of identity embeddings "
        f"({md.code(judges.get('dino', '?'))}, CLS token), every generated image against every "
        "real photo, averaged.",
        f"- **CLIP-I**: the same with CLIP image embeddings ({md.code(judges.get('clip', '?'))}).",
        "- **CLIP-T**: CLIP cosine between each image and its prompt *with the identifier "
        "removed* (\"a dog in the jungle\"), the convention of public re-implementations.",
        "- **PRES**: DINO between images the *personalised* model draws for the bare class "
        "prompt and the real photos (lower = the class kept its variety; std over images).",
        "- **DIV**: 1 − mean pairwise DINO similarity among the images of one prompt. "
        "*Deviation from the paper*, which uses LPIPS distance: LPIPS needs torchvision, which "
        "cannot be installed beside the CPU torch wheel; the figures are not comparable to "
        "the paper's DIV in scale.",
        "- **Real images**: the photos against each other, leave-one-out (no self-pairs).",
        "- Numbers from other judges (e.g. random-weight test models or the toy world's) are "
        "only comparable with each other, not with the paper's rows.",
    ]
    return "\n".join(lines) + "\n"
