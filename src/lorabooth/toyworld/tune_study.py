"""Does `tune` beat fixed settings? Measured on the toy world, at the same
CPU time.

Three arms per repeat: `tune` (its recommended trial), the shipped defaults
of `train`, and the seed's recipe (prior preservation with class images,
text-encoder LoRA, 5e-4 / 1e-4, 300 steps, batch 1). A fixed setting given
the CPU time a tune took is run with one training seed after another until
it has used as much, and the same rule as `tune`'s picks among those runs:
what a user does who retries seeds instead of searching. Each arm's pick is
then scored again on images it was not picked on (other evaluation seeds),
so no arm is flattered by its own selection. CPU seconds are the process's
(``time.process_time``): they hold on a machine shared with other work."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..core.fileio import write_json, write_text
from ..evaluation.verdict import compare
from .claims import NEW_CONTEXTS, SUBJECT, subject_photos

log = logging.getLogger(__name__)
CLASS_NOUN = "ball"
FIXED = {  # TrainConfig fields over `train`'s own defaults
    "defaults": {},
    "seed-recipe": {"prior_preservation": "images", "train_text_encoder": True, "lr": 5e-4,
                    "lr_text": 1e-4, "steps": 300, "batch_size": 1},
}
ARMS = ("tune", *FIXED)
HELD_OUT_SEED = 500  # evaluation seeds of the second scoring: 500, 501, ...
MAX_FIXED_RUNS = 40


@dataclass(frozen=True)
class Plan:
    out: Path
    budget: int = 8
    steps: tuple[int, ...] = (100, 200, 400)
    images_per_prompt: int = 4
    pres_images: int = 8
    num_class_images: int = 64
    sample_steps: int = 20


def prompts_file(folder: Path) -> Path:
    """The subject in the toy world's two contexts it was never photographed in."""
    return folder / "prompts.txt"


def prepare(plan: Plan) -> None:
    """The photos and prompts every repeat reads: written once, before the
    repeats run (side by side, as separate processes)."""
    subject_photos(plan.out / "photos")
    write_text(prompts_file(plan.out), "".join(
        f"a photo of {{0}} {{1}} {'in the' if c == 'room' else 'on the'} {c}\n"
        for c in NEW_CONTEXTS))


def _evaluate(plan: Plan, run: Path, seed: int, out: Path, judges: Any,
              scales: dict[str, float]) -> dict[str, float]:
    from ..evaluation.runner import evaluate

    result = evaluate(run, str(plan.out / "photos"), class_noun=CLASS_NOUN,
                      prompts_file=str(prompts_file(plan.out)),
                      images_per_prompt=plan.images_per_prompt, seed=seed,
                      steps=plan.sample_steps, judges=judges, pres_images=plan.pres_images,
                      out=out, **scales)
    row = result["rows"]["lorabooth"]
    return {"fidelity": row["dino"]["mean"], "clip_t": row["clip_t"]["mean"],
            "pres": row["pres"]["mean"]}


def _cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def run_tune(plan: Plan, repeat: int, judges: Any, tune_config: type) -> dict:
    """One tune (seed ``repeat``): its CPU seconds, trial counts and pick;
    ``tune_config``: the command line's TuneConfig (passed in: the commands
    import this module, not the other way round)."""
    from ..search.tune import tune
    from ..search.tune_pruning import steps_saved
    from ..search.tune_report import completed, recommend

    out = plan.out / f"tune-{repeat}"
    config = tune_config(photos=str(plan.out / "photos"), class_noun=CLASS_NOUN, model="toy",
                        judges="toy", budget=plan.budget, seed=repeat, out=str(out),
                        steps=list(plan.steps), prompts=str(prompts_file(plan.out)),
                        images_per_prompt=plan.images_per_prompt,
                        pres_images=plan.pres_images, num_class_images=plan.num_class_images,
                        sample_steps=plan.sample_steps)

    def compute() -> dict:
        import optuna
        from optuna.trial import TrialState

        tune(config)
        study = optuna.load_study(study_name="lorabooth-tune",
                                  storage=f"sqlite:///{(out / 'study.db').resolve()}")
        trials = study.get_trials(deepcopy=False)
        best = recommend(completed(study), study.best_trials)
        saved, planned = steps_saved(trials)
        return {"cpu_s": sum(t.user_attrs.get("cpu_s", 0.0) for t in trials),
                "completed": len(completed(study)),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
                "steps_saved": saved, "steps_planned": planned,
                "pick": {"run": str(out / best.user_attrs["run"]),
                         "settings": best.user_attrs["settings"],
                         "scores": best.user_attrs["scores"]}}

    return _cached(out / "tune_study.json", compute)


