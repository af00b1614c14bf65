"""The page: six tabs in the order a user goes (photos, identifier, train,
draw, measure, runs), each wiring widgets to a function of `handlers`.
Nothing here computes; a refused input shows as one escaped line in the
tab's status box."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..config import CROPS
from ..core.errors import UserError
from ..models.loading import BUILTIN_MODELS
from ..photos.imagefiles import Rejected
from . import handlers as h
from .jobs import JobQueue
from .trainform import FormField, form_fields
from .workspace import Workspace

CSS = """
.lb-error { color: #b00020; font-weight: 600; }
.lb-ok { color: #1b5e20; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
"""
REFRESH_S = 1.0  # how often the page rereads a run's folder


def guarded(fn: Callable[..., tuple], outputs: int) -> Callable[..., tuple]:
    """``fn`` whose refusals (UserError, Rejected) become the tab's status
    line, the other outputs left as they are."""
    def call(*args: Any) -> tuple:
        try:
            return fn(*args)
        except (UserError, Rejected) as e:
            return (h.message(str(e), error=True), *[gr.update()] * (outputs - 1))
    return call


def _widget(f: FormField) -> gr.components.Component:
    common = {"label": f.label, "info": f.help, "elem_id": f"train-{f.name}"}
    if f.name == "model":  # the built-in models to pick from, or a folder or hub id typed in
        return gr.Dropdown(choices=list(BUILTIN_MODELS), value=f.default,
                           allow_custom_value=True, **common)
    if f.kind is bool:
        return gr.Checkbox(value=f.default, **common)
    if f.choices:
        return gr.Dropdown(choices=list(f.choices), value=f.default, **common)
    if f.kind is int:
        return gr.Number(value=f.default, precision=0, **common)
    if f.kind is float:
        return gr.Number(value=f.default, **common)
    return gr.Textbox(value="" if f.default is None else str(f.default), **common)


def _photos_tab(ws: Workspace, train: dict[str, gr.components.Component]) -> None:
    with gr.Row():
        files = gr.File(file_count="multiple", file_types=["image"], label="Photos of the subject",
                        elem_id="photos-files")
        with gr.Column():
            folder = gr.Textbox(label="…or a folder of photos in the workspace",
                                elem_id="photos-folder")
            name = gr.Textbox(value="subject", label="Dataset name (datasets/NAME)",
                              elem_id="photos-name")
            crop = gr.Radio(list(CROPS), value="center", label="Crop")
            resolution = gr.Number(value=512, precision=0, label="Resolution (px)",
                                   elem_id="photos-resolution")
            noun = gr.Textbox(label="Class noun (captions 'a photo of sks NOUN')",
                              elem_id="photos-noun")
    go = gr.Button("Prepare", variant="primary", elem_id="photos-prepare")
    status = gr.HTML(elem_id="photos-status")
    sheet = gr.Image(label="Contact sheet (red: the crop)", type="filepath",
                     elem_id="photos-sheet", interactive=False)
    rejected = gr.HTML(elem_id="photos-rejected")

    def run(uploads, folder_text, name_text, crop_mode, res, class_noun):
        pairs = [(p, Path(p).name) for p in (uploads or [])]
        done = h.prepare_photos(ws, pairs, folder_text or "", name_text or "", crop_mode,
                                int(res or 512), class_noun or "")
        note = h.message(f"kept {done.kept} photos in {ws.relative(done.dataset)}",
                         error=not done.kept)
        refused = (h.table(["file", "why it was left out"], done.rejected) if done.rejected
                   else "")
        sheet_url = ws.publish(done.sheet) if done.sheet else None
        return note, sheet_url, refused, ws.relative(done.dataset)

    go.click(guarded(run, 4), [files, folder, name, crop, resolution, noun],
             [status, sheet, rejected, train["instance_dir"]])


def _identifier_tab(model: str, train: dict[str, gr.components.Component]) -> None:
    with gr.Row():
        tokenizer = gr.Textbox(value=model, label="Model whose tokenizer to ask")
        n = gr.Number(value=10, precision=0, label="How many")
        noun = gr.Textbox(value="dog", label="Class noun", elem_id="ident-noun")
    go = gr.Button("Suggest identifiers", elem_id="ident-suggest")
    status = gr.HTML(elem_id="ident-status")
    shown = gr.HTML(elem_id="ident-table")

    def run(m, count, class_noun):
        table, instance, klass = h.suggest_identifiers(m, int(count or 10), class_noun or "")
        return h.message(f"prompts filled in: {instance!r} / {klass!r}"), table, instance, klass

    go.click(guarded(run, 4), [tokenizer, n, noun],
             [status, shown, train["instance_prompt"], train["class_prompt"]])


def _train_tab(ws: Workspace, queue: JobQueue, model: str,
               train: dict[str, gr.components.Component]) -> gr.Dropdown:
    fields = form_fields({"model": model, "output": "runs/run"})
    with gr.Row():
        basic = [f for f in fields if not f.advanced]
        for column in (basic[: (len(basic) + 1) // 2], basic[(len(basic) + 1) // 2:]):
            with gr.Column():
                for f in column:
                    train[f.name] = _widget(f)
    with gr.Accordion("Advanced options", open=False):
        with gr.Row():
            for f in (f for f in fields if f.advanced):
                train[f.name] = _widget(f)
    names = [f.name for f in fields]
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
        watched = gr.Dropdown(label="Run shown below", choices=[], allow_custom_value=True,
                              elem_id="train-run")
    status = gr.HTML(elem_id="train-status")
    summary = gr.HTML(elem_id="train-progress")
    curve = gr.HTML(elem_id="train-curve")
    samples = gr.Gallery(label="Validation images", columns=6, height=220,
                         elem_id="train-samples")
    log = gr.Textbox(label="Log (last lines)", lines=6, elem_id="train-log")

    def begin(*values):
        job = h.start_training(ws, queue, dict(zip(names, values)))
        name = ws.relative(job.path)
        return h.message(f"queued training of {name}"), gr.update(value=name)

    def halt(run):
        job = queue.stop(ws.path(run, "run")) if run else None
        return h.message(f"stopping {run}" if job else "nothing to stop", error=not job)

    def again(run):
        h.resume_training(ws, queue, run or "")
        return (h.message(f"queued: resume {run}"),)

    def refresh(run):
        if not run:
            return "", "", [], ""
        p = h.progress(ws, run)
        return p.summary_html(), p.curve_svg, [ws.publish(s) for s in p.samples], p.log

    start.click(guarded(begin, 2), [train[n] for n in names], [status, watched])
    stop.click(guarded(lambda r: (halt(r),), 1), [watched], [status])
    resume.click(guarded(again, 1), [watched], [status])
    gr.Timer(REFRESH_S).tick(guarded(refresh, 4), [watched], [summary, curve, samples, log])
    return watched


def _draw_tab(ws: Workspace, queue: JobQueue) -> tuple[gr.Dropdown, gr.Dropdown]:
    with gr.Row():
        run_a = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="draw-run")
        run_b = gr.Dropdown(label="Compare with (optional)", choices=[], allow_custom_value=True,
                            elem_id="draw-run-b")
    prompt = gr.Textbox(label="Prompt", elem_id="draw-prompt")
    with gr.Row():
        unet = gr.Slider(0, 2, value=1.0, step=0.05, label="UNet LoRA scale")
        text = gr.Slider(0, 2, value=1.0, step=0.05, label="Text-encoder LoRA scale")
        base_row = gr.Checkbox(value=True, label="Also draw at UNet scale 0 (the base model)",
                               elem_id="draw-base")
    with gr.Row():
        guidance = gr.Slider(0, 15, value=0, step=0.5, label="Guidance (0: the model family's "
                             "own: SD 7.5, FLUX.2 [klein] 4, FLUX.1 [dev] 3.5)")
        seed = gr.Number(value=0, precision=0, label="First seed")
        count = gr.Number(value=4, precision=0, label="Seeds (images per setting)",
                          elem_id="draw-count")
        steps = gr.Number(value=20, precision=0, label="Sampler steps", elem_id="draw-steps")
    go = gr.Button("Draw", variant="primary", elem_id="draw-go")
    status = gr.HTML(elem_id="draw-status")
    folders = gr.State([])
    with gr.Row():
        grid_a = gr.Image(label="Run", type="filepath", interactive=False, elem_id="draw-grid-a")
        grid_b = gr.Image(label="Compared run", type="filepath", interactive=False,
                          elem_id="draw-grid-b")
    with gr.Row():
        layout = gr.Radio(["diffusers", "kohya"], value="diffusers", label="LoRA file layout")
        fetch = gr.Button("Get the LoRA file", elem_id="draw-download")
        lora = gr.File(label="LoRA", interactive=False, elem_id="draw-lora")

    def draw(a, b, text_prompt, u, t, base, g, s, n, k):
        scales = ("0," if base and u != 0 else "") + f"{u:g}"
        jobs = h.start_drawing(ws, queue, [a, b], text_prompt or "", scales, f"{t:g}", g,
                               int(s or 0), int(n or 1), int(k or 20))
        return h.message(f"queued {len(jobs)} drawing(s)"), [ws.relative(j.path) for j in jobs]

    def refresh(current):
        if not current:
            return gr.update(), gr.update(), gr.update()
        shown = h.drawn_grids(ws, current)
        images = [ws.publish(g) if g else None for g, _ in shown] + [None]
        line = " · ".join(s for _, s in shown)
        return f'<p class="lb-draw" data-grids="{sum(g is not None for g, _ in shown)}">' \
               f"{h.esc(line)}</p>", images[0], images[1]

    go.click(guarded(draw, 2), [run_a, run_b, prompt, unet, text, base_row, guidance, seed,
                                count, steps], [status, folders])
    gr.Timer(REFRESH_S).tick(guarded(refresh, 3), [folders], [status, grid_a, grid_b])
    fetch.click(guarded(lambda r, fmt: (h.message("ready"), ws.publish(h.lora_file(ws, r or "", fmt))),
                        2), [run_a, layout], [status, lora])
    return run_a, run_b


def _measure_tab(ws: Workspace, queue: JobQueue) -> gr.Dropdown:
    kind = gr.Radio(["evaluate", "snapshots", "sweep", "tune"], value="evaluate",
                    label="Measure (snapshots: every step the run saved, the step to keep)")
    with gr.Row():
        run = gr.Dropdown(label="Run (evaluate; tune takes its model)", choices=[],
                          allow_custom_value=True)
        photos = gr.Textbox(label="Subject's photos (a folder in the workspace)")
        noun = gr.Textbox(label="Class noun (tune)")
        sweep = gr.Textbox(label="Sweep file (.toml in the workspace)")
        budget = gr.Number(value=4, precision=0, label="Trials (tune)")
    go = gr.Button("Start", variant="primary")
    status = gr.HTML()
    folder = gr.State("")
    report = gr.Markdown(sanitize_html=True, label="Report")

    def begin(k, r, p, c, s, b):
        job = h.start_measure(ws, queue, k, r or "", p or "", c or "", s or "", int(b or 1))
        return h.message(f"queued {k}"), ws.relative(job.path)

    def refresh(current):
        if not current:
            return gr.update(), gr.update()
        line, text = h.measure_report(ws, current)
        if text.lstrip().startswith("<"):  # the sweep's HTML report: shown as source
            text = f"```html\n{text}\n```"
        return h.message(line), text

    go.click(guarded(begin, 2), [kind, run, photos, noun, sweep, budget], [status, folder])
    gr.Timer(REFRESH_S * 3).tick(guarded(refresh, 2), [folder], [status, report])
    return run


def _runs_tab(ws: Workspace) -> tuple[gr.HTML, gr.Dropdown]:
    refresh = gr.Button("Refresh", elem_id="runs-refresh")
    overview = gr.HTML(elem_id="runs-table")
    chosen = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="runs-run")
    with gr.Row():
        settings = gr.HTML(elem_id="runs-settings")
        curve = gr.HTML(elem_id="runs-curve")
    steps = gr.HTML(elem_id="runs-steps")
    card = gr.Markdown(sanitize_html=True, elem_id="runs-card")

    def show(run):
        if not run:
            return "", "", "", ""
        settings_html, card_text = h.run_details(ws, run)
        return settings_html, h.progress(ws, run).curve_svg, h.step_curves(ws, run), card_text

    refresh.click(lambda: h.runs_overview(ws)[0], None, [overview])
    chosen.change(guarded(show, 4), [chosen], [settings, curve, steps, card])
    return overview, chosen


def build(ws: Workspace, queue: JobQueue, model: str = "tiny") -> gr.Blocks:
    train: dict[str, gr.components.Component] = {}
    with gr.Blocks(title="lorabooth") as page:
        gr.Markdown(f"# lorabooth\nWorkspace: `{h.esc(ws.root)}` (the page reads and writes "
                    f"nothing outside it)")
        with gr.Tabs():
            with gr.Tab("1. Photos", id="photos"):
                photos_slot = gr.Column()
            with gr.Tab("2. Identifier", id="identifier"):
                ident_slot = gr.Column()
            with gr.Tab("3. Train", id="train"):
                watched = _train_tab(ws, queue, model, train)
            with gr.Tab("4. Draw", id="draw"):
                run_a, run_b = _draw_tab(ws, queue)
            with gr.Tab("5. Measure", id="measure"):
                measure_run = _measure_tab(ws, queue)
            with gr.Tab("6. Runs", id="runs"):
                overview, chosen = _runs_tab(ws)
        # the first two tabs fill the train form, so they are built after it
        with photos_slot:
            _photos_tab(ws, train)
        with ident_slot:
            _identifier_tab(model, train)

        def on_load():
            table, names = h.runs_overview(ws)
            live = next((ws.relative(j.path) for j in queue.jobs()
                         if j.kind == "train" and j.status in ("running", "queued")), None)
            pick = gr.update(choices=names)
            return (table, gr.update(choices=names, value=live or (names[0] if names else None)),
                    pick, pick, pick, pick)

        page.load(on_load, None, [overview, watched, run_a, run_b, measure_run, chosen])

        def follow(run):  # a training just queued: the other tabs list it, Draw picks it
            table, names = h.runs_overview(ws)
            pick = gr.update(choices=names)
            return table, gr.update(choices=names, value=run or None), pick, pick, pick

        watched.change(follow, [watched], [overview, run_a, run_b, measure_run, chosen])
    return page
