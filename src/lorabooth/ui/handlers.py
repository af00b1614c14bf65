"""What each button of the page does, as plain functions of plain values
(tested without a browser). They call the same functions and commands as
the CLI; every string that lands in HTML goes through ``html.escape``."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from ..commands.guard import RUN_CONFIGS
from ..config import EvaluateConfig, GenerateConfig, PrepareConfig, TuneConfig, to_argv, to_toml_dict
from ..core.errors import UserError
from ..core.fileio import MAX_JSON_BYTES, load_json, load_toml, read_bytes_file
from ..formats import LORA_FILES
from ..photos.imagefiles import Rejected
from ..reports.lossplot import loss_svg
from .jobs import Job, JobQueue, load_job
from .trainform import config_from_form
from .workspace import Workspace, read_metrics, read_run_config

TRAIN_SPEC = RUN_CONFIGS[1]  # the config the page queued a training with


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def table(header: list[str], rows: list[list[object]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def message(text: str, error: bool = False) -> str:
    kind = "error" if error else "ok"
    return f'<p class="lb-{kind}">{esc(text)}</p>'


# --- 1. photos -----------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    dataset: Path
    sheet: Path | None
    rejected: list[tuple[str, str]]  # (file, reason): refused uploads and prepare's rejects
    kept: int


def prepare_photos(ws: Workspace, uploads: list[tuple[str, str]], folder: str, name: str,
                   crop: str, resolution: int, class_noun: str,
                   identifier: str = "sks") -> Prepared:
    """Uploaded files (temp path, original name), or a folder in the
    workspace, through `prepare` into datasets/NAME."""
    name = name.strip() or "subject"
    refused = []
    if uploads:
        src = ws.path(Path("photos") / name, "dataset name")
        for temp, original in uploads:
            try:
                ws.save_upload(temp, original, src)
            except Rejected as e:
                refused.append((Path(original).name, str(e)))
    elif folder.strip():
        src = ws.path(folder, "photo folder")
        if not src.is_dir():
            raise UserError(f"photo folder {folder!r}: not a folder in the workspace")
    else:
        raise UserError("photos: upload files or name a folder in the workspace")
    out = ws.path(Path("datasets") / name, "dataset name")
    caption = "a photo of {identifier} {class}" if class_noun.strip() else ""
    config = PrepareConfig(src=str(src), out=str(out), resolution=int(resolution), crop=crop,
                           caption=caption, identifier=identifier.strip() or "sks",
                           class_noun=class_noun.strip())
    from ..photos.prepare import SHEET_NAME, prepare

    try:
        prepare(config)
    except UserError:
        if not _finished_report(out):  # refused before judging any file
            raise
    # prepare.json has every file's fate, also when none could be kept
    report = load_json(out / "prepare.json")
    refused += [(f["source"], f["reason"]) for f in report["files"] if not f["kept"]]
    sheet = out / SHEET_NAME
    return Prepared(out, sheet if sheet.is_file() and report["kept"] else None, refused,
                    report["kept"])


def _finished_report(out: Path) -> bool:
    """Whether OUT holds a finished prepare's report (not the record of a run
    that is still writing, or was stopped)."""
    try:
        return not load_json(out / "prepare.json").get("running")
    except (UserError, AttributeError):
        return False


# --- 2. identifier -------------------------------------------------------
def suggest_identifiers(model: str, n: int, class_noun: str) -> tuple[str, str, str]:
    """(HTML table of rare tokens, instance prompt, class prompt) for the
    rarest candidate."""
    from ..models.loading import load_tokenizers
    from ..photos.identifier import check_prompt, rare_identifiers

    tokenizers = load_tokenizers(model)
    tokenizer = tokenizers[-1]  # as `lorabooth identifier` ranks (FLUX.1: T5's)
    rows = rare_identifiers(tokenizer, n=max(1, int(n)))
    noun = class_noun.strip() or "dog"
    lines = [[c.token, c.id, " ".join(tokenizer.tokenize(f"a photo of {c.token} {noun}")),
              f"{c.zipf:.2f}"] for c in rows]
    instance = f"a photo of {rows[0].token} {noun}"
    report, warnings = check_prompt(instance, tokenizers, f"a photo of a {noun}")
    shown = table(["token", "id", f"'a photo of TOKEN {noun}' tokenises as", "English zipf"],
                  lines) + f"<pre>{esc(report)}</pre>" + "".join(message(w, True) for w in warnings)
    return shown, instance, f"a photo of a {noun}"


# --- 3. train ------------------------------------------------------------
def start_training(ws: Workspace, queue: JobQueue, values: dict) -> Job:
    """Validate the form as a TrainConfig, write it into the run folder and
    queue `lorabooth train --config RUN/ui-train.toml`."""
    config = config_from_form(ws, values)
    run = Path(config.output)
    if (run / "config.toml").is_file():  # written once a training has started there
        raise UserError(f"output {ws.relative(run)}: already holds a run; choose another folder, "
                        f"or Resume that one")
    run.mkdir(parents=True, exist_ok=True)
    from ..core.fileio import write_text

    write_text(run / TRAIN_SPEC, tomli_w.dumps(to_toml_dict(config)))
    return queue.submit("train", ["train", "--config", str(run / TRAIN_SPEC)], run,
                        expect=LORA_FILES["diffusers"])


def resume_training(ws: Workspace, queue: JobQueue, run: str) -> Job:
    folder = ws.path(run, "run")
    if not (folder / TRAIN_SPEC).is_file():
        raise UserError(f"run {run!r}: was not started from the page (no {TRAIN_SPEC}); resume it "
                        f"with `lorabooth train --config RUN/config.toml --resume`")
    return queue.submit("train", ["train", "--config", str(folder / TRAIN_SPEC), "--resume"],
                        folder, expect=LORA_FILES["diffusers"])


@dataclass(frozen=True)
class Progress:
    status: str
    step: int
    steps: int
    loss: float | None
    s_per_step: float | None
    eta_s: float | None
    curve_svg: str
    samples: list[Path]
    log: str

    def summary_html(self) -> str:
        loss = "–" if self.loss is None else f"{self.loss:.4g}"
        speed = "–" if self.s_per_step is None else f"{self.s_per_step:.3g}"
        eta = "–" if self.eta_s is None else f"{self.eta_s:.0f} s"
        return (f'<p class="lb-progress" data-step="{self.step}" data-steps="{self.steps}" '
                f'data-status="{esc(self.status)}">status <b>{esc(self.status)}</b> · '
                f"step {self.step} / {self.steps} · loss {esc(loss)} · {esc(speed)} s/step · "
                f"ETA {esc(eta)}</p>")


def progress(ws: Workspace, run: str) -> Progress:
    """Where a run stands, read from its folder alone (metrics.jsonl,
    samples/, ui-job.json), so any server, any browser, shows the same."""
    folder = ws.path(run, "run")
    config = read_run_config(folder)
    records = read_metrics(folder)
    job = load_job(folder)
    status = job.status if job else ("done" if (folder / LORA_FILES["diffusers"]).is_file()
                                     else "unknown")
    steps = config.get("steps") if isinstance(config.get("steps"), int) else 0
    step = records[-1]["step"] if records else 0
    recent = [r["s_per_step"] for r in records[-20:] if isinstance(r.get("s_per_step"), float)]
    speed = sum(recent) / len(recent) if recent else None
    eta = speed * (steps - step) if speed is not None and status == "running" else None
    curve = loss_svg([(folder.name, [r["step"] for r in records],
                       [r["loss"] for r in records])]) if records else "<p>No losses yet.</p>"
    samples = sorted((folder / "samples").glob("*.png"))
    return Progress(status, step, steps, records[-1]["loss"] if records else None, speed, eta,
                    curve, samples, job.log_tail() if job else "")


# --- 4. draw -------------------------------------------------------------
def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in str(text).replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}: a comma list of numbers (got {text!r})") from None
    if not values:
        raise UserError(f"{what}: give at least one number")
    return values


def start_drawing(ws: Workspace, queue: JobQueue, runs: list[str], prompt: str,
                  unet_scales: str, text_scales: str, guidance: float, seed: int,
                  num_images: int, steps: int) -> list[Job]:
    """One `lorabooth generate` job per run (two runs: side by side), each
    into RUN/generated/ui-TIME; they queue behind any training."""
    if not prompt.strip():
        raise UserError("prompt: is required")
    chosen = [r for r in runs if r]
    if not chosen:
        raise UserError("run: choose a trained run")
    stamp = time.strftime("ui-%Y%m%d-%H%M%S")
    options = {"prompt": [prompt.strip()], "unet_scale": _numbers(unet_scales, "UNet scales"),
               "text_scale": _numbers(text_scales, "text scales"),
               # 0: none given, so `generate` draws at the family's own scale
               "guidance": [float(guidance)] if guidance else [],
               "seed": int(seed), "num_images": int(num_images), "steps": int(steps)}
    configs = []
    for run in chosen:  # every config checked before any job is queued
        folder = ws.path(run, "run")
        if not (folder / LORA_FILES["diffusers"]).is_file():
            raise UserError(f"run {run!r}: has no LoRA yet (is it still training?)")
        configs.append(GenerateConfig(run=str(folder), output=str(folder / "generated" / stamp),
                                      **options))
    return [queue.submit("generate", ["generate", *to_argv(c)], Path(c.output),
                         expect="*/grid.png") for c in configs]


def drawn_grids(ws: Workspace, folders: list[str]) -> list[tuple[Path | None, str]]:
    """(grid.png or None, status line) for each drawing job's folder."""
    out = []
    for folder in folders:
        path = ws.path(folder, "drawing")
        job = load_job(path)
        grids = sorted(path.glob("*/grid.png"))
        status = job.status if job else "unknown"
        out.append((grids[0] if grids else None, f"{ws.relative(path)}: {status}"))
    return out