def run_fixed(plan: Plan, arm: str, repeat: int, cpu_budget: float, judges: Any) -> dict:
    """Runs of a fixed setting, one training seed after another, until they
    have used ``cpu_budget`` CPU seconds; the pick by `tune`'s rule."""
    from ..search.tune_report import recommend
    from ..training.loop import train

    runs = []
    while sum(r["cpu_s"] for r in runs) < cpu_budget and len(runs) < MAX_FIXED_RUNS:
        seed = 1000 * repeat + len(runs)
        run = plan.out / arm / f"seed{seed}"

        def compute(run=run, seed=seed) -> dict:
            tick = time.process_time()
            train(TrainConfig(**{
                "model": "toy", "instance_dir": str(plan.out / "photos"),
                "instance_prompt": f"a photo of sks {CLASS_NOUN}",
                "class_prompt": f"a photo of a {CLASS_NOUN}", "num_class_images":
                plan.num_class_images, "class_dir": str(plan.out / arm / f"class_images-{repeat}"),
                "seed": seed, "output": str(run), **FIXED[arm]}))
            scores = _evaluate(plan, run, repeat, run / "eval", judges, {})
            return {"run": str(run), "cpu_s": time.process_time() - tick, "scores": scores}

        runs.append(_cached(run / "tune_study.json", compute))
    study = _study(runs)
    pick = recommend(study.trials, study.best_trials)
    return {"cpu_s": sum(r["cpu_s"] for r in runs), "runs": len(runs), "pick": pick.user_attrs}


def _as_trials(runs: list[dict]) -> list[Any]:
    from optuna.trial import TrialState, create_trial

    return [create_trial(values=[r["scores"][k] for k in ("fidelity", "clip_t", "pres")],
                         state=TrialState.COMPLETE, user_attrs={**r, "settings": {}})
            for r in runs]


def _study(runs: list[dict]) -> Any:
    """The runs as a study's completed trials, numbered as a tune numbers them,
    so its Pareto front (best_trials) names the same trials."""
    import optuna

    study = optuna.create_study(directions=["maximize", "maximize", "minimize"])
    study.add_trials(_as_trials(runs))
    return study


def held_out(plan: Plan, arm: str, repeat: int, pick: dict, judges: Any) -> dict:
    """The pick scored again on evaluation seeds it was not chosen on."""
    settings = pick.get("settings", {})
    scales = {k: settings[k] for k in ("unet_scale", "text_scale", "guidance") if k in settings}
    run = Path(pick["run"])
    return _cached(run / "held_out.json", lambda: _evaluate(
        plan, run, HELD_OUT_SEED + repeat, run / "eval-held-out", judges, scales))


def run_repeat(plan: Plan, repeat: int, tune_config: type) -> dict:
    """Everything for one repeat; cached on disk, so a killed repeat resumes."""
    from .judges import toy_judges

    judges = toy_judges()
    result = {"tune": run_tune(plan, repeat, judges, tune_config)}
    for arm in FIXED:
        result[arm] = run_fixed(plan, arm, repeat, result["tune"]["cpu_s"], judges)
    for arm in ARMS:
        result[arm]["held_out"] = held_out(plan, arm, repeat, result[arm]["pick"], judges)
    write_json(plan.out / f"repeat-{repeat}.json", result)
    log.info("repeat %d done (subject %s)", repeat, SUBJECT)
    return result


def _stat(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} [{min(values):.2f}–{max(values):.2f}]" if len(values) > 1 else f"{mean:.3f}"


TITLES = {"tune": "`tune` (its recommended trial)", "defaults": "`train`'s defaults",
          "seed-recipe": "the seed's recipe"}


FIGURES = (("fidelity", "fidelity", "higher"), ("pres", "PRES", "lower"),
           ("clip_t", "CLIP-T", "higher"))  # (key, name, the better direction)


