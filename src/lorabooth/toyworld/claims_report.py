"""docs/toyworld.md from claims.json: every figure as mean [min-max] over
seeds, and each claim judged by the one verdict rule (evaluation/verdict.py:
a bootstrap interval over seeds of the difference, docs/verdict.md)."""

from __future__ import annotations

from ..evaluation.verdict import compare, steps, trend

FIGURES = [("fidelity", "identity sim. ↑"), ("subject_rate", "subject rate ↑"),
           ("context_acc", "context acc. ↑"), ("pres", "PRES ↓"), ("div", "DIV ↑"),
           ("class_colour_entropy", "class colour entropy ↑"),
           ("red_other_classes", "'red' still red ↑")]
BASELINE = "unet+prior"  # what every lever is added to


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, min, max over seeds."""
    return sum(values) / len(values), min(values), max(values)


def frontier_verdict(lever: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    """Does a lever move the (identity, PRES) frontier? Identity and PRES
    each against the baseline by the one verdict rule (evaluation/verdict.py)."""
    identity, pres = compare(lever["fidelity"], base["fidelity"]), compare(lever["pres"], base["pres"])
    if "too few seeds" in (identity.word, pres.word):
        return "**too few seeds**"
    won = [n for n, c, w in (("identity", identity, "higher"), ("PRES", pres, "lower")) if c.word == w]
    lost = [n for n, c, w in (("identity", identity, "lower"), ("PRES", pres, "higher")) if c.word == w]
    if won and not lost:
        return f"**moves the frontier** (better {' and '.join(won)}, nothing worse)"
    if won and lost:
        return f"**a trade** (better {' and '.join(won)}, worse {' and '.join(lost)})"
    if lost:
        return f"**worse** ({' and '.join(lost)})"
    return "**no difference shown**"


def _values(results: dict, row: str, key: str) -> list[float]:
    return [r[key] for r in results.get(row, [])]


def spread_text(values: list[float]) -> str:
    if not values:
        return "–"
    mean, lo, hi = spread([v + 0.0 for v in values])  # + 0.0: no "-0.00"
    return f"{mean:.3f} [{lo + 0.0:.2f}–{hi + 0.0:.2f}]"


def claim(results: dict, row_a: str, row_b: str, key: str, claimed: str) -> str:
    """Row A against row B on ``key`` by the one verdict rule, with the
    word the claim expects ("higher" or "lower") beside the measured one."""
    a, b = _values(results, row_a, key), _values(results, row_b, key)
    if not a or not b:
        return "**not measured** in this run"
    found = compare(a, b)
    agree = "as claimed" if found.word == claimed else f"claimed: {claimed}"
    return f"{found.text()} ({agree}; {key}: {spread_text(a)} vs {spread_text(b)})"


def _seconds(results: dict, row: str) -> str:
    values = results.get("train_seconds", {}).get(row, [])
    return f"{sum(values) / len(values):.0f}" if values else "–"


def table(results: dict, variants) -> list[str]:
    lines = ["| setting | " + " | ".join(t for _, t in FIGURES) + " | train s |",
             "|---|" + "---|" * (len(FIGURES) + 1)]
    rows = [("base", "base model (LoRA scale 0)")] + [(v.name, v.title) for v in variants]
    for row, title in rows:
        if results.get(row):
            lines.append(f"| {title} | " + " | ".join(spread_text(_values(results, row, k))
                                                       for k, _ in FIGURES)
                         + f" | {_seconds(results, row)} |")
    return lines


def both_at_once(results: dict, variants) -> list[str]:
    """Settings with prior preservation whose identity similarity is not
    shown lower than the no-prior run's, and whose PRES is not shown higher
    than the UNet + prior run's, by the one verdict rule (3 seeds at least)."""
    fid, pres = _values(results, "unet", "fidelity"), _values(results, BASELINE, "pres")
    if not fid or not pres:
        return []

    def passes(row: str, key: str, reference: list[float], bad: str) -> bool:
        return compare(_values(results, row, key), reference).word not in (bad, "too few seeds")

    return [v.name for v in variants if v.prior and results.get(v.name)
            and passes(v.name, "fidelity", fid, "lower") and passes(v.name, "pres", pres, "higher")]


