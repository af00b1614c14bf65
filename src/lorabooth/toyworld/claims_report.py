"""docs/toyworld.md from claims.json: every figure as mean [min-max] over
seeds, and each claim judged by `holds` (the gap must exceed the spread)."""

from __future__ import annotations

FIGURES = [("fidelity", "identity sim. ↑"), ("subject_rate", "subject rate ↑"),
           ("context_acc", "context acc. ↑"), ("pres", "PRES ↓"), ("div", "DIV ↑"),
           ("class_colour_entropy", "class colour entropy ↑"),
           ("red_other_classes", "'red' still red ↑")]
BASELINE = "unet+prior"  # what every lever is added to


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, min, max over seeds."""
    return sum(values) / len(values), min(values), max(values)


def holds(higher: list[float], lower: list[float]) -> bool:
    """The claim 'higher > lower' holds when the gap between the means exceeds
    both settings' spreads over seeds (max - min)."""
    mh, lo_h, hi_h = spread(higher)
    ml, lo_l, hi_l = spread(lower)
    return mh - ml > max(hi_h - lo_h, hi_l - lo_l)


def within(values: list[float], reference: list[float], better: str) -> bool:
    """The mean of ``values`` is at least as good as the worst seed of
    ``reference`` ('high': not below its min; 'low': not above its max)."""
    mean = spread(values)[0]
    return mean >= min(reference) if better == "high" else mean <= max(reference)


