"""A process writing a folder: one at a time (``FOLDER/.lock`` holds the
writer's pid), and stopped by SIGTERM the way Ctrl-C stops it, so its
cleanup (``finally``, atomic writes' temp files, the lock) still runs."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .fileio import read_text_file

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(folder: Path, label: str = "--output") -> Path:
    """``FOLDER/.lock`` holds the writer's pid; a second writer stops with a
    line naming ``label`` (the option or argument that named the folder), a
    lock left by a killed process is taken over."""
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(read_text_file(lock, "", 4096).split()[0])  # never a FIFO's wait
            except (UserError, ValueError, IndexError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise UserError(f"{label} {folder}: another lorabooth process (pid {pid}) is "
                                f"writing here; wait for it or choose another {label}") from None
            log.warning("taking over the stale lock of process %s in %s", pid, folder)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise UserError(f"{label} {folder}: could not take the lock {lock}")


def release_lock(lock: Path | None) -> None:
    if lock is not None:
        lock.unlink(missing_ok=True)


@contextmanager
def locked(folder: Path, label: str) -> Iterator[None]:
    """``folder`` (which exists) locked while the block runs."""
    lock = acquire_lock(folder, label)
    try:
        yield
    finally:
        release_lock(lock)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a closing terminal's job control, the web UI's stop)
    raises KeyboardInterrupt while the block runs, as Ctrl-C does, instead of
    ending the process on the spot. Only the main thread can set a handler:
    elsewhere (a UI worker thread) SIGTERM keeps its meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