def lever_rows(results: dict, levers, baseline: str = "UNet LoRA + prior") -> list[str]:
    base = {k: _values(results, BASELINE, k) for k in ("fidelity", "pres")}
    if not all(base.values()):
        return []
    lines = [f"| lever (on {baseline}) | identity sim. | identity, lever - baseline | PRES "
             "| PRES, lever - baseline | verdict |", "|---|---|---|---|---|---|"]
    for v in levers:
        if results.get(v.name):
            mine = {k: _values(results, v.name, k) for k in ("fidelity", "pres")}
            lines.append(f"| {v.title} | {spread_text(mine['fidelity'])} "
                         f"| {compare(mine['fidelity'], base['fidelity']).text()} "
                         f"| {spread_text(mine['pres'])} | {compare(mine['pres'], base['pres']).text()} "
                         f"| {frontier_verdict(mine, base)} |")
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
        cells = [spread_text([s[name][k] for s in sweeps]) for k, _ in FIGURES[:3]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def monotone(results: dict, key: str, rising: bool) -> str:
    """``key`` over the UNet scales (text scale 1): each step by the one
    verdict rule, and the series' word from its steps (`verdict.trend`)."""
    sweeps = results.get("scales", [])
    if not sweeps:
        return "**not measured** in this run"
    names = [n for n in _settings(sweeps) if n.endswith("text=1")]
    series = [[s[n][key] for s in sweeps] for n in names]
    each = steps(series)
    scale = [n.split(",")[0].removeprefix("unet=") for n in names]
    means = " → ".join(f"{sum(v) / len(v):.2f}" for v in series)
    shown = "; ".join(f"{a} → {b}: {c.text()}" for a, b, c in zip(scale, scale[1:], each))
    return f"**{trend(each, rising)}** ({means}; each step, UNet scale {shown})"


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
        "Every figure is *mean [min–max] over seeds*. Each claim compares two settings by "
        "[the one verdict rule](verdict.md): the mean difference, its 95% bootstrap interval "
        "over seeds (paired by seed) and a standardised effect d; *higher* or *lower* only "
        "where the interval excludes 0. The toy world is a stand-in for "
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
    ctx_gap = [a - b for a, b in zip(_values(results, "base", "context_acc"),
                                     _values(results, "unet", "context_acc"))]
    both = both_at_once(results, variants + levers)
    titles = {v.name: v.title for v in variants + levers}
    return [
        "",
        "## The claims",
        "",
        "Each claim below is *setting A minus setting B*, judged by the one verdict rule.",
        "",
        "1. **Fidelity**: the LoRA raises identity similarity over the base model (LoRA - base): "
        f"{claim(results, 'unet', 'base', 'fidelity', 'higher')}. Context accuracy drops by "
        f"{(sum(ctx_gap) / len(ctx_gap)) if ctx_gap else float('nan'):.3f} on average "
        "(base minus LoRA).",
        "2. **Prior preservation**: without it the bare class drifts towards the subject "
        f"(PRES, without - with): {claim(results, 'unet', BASELINE, 'pres', 'higher')}; and "
        f"loses variety (DIV, with - without): {claim(results, BASELINE, 'unet', 'div', 'higher')}. "
        "Does it cost fidelity (weight 1, 64 class images, UNet-only LoRA; identity, without - "
        f"with)? {claim(results, 'unet', BASELINE, 'fidelity', 'higher')}.",
        "3. **Identifier**: a rare token ('sks') leaves the word 'red' its meaning more than "
        "using 'red' itself as the identifier ('red' still red, 'sks' - 'red'): "
        f"{claim(results, 'unet', 'common-word', 'red_other_classes', 'higher')}.",
        "4. **Scales**: raising the UNet scale (text scale 1) raises identity similarity "
        f"step by step: {monotone(results, 'fidelity', rising=True)}; and lowers context "
        f"accuracy: {monotone(results, 'context_acc', rising=False)}.",
        "5. **Text-encoder LoRA** (own lr, 10x lower): fidelity higher than UNet only (UNet + "
        f"text - UNet): {claim(results, 'unet+te', 'unet', 'fidelity', 'higher')}; context "
        f"accuracy lower: {claim(results, 'unet+te', 'unet', 'context_acc', 'lower')}.",
        "6. **Likeness without wrecking the class**: settings with prior preservation whose "
        "identity similarity is not shown lower than the no-prior run's while their PRES is not "
        "shown higher than the prior run's: "
        + ("; ".join(titles[n] for n in both) if both else "**none**") + ".",
        f"7. **Image-free prior**: time, {_timing(results)}.",
        "",
        "### The levers, each on the same baseline (UNet LoRA + prior preservation)",
        "",
        "A lever *moves the frontier* when identity reads *higher* or PRES *lower* than the "
        "baseline's and neither reads the other way (lever minus baseline, paired by seed).",
        "",
        *lever_rows(results, levers),
    ]


def render_flow_claims(results: dict, record: dict, study, settings, levers, toy_train: dict,
                       pictures: str) -> str:
    """The flow toy model's page: the same subject, prompts, judges and
    verdict rule as the UNet world's, on a FLUX.2 [klein]-shaped transformer;
    ``pictures``: the folder (beside the page) of its figures and raw data."""
    variants = [v for v in settings if results.get(v.name)]
    levers = [v for v in levers if results.get(v.name)]
    seeds = study.seeds
    accuracy = {k.removeprefix("draws_").removesuffix("_accuracy"): v
                for k, v in record.items() if k.startswith("draws_") and k.endswith("_accuracy")}
    return "\n".join([
        "# The flow toy world: DreamBooth's claims on a flow-matching transformer",
        "",
        "Made by `lorabooth toyworld claims --model flow-toy` "
        f"({len(seeds)} seeds: {', '.join(map(str, seeds))}; unless a row says otherwise "
        f"{toy_train['steps']} LoRA steps, batch {toy_train['batch_size']}, lr {toy_train['lr']:g}, "
        f"rank {toy_train['rank']}; {study.images} images per prompt, 20 flow-matching Euler "
        f"steps, guidance {study.guidance:g}; {results.get('work_seconds', '?')} s of drawing, "
        "training and scoring on this machine). Every figure is *mean [min–max] over seeds*; "
        "each claim compares two settings by [the one verdict rule](verdict.md) (the mean "
        "difference, its 95% bootstrap interval over seeds, paired by seed; *higher* or "
        "*lower* only where the interval excludes 0).",
        "",
        "The world, the subject (a **purple striped ball** never rendered in pretraining, shown "
        "in 4 views on grass and beach, asked for on the snow and in the room), the prompts and "
        "the judges are those of [the UNet toy world](toyworld.md). The model is the second "
        "base (`--model flow-toy`): FLUX.2 [klein]'s classes (AutoencoderKLFlux2, a Qwen3 text "
        "encoder, Flux2Transformer2DModel) trained by flow matching through the same "
        "definitions LoRA training uses, by "
        f"`{record.get('command', 'lorabooth toyworld flow-pretrain')}` in "
        f"{record.get('total_seconds', '?')} s. Its draws of the pretraining prompts, read by "
        "the judges: " + (", ".join(f"{k} {v:.2f}" for k, v in sorted(accuracy.items()))
                          or "not recorded") + ". The text encoder stays frozen (FLUX.2's "
        "Qwen3 is not trained), so the UNet world's text-encoder rows, scale sweep and "
        "pivotal tuning have no counterpart here.",
        "",
        "| setting | " + " | ".join(t for _, t in FIGURES) + " | train s |",
        *table(results, variants + levers)[1:],
        "",
        "## The claims",
        "",
        "1. **Fidelity** (LoRA - base): "
        f"{claim(results, 'unet', 'base', 'fidelity', 'higher')}.",
        "2. **Prior preservation**: drift without it (PRES, without - with): "
        f"{claim(results, 'unet', BASELINE, 'pres', 'higher')}; variety (DIV, with - without): "
        f"{claim(results, BASELINE, 'unet', 'div', 'higher')}; its cost in likeness (identity, "
        f"without - with): {claim(results, 'unet', BASELINE, 'fidelity', 'higher')}.",
        "3. **Identifier** ('red' still red, 'sks' - 'red'): "
        f"{claim(results, 'unet', 'common-word', 'red_other_classes', 'higher')}.",
        "",
        "### The levers, each on the same baseline (LoRA + prior preservation)",
        "",
        *lever_rows(results, levers, "transformer LoRA + prior"),
        "",
        f"Raw per-seed figures: [{pictures}/claims_per_seed.json]({pictures}/claims_per_seed.json)."
        f" Identity against PRES, one point per setting and seed:",
        "",
        f"![fidelity against preservation]({pictures}/frontier.svg)",
        "",
        f"![base vs LoRA]({pictures}/grid_base_vs_lora.png)",
    ]) + "\n"