def frontier_verdict(lever: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    """Does a lever move the (identity, PRES) frontier beyond the seed spread?"""
    gains = [holds(lever["fidelity"], base["fidelity"]), holds(base["pres"], lever["pres"])]
    losses = [holds(base["fidelity"], lever["fidelity"]), holds(lever["pres"], base["pres"])]
    names = ("identity", "PRES")
    won = [n for n, g in zip(names, gains) if g]
    lost = [n for n, g in zip(names, losses) if g]
    if won and not lost:
        return f"**moves the frontier** (better {' and '.join(won)}, nothing worse)"
    if won and lost:
        return f"**a trade** (better {' and '.join(won)}, worse {' and '.join(lost)})"
    if lost:
        return f"**worse** ({' and '.join(lost)})"
    return "**no change beyond the seed spread**"


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


def _seconds(results: dict, row: str) -> str:
    values = results.get("train_seconds", {}).get(row, [])
    return f"{sum(values) / len(values):.0f}" if values else "–"


def table(results: dict, variants) -> list[str]:
    lines = ["| setting | " + " | ".join(t for _, t in FIGURES) + " | train s |",
             "|---|" + "---|" * (len(FIGURES) + 1)]
    rows = [("base", "base model (LoRA scale 0)")] + [(v.name, v.title) for v in variants]
    for row, title in rows:
        if results.get(row):
            lines.append(f"| {title} | " + " | ".join(_fmt(_values(results, row, k))
                                                       for k, _ in FIGURES)
                         + f" | {_seconds(results, row)} |")
    return lines


def both_at_once(results: dict, variants) -> list[str]:
    """Settings with prior preservation whose identity similarity reaches the
    no-prior run's spread while PRES stays within the UNet + prior run's."""
    fid, pres = _values(results, "unet", "fidelity"), _values(results, BASELINE, "pres")
    if not fid or not pres:
        return []
    return [v.name for v in variants if v.prior and results.get(v.name)
            and within(_values(results, v.name, "fidelity"), fid, "high")
            and within(_values(results, v.name, "pres"), pres, "low")]


def lever_rows(results: dict, levers) -> list[str]:
    base = {k: _values(results, BASELINE, k) for k in ("fidelity", "pres")}
    if not all(base.values()):
        return []
    lines = ["| lever (on UNet LoRA + prior) | identity sim. | PRES | verdict |", "|---|---|---|---|"]
    for v in levers:
        if results.get(v.name):
            mine = {k: _values(results, v.name, k) for k in ("fidelity", "pres")}
            lines.append(f"| {v.title} | {_fmt(mine['fidelity'])} | {_fmt(mine['pres'])} | "
                         f"{frontier_verdict(mine, base)} |")
    return lines


def _settings(sweeps: list[dict]) -> list[str]:
    """The scale settings of a sweep (its "seconds" is not one)."""
    return [n for n, v in sweeps[0].items() if isinstance(v, dict)] if sweeps else []


def _scale_rows(results: dict) -> list[str]:
    sweeps = results.get("scales", [])
    if not sweeps:
        return []
    lines = ["| setting | " + " | ".join(t for _, t in FIGURES[:3]) + " |",
             "|---|" + "---|" * 3]
    for name in _settings(sweeps):
        cells = [_fmt([s[name][k] for s in sweeps]) for k, _ in FIGURES[:3]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _monotone(results: dict, key: str, rising: bool) -> tuple[bool | None, str]:
    sweeps = results.get("scales", [])
    if not sweeps:
        return None, "–"
    names = [n for n in _settings(sweeps) if n.endswith("text=1")]
    means = [sum(s[n][key] for s in sweeps) / len(sweeps) for n in names]
    spreads = [max(s[n][key] for s in sweeps) - min(s[n][key] for s in sweeps) for n in names]
    noise = max(spreads, default=0.0)
    steps = [b - a if rising else a - b for a, b in zip(means, means[1:])]
    ok = bool(steps) and all(d >= -noise for d in steps) and sum(steps) > noise
    return ok, " → ".join(f"{m:.2f}" for m in means)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _timing(results: dict) -> str:
    drawn = results.get("class_draw_seconds", [])
    images = results.get("train_seconds", {}).get(BASELINE, [])
    model = results.get("train_seconds", {}).get("model-prior", [])
    if not drawn or not images or not model:
        return "not measured in this run"
    return (f"image-free prior {_mean(model):.0f} s of training; class images "
            f"{_mean(images):.0f} s of training + {_mean(drawn):.0f} s to draw 64 class images "
            f"= {_mean(images) + _mean(drawn):.0f} s (means over seeds, with several runs sharing "
            "the cores; `benchmarks/prior_modes.py` times the two alone)")


def _calibration(results: dict) -> list[str]:
    cal = results.get("calibration")
    if not cal:
        return []
    words = ", ".join(f"{w} {d:.2f}" for w, d in cal["identifiers"].items())
    refs = ", ".join(f"'{p}' {d:.2f}" for p, d in cal["references"].items())
    return [
        "How far the text encoder moves 'a photo of W ball' from 'a photo of a ball' (mean L2 "
        f"per position over the 77): rare identifiers W: {words}; for scale, {refs}. Input "
        f"embedding norms: rare identifiers {cal['rare_norm']:.2f}, words of the captions "
        f"{cal['word_norm']:.2f}. Why this matters and what it was before the calibration: "
        "[calibration.md](calibration.md).",
        "",
    ]


def render_claims(results: dict, record: dict, study, settings, levers, toy_train: dict) -> str:
    """``settings`` and ``levers``: the study's variants (the levers get the
    frontier verdicts); ``toy_train``: the training every row starts from."""
    variants = [v for v in settings if results.get(v.name)]
    levers = [v for v in levers if results.get(v.name)]
    seeds = study.seeds
    lines = [
        "# The toy world: DreamBooth's claims, measured offline",
        "",
        "Made by `lorabooth toyworld claims` "
        f"({len(seeds)} seeds: {', '.join(map(str, seeds))}; unless a row says otherwise "
        f"{toy_train['steps']} LoRA steps, batch {toy_train['batch_size']}, lr {toy_train['lr']:g}, "
        f"rank {toy_train['rank']}; {study.images} images per prompt, DPM-Solver 20 steps, "
        f"guidance 5; {results.get('work_seconds', '?')} s of drawing, training and scoring on this "
        "machine). "
        "Every figure is *mean [min–max] over seeds*. A claim holds only where the gap between "
        "the two means exceeds the larger of the two ranges. The toy world is a stand-in for "
        "real models: it shows what the method does and which settings move what, at 32 px on "
        "a CPU; the numbers are not Stable Diffusion's.",
        "",
        "## The world, the model and the judges",
        "",
        "32 px pictures of 4 classes (ball, car, mug, kite) x 6 colours x 3 patterns (plain, "
        "striped, dotted) in 4 contexts (grass, beach, snow, room), captioned by template. Three "
        "(class, colour, pattern) combinations are never rendered in pretraining; the subject is "
        "one of them, a **purple striped ball**, shown to the LoRA in 4 views on grass and beach "
        "only and asked for on the *snow* and in the *room*. A quarter of the pretraining "
        "captions carry one rare word ('sks' or one of the identifier candidates `lorabooth "
        "identifier` offers) with a weak meaning of its own (a side and a size no judge scores), "
        "as real text encoders have met rare tokens in web text; see "
        "[calibration.md](calibration.md).",
        "",
        f"The toy model (`--model toy`, diffusers AutoencoderKL + UNet2DConditionModel, "
        f"transformers CLIPTextModel, the real CLIP tokenizer) was pretrained by "
        f"`{record.get('command', 'lorabooth toyworld pretrain')}`: VAE "
        f"{record.get('vae_steps')} steps ({record.get('vae_psnr_db_held_out')} dB PSNR on "
        f"held-out renders), UNet + text encoder {record.get('unet_steps')} steps in "
        f"{record.get('unet_seconds', '?')} s, judges {record.get('judge_steps')} steps (accuracy "
        f"on fresh renders: {record.get('judge_accuracy_fresh')})"
        + (f"; the VAE and the judges are those of `{record['reused_from']['command']}`"
           if record.get("reused_from") else "")
        + ". Times are wall clock on 2 cores shared with other jobs. The tests hold the "
        "shipped judges to >= 0.9 accuracy on every attribute of fresh renders and the base "
        "model to the prompt's class and context in >= 60% of its images.",
        "",
        *_calibration(results),
        "Figures: *identity sim.* = cosine of the judge's identity embedding (the toy DINO) "
        "between generated images and the subject's views; *subject rate* = share judged purple "
        "and striped; *context acc.* = share judged in the prompt's context; *PRES*, *DIV*, "
        "*class colour entropy* on 'a photo of a ball' (bits, 6 colours = 2.58 max); "
        "*'red' still red* = share of 'a photo of a red mug/car/kite' judged red; *train s* = "
        "training wall time (class images drawn beforehand, see claim 7).",
        "",
        *table(results, variants + levers),
    ]
    lines += _claims(results, variants, levers)
    lines += [
        "",
        "### Scale sweep (UNet + text-encoder LoRA)",
        "",
        *_scale_rows(results),
        "",
        "## Pictures",
        "",
        "Identity similarity against PRES, one point per setting and seed (top left is best):",
        "",
        "![fidelity against preservation](toyworld/frontier.svg)",
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


def _claims(results: dict, variants, levers) -> list[str]:
    c1, t1 = _claim(results, "unet", "base", "fidelity")
    ctx_gap = [a - b for a, b in zip(_values(results, "base", "context_acc"),
                                     _values(results, "unet", "context_acc"))]
    c2a, t2a = _claim(results, "unet", BASELINE, "pres")
    c2b, t2b = _claim(results, BASELINE, "unet", "div")
    c2c, t2c = _claim(results, "unet", BASELINE, "fidelity")
    c3, t3 = _claim(results, "unet", "common-word", "red_other_classes")
    c4a, t4a = _monotone(results, "fidelity", rising=True)
    c4b, t4b = _monotone(results, "context_acc", rising=False)
    c5a, t5a = _claim(results, "unet+te", "unet", "fidelity")
    c5b, t5b = _claim(results, "unet", "unet+te", "context_acc")
    both = both_at_once(results, variants + levers)
    titles = {v.name: v.title for v in variants + levers}
    return [
        "",
        "## The claims",
        "",
        f"1. **Fidelity**: the LoRA raises identity similarity over the base model: "
        f"{_verdict(c1)} ({t1}). Context accuracy drops by "
        f"{(sum(ctx_gap) / len(ctx_gap)) if ctx_gap else float('nan'):.3f} on average "
        "(base minus LoRA).",
        f"2. **Prior preservation**: without it the bare class drifts towards the subject "
        f"(PRES higher without): {_verdict(c2a)} ({t2a}); and loses variety (DIV higher with): "
        f"{_verdict(c2b)} ({t2b}). Does it cost fidelity (weight 1, 64 class images, UNet-only "
        f"LoRA; identity higher without)? {_verdict(c2c)} ({t2c}).",
        f"3. **Identifier**: a rare token ('sks') leaves the word 'red' its meaning more than "
        f"using 'red' itself as the identifier: {_verdict(c3)} ({t3}).",
        f"4. **Scales**: raising the UNet scale (text scale 1) raises identity similarity "
        f"monotonically within noise: {_verdict(c4a)} ({t4a}); and lowers context accuracy: "
        f"{_verdict(c4b)} ({t4b}).",
        f"5. **Text-encoder LoRA** (own lr, 10x lower): fidelity higher than UNet only: "
        f"{_verdict(c5a)} ({t5a}); context accuracy lower: {_verdict(c5b)} ({t5b}).",
        "6. **Likeness without wrecking the class**: settings with prior preservation whose "
        "identity similarity reaches the no-prior run's spread (mean >= its worst seed) while "
        "PRES stays within the prior run's (mean <= its worst seed): "
        + ("; ".join(titles[n] for n in both) if both else "**none**") + ".",
        f"7. **Image-free prior**: time, {_timing(results)}.",
        "",
        "### The levers, each on the same baseline (UNet LoRA + prior preservation)",
        "",
        "A lever *moves the frontier* when identity rises or PRES falls by more than the spread "
        "over seeds and neither gets worse by more than it.",
        "",
        *lever_rows(results, levers),
    ]
