"""`lorabooth ui` without a browser: the workspace's confinement, the auth
rule, escaping, the train form, and the job queue's state surviving a
restart (jobs run a stand-in command here; the browser test runs real ones)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from lorabooth.commands.cli import main
from lorabooth.config import TrainConfig, build_config
from lorabooth.core.errors import UserError
from lorabooth.photos.imagefiles import Rejected
from lorabooth.ui import handlers as h
from lorabooth.ui.jobs import ACTIVE, STATE, Job, JobQueue, load_job
from lorabooth.ui.server import parse_auth
from lorabooth.ui.trainform import HIDDEN, config_from_form, form_fields
from lorabooth.ui.workspace import Workspace, read_metrics
from test_hostile_files import smooth_photos

WAIT = 120  # hang guard for the queue; no test asserts on time
# The stand-in for `python -m lorabooth`: its argv says what to do. Its own
# command line holds "lorabooth", as a real job's does.
FAKE = """
import sys, time
args = sys.argv[2:]
print("fake", *args, flush=True)
if args[0] == "sleep":
    time.sleep(float(args[1]))
elif args[0] == "fail":
    sys.exit(3)
elif args[0] == "write":
    open(args[1], "w").write("done")
"""


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


def fake_queue(ws: Workspace) -> JobQueue:
    return JobQueue(ws, launcher=[sys.executable, "-c", FAKE, "lorabooth"])


def until(check, what: str) -> None:
    """Poll ``check()`` until it holds (WAIT only guards against a hang)."""
    end = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < end, f"still waiting for {what}"
        time.sleep(0.05)


def wait_idle(queue: JobQueue) -> None:
    """Until every job in the queue's workspace has ended, as its state file says."""
    until(lambda: all(j.status not in ACTIVE for j in queue.jobs()), "the queue to go idle")


# --- the workspace -------------------------------------------------------
def test_paths_inside_the_workspace_resolve(ws):
    assert ws.path("runs/a") == ws.root / "runs" / "a"
    assert ws.path(str(ws.root / "runs" / "b")) == ws.root / "runs" / "b"
    assert ws.path(".") == ws.root


@pytest.mark.parametrize("bad", ["../x", "runs/../../x", "runs/../a", "/etc", "/", "~"])
def test_paths_outside_or_climbing_are_refused(ws, bad):
    with pytest.raises(UserError, match="outside the workspace|'..' is not allowed"):
        ws.path(bad)


def test_a_symlink_out_of_the_workspace_is_refused(ws, tmp_path):
    (tmp_path / "secret").mkdir()
    (ws.root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UserError, match="symlink out of it"):
        ws.path("link/file.png")
    (ws.root / "inner").mkdir()
    (ws.root / "ok").symlink_to(ws.root / "inner")  # a link that stays inside is fine
    assert ws.path("ok") == ws.root / "inner"


def test_an_empty_or_nul_path_is_refused(ws):
    for bad in ("", "  ", "a\x00b"):
        with pytest.raises(UserError):
            ws.path(bad)


def test_uploads_are_decoded_size_limited_and_named_inside(tmp_path, photos):
    ws = Workspace.open(tmp_path / "ws", max_upload=100_000)
    photo = next(photos.iterdir())
    saved = ws.save_upload(photo, "../../../evil name.png", ws.root / "photos")
    assert saved == ws.root / "photos" / "evil_name.png" and saved.read_bytes() == photo.read_bytes()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Rejected, match="not an image"):
        ws.save_upload(text, "notes.png", ws.root / "photos")
    big = tmp_path / "big.png"
    big.write_bytes(photo.read_bytes() + b"\0" * 100_000)
    with pytest.raises(Rejected, match="upload limit"):
        ws.save_upload(big, "big.png", ws.root / "photos")
    with pytest.raises(UserError, match="outside the workspace"):
        ws.save_upload(photo, "a.png", tmp_path / "elsewhere")
    assert sorted(p.name for p in (ws.root / "photos").iterdir()) == ["evil_name.png"]


def test_prepare_refused_while_another_writes_the_dataset(ws, tmp_path):
    """The refusal reaches the page: the live writer's record in prepare.json
    is no report of files judged."""
    src = smooth_photos(ws.root / "shots", 2)
    out = ws.root / "datasets" / "subject"
    out.mkdir(parents=True)
    (out / "prepare.json").write_text('{"running": true, "outputs": [], "files": []}')
    (out / ".lock").write_text(f"{os.getppid()}\n")  # our parent: alive, not us
    with pytest.raises(UserError, match="another lorabooth process"):
        h.prepare_photos(ws, [], "shots", "subject", "center", 32, "dog")
    (out / ".lock").unlink()
    done = h.prepare_photos(ws, [], str(src.relative_to(ws.root)), "subject", "center", 32, "dog")
    assert done.kept == 2 and done.sheet is not None