def lora_file(ws: Workspace, run: str, layout: str) -> Path:
    """The run's LoRA in the layout asked for, converted (formats) when the
    run did not save that one."""
    if layout not in LORA_FILES:
        raise UserError(f"layout: must be diffusers or kohya (got {layout!r})")
    folder = ws.path(run, "run")
    wanted = folder / LORA_FILES[layout]
    if wanted.is_file():
        return wanted
    have = [folder / f for f in LORA_FILES.values() if (folder / f).is_file()]
    if not have:
        raise UserError(f"run {run!r}: has no LoRA file yet")
    from ..formats.layouts import convert_file

    return convert_file(have[0], folder / "downloads" / LORA_FILES[layout], layout)


# --- 5. measure ----------------------------------------------------------
REPORTS = {"evaluate": "report.md", "snapshots": "snapshots.md", "sweep": "report.html",
           "tune": "report.md"}


def start_measure(ws: Workspace, queue: JobQueue, kind: str, run: str, photos: str,
                  class_noun: str, sweep_file: str, budget: int) -> Job:
    """`evaluate` a run against the subject's photos, a `sweep` file, or
    `tune` on the photos (toy judges on the toy model: no downloads)."""
    if kind in ("evaluate", "snapshots"):  # snapshots: every step the run saved
        folder = ws.path(run, "run")
        config = EvaluateConfig(run=str(folder), real=str(ws.path(photos, "photos")),
                                out=str(folder / "eval"), snapshots=kind == "snapshots")
        out, argv = Path(config.out), ["evaluate", *to_argv(config)]
    elif kind == "sweep":
        file = ws.path(sweep_file, "sweep file")
        # the sweep writes where its [base] output says (relative: to the workspace)
        base = load_toml(file, "sweep file").get("base", {})
        out = ws.path(base.get("output", "runs/sweep") if isinstance(base, dict) else "",
                      "the sweep's [base] output")
        argv = ["sweep", str(file)]
    elif kind == "tune":
        real = ws.path(photos, "photos")
        out = ws.path(Path("tune") / real.name, "tune folder")
        model = read_run_config(ws.path(run, "run")).get("model", "tiny") if run else "tiny"
        config = TuneConfig(photos=str(real), class_noun=class_noun.strip(), budget=int(budget),
                            model=model, out=str(out), judges="toy" if model == "toy" else "")
        argv = ["tune", *to_argv(config)]
    else:
        raise UserError(f"measure: must be evaluate, snapshots, sweep or tune (got {kind!r})")
    return queue.submit(kind, argv, out, expect=REPORTS[kind])


