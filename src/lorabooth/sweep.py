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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .checks import MAX_STEPS, check_count, check_seeds, finite
from .config import TrainConfig, check_keys, read_toml, to_toml_dict
from .drawing import Setting, load_pipeline, prompt_slug, settings_grid
from .errors import UserError
from .evaluation.runner import check_options
from .fileio import save_png, to_json
from .grid import make_grid

log = logging.getLogger(__name__)
SECTIONS = {"base", "train", "generate", "evaluate"}
GENERATE_KEYS = {"prompts": list, "seeds": list, "steps": int, "negative_prompt": str,
                 "grid": dict}
GENERATE_GRID = ("unet_scale", "text_scale", "guidance")
EVALUATE_KEYS = {"real": str, "class_noun": str, "kind": str, "prompts_file": str,
                 "images_per_prompt": int, "steps": int, "baselines": bool, "dino": str,
                 "clip": str, "judges": str, "pres_images": int}
NEUTRAL = {"output", "resume", "force"}  # do not change what a run computes
EVALUATE_CHECKED = ("kind", "prompts_file", "images_per_prompt", "pres_images", "steps")
MAX_RUNS = 1000  # a bigger grid is more likely a typo than a plan: it needs --yes


@dataclass
class Sweep:
    source: str
    base: dict[str, Any]
    train_grid: dict[str, list]
    prompts: list[str]
    seeds: list[int]
    steps: int = 25
    negative_prompt: str = ""
    generate_grid: dict[str, list] = field(default_factory=dict)
    evaluate: dict[str, Any] | None = None

    @property
    def output(self) -> Path:
        return Path(self.base.get("output", "runs/sweep"))

    @property
    def settings(self) -> list[Setting]:
        g = self.generate_grid
        return settings_grid([float(v) for v in g.get("unet_scale", [1.0])],
                             [float(v) for v in g.get("text_scale", [1.0])],
                             [float(v) for v in g.get("guidance", [7.5])])


def _unknown(key: str, known, where: str) -> UserError:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return UserError(f"{where}: unknown key `{key}`" + (f"; did you mean `{close[0]}`?" if close else ""))


def _table(data: dict, key: str, where: str) -> dict:
    """``data[key]`` must be a TOML table (``[key]``), or absent."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{where}: `{key}` must be a table [{key}] (got {value!r})")
    return value


def _typed(section: dict, spec: dict[str, type], where: str) -> dict:
    for key, value in section.items():
        if key not in spec:
            raise _unknown(key, spec, where)
        if spec[key] is int and isinstance(value, bool) or not isinstance(value, spec[key]):
            raise UserError(f"{where}: `{key}` must be {spec[key].__name__} (got {value!r})")
    return section


def _list_of(values: Any, kinds: tuple[type, ...], key: str, where: str, what: str) -> list:
    """A non-empty list whose items are all of ``kinds`` (never bool)."""
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)):
        raise UserError(f"{where}: `{key}` must be a non-empty list of {what} (got {values!r})")
    return values


def _check_train(data: dict, where: str) -> tuple[dict, dict]:
    base = check_keys(TrainConfig, _table(data, "base", where), f"{where} [base]")
    train = _table(data, "train", where)
    for key in train:
        if key != "grid":
            raise _unknown(key, {"grid"}, f"{where} [train]")
    grid = _table(train, "grid", f"{where} [train]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where} [train.grid]: `{key}` must be a non-empty list")
        for v in values:
            check_keys(TrainConfig, {key: v}, f"{where} [train.grid]")
    return base, grid


def _check_generate(data: dict, path: str) -> dict:
    where, grid_where = f"{path} [generate]", f"{path} [generate.grid]"
    gen = _typed(dict(_table(data, "generate", path)), GENERATE_KEYS, where)
    for key, values in gen.get("grid", {}).items():
        if key not in GENERATE_GRID:
            raise _unknown(key, GENERATE_GRID, grid_where)
        for v in _list_of(values, (int, float), key, grid_where, "numbers"):
            finite(v, f"{grid_where}: `{key}`")
    if "prompts" not in gen:
        raise UserError(f"{where}: `prompts` is required (a list of prompts)")
    _list_of(gen["prompts"], (str,), "prompts", where, "prompts")
    check_seeds(_list_of(gen.get("seeds", [0]), (int,), "seeds", where, "integers"),
                f"{where}: `seeds`")
    check_count(gen.get("steps", 25), f"{where}: `steps`", MAX_STEPS)
    return gen


def _check_evaluate(data: dict, path: str) -> dict | None:
    if "evaluate" not in data:
        return None
    where = f"{path} [evaluate]"
    opts = _typed(_table(data, "evaluate", path), EVALUATE_KEYS, where)
    if not Path(opts.get("real", "")).is_dir():
        raise UserError(f"{where}: `real` must be the folder of the subject's photos "
                        f"(got {opts.get('real', '')!r})")
    if opts.get("judges", "toy") != "toy":
        raise UserError(f"{where}: `judges` can only be \"toy\" (got {opts['judges']!r}); "
                        f"leave it out for DINO and CLIP")
    try:
        check_options(**{k: v for k, v in opts.items() if k in EVALUATE_CHECKED})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return opts


def load_sweep(path: str | Path) -> Sweep:
    """Read and check the whole file before anything runs: every section's
    type, every train value by the train config's own checks (in
    ``expand``), the generate and evaluate sections by their commands'."""
    where = str(path)
    data = read_toml(path)
    for key in data:
        if key not in SECTIONS:
            raise _unknown(key, SECTIONS, where)
    base, grid = _check_train(data, where)
    gen = _check_generate(data, where)
    return Sweep(where, base, grid, gen["prompts"], gen.get("seeds", [0]), gen.get("steps", 25),
                 gen.get("negative_prompt", ""), gen.get("grid", {}), _check_evaluate(data, where))


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
    if same and any((out / n).is_file() for n in ("pytorch_lora_weights.safetensors",
                                                  "lora_kohya.safetensors")):
        return "done"
    if same and (out / "checkpoints").is_dir():
        return "resume"
    return "new"


