"""Shared by the benchmarks: the SD 1.5-size model folder, child processes
timed from their progress bars, and a description of the machine.

Both sides are measured the same way: the benchmark starts the trainer as a
child process, reads its progress bar as it is printed and stamps every
update with the benchmark's own clock, and takes the child's peak RSS from
the kernel (wait4) when it exits.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "src" / "lorabooth" / "assets" / "demo_photos"
BENCH_DIR = Path(os.environ.get("LORABOOTH_BENCH_DIR", Path.home() / ".cache" / "lorabooth" / "bench"))
DEFAULT_MODEL_DIR = BENCH_DIR / "sd15-random"

# Stable Diffusion 1.5's own scheduler_config.json: the reference draws its
# class images with the scheduler it finds in the model folder, as it would
# with the real model.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


def model_dir(path: Path = DEFAULT_MODEL_DIR, name: str = "sd15-random") -> Path:
    """The built-in model ``name`` (random weights at a real architecture's
    size: ``sd15-random``, about 4 GB in fp32) saved as a diffusers folder,
    built once from configs and kept outside the repo; an unknown name fails
    with the loader's own message."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        print(f"building {name} in {path} (once)", file=sys.stderr)
        tmp = path.with_name(path.name + ".partial")
        built = subprocess.run([sys.executable, "-c", (
            "import sys; from lorabooth.core.errors import UserError; "
            "from lorabooth.models.loading import load_base, save_base\n"
            "try: save_base(load_base(sys.argv[1]), sys.argv[2])\n"
            "except UserError as e: sys.exit(str(e))"), name, str(tmp)])
        if built.returncode:
            sys.exit(f"could not build {name} (above)")
        tmp.rename(path)
    if name == "sd15-random":
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    return path


def model_view(base: Path, resolution: int, where: Path) -> Path:
    """A copy of the model folder (weights hard-linked) whose UNet's
    sample_size draws at ``resolution`` by default and whose scheduler is
    DPM-Solver++ with SD 1.5's betas: what the reference draws class images
    with, so both sides draw the same images' worth of work."""
    from diffusers import DPMSolverMultistepScheduler

    view = where / f"{base.name}-{resolution}px-dpm"
    if view.exists():
        shutil.rmtree(view)
    for f in base.rglob("*"):
        if f.is_file():
            target = view / f.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:  # another file system
                shutil.copy2(f, target)
    vae = json.loads((base / "vae" / "config.json").read_text())
    unet_config = view / "unet" / "config.json"
    unet = json.loads(unet_config.read_text())
    unet["sample_size"] = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    unet_config.unlink()  # a hard link: writing in place would change the base folder
    unet_config.write_text(json.dumps(unet, indent=2))
    (view / "scheduler" / "scheduler_config.json").unlink()
    DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER).save_config(view / "scheduler")
    return view


def warm_page_cache(path: Path) -> None:
    """Read every file once, so neither side pays the first read from disk."""
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


@dataclass
class Child:
    wall_s: float
    peak_rss_gb: float
    ticks: dict[int, float] = field(default_factory=dict)  # progress n -> seconds since launch
    tail: str = ""

    def steady_s_per_step(self) -> float:
        """Median time between consecutive updates, the first step left out."""
        ns = sorted(n for n in self.ticks if n >= 1)
        gaps = [self.ticks[b] - self.ticks[a] for a, b in zip(ns, ns[1:]) if b == a + 1]
        return statistics.median(gaps) if gaps else float("nan")

    def to_first_step_s(self) -> float:
        return self.ticks.get(0, float("nan"))


def run_child(cmd: list[str], bar: str, env: dict | None = None, cwd: Path | None = None,
              stop_when=None) -> Child:
    """Run ``cmd``; stamp each progress line matching ``bar`` (a regex whose
    group 1 is the count done). ``stop_when(ticks)`` True ends the child early."""
    pattern = re.compile(bar)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, **(env or {})})
    ticks: dict[int, float] = {}
    buffer, tail = b"", b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter() - t0
        tail = (tail + chunk)[-4000:]
        buffer += chunk
        *pieces, buffer = re.split(rb"[\r\n]", buffer)
        # tqdm writes "\r" + the bar: a bar line ends only when the next one
        # starts, so the unfinished last piece is read as well
        for piece in [*pieces, buffer]:
            m = pattern.search(piece.decode("utf-8", "replace"))
            if m:
                ticks.setdefault(int(m.group(1)), now)
        if stop_when and stop_when(ticks):
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not stop_when:
        raise RuntimeError(f"{cmd[:3]} exited {code}:\n{tail.decode('utf-8', 'replace')}")
    return Child(wall, usage.ru_maxrss / 1e6, ticks, tail.decode("utf-8", "replace"))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}; python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