def measure_report(ws: Workspace, folder: str) -> tuple[str, str]:
    """(status line, report text) of a measuring job's folder; the report is
    shown as text or sanitised markdown, never as the page's own HTML."""
    path = ws.path(folder, "report folder")
    job = load_job(path)
    status = f"{ws.relative(path)}: {job.status if job else 'unknown'}"
    names = ("snapshots.md",) if job and job.kind == "snapshots" else ("report.md", "report.html")
    for name in names:
        if (path / name).is_file():
            return status, _report_text(path / name)
    return status, job.log_tail(30) if job else ""


def _report_text(path: Path) -> str:
    """A report or card lorabooth wrote, as text (bad bytes replaced); a file
    swapped for something else is one line."""
    return read_bytes_file(path, "", MAX_JSON_BYTES).decode("utf-8", errors="replace")


# --- 6. runs -------------------------------------------------------------
def runs_overview(ws: Workspace) -> tuple[str, list[str]]:
    """(HTML table of every run, their names for the dropdowns)."""
    rows, names = [], []
    for folder in ws.runs():
        name = ws.relative(folder)
        config = read_run_config(folder)
        records = read_metrics(folder)
        job = load_job(folder)
        status = job.status if job else ("done" if (folder / LORA_FILES["diffusers"]).is_file()
                                         else "unknown")
        last = f"{records[-1]['loss']:.4g}" if records else "–"
        rows.append([name, status, f"{records[-1]['step'] if records else 0}/"
                     f"{config.get('steps', '?')}", last, config.get("model", "?"),
                     config.get("instance_prompt", ""), config.get("rank", "?"),
                     config.get("lr", "?")])
        names.append(name)
    header = ["run", "status", "step", "last loss", "model", "instance prompt", "rank", "lr"]
    return table(header, rows), names


def step_curves(ws: Workspace, run: str) -> str:
    """The run's figures against the step and its kept step, once `evaluate
    --snapshots` has scored it (Measure: snapshots); "" before."""
    from ..evaluation.snapshots import curves_html

    return curves_html(run, ws.path(run, "run"))


def run_details(ws: Workspace, run: str) -> tuple[str, str]:
    """(settings as an HTML table, model card markdown) of one run."""
    folder = ws.path(run, "run")
    config = read_run_config(folder)
    settings = table(["option", "value"], [[k, v] for k, v in sorted(config.items())])
    if (folder / "README.md").exists():
        card = _report_text(folder / "README.md")
    else:
        card = "(no model card yet: it is written when training ends)"
    return settings, card