def _draw_all(sweep: Sweep, run: Path) -> dict[str, list[list[Image.Image]]]:
    """Every prompt x setting x seed for one run, drawing only what is missing."""
    from .drawing import draw_cached

    pipe = None
    out: dict[str, list[list[Image.Image]]] = {}
    for p, prompt in enumerate(sweep.prompts):
        rows = []
        for setting in sweep.settings:
            folder = run / "sweep" / prompt_slug(p, prompt) / f"{setting.slug}_steps{sweep.steps}"
            if pipe is None and not all((folder / f"seed{s}.png").is_file() for s in sweep.seeds):
                pipe = load_pipeline(run)
            model, has_text = pipe or (None, False)  # None: every image is cached
            rows.append(draw_cached(model, has_text, prompt, setting, sweep.seeds, sweep.steps,
                                    folder))
        out[prompt] = rows
    return out


def run_sweep(path: str | Path, yes: bool = False) -> Path:
    from .sweep_report import write_report
    from .training import train

    sweep = load_sweep(path)
    check_size(sweep, yes)
    runs = expand(sweep)
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
            Path(config.output).mkdir(parents=True, exist_ok=True)
            (Path(config.output) / "sweep_hash.txt").write_text(config_hash(config) + "\n")
            train(TrainConfig(**{**to_toml_dict(config), "resume": state == "resume"}))
        run = Path(config.output)
        images = _draw_all(sweep, run)
        for p, prompt in enumerate(sweep.prompts):
            grid = make_grid(images[prompt], [s.label for s in sweep.settings],
                             [f"seed {s}" for s in sweep.seeds], title=f"{name}: {prompt}")
            save_png(grid, run / "sweep" / prompt_slug(p, prompt) / "grid.png")
        metrics = _evaluate(sweep, run) if sweep.evaluate else None
        results.append({"name": name, "config": config, "run": run, "images": images,
                        "metrics": metrics})
    for p, prompt in enumerate(sweep.prompts):  # across runs: first seed of every setting
        rows = [[row[0] for row in r["images"][prompt]] for r in results]
        grid = make_grid(rows, [r["name"] for r in results], [s.label for s in sweep.settings],
                         title=f"{prompt} (seed {sweep.seeds[0]})")
        save_png(grid, sweep.output / "grids" / f"{prompt_slug(p, prompt)}.png")
    report = write_report(sweep, results, sweep.output / "report.html")
    log.info("sweep of %d runs done in %.0f s; report: %s", len(runs),
             time.perf_counter() - started, report)
    return report


def _evaluate(sweep: Sweep, run: Path) -> dict:
    from .evaluation.runner import evaluate

    opts = dict(sweep.evaluate)
    real = opts.pop("real", "")
    if opts.pop("judges", "") == "toy":  # the toy world's own judges instead of DINO/CLIP
        from .models import toy_model_dir
        from .toyworld.judges import ToyJudge

        opts["judges"] = ToyJudge.load(toy_model_dir() / "judges.safetensors").judges()
    return evaluate(run, real, out=run / "eval", **opts)

