"""One background worker running the page's jobs one at a time, each as a
`python -m lorabooth ...` subprocess: a training, then the drawings queued
behind it. A job's state is a small JSON file in its own output folder
(the run folder for a training), beside what the command writes there, so
a restarted `lorabooth ui` finds every job again: one still running is
watched to its end, one whose process died is shown as interrupted (a
training can be resumed from its checkpoints), one still queued is queued
again.

A subprocess, not a thread: stopping is terminating its process group, the
training's own checkpoints and `--resume` do the rest, and a process in its
own session outlives the page and the server."""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..commands.guard import PAGE_RECORDS
from ..core.errors import UserError
from ..core.fileio import check_regular_file, parse_json, read_bytes_file, to_json, write_text
from .workspace import Workspace

log = logging.getLogger(__name__)

STATE, LOG = PAGE_RECORDS
ACTIVE = ("queued", "running")


@dataclass
class Job:
    id: str
    kind: str  # the lorabooth command: train, generate, evaluate, sweep, tune
    argv: list[str]  # its arguments after `lorabooth`
    folder: str  # absolute; holds ui-job.json and ui-job.log
    status: str = "queued"  # queued, running, done, failed, stopped, interrupted
    pid: int | None = None
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    expect: str = ""  # a glob under folder that exists once the job succeeded

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def save(self) -> None:
        write_text(self.path / STATE, to_json(asdict(self), indent=1) + "\n")

    def log_tail(self, lines: int = 15) -> str:
        try:
            check_regular_file(self.path / LOG)  # a FIFO in its place would block the page
            with (self.path / LOG).open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except (OSError, UserError):
            return ""
        # tqdm redraws its bar with \r: keep only the last state of each line
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n")[-lines:])


STATUSES = (*ACTIVE, "done", "failed", "stopped", "interrupted")
MAX_STATE_BYTES = 1 << 20  # ours are a few hundred bytes
_NUMBER = (int, float)
# each field's JSON types (a bool is refused where a number is asked for)
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "kind": (str,), "argv": (list,), "folder": (str,), "status": (str,),
    "pid": (int, type(None)), "returncode": (int, type(None)), "created": _NUMBER,
    "started": (*_NUMBER, type(None)), "ended": (*_NUMBER, type(None)), "expect": (str,)}


def load_job(folder: Path, warn: bool = False) -> Job | None:
    """The job whose state is in ``folder``, or None when there is none or it
    cannot be read (any JSON at all may sit in a workspace: too deep, wrong
    types); with ``warn`` such a file gets one warning line."""
    path = folder / STATE
    if not os.path.lexists(path):
        return None
    try:  # a regular file only (a FIFO would block), capped, nesting bounded
        job = Job(**_state_fields(parse_json(read_bytes_file(path, "", MAX_STATE_BYTES),
                                             str(path))))
    except (UserError, ValueError) as e:
        if warn:
            log.warning("%s: not a job state this version can read (%s); that job is skipped",
                        path, str(e)[:200] or type(e).__name__)
        return None
    job.folder = str(folder)  # the workspace may have moved since
    return job


def _state_fields(data: object) -> dict:
    """``data`` when it holds a Job's fields with their types; ValueError
    naming the first that does not."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    for name in ("id", "kind", "argv", "folder"):
        if name not in data:
            raise ValueError(f"no {name!r}")
    for name, value in data.items():
        types = _TYPES.get(name)
        if types is None:
            raise ValueError(f"unknown key {name[:40]!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{name!r} is a JSON {type(value).__name__}")
    if not all(isinstance(a, str) for a in data["argv"]):
        raise ValueError("'argv' holds a value that is not a string")
    if data.get("pid") is not None and not 0 < data["pid"] < 2 ** 31:  # os.kill's range
        raise ValueError(f"pid {data['pid']} is not a process id")
    if data.get("status", "queued") not in STATUSES:
        raise ValueError(f"unknown status {str(data['status'])[:40]!r}")
    return data


def process_alive(pid: int | None) -> bool:
    """A live lorabooth process with this pid (not a stranger that got the
    pid after ours ended)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ProcessLookupError):
        return False
    return b"lorabooth" in cmdline


def _succeeded(job: Job) -> bool:
    return bool(job.expect) and any(job.path.glob(job.expect))