def test_metrics_skip_the_line_being_written(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\nnot json\n'
                                            '{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# --- who may connect -----------------------------------------------------
def test_a_shared_host_needs_auth():
    assert parse_auth("", "127.0.0.1") is None
    assert parse_auth("ann:pw:with:colons", "0.0.0.0") == ("ann", "pw:with:colons")
    with pytest.raises(UserError, match="--host 0.0.0.0: serving beyond this machine needs --auth"):
        parse_auth("", "0.0.0.0")
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(UserError, match="--auth: expected user:password"):
            parse_auth(bad, "0.0.0.0")


def test_the_cli_refuses_a_shared_host_without_auth(capsys, tmp_path):
    assert main(["ui", "--host", "0.0.0.0", "--workspace", str(tmp_path / "ws")]) == 2
    assert "needs --auth user:password" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


# --- escaping ------------------------------------------------------------
def test_every_string_put_in_html_is_escaped(ws):
    evil = '<script>alert(1)</script>"'
    assert "<script>" not in h.table([evil], [[evil]]) + h.message(evil, error=True)
    run = ws.root / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'steps = 4\ninstance_prompt = {json.dumps(evil)}\n'
                                     f'model = {json.dumps(evil)}\n')
    table, names = h.runs_overview(ws)
    assert names == ["runs/x"]
    assert "<script>" not in table and "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in table
    settings, _ = h.run_details(ws, "runs/x")
    assert "<script>" not in settings
    summary = h.Progress(evil, 1, 4, 0.5, None, None, "", [], "").summary_html()
    assert "<script>" not in summary


# --- the train form ------------------------------------------------------
def test_the_form_has_every_train_option_with_help_and_default():
    shown = {f.name: f for f in form_fields()}
    assert set(shown) == {f.name for f in fields(TrainConfig)} - set(HIDDEN)
    for f in fields(TrainConfig):
        if f.name in shown:
            assert shown[f.name].help == f.metadata["help"]
    assert shown["steps"].default == 300 and not shown["steps"].advanced
    assert shown["snr_gamma"].advanced and shown["adapter"].choices == ("lora", "dora", "lokr", "loha")
    assert form_fields({"model": "toy"})[0].default == "toy"


def test_form_values_become_a_config_with_paths_in_the_workspace(ws, tmp_path):
    values = {"model": "tiny", "instance_dir": "datasets/a", "instance_prompt": "a photo of sks dog",
              "steps": 30.0, "lr": 1e-3, "output": "runs/a", "train_text_encoder": True}
    config = config_from_form(ws, values)
    assert config.steps == 30 and isinstance(config.steps, int)
    assert config.instance_dir == str(ws.root / "datasets" / "a")
    assert config.output == str(ws.root / "runs" / "a") and config.train_text_encoder
    for key, bad in (("output", "../out"), ("instance_dir", str(tmp_path)),
                     ("class_dir", "/tmp"), ("model", "../models/x")):
        with pytest.raises(UserError):
            config_from_form(ws, {**values, key: bad})
    with pytest.raises(UserError, match="--steps: must be at least 1"):
        config_from_form(ws, {**values, "steps": 0})
    with pytest.raises(UserError, match="must be an integer"):
        config_from_form(ws, {**values, "steps": 2.5})


def test_start_training_queues_the_cli_on_the_written_config(ws):
    queue = JobQueue(ws, launcher=[sys.executable, "-c", FAKE, "lorabooth"])
    values = {"model": "tiny", "instance_dir": "photos", "instance_prompt": "a photo of sks dog",
              "steps": 7, "output": "runs/a"}
    job = h.start_training(ws, queue, values)
    run = ws.root / "runs" / "a"
    assert job.argv == ["train", "--config", str(run / h.TRAIN_SPEC)]
    assert build_config(TrainConfig, run / h.TRAIN_SPEC, {}) == config_from_form(ws, values)
    wait_idle(queue)
    assert load_job(run).status == "done"  # the stand-in exits 0
    with pytest.raises(UserError, match="resume it"):
        h.resume_training(ws, queue, "runs/b")
    again = h.resume_training(ws, queue, "runs/a")
    assert again.argv[-1] == "--resume"
    wait_idle(queue)


