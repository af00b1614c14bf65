"""Training speed and memory at Stable Diffusion 1.5's real size on the CPU.

Runs `lorabooth train --model sd15-random` (SD 1.5's exact architecture, random
weights) at 256 px, batch 1, UNet LoRA rank 4, in a child process per setting,
and prints steady-state seconds per step (median of the steps after the
first), time to the first step, and peak RSS. Compare with the reference
trainer's figures in ../shared/REFERENCE.md (measure both in one session).

    python benchmarks/train_speed.py [--steps 6] [--precision no bf16]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[1] / "src" / "lorabooth" / "assets" / "demo_photos"


def run(precision: str, steps: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    cmd = [sys.executable, "-m", "lorabooth", "train", "--model", "sd15-random",
           "--instance-dir", str(PHOTOS), "--instance-prompt", "a photo of sks ball",
           "--resolution", "256", "--steps", str(steps), "--batch-size", "1", "--rank", "4",
           "--mixed-precision", precision, "--save-format", "diffusers", "--output", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["s_per_step"] for r in rows]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
    return {"precision": precision, "steps": steps, "wall_s": round(wall, 1),
            "first_step_s": per_step[0], "steady_s_per_step": round(statistics.median(per_step[1:]), 3),
            "to_first_step_s": round(wall - sum(per_step), 1), "peak_rss_gb": round(peak_kb / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"])
    args = parser.parse_args()
    for precision in args.precision:
        print(json.dumps(run(precision, args.steps)), flush=True)


if __name__ == "__main__":
    main()