class JobQueue:
    """``launcher`` is the command a job's argv is appended to (tests give
    their own); the worker thread starts on the first submit or recover."""

    def __init__(self, workspace: Workspace,
                 launcher: list[str] | None = None) -> None:
        self.workspace = workspace
        self.launcher = launcher or [sys.executable, "-m", "lorabooth"]
        self._queue: collections.deque[Job] = collections.deque()
        self._adopted: list[Job] = []  # running when the server started
        self._current: tuple[Job, subprocess.Popen] | None = None
        self._stopping: set[str] = set()
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None

    # --- what the page calls -------------------------------------------
    def submit(self, kind: str, argv: list[str], folder: Path, expect: str = "") -> Job:
        folder = self.workspace.path(folder, "job folder")
        with self._lock:
            old = load_job(folder)
            if old and old.status in ACTIVE and (old.status == "queued" or process_alive(old.pid)):
                raise UserError(f"{self.workspace.relative(folder)}: a {old.kind} job is already "
                                f"{old.status} there")
            job = Job(id=secrets.token_hex(4), kind=kind, argv=argv, folder=str(folder),
                      expect=expect)
            folder.mkdir(parents=True, exist_ok=True)
            job.save()
            self._queue.append(job)
            self._ensure_worker()
            self._lock.notify_all()
        return job

    def stop(self, folder: Path) -> Job | None:
        """Stop the job in ``folder``: a queued one leaves the queue, a running
        one's process group is terminated (the training keeps its checkpoints)."""
        folder = self.workspace.path(folder, "job folder")
        with self._lock:
            for job in list(self._queue):
                if job.path == folder:
                    self._queue.remove(job)
                    job.status, job.ended = "stopped", time.time()
                    job.save()
                    return job
            job = load_job(folder)
            if job and job.status == "running" and process_alive(job.pid):
                self._stopping.add(job.id)
                _terminate(job.pid)
            return job

    def jobs(self, warn: bool = False) -> list[Job]:
        """Every job under the workspace, newest first; ``warn``: one warning
        line for each state file that cannot be read."""
        # none among the uploads: a browser could upload a "queued job" there
        found = [load_job(p.parent, warn) for p in self.workspace.root.rglob(STATE)
                 if not p.is_symlink() and not self.workspace.holds_uploads(p)]
        return sorted([j for j in found if j], key=lambda j: j.created, reverse=True)

    def recover(self) -> list[Job]:
        """After a restart: queued jobs queue again, running ones whose process
        lives on are watched, the others are marked interrupted."""
        with self._lock:
            for job in sorted(self.jobs(warn=True), key=lambda j: j.created):
                if job.status == "queued":
                    self._queue.append(job)
                elif job.status == "running" and process_alive(job.pid):
                    self._adopted.append(job)
                elif job.status == "running":
                    job.status, job.ended = "interrupted", time.time()
                    job.save()
            self._ensure_worker()
            self._lock.notify_all()
            return [*self._adopted, *self._queue]

    # --- the worker ------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="lorabooth-ui-jobs",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._adopted:
                    self._lock.wait()
            self._watch_adopted()
            with self._lock:
                if not self._queue:
                    continue
                job = self._queue.popleft()
                self._run_start(job)
            self._run_finish()

    def _watch_adopted(self) -> None:
        """One training at a time includes one started by an earlier server."""
        for job in list(self._adopted):
            while process_alive(job.pid):
                time.sleep(0.5)
            job.status = "done" if _succeeded(job) else "interrupted"
            job.ended = time.time()
            job.save()
            with self._lock:
                self._adopted.remove(job)
                self._lock.notify_all()

    def _run_start(self, job: Job) -> None:
        with (job.path / LOG).open("ab") as out:
            out.write(f"$ lorabooth {' '.join(job.argv)}\n".encode())
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([*self.launcher, *job.argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workspace.root, env=env, start_new_session=True)
        job.status, job.pid, job.started = "running", proc.pid, time.time()
        job.save()
        self._current = (job, proc)

    def _run_finish(self) -> None:
        job, proc = self._current
        rc = proc.wait()
        with self._lock:
            stopped = job.id in self._stopping
            self._stopping.discard(job.id)
            job.returncode, job.ended = rc, time.time()
            job.status = "stopped" if stopped else "done" if rc == 0 else "failed"
            job.save()
            self._current = None
            self._lock.notify_all()


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # its own session: the group is the job alone
    except (ProcessLookupError, PermissionError):
        pass
