"""`lorabooth sweep FILE.toml`: a grid of training runs times a grid of
inference settings, labelled image grids, an HTML report. Resumable: a run
whose settings match a finished run is skipped, an interrupted one resumed,
images already drawn are reused."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import (
    SWEEP_NEUTRAL,
    EvaluateConfig,
    SweepEvaluate,
    SweepGenerate,
    TrainConfig,
    build_section,
    check_keys,
    config_keys,
    evaluate_options,
    to_toml_dict,
    unknown_key,
)
from ..core.errors import UserError
from ..core.fileio import load_toml, save_png, to_json
from ..formats import LORA_FILES
from ..generation import Setting, cache_name, load_pipeline, prompt_slug, settings_grid
from ..models.loading import model_guidance
from ..reports.grid import make_grid

log = logging.getLogger(__name__)
SECTIONS = ("base", "train", "generate", "evaluate")
GRID_KEYS = ("unet_scale", "text_scale", "text2_scale", "guidance")  # [generate.grid]
NEUTRAL = SWEEP_NEUTRAL  # config.train says why it differs from RESUME_NEUTRAL
MAX_RUNS = 1000  # a bigger grid is more likely a typo than a plan: it needs --yes


@dataclass
class Sweep:
    """A checked sweep file: a TrainConfig base plus its grid ([base],
    [train.grid]), what every run draws ([generate]) and how it is scored
    ([evaluate]); the tables are the config tree's own classes."""
    source: str
    base: dict[str, Any]
    train_grid: dict[str, list]
    generate: SweepGenerate
    evaluate: SweepEvaluate | None = None

    @property
    def output(self) -> Path:
        return Path(self.base.get("output", "runs/sweep"))

    @property
    def prompts(self) -> list[str]:
        return self.generate.prompts

    @property
    def seeds(self) -> list[int]:
        return self.generate.seeds

    @property
    def steps(self) -> int:
        return self.generate.steps

    def settings(self, model: str) -> list[Setting]:
        """The [generate.grid] settings for a run of ``model``; no guidance
        list: the model family's own scale (SD 7.5, FLUX.2 4, FLUX.1 3.5)."""
        g = self.generate
        return settings_grid(g.unet_scale, g.text_scale,
                             g.guidance or [model_guidance(model)], g.text2_scale)


def _table(data: dict, key: str, where: str) -> dict:
    """``data[key]`` must be a TOML table (``[key]``), or absent."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{where}: `{key}` must be a table [{key}] (got {value!r})")
    return value


def _check_train(data: dict, where: str) -> tuple[dict, dict]:
    base = check_keys(TrainConfig, _table(data, "base", where), f"{where} [base]")
    train = _table(data, "train", where)
    for key in train:
        if key != "grid":
            raise unknown_key(key, ["grid"], f"{where} [train]")
    grid = _table(train, "grid", f"{where} [train]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where} [train.grid]: `{key}` must be a non-empty list")
        for v in values:
            check_keys(TrainConfig, {key: v}, f"{where} [train.grid]")
    return base, grid


def _check_generate(data: dict, path: str) -> SweepGenerate:
    table = dict(_table(data, "generate", path))
    grid = _table(table, "grid", f"{path} [generate]")
    table.pop("grid", None)
    for key in grid:
        if key not in GRID_KEYS:
            raise unknown_key(key, GRID_KEYS, f"{path} [generate.grid]")
    for key in table:
        if key in GRID_KEYS:  # a scale list belongs in the grid table
            raise unknown_key(key, set(config_keys(SweepGenerate)) - set(GRID_KEYS),
                              f"{path} [generate]")
    if "prompts" not in table:
        raise UserError(f"{path} [generate]: `prompts` is required (a list of prompts)")
    return build_section(SweepGenerate, {**table, **grid}, f"{path} [generate]")


def _check_evaluate(data: dict, path: str) -> SweepEvaluate | None:
    if "evaluate" not in data:
        return None
    where = f"{path} [evaluate]"
    table = dict(_table(data, "evaluate", path))
    if "prompts_file" in table:  # the table's older key, read as `evaluate --prompts`'s
        if "prompts" in table:
            raise UserError(f"{where}: `prompts` and `prompts_file` are one option; give one")
        table["prompts"] = table.pop("prompts_file")
    return build_section(SweepEvaluate, table, where)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check the whole file before anything runs: every table by
    its class in the config tree, every train value by TrainConfig's own
    checks (in ``expand``), the evaluate options by evaluate's."""
    where = str(path)
    data = load_toml(path, "sweep file")
    for key in data:
        if key not in SECTIONS:
            raise unknown_key(key, SECTIONS, where)
    base, grid = _check_train(data, where)
    return Sweep(where, base, grid, _check_generate(data, where), _check_evaluate(data, where))


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _label(values: dict[str, Any]) -> str:
    """The settings that vary, readable and safe as one file name: no path
    separators (so no `..` walk out of the sweep folder), at most 80 characters."""
    text = ",".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9.,=_+-]", "_", text)[:80]