def verdict_lines(col: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """`tune`'s pick against each fixed setting, figure by figure, by the one
    verdict rule (paired by repeat); ``col[arm][figure][repeat]``. A figure
    missing from ``col['tune']`` is left out."""
    lines = []
    for arm in FIXED:
        parts = []
        for key, name, good in FIGURES:
            if key in col["tune"]:
                found = compare(col["tune"][key], col[arm][key])
                better = {good: " (better)", "no difference shown": "",
                          "too few seeds": ""}.get(found.word, " (worse)")
                parts.append(f"{name} {found.text()}{better}")
        lines.append(f"- vs {TITLES[arm]}: " + "; ".join(parts) + ".")
    return lines


def render(results: dict[int, dict], plan: Plan) -> str:
    """docs/tune.md from the repeats' results (``results[repeat]``)."""
    from .frontier import frontier_svg

    repeats = sorted(results)
    col = {arm: {k: {r: results[r][arm]["held_out"][k] for r in repeats}
                 for k, _, _ in FIGURES} for arm in ARMS}
    picked = {arm: [results[r][arm]["pick"]["scores"]["fidelity"] for r in repeats] for arm in ARMS}
    lines = [
        "# Does `tune` beat fixed settings? (toy world)", "",
        "Generated by `lorabooth toyworld tune-study`; the method is in "
        "`src/lorabooth/toyworld/tune_study.py`'s docstring. The subject: the toy world's purple "
        f"striped ball; prompts: the ball in two contexts it was never photographed in; "
        f"{len(repeats)} repeats (tune seeds {', '.join(map(str, repeats))}); budget "
        f"{plan.budget} completed trials, steps from {', '.join(map(str, plan.steps))}, the "
        "pruner on. Fixed settings are run with one training seed after another until they "
        "have used the CPU time of the same repeat's tune, and `tune`'s rule picks among "
        "them. Scores: mean [min–max] over repeats, on held-out evaluation seeds.", "",
        "| arm | runs per repeat | CPU s per repeat | fidelity | CLIP-T | PRES | fidelity as picked |",
        "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        runs = [results[r][arm].get("runs", results[r][arm].get("completed", 0)
                                    + results[r][arm].get("pruned", 0)) for r in repeats]
        cpu = [results[r][arm]["cpu_s"] for r in repeats]
        lines.append(f"| {TITLES[arm]} | {sum(runs) / len(runs):.1f} | {sum(cpu) / len(cpu):.0f} "
                     f"| {_stat(list(col[arm]['fidelity'].values()))} "
                     f"| {_stat(list(col[arm]['clip_t'].values()))} "
                     f"| {_stat(list(col[arm]['pres'].values()))} | {_stat(picked[arm])} |")
    lines += ["", "Against each fixed setting, `tune`'s pick minus the fixed setting's, paired by "
              "repeat, by [the one verdict rule](verdict.md) (mean difference, 95% bootstrap "
              "interval over repeats, standardised effect d; lower PRES is better):", "",
              *verdict_lines(col)]
    lines += ["", "![fidelity against PRES, each arm's pick per repeat](tune/figure.svg)", "",
              "## The tunes", "",
              "| repeat | completed | pruned | failed | CPU s | steps not trained (pruner) "
              "| recommended |", "|---|---|---|---|---|---|---|"]
    for r in repeats:
        t = results[r]["tune"]
        s = t["pick"]["settings"]
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in s.items())
        lines.append(f"| {r} | {t['completed']} | {t['pruned']} | {t['failed']} "
                     f"| {t['cpu_s']:.0f} | {t['steps_saved']} of {t['steps_planned']} "
                     f"| {shown} |")
    points = [(TITLES[arm].replace("`", ""), results[r][arm]["held_out"]["pres"],
               results[r][arm]["held_out"]["fidelity"]) for arm in ARMS for r in repeats]
    return "\n".join(lines) + "\n", frontier_svg(points)


def tune_study(out: str | Path, report: str | Path, repeats: list[int], budget: int,
               tune_config: type) -> Path:
    """Run the repeats (each cached: rerunning resumes) and write the report
    from every repeat finished so far, in this process or another."""
    plan = Plan(Path(out), budget=budget)
    prepare(plan)
    for r in repeats:
        run_repeat(plan, r, tune_config)
    results = {int(p.stem.split("-")[1]): json.loads(p.read_text())
               for p in sorted(plan.out.glob("repeat-*.json"))}
    text, svg = render(results, plan)
    report = Path(report)
    write_text(report, text)
    write_text(report.parent / "tune" / "figure.svg", svg)
    write_json(report.parent / "tune" / "repeats.json", results)  # the page's raw data, beside it
    return report
