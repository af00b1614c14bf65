"""docs/toyworld.md from claims.json: every figure as mean [min-max] over
seeds, and each claim judged by `holds` (the gap must exceed the spread)."""

from __future__ import annotations

FIGURES = [("fidelity", "identity sim. ↑"), ("subject_rate", "subject rate ↑"),
           ("context_acc", "context acc. ↑"), ("pres", "PRES ↓"), ("div", "DIV ↑"),
           ("class_colour_entropy", "class colour entropy ↑"),
           ("red_other_classes", "'red' still red ↑")]
ROWS = [("base", "base model (LoRA scale 0)"), ("unet", "UNet LoRA"),
        ("unet+prior", "UNet LoRA + prior preservation"),
        ("unet+te", "UNet + text-encoder LoRA (lr 1e-3 / 1e-4)"),
        ("common-word", "UNet LoRA, identifier 'red' (a common word)")]


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, min, max over seeds."""
    return sum(values) / len(values), min(values), max(values)


def holds(higher: list[float], lower: list[float]) -> bool:
    """The claim 'higher > lower' holds when the gap between the means exceeds
    both settings' spreads over seeds (max - min)."""
    mh, lo_h, hi_h = spread(higher)
    ml, lo_l, hi_l = spread(lower)
    return mh - ml > max(hi_h - lo_h, hi_l - lo_l)


def _values(results: dict, row: str, key: str) -> list[float]:
    return [r[key] for r in results.get(row, [])]


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean, lo, hi = spread([v + 0.0 for v in values])  # + 0.0: no "-0.00"
    return f"{mean:.3f} [{lo + 0.0:.2f}–{hi + 0.0:.2f}]"


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "**not measured** in this run"
    return "**holds**" if ok else "**does not hold** (gap within the spread over seeds)"


def _claim(results, higher_row, lower_row, key) -> tuple[bool | None, str]:
    hi, lo = _values(results, higher_row, key), _values(results, lower_row, key)
    if not hi or not lo:
        return None, "–"
    return holds(hi, lo), f"{key}: {_fmt(hi)} vs {_fmt(lo)}"