def expand(sweep: Sweep) -> list[tuple[str, TrainConfig]]:
    """One (name, config) per point of the training grid, each validated by
    TrainConfig. The name is the settings that vary plus a hash of all of
    them (`lr=0.0005,train_text_encoder=true-1a2b3c4d`): values that print
    alike still get their own folder, always inside the sweep's output."""
    keys = list(sweep.train_grid)
    points = list(itertools.product(*(sweep.train_grid[k] for k in keys))) or [()]
    varying = [k for k in keys if len(sweep.train_grid[k]) > 1]
    root = sweep.output.resolve()
    runs, names = [], set()
    for point in points:
        values = dict(zip(keys, point))
        label = _label({k: values[k] for k in varying})
        try:
            config = TrainConfig(**{**sweep.base, **values, "output": str(sweep.output)})
        except UserError as e:
            raise UserError(f"{sweep.source}: run {label}: {e}") from None
        name = f"{label}-{config_hash(config)[:8]}"
        if name in names:
            raise UserError(f"{sweep.source} [train.grid]: two runs have the same settings "
                            f"({label}); list each value once")
        names.add(name)
        if not (sweep.output / name).resolve().is_relative_to(root):  # a symlinked run folder
            raise UserError(f"{sweep.output / name}: leads outside the sweep folder {root}")
        runs.append((name, dataclasses.replace(config, output=str(sweep.output / name))))
    return runs


def check_size(sweep: Sweep, yes: bool) -> None:
    count = math.prod(len(v) for v in sweep.train_grid.values())
    if count > MAX_RUNS and not yes:
        raise UserError(f"{sweep.source} [train.grid]: {count} training runs (more than "
                        f"{MAX_RUNS}); add --yes to start them all")


def config_hash(config: TrainConfig) -> str:
    data = {k: v for k, v in to_toml_dict(config).items() if k not in NEUTRAL}
    return hashlib.sha256(to_json(data, sort_keys=True).encode()).hexdigest()[:16]


def run_state(config: TrainConfig) -> str:
    """'done' (same settings, finished), 'resume' (checkpoints), or 'new'."""
    out = Path(config.output)
    stamp = out / "sweep_hash.txt"
    same = stamp.is_file() and stamp.read_text().strip() == config_hash(config)
    if same and any((out / n).is_file() for n in LORA_FILES.values()):
        return "done"
    if same and (out / "checkpoints").is_dir():
        return "resume"
    return "new"


def _draw_all(sweep: Sweep, run: Path, settings: list[Setting]
              ) -> dict[str, list[list[Image.Image]]]:
    """Every prompt x setting x seed for one run, drawing only what is missing."""
    from ..generation import check_windows, draw_cached

    pipe = None
    negative = sweep.generate.negative_prompt
    out: dict[str, list[list[Image.Image]]] = {}
    for p, prompt in enumerate(sweep.prompts):
        rows = []
        for setting in settings:
            folder = (run / "sweep" / prompt_slug(p, prompt)
                      / cache_name(setting, sweep.steps, run, negative))
            if pipe is None and not all((folder / f"seed{s}.png").is_file() for s in sweep.seeds):
                pipe = load_pipeline(run)
                check_windows(pipe[0], run, sweep.prompts, "[generate] prompts")
            model, has_text = pipe or (None, False)  # None: every image is cached
            rows.append(draw_cached(model, has_text, prompt, setting, sweep.seeds, sweep.steps,
                                    folder, negative))
        out[prompt] = rows
    return out


