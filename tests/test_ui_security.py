"""`lorabooth ui` serves no file it did not write: a real server (in this
process, on a free port) is asked for /etc/passwd and for secrets beside
and inside its workspace through every route Gradio has that returns a
file, with `..` and encoded variants; the workspace may not be a system
folder, the root or home; a malformed ui-job.json does not stop the page."""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.core.fileio import system_folder
from lorabooth.ui.jobs import STATE, Job, JobQueue, load_job
from lorabooth.ui.workspace import Workspace

WAIT = 300  # hang guard for the server's start; no test asserts on time
PASSWD = Path("/etc/passwd").read_bytes().split(b"\n")[0]
LORA = b"LORA-BYTES-written-by-the-page"
DEEP = 100_000  # far past Python's recursion limit
BAD_STATES = {  # folder -> a ui-job.json no version of the page wrote
    "deep-list": "[" * DEEP + "]" * DEEP,
    "deep-object": '{"id": ' * DEEP + "1" + "}" * DEEP,
    "a-list": '["train"]',
    "wrong-types": json.dumps({"id": 1, "kind": "train", "argv": "rm -rf", "folder": "x"}),
    "time-as-text": json.dumps({"id": "a", "kind": "train", "argv": [], "folder": "x",
                                "created": "yesterday"}),
    "huge-pid": json.dumps({"id": "a", "kind": "train", "argv": [], "folder": "x",
                            "status": "running", "pid": 10 ** 30}),
    "bool-pid": json.dumps({"id": "a", "kind": "train", "argv": [], "folder": "x",
                            "status": "running", "pid": True}),
    "odd-status": json.dumps({"id": "a", "kind": "train", "argv": [], "folder": "x",
                              "status": {"x": 1}}),
    "not-utf8": b"\xff\xfe{",
    "too-big": json.dumps({"id": "a", "kind": "train", "argv": ["x" * (2 << 20)],
                           "folder": "x"}),
}


def write_bad_states(root: Path) -> None:
    for name, text in BAD_STATES.items():
        (root / "bad" / name).mkdir(parents=True)
        path = root / "bad" / name / STATE
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    # a real job beside them, so that sorting meets their values
    Job(id="good", kind="train", argv=["train"], folder=str(root / "good"), status="done").save()


# --- the workspace may not be the machine's own folders -------------------
@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.mark.parametrize("path, reason", [
    ("/", "is the filesystem root"), ("/../..", "is the filesystem root"),
    ("/etc", "is the system folder /etc"), ("/etc/lorabooth", "is inside the system folder /etc"),
    ("/usr/share/x", "inside the system folder /usr"), ("/bin", "the system folder /bin"),
    ("/sbin/x", "/sbin"), ("/lib/x", "/lib"), ("/boot", "/boot"), ("/dev/shm", "/dev"),
    ("/proc/self", "/proc"), ("/sys", "/sys"), ("/var", "is the system folder /var"),
    ("/var/tmp", "/var/tmp"), ("/opt", "/opt"), ("/srv", "/srv"), ("/run", "/run"),
    ("/tmp", "is the system folder /tmp"), ("/tmp/", "/tmp"), ("/home", "/home"),
    ("~", "is your home folder"),
])
def test_system_folders_the_root_and_home_are_refused(home, path, reason):
    assert reason in (system_folder(path) or "")


def test_folders_of_their_own_are_fine(home, tmp_path):
    for path in ("/tmp/lorabooth", "/var/tmp/x", "/opt/lorabooth", "/srv/lb", "/home/ann/runs",
                 "~/runs", str(home / "a" / "b"), str(tmp_path / "ws")):
        assert system_folder(path) is None, path


def test_symlinks_are_judged_where_they_lead(home, tmp_path, monkeypatch):
    for name, target in (("to-root", "/"), ("to-etc", "/etc"), ("to-home", str(home))):
        (tmp_path / name).symlink_to(target)
    assert system_folder(tmp_path / "to-root") == "is the filesystem root"
    assert "system folder /etc" in system_folder(tmp_path / "to-etc")
    assert "is your home folder" in system_folder(tmp_path / "to-home")
    assert "holds your home folder" in system_folder(tmp_path)  # home lies inside it
    monkeypatch.chdir("/")
    assert system_folder(".") == "is the filesystem root"


@pytest.fixture
def never_serve(monkeypatch) -> None:
    """A refusal that failed would serve forever: fail instead."""
    import uvicorn

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", serve)


@pytest.mark.parametrize("given, reason", [("/", "is the filesystem root"),
                                           ("~", "is your home folder"),
                                           ("/etc", "is the system folder /etc"),
                                           ("/tmp", "is the system folder /tmp")])