def test_the_queued_command_trains_in_the_folder_the_page_prepared(ws, capsys):
    """The page writes its config (and the job's state and log) into the run
    folder before the job starts; train must take that folder as its own."""
    smooth_photos(ws.root / "photos", 3)
    queue = fake_queue(ws)
    values = {"model": "tiny", "instance_dir": "photos", "instance_prompt": "a photo of sks dog",
              "steps": 2, "output": "runs/a", "resolution": 32}
    job = h.start_training(ws, queue, values)
    wait_idle(queue)
    run = ws.root / "runs" / "a"
    assert (run / "ui-job.json").is_file()
    assert main(job.argv) == 0, capsys.readouterr().err
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    # drawing: the page's job record is in RUN/generated/ui-TIME before generate starts
    [draw] = h.start_drawing(ws, queue, ["runs/a"], "a photo of sks dog", "0,1", "1", 7.5, 0, 1, 2)
    wait_idle(queue)
    assert main(draw.argv + ["--width", "32", "--height", "32"]) == 0, capsys.readouterr().err
    assert list(Path(draw.folder).glob(draw.expect))


def test_progress_reads_the_run_folder(ws):
    run = ws.root / "runs" / "a"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text("steps = 10\n")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 1.0 / i, "s_per_step": 0.5}) + "\n" for i in range(1, 5)))
    (run / "samples" / "step-000004.png").write_bytes(b"")
    Job(id="x", kind="train", argv=[], folder=str(run), status="running", pid=os.getpid()).save()
    p = h.progress(ws, "runs/a")
    assert (p.step, p.steps, p.loss, p.s_per_step, p.eta_s) == (4, 10, 0.25, 0.5, 3.0)
    assert p.curve_svg.count('class="smooth"') == 1 and len(p.samples) == 1
    assert 'data-step="4" data-steps="10" data-status="running"' in p.summary_html()


# --- the job queue -------------------------------------------------------
def test_jobs_run_one_at_a_time_in_order_and_record_their_end(ws):
    queue = fake_queue(ws)
    marker = ws.root / "b" / "made"
    first = queue.submit("train", ["sleep", "0.5"], ws.root / "a")
    second = queue.submit("generate", ["write", str(marker)], ws.root / "b", expect="made")
    failed = queue.submit("generate", ["fail"], ws.root / "c")
    wait_idle(queue)
    a, b, c = (load_job(ws.root / x) for x in "abc")
    assert (a.status, b.status, c.status) == ("done", "done", "failed") and c.returncode == 3
    assert a.ended <= b.started and b.ended <= c.started  # never two at once
    assert marker.read_text() == "done" and "fake write" in b.log_tail()
    assert {j.id for j in queue.jobs()} == {first.id, second.id, failed.id}


def test_stop_terminates_a_running_job_and_unqueues_a_waiting_one(ws):
    queue = fake_queue(ws)
    queue.submit("train", ["sleep", "600"], ws.root / "a")
    queue.submit("generate", ["sleep", "600"], ws.root / "b")
    until(lambda: load_job(ws.root / "a").status == "running", "job a to start")
    with pytest.raises(UserError, match="already running"):
        queue.submit("train", ["sleep", "1"], ws.root / "a")
    assert queue.stop(ws.root / "b").status == "stopped"  # still queued
    queue.stop(ws.root / "a")
    wait_idle(queue)
    assert load_job(ws.root / "a").status == "stopped"
    assert load_job(ws.root / "b").started is None


def test_a_restarted_server_finds_every_job(ws):
    """Queued jobs run again, a live one is watched to its end before the
    next starts, a dead one is marked interrupted (and can be resumed)."""
    # a "lorabooth" process that, once the test closes its stdin, writes its
    # output and ends: a queue that looked for the output before its end says
    # "interrupted", one that watched it to its end says "done"
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); "
                             "open(sys.argv[2], 'w').close()", "lorabooth", str(ws.root / "live" / "out")],
                            stdin=subprocess.PIPE)
    for name, status, pid in (("dead", "running", 2 ** 22 + 1), ("live", "running", live.pid),
                              ("waiting", "queued", None)):
        Job(id=name, kind="train", argv=["write", str(ws.root / name / "out")],
            folder=str(ws.root / name), status=status, pid=pid, expect="out").save()
    queue = fake_queue(ws)
    assert {j.id for j in queue.recover()} == {"live", "waiting"}
    assert load_job(ws.root / "dead").status == "interrupted"
    assert load_job(ws.root / "waiting").status == "queued"  # behind the live one
    released = time.time()
    live.stdin.close()
    live.wait()
    wait_idle(queue)
    assert load_job(ws.root / "live").status == "done"
    waiting = load_job(ws.root / "waiting")
    assert waiting.status == "done" and (ws.root / "waiting" / "out").is_file()
    assert waiting.started >= released  # one at a time across restarts