def _scale_rows(results: dict) -> list[str]:
    sweeps = results.get("scales", [])
    if not sweeps:
        return []
    lines = ["| setting | " + " | ".join(t for _, t in FIGURES[:3]) + " |",
             "|---|" + "---|" * 3]
    for name in sweeps[0]:
        cells = [_fmt([s[name][k] for s in sweeps]) for k, _ in FIGURES[:3]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _monotone(results: dict, key: str, rising: bool) -> tuple[bool | None, str]:
    sweeps = results.get("scales", [])
    if not sweeps:
        return None, "–"
    names = [n for n in (sweeps[0] if sweeps else []) if n.endswith("text=1")]
    means = [sum(s[n][key] for s in sweeps) / len(sweeps) for n in names]
    spreads = [max(s[n][key] for s in sweeps) - min(s[n][key] for s in sweeps) for n in names]
    noise = max(spreads, default=0.0)
    steps = [b - a if rising else a - b for a, b in zip(means, means[1:])]
    ok = bool(steps) and all(d >= -noise for d in steps) and sum(steps) > noise
    return ok, " → ".join(f"{m:.2f}" for m in means)


def render_claims(results: dict, record: dict, seeds: tuple, steps: int, images: int) -> str:
    header = "| setting | " + " | ".join(t for _, t in FIGURES) + " |"
    lines = [
        "# The toy world: DreamBooth's claims, measured offline",
        "",
        "Made by `lorabooth toyworld claims` "
        f"({len(seeds)} seeds: {', '.join(map(str, seeds))}; {steps} LoRA steps, batch 4, rank 4; "
        f"{images} images per prompt, DPM-Solver 20 steps, guidance 5; "
        f"{results.get('seconds', '?')} s on this machine). "
        "Every figure is *mean [min–max] over seeds*. A claim holds only where the gap between "
        "the two means exceeds the larger of the two ranges.",
        "",
        "## The world, the model and the judges",
        "",
        "32 px pictures of 4 classes (ball, car, mug, kite) x 6 colours x 3 patterns (plain, "
        "striped, dotted) in 4 contexts (grass, beach, snow, room), captioned by template. Three "
        "(class, colour, pattern) combinations are never rendered in pretraining; the subject is "
        "one of them, a **purple striped ball**, shown to the LoRA in 4 views on grass and beach "
        "only and asked for on the *snow* and in the *room*.",
        "",
        f"The toy model (`--model toy`, diffusers AutoencoderKL + UNet2DConditionModel, "
        f"transformers CLIPTextModel, the real CLIP tokenizer) was pretrained by "
        f"`{record.get('command', 'lorabooth toyworld pretrain')}` in "
        f"{record.get('total_seconds', '?')} s: VAE {record.get('vae_steps')} steps "
        f"({record.get('vae_psnr_db_held_out')} dB PSNR on held-out renders), UNet + text encoder "
        f"{record.get('unet_steps')} steps, judges {record.get('judge_steps')} steps "
        f"(accuracy on fresh renders: {record.get('judge_accuracy_fresh')}). The time is wall "
        "clock on 2 cores that were also running other jobs; alone, the stages take about "
        "45 minutes. The tests hold the shipped judges to >= 0.9 accuracy on every attribute "
        "of fresh renders and the base model to the prompt's class and context in >= 60% of "
        "its images.",
        "",
        "Figures: *identity sim.* = cosine of the judge's identity embedding (the toy DINO) "
        "between generated images and the subject's views; *subject rate* = share judged purple "
        "and striped; *context acc.* = share judged in the prompt's context; *PRES*, *DIV*, "
        "*class colour entropy* on 'a photo of a ball' (bits, 6 colours = 2.58 max); "
        "*'red' still red* = share of 'a photo of a red mug/car/kite' judged red.",
        "",
        header, "|---|" + "---|" * len(FIGURES),
    ]
    for row, title in ROWS:
        if results.get(row):
            lines.append(f"| {title} | " + " | ".join(_fmt(_values(results, row, k))
                                                       for k, _ in FIGURES) + " |")
    c1, t1 = _claim(results, "unet", "base", "fidelity")
    ctx_gap = [a - b for a, b in zip(_values(results, "base", "context_acc"),
                                     _values(results, "unet", "context_acc"))]
    c2a, t2a = _claim(results, "unet", "unet+prior", "pres")
    c2b, t2b = _claim(results, "unet+prior", "unet", "div")
    c3, t3 = _claim(results, "unet", "common-word", "red_other_classes")
    c4a, t4a = _monotone(results, "fidelity", rising=True)
    c4b, t4b = _monotone(results, "context_acc", rising=False)
    c5a, t5a = _claim(results, "unet+te", "unet", "fidelity")
    c5b, t5b = _claim(results, "unet", "unet+te", "context_acc")
    lines += [
        "",
        "## The claims",
        "",
        f"1. **Fidelity**: the LoRA raises identity similarity over the base model: "
        f"{_verdict(c1)} ({t1}). Context accuracy drops by "
        f"{(sum(ctx_gap) / len(ctx_gap)) if ctx_gap else float('nan'):.3f} on average "
        "(base minus LoRA).",
        f"2. **Prior preservation**: without it the bare class drifts towards the subject "
        f"(PRES higher without): {_verdict(c2a)} ({t2a}); and loses variety (DIV higher with): "
        f"{_verdict(c2b)} ({t2b}). The price, at prior weight 1 with 64 class images and "
        f"UNet-only LoRA: the subject is learned far less "
        f"(identity sim. {_fmt(_values(results, 'unet+prior', 'fidelity'))} with prior vs "
        f"{_fmt(_values(results, 'unet', 'fidelity'))} without). Getting both at once needs "
        "other settings (a lower prior weight, more steps); see the seed study's sweep.",
        f"3. **Identifier**: a rare token ('sks') leaves the word 'red' its meaning more than "
        f"using 'red' itself as the identifier: {_verdict(c3)} ({t3}).",
        f"4. **Scales**: raising the UNet scale (text scale 1) raises identity similarity "
        f"monotonically within noise: {_verdict(c4a)} ({t4a}); and lowers context accuracy: "
        f"{_verdict(c4b)} ({t4b}).",
        f"5. **Text-encoder LoRA** (own lr, 10x lower): fidelity higher than UNet only: "
        f"{_verdict(c5a)} ({t5a}); context accuracy lower: {_verdict(c5b)} ({t5b}).",
        "",
        "### Scale sweep (UNet + text-encoder LoRA)",
        "",
        *_scale_rows(results),
        "",
        "## Pictures",
        "",
        "Base model vs LoRA, in contexts the subject was never shown in:",
        "",
        "![base vs LoRA](toyworld/grid_base_vs_lora.png)",
        "",
        "UNet / text-encoder scales x guidance (rows), seeds (columns):",
        "",
        "![scales and guidance](toyworld/grid_scales_guidance.png)",
    ]
    return "\n".join(lines) + "\n"