def test_the_cli_refuses_such_a_workspace_and_creates_nothing(capsys, home, never_serve, given,
                                                              reason):
    before = set(os.listdir("/")), set(os.listdir(home))
    assert main(["ui", "--workspace", given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--workspace {given}: {reason}" in err, err
    assert (set(os.listdir("/")), set(os.listdir(home))) == before
    assert not Path("/.ui-uploads").exists() and not Path("/tmp/.ui-uploads").exists()


def test_a_symlink_to_the_root_is_refused_too(capsys, tmp_path, never_serve):
    (tmp_path / "ws").symlink_to("/")
    assert main(["ui", "--workspace", str(tmp_path / "ws")]) == 2
    assert "is the filesystem root" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ws"]


def test_an_upload_folder_that_is_a_symlink_is_refused(capsys, tmp_path, never_serve):
    """A workspace unpacked from elsewhere could bring `.ui-uploads -> /`:
    Gradio would then serve every file on the machine."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / ".ui-uploads").symlink_to("/")
    assert main(["ui", "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".ui-uploads is not a folder of its own" in err


def test_no_path_the_page_is_given_leads_into_the_upload_folder(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    for bad in (".ui-uploads", ".ui-uploads/runs/a", str(ws.uploads / "x"), "./.ui-uploads/"):
        with pytest.raises(UserError, match="the page's own upload folder"):
            ws.path(bad)


# --- malformed job files ------------------------------------------------
def test_a_malformed_job_file_is_skipped_with_one_warning(tmp_path, caplog):
    ws = Workspace.open(tmp_path / "ws")
    write_bad_states(ws.root)
    for name in BAD_STATES:
        assert load_job(ws.root / "bad" / name) is None, name
    queue = JobQueue(ws, launcher=["false"])
    with caplog.at_level(logging.WARNING, logger="lorabooth.ui.jobs"):
        assert queue.recover() == []
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(BAD_STATES) and all("that job is skipped" in w for w in warned)
    assert all("\n" not in w and len(w) < 600 for w in warned)
    assert [j.id for j in queue.jobs()] == ["good"]
    assert ws.root / "good" in ws.runs()  # reading them for the runs table does not fail


# --- the server serves only what it wrote ---------------------------------
def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        """The path goes on the wire as given: no client-side `..` folding."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def upload(self, name: str, text: str) -> str:
        """POST one file as the page's upload widget does; its server path."""
        boundary = "lorabooth-boundary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n"
                f"{text}\r\n--{boundary}--\r\n").encode()
        status, body = self.request("POST", "/gradio_api/upload", form,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200, body
        [path] = json.loads(body)
        return path

    def call(self, endpoint: str, data: list) -> list:
        """One event through Gradio's HTTP API, as the page sends it."""
        status, body = self.request("POST", f"/gradio_api/call/{endpoint}",
                                    json.dumps({"data": data}).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200, body
        event = json.loads(body)["event_id"]
        status, body = self.request("GET", f"/gradio_api/call/{endpoint}/{event}")
        text = body.decode()
        assert "event: complete" in text, text[-2000:]
        return json.loads(text.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])

    def endpoint(self, inputs: list[str], output: str) -> str:
        """The API name of the event with these inputs and this output."""
        info = json.loads(self.request("GET", "/gradio_api/info")[1])
        for name, ep in info["named_endpoints"].items():
            if [p.get("label") for p in ep["parameters"]] == inputs \
                    and output in [r.get("label") for r in ep["returns"]]:
                return name.lstrip("/")
        raise AssertionError(f"no endpoint from {inputs} to {output}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server whose workspace holds (but did not write) a secret and a
    LoRA, beside a folder it must not reach, with malformed job files."""
    from lorabooth.ui.server import serve

    root = tmp_path_factory.mktemp("workspace")
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret outside the workspace")
    (root / "secret.txt").write_text("secret inside the workspace")
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "a" / "pytorch_lora_weights.safetensors").write_bytes(LORA)
    (root / "runs" / "a" / "config.toml").write_text("steps = 4\n")
    png(root / "runs" / "a" / "samples" / "step-000001.png")
    write_bad_states(root)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("lorabooth.ui.jobs").addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "GRADIO_ANALYTICS_ENABLED"):
            mp.setenv(name, "")  # serve sets them; they are restored after
        server = serve(str(root), port=0, model="toy", block=False)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        end = time.monotonic() + WAIT
        while not server.started and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert server.started, "the server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield {"client": Client(port), "root": root, "ws": Workspace.open(root),
                   "secrets": {Path("/etc/passwd"): PASSWD, outside: outside.read_bytes(),
                               root / "secret.txt": (root / "secret.txt").read_bytes()},
                   "warnings": records}
        finally:
            server.should_exit = True
            thread.join(WAIT)
            logging.getLogger("lorabooth.ui.jobs").removeHandler(handler)


FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
# every other route that takes a path or returns a file (the run-history and
# monitoring routes are off, upload_progress only streams an upload's size)
PREFIXES = (*FILE_ROUTES, "/gradio_api/proxy=", "/gradio_api/stream/", "/static/", "/assets/",
            "/svelte/", "/gradio_api/custom_component/x/client/js/",
            "/gradio_api/deep_link?session_hash=", "/favicon.ico?", "/gradio_api/runs/", "/")


def spellings(target: Path, allowed: Path) -> list[str]:
    """``target`` as a route's tail: as is, encoded, and climbing out of the
    folder that is served (and out of the package's own folders) with `..`
    written plainly, percent-encoded and double-encoded."""
    tail = str(target).lstrip("/")
    up = len(allowed.parts) + 1
    out = [str(target), "/" + str(target), "file://" + str(target)]
    for dots in ("../", "%2e%2e/", "..%2f", "%2e%2e%2f", "%252e%252e%252f", "..\\"):
        out += [f"{allowed}/{dots * up}{tail}", f"{dots * 20}{tail}",
                f"{allowed}/page/{dots * 40}{tail}"]
    out += [urllib.parse.quote(str(target), safe=""),
            urllib.parse.quote(urllib.parse.quote(str(target), safe=""), safe=""),
            f"{allowed}/%00/../../{tail}", f"{allowed}/x/..//{'../' * up}{tail}"]
    return out


def test_no_route_returns_a_file_the_page_did_not_write(served):
    client, ws = served["client"], served["ws"]
    leaks = []
    for target, content in served["secrets"].items():
        for prefix in PREFIXES:
            for tail in spellings(target, ws.uploads):
                for method in ("GET", "HEAD"):
                    status, body = client.request(method, prefix + tail)
                    if content in body or (status == 200 and prefix in FILE_ROUTES):
                        leaks.append((method, prefix + tail, status))
    assert not leaks, leaks[:20]


def test_a_symlink_in_the_served_folder_does_not_lead_out(served):
    client, ws = served["client"], served["ws"]
    for target, content in served["secrets"].items():
        link = ws.uploads / "page" / f"link-{abs(hash(target))}.txt"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        for prefix in ("/gradio_api/file=", "/gradio_api/file/"):
            status, body = client.request("GET", prefix + str(link))
            assert status != 200 and content not in body, (link, target, status)


def test_what_the_page_shows_is_served_and_nothing_beside_it(served):
    """The routes do serve: the LoRA the page offers and the validation
    image it shows come back, from copies in the upload folder, while the
    originals beside the secret stay unreachable."""
    client, root = served["client"], served["root"]
    _, lora = client.call(client.endpoint(["Run", "LoRA file layout"], "LoRA"), ["runs/a", "diffusers"])
    assert Path(lora["path"]).is_relative_to(root / ".ui-uploads")
    status, body = client.request("GET", urllib.parse.urlparse(lora["url"]).path)
    assert (status, body) == (200, LORA)
    gallery = client.call(client.endpoint(["Run shown below"], "Validation images"), ["runs/a"])[2]
    url = urllib.parse.urlparse(gallery[0]["image"]["url"]).path
    status, body = client.request("GET", url)
    assert status == 200 and body == (root / "runs/a/samples/step-000001.png").read_bytes()
    for original in ("runs/a/pytorch_lora_weights.safetensors", "runs/a/samples/step-000001.png"):
        assert client.request("GET", f"/gradio_api/file={root / original}")[0] == 403


def test_an_upload_lands_in_the_upload_folder_whatever_its_name(served):
    client, root = served["client"], served["root"]
    path = client.upload("../../../secret.txt", "uploaded")
    assert Path(path).resolve().is_relative_to(root / ".ui-uploads")
    assert (root / "secret.txt").read_text() == "secret inside the workspace"
    assert client.request("GET", f"/gradio_api/file={path}") == (200, b"uploaded")


def test_an_uploaded_job_file_is_not_a_job(served):
    """A browser may upload anything: a "queued job" among the uploads would
    run at the next start if the queue looked there."""
    client, ws = served["client"], served["ws"]
    job = json.dumps({"id": "evil", "kind": "train", "argv": ["train"], "folder": "x",
                      "status": "queued"})
    path = client.upload(STATE, job)
    assert Path(path).name == STATE and Path(path).read_text() == job
    assert "evil" not in [j.id for j in JobQueue(ws, launcher=["false"]).jobs()]
    assert Path(path).parent not in ws.runs()


def test_malformed_job_files_do_not_stop_the_page(served):
    client = served["client"]
    assert client.request("GET", "/")[0] == 200
    table, *_ = client.call("on_load", [])
    assert "runs/a" in table
    skipped = [r for r in served["warnings"] if "that job is skipped" in r.getMessage()]
    assert len(skipped) == len(BAD_STATES)
