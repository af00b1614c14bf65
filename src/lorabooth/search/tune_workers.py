"""`tune --workers N`: N processes on this machine working on one study.
Each is a fresh interpreter (multiprocessing's spawn: no forked CUDA or
thread state) that runs the same trial loop as a single `tune`; the study's
storage is all they share, plus OUT/class_images, drawn by one of them
under a file lock."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def visible_gpus(cuda_visible: str | None, count: int) -> list[str]:
    """The GPU ids the workers share out: the parent's CUDA_VISIBLE_DEVICES
    when set (a worker must pick among those, not among all), else
    0..count-1."""
    if cuda_visible is not None and cuda_visible.strip():
        return [g.strip() for g in cuda_visible.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def worker_env(worker: int, workers: int, gpus: list[str], cores: int) -> dict[str, str]:
    """Environment of worker ``worker`` of ``workers``: one GPU each, round
    robin; the CPU cores split evenly, so that N workers do not each start
    a thread per core and oversubscribe the machine."""
    threads = str(max(1, cores // workers))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[worker % len(gpus)]
    return env


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, not the whole machine
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_workers(workers: int, target: Callable[..., None], args: tuple) -> None:
    """Start ``workers`` processes running ``target(*args, worker, env)``
    and wait for all of them; a worker that failed is one line."""
    import multiprocessing

    from ..core.errors import UserError

    gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), _gpu_count())
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, name=f"tune-worker-{i}",
                             args=(*args, i, worker_env(i, workers, gpus, _cores())))
             for i in range(workers)]
    for p in procs:
        p.start()
    log.info("%d workers started (%s)", workers,
             f"GPUs {', '.join(gpus)}" if gpus else f"{_cores()} CPU cores shared")
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: each fails its trial
        for p in procs:
            p.join()
        raise
    failed = [f"{i} (exit status {p.exitcode})" for i, p in enumerate(procs) if p.exitcode]
    if failed:
        raise UserError(f"--workers {workers}: worker {', '.join(failed)} stopped; its own "
                        "message is above")


def start_worker(worker: int, env: dict[str, str]) -> None:
    """Set up a spawned worker: its GPU and thread share, its logging."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch may be imported already
    logging.basicConfig(level=logging.INFO, format=f"lorabooth worker {worker}: %(message)s",
                        stream=sys.stderr)
    from ..core.logs import quiet_libraries

    quiet_libraries()  # its basicConfig is then a no-op: the worker's prefix stays


@contextmanager
def class_images_once(folder: Path, missing: Callable[[], Any]) -> Iterator[None]:
    """Around a trial that uses the shared class images: if some are
    ``missing()``, this trial draws them while holding the lock, and every
    other worker wanting them waits; once they are all there, nobody waits.
    (Two drawers at once would also delete each other's half-written files.)"""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process is killed
        try:
            if missing():
                yield
                return
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    yield
