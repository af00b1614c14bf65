"""`lorabooth ui` in a real headless Chromium (Debian's, driven by
Playwright): the whole flow a user takes on the toy model, the refusals,
and no request leaving the machine. With LORABOOTH_SCREENSHOTS=docs/ui set,
each step's screenshot is written there (the README shows them)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lorabooth.demo import demo_photos

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
playwright = pytest.importorskip("playwright.sync_api")

# hang guards only: no test asserts on time
START_S = 900
TRAIN_S = 1200
DRAW_S = 600


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), so no
    client's outgoing connection takes it before the server binds it."""
    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                    if p])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _launch(workspace: Path, *extra: str) -> tuple[subprocess.Popen, Path, str]:
    """`lorabooth ui` on a free port: (process, its log, its URL)."""
    port = _free_port()
    log = workspace.parent / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorabooth", "ui", "--workspace",
                                 str(workspace), "--port", str(port), "--model", "toy", *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=_env())
    return proc, log, f"http://127.0.0.1:{port}"


def _wait_serving(proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + START_S
    while "serving on" not in log.read_text() and time.monotonic() < end:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
        time.sleep(0.5)
    assert "serving on" in log.read_text(), "the server did not start"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class Shots:
    """Screenshots of each step, written only when LORABOOTH_SCREENSHOTS names a folder."""

    def __init__(self, page) -> None:
        self.page = page
        folder = os.environ.get("LORABOOTH_SCREENSHOTS")
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        if self.folder:
            self.page.screenshot(path=str(self.folder / f"{name}.png"), full_page=True)


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")  # gradio takes a textbox's value on change/blur


def _wait_started(page) -> None:
    """Until the training runs (or has already ended); a job that failed
    ends the test at once with its log, rather than at the hang guard."""
    page.locator("#train-progress [data-status]").and_(page.locator(
        ":is([data-status='running'], [data-status='done'], [data-status='failed'],"
        " [data-status='interrupted'])")).wait_for(timeout=TRAIN_S * 1000)
    status = page.locator("#train-progress [data-status]").get_attribute("data-status")
    assert status in ("running", "done"), (
        f"the training {status}: {_value(page, 'train-log')}")


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


@pytest.fixture
def servers(tmp_path):
    """The page on 127.0.0.1, and one on 0.0.0.0 with --auth (started
    together: each takes a while to import gradio)."""
    local, shared = tmp_path / "ws", tmp_path / "ws-shared"
    procs = [_launch(local), _launch(shared, "--host", "0.0.0.0", "--auth", "ann:secret-pw")]
    try:
        for proc, log, _ in procs:
            _wait_serving(proc, log)
        yield local, [url for _, _, url in procs]
    finally:
        for proc, _, _ in procs:
            _stop(proc)


@pytest.mark.slow
def test_the_whole_flow_in_a_real_browser(servers, tmp_path):
    workspace, (url, shared_url) = servers
    sync = playwright.sync_playwright
    with sync() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside = []  # every request the page makes beyond this machine
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        shot = Shots(page)
        try:
            page.goto(url, timeout=START_S * 1000)
            page.wait_for_selector("#photos-prepare", timeout=START_S * 1000)

            # a folder outside the workspace is refused, escaped, in the page
            _fill(page, "photos-folder", "../<b>elsewhere</b>")
            page.click("#photos-prepare")
            refusal = page.locator("#photos-status .lb-error")
            refusal.wait_for(timeout=60000)
            assert "'..' is not allowed" in refusal.inner_text()
            assert "<b>elsewhere</b>" in refusal.inner_text()  # shown as text, not markup
            shot("01-refused-path")

            # upload the toy subject's 4 views, plus one named to climb out
            _fill(page, "photos-folder", "")
            views = sorted(demo_photos().glob("*.png"))
            climber = {"name": "../../escape.png", "mimeType": "image/png",
                       "buffer": views[0].read_bytes()}
            page.set_input_files("#photos-files input[type=file]",
                                 [{"name": v.name, "mimeType": "image/png", "buffer": v.read_bytes()}
                                  for v in views] + [climber])
            _fill(page, "photos-noun", "ball")
            _fill(page, "photos-resolution", "32")  # the toy model's size
            page.click("#photos-prepare")
            page.locator("#photos-status .lb-ok").wait_for(timeout=120000)
            assert "kept 4 photos in datasets/subject" in page.inner_text("#photos-status")
            page.locator("#photos-sheet img").wait_for(timeout=60000)
            # the climbing name was cleaned: the file landed in the dataset's photos
            assert (workspace / "photos" / "subject" / "escape.png").is_file()
            assert [p for p in tmp_path.rglob("escape.png") if workspace not in p.parents] == []
            shot("02-photos")

            # identifier: rare tokens, prompts filled into the train form
            page.get_by_role("tab", name="2. Identifier").click()
            _fill(page, "ident-noun", "ball")
            page.click("#ident-suggest")
            page.locator("#ident-table table").wait_for(timeout=120000)
            shot("03-identifier")

            # train 12 steps on the toy model and watch them to the end
            page.get_by_role("tab", name="3. Train").click()
            assert _value(page, "train-instance_dir") == "datasets/subject"
            prompt = _value(page, "train-instance_prompt")
            assert prompt.startswith("a photo of ") and prompt.endswith(" ball")
            _fill(page, "train-steps", "12")
            _fill(page, "train-output", "runs/ball")
            _fill(page, "train-validation_prompt", prompt)
            _fill(page, "train-checkpoint_every", "4")
            page.click("#train-start")
            _wait_started(page)
            page.wait_for_function(
                "() => Number(document.querySelector('#train-progress [data-step]')"
                "?.dataset.step) >= 3", timeout=TRAIN_S * 1000)
            shot("04-training")
            page.locator('#train-progress [data-status="done"]').wait_for(timeout=TRAIN_S * 1000)
            done = page.locator("#train-progress [data-step]")
            assert done.get_attribute("data-step") == "12" == done.get_attribute("data-steps")
            assert len(list((workspace / "runs" / "ball" / "checkpoints").iterdir())) == 2
            assert page.locator("#train-curve svg path.smooth").count() == 1
            page.locator("#train-samples img").first.wait_for(timeout=60000)
            shot("05-trained")

            # draw at UNet scales 0 and 1: one labelled grid in the page
            page.get_by_role("tab", name="4. Draw").click()
            _fill(page, "draw-prompt", prompt + " on the snow")
            _fill(page, "draw-count", "2")
            _fill(page, "draw-steps", "10")
            page.click("#draw-go")
            page.wait_for_function(  # drawn, or failed: then the test ends at once
                "() => { const p = document.querySelector('.lb-draw');"
                " return p && (p.dataset.grids === '1' || /failed|interrupted/.test(p.textContent)); }",
                timeout=DRAW_S * 1000)
            assert page.locator('.lb-draw[data-grids="1"]').count() == 1, \
                page.inner_text(".lb-draw")
            page.locator("#draw-grid-a img").wait_for(timeout=60000)
            grids = list((workspace / "runs" / "ball" / "generated").glob("ui-*/*/grid.png"))
            assert len(grids) == 1
            assert len(list(grids[0].parent.glob("u0_*.png"))) == len(
                list(grids[0].parent.glob("u1_*.png"))) == 2
            shot("06-drawn")

            # the runs list shows it after a reload (state lives in the run folder)
            page.reload()
            page.get_by_role("tab", name="6. Runs").click()
            page.click("#runs-refresh")
            page.locator("#runs-table td", has_text="runs/ball").wait_for(timeout=60000)
            shot("07-runs")

            # a file outside the workspace is not served
            assert _status(f"{url}/gradio_api/file=/etc/passwd") in (403, 404)

            # the shared server: nothing without the password
            assert _status(f"{shared_url}/config") == 401
            assert _status(f"{shared_url}/gradio_api/info") == 401
            page.goto(shared_url)
            page.locator("input[type=password]").wait_for(timeout=60000)
            assert page.locator("#photos-prepare").count() == 0
            shot("08-login")
        except Exception:
            shot("failure")  # what the page showed when it went wrong
            raise
        browser.close()
    assert outside == []


def test_a_shared_host_without_auth_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorabooth", "ui", "--workspace",
                             str(tmp_path / "ws"), "--host", "0.0.0.0"], capture_output=True,
                            text=True, env=_env(), timeout=START_S)
    assert result.returncode == 2
    assert "--host 0.0.0.0: serving beyond this machine needs --auth" in result.stderr
    assert not (tmp_path / "ws").exists()