def test_a_broken_state_file_is_ignored(ws):
    (ws.root / "x").mkdir()
    (ws.root / "x" / STATE).write_text("{not json")
    assert fake_queue(ws).jobs() == []
    (ws.root / "x" / STATE).write_text(json.dumps({"id": "y"}))  # fields missing
    assert load_job(ws.root / "x") is None


def test_measure_jobs_are_the_cli_commands_on_workspace_paths(ws):
    queue = fake_queue(ws)
    run = ws.root / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text('model = "toy"\nsteps = 2\n')
    (ws.root / "photos").mkdir()
    job = h.start_measure(ws, queue, "tune", "runs/a", "photos", "ball", "", 3)
    assert job.argv == ["tune", str(ws.root / "photos"), "--class-noun", "ball", "--budget", "3",
                        "--model", "toy", "--out", str(ws.root / "tune" / "photos"),
                        "--judges", "toy"]
    job = h.start_measure(ws, queue, "evaluate", "runs/a", "photos", "", "", 1)
    assert job.argv[:4] == ["evaluate", str(run), "--real", str(ws.root / "photos")]
    assert "--snapshots" not in job.argv
    wait_idle(queue)  # one job per folder: both write RUN/eval
    job = h.start_measure(ws, queue, "snapshots", "runs/a", "photos", "", "", 1)
    assert job.argv[:4] == ["evaluate", str(run), "--real", str(ws.root / "photos")]
    assert "--snapshots" in job.argv and job.kind == "snapshots"
    (ws.root / "s.toml").write_text('[base]\noutput = "/tmp/elsewhere"\n')
    with pytest.raises(UserError, match="outside the workspace"):
        h.start_measure(ws, queue, "sweep", "", "", "", "s.toml", 1)
    with pytest.raises(UserError, match="outside the workspace"):
        h.start_measure(ws, queue, "evaluate", "runs/a", "/etc", "", "", 1)
    wait_idle(queue)


def test_the_lora_comes_in_either_layout(ws, trained_run):
    from safetensors.torch import load_file

    from lorabooth.formats.layouts import detect_layout

    run = ws.root / "runs" / "a"
    run.mkdir(parents=True)
    shutil.copy(trained_run / h.LORA_FILES["diffusers"], run)  # a run saved in one layout
    assert h.lora_file(ws, "runs/a", "diffusers") == run / h.LORA_FILES["diffusers"]
    kohya = h.lora_file(ws, "runs/a", "kohya")
    assert kohya.parent == run / "downloads" and detect_layout(load_file(kohya), "") == "kohya"
    with pytest.raises(UserError, match="no LoRA file yet"):
        (ws.root / "runs" / "b").mkdir()
        h.lora_file(ws, "runs/b", "kohya")


def test_a_runs_step_curves_show_once_its_snapshots_are_scored(ws):
    """The Runs tab's step view: nothing before `evaluate --snapshots`, then
    the kept step and one plot, built from numbers only (a doctored
    snapshots.json is a line, its strings never reach the page)."""
    run = ws.root / "runs" / "a"
    (run / "eval").mkdir(parents=True)
    assert h.step_curves(ws, "runs/a") == ""
    rows = [{"step": s, "dino": d, "clip_i": 0.5, "clip_t": 0.3, "pres": p, "div": 0.2}
            for s, d, p in ((50, 0.4, 0.5), (100, 0.6, 0.4))]
    (run / "eval" / "snapshots.json").write_text(json.dumps({"rows": rows,
                                                            "recommended_step": 100}))
    page = h.step_curves(ws, "runs/a")
    assert "runs/a: keep step 100</h3>" in page and page.count("<svg") == 1
    (run / "eval" / "snapshots.json").write_text(json.dumps(
        {"rows": [{"step": "<script>alert(1)</script>"}], "recommended_step": 1}))
    page = h.step_curves(ws, "runs/a")
    assert "could not be read" in page and "<script>" not in page
    with pytest.raises(UserError):
        h.step_curves(ws, "../outside")