def run_sweep(path: str | Path, yes: bool = False) -> Path:
    from ..training.loop import train
    from .sweep_report import write_report

    sweep = load_sweep(path)
    check_size(sweep, yes)
    runs = expand(sweep)
    check_snapshots(sweep, runs)
    sweep.output.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), []
    for i, (name, config) in enumerate(runs, 1):
        state = run_state(config)
        elapsed = time.perf_counter() - started
        eta = f", about {elapsed / (i - 1) * (len(runs) - i + 1):.0f} s left" if i > 1 else ""
        log.info("run %d of %d: %s (%s%s)", i, len(runs), name,
                 {"done": "finished before: skipped", "resume": "resuming", "new": "training"}[state],
                 eta)
        if state != "done":
            shutil.rmtree(Path(config.output) / "sweep", ignore_errors=True)  # a replaced run's
            Path(config.output).mkdir(parents=True, exist_ok=True)
            (Path(config.output) / "sweep_hash.txt").write_text(config_hash(config) + "\n")
            # "new" in a folder holding a run: its settings changed, so it is replaced
            train(TrainConfig(**{**to_toml_dict(config), "resume": state == "resume",
                                 "overwrite": state == "new"}))
        run = Path(config.output)
        settings = sweep.settings(config.model)
        images = _draw_all(sweep, run, settings)
        for p, prompt in enumerate(sweep.prompts):
            grid = make_grid(images[prompt], [s.label for s in settings],
                             [f"seed {s}" for s in sweep.seeds], title=f"{name}: {prompt}")
            save_png(grid, run / "sweep" / prompt_slug(p, prompt) / "grid.png")
        metrics = _evaluate(sweep, run) if sweep.evaluate else None
        results.append({"name": name, "config": config, "run": run, "images": images,
                        "metrics": metrics, "labels": [s.label for s in settings]})
    for p, prompt in enumerate(sweep.prompts):  # across runs: first seed of every setting
        rows = [[row[0] for row in r["images"][prompt]] for r in results]
        grid = make_grid(rows, [r["name"] for r in results], _columns(results),
                         title=f"{prompt} (seed {sweep.seeds[0]})")
        save_png(grid, sweep.output / "grids" / f"{prompt_slug(p, prompt)}.png")
    report = write_report(sweep, results, sweep.output / "report.html")
    log.info("sweep of %d runs done in %.0f s; report: %s", len(runs),
             time.perf_counter() - started, report)
    return report


def check_snapshots(sweep: Sweep, runs: list[tuple[str, TrainConfig]]) -> None:
    """[evaluate] snapshots needs every run to save them: one line before
    anything trains."""
    if not (sweep.evaluate and sweep.evaluate.snapshots):
        return
    for name, config in runs:
        if not config.save_every:
            raise UserError(f"{sweep.source} [evaluate] snapshots: run {name} saves none; set "
                            f"save_every in [base] (or [train.grid])")


def _columns(results: list[dict]) -> list[str]:
    """The settings' labels across runs; runs of families with their own
    default guidance (no [generate.grid] guidance) differ in it only."""
    labels = [r["labels"] for r in results]
    if all(lab == labels[0] for lab in labels):
        return labels[0]
    return [lab.rsplit(" | cfg", 1)[0] + " | cfg: the family's" for lab in labels[0]]


def _evaluate(sweep: Sweep, run: Path) -> dict:
    from ..evaluation.judges import load_judges
    from ..evaluation.runner import evaluate

    e = sweep.evaluate
    judges = load_judges(e.judges, e.dino, e.clip) if e.judges else None
    config = EvaluateConfig(run=str(run), real=e.real, steps=e.steps, baselines=e.baselines,
                            out=str(run / "eval"), **evaluate_options(e))
    metrics = evaluate(config, judges=judges)
    if e.snapshots:  # RUN/eval/snapshots.json, .md, .svg: the report reads the json
        evaluate(dataclasses.replace(config, baselines=False, snapshots=True), judges=judges)
    return metrics
