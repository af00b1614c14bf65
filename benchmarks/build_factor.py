"""How much of a speed ratio is the torch build: the same UNet forward +
backward timed under two Python environments (lorabooth's torch and the
reference's), taken in turns.

The work is identical on both sides and uses only torch and diffusers: the
model folder's UNet (SD 1.5's architecture, random weights), latents of
RESOLUTION/8 that require grad, fixed timesteps and a fixed random
77x768 context; backward to the latents (what a LoRA step pays: every
layer's input gradients). fp32, or bf16 as both trainers run it (frozen
weights stored in bf16, under CPU autocast).

    python benchmarks/build_factor.py --python-a .venv/bin/python \
        --python-b REFVENV/bin/python --precision fp32 bf16 --rounds 2 --json OUT.json
    python benchmarks/build_factor.py --child MODEL_DIR fp32 128 4   # one timed process

Each child loads the UNet once, runs one untimed step, then REPS timed
ones; A and B alternate (A B A B ...) so a drift in the machine's speed
falls on both. The factor is B's median step over A's: above 1, A's build
is faster on this work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(model: str, precision: str, resolution: int, reps: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=gen, requires_grad=True)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.tensor([500])
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(latents, timesteps, context).sample
        out.float().pow(2).mean().backward()
        latents.grad = None
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    print(json.dumps({"torch": torch.__version__, "precision": precision, "times_s": times}))


def summarise(runs: list[dict], precisions) -> dict:
    """Per precision: each side's median step over every process and rep,
    and the factor B over A."""
    summary = {}
    for precision in precisions:
        med = {side: statistics.median(t for r in runs if r["side"] == side
                                       and r["precision"] == precision for t in r["times_s"])
               for side in "ab"}
        summary[precision] = {"a_median_s": med["a"], "b_median_s": med["b"],
                              "factor_b_over_a": med["b"] / med["a"]}
    return summary


def table(runs: list[dict], precisions) -> list[str]:
    """RESULTS.md's table of the saved runs (tests/test_docs_data.py renders it again)."""
    torch = {side: next(r["torch"] for r in runs if r["side"] == side) for side in "ab"}
    count = {p: sum(len(r["times_s"]) for r in runs if r["side"] == "a" and r["precision"] == p)
             for p in precisions}
    lines = [f"| work | lorabooth's torch {torch['a']} (median of n) | the reference's torch "
             f"{torch['b']} (median of n) | factor |", "|---|---|---|---|"]
    for precision, s in summarise(runs, precisions).items():
        work = {"fp32": "fp32", "bf16": "bf16 (bf16 weights, CPU autocast)"}[precision]
        lines.append(f"| {work} (n = {count[precision]}) | {s['a_median_s']:.2f} s | "
                     f"{s['b_median_s']:.2f} s | {s['factor_b_over_a']:.2f}x |")
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        model, precision, resolution, reps = sys.argv[2:6]
        child(model, precision, int(resolution), int(reps))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-a", default=sys.executable, help="lorabooth's python")
    parser.add_argument("--python-b", required=True, help="the reference venv's python")
    parser.add_argument("--model-dir", type=Path, required=True, help="the sd15-random folder")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every process's times here")
    args = parser.parse_args()
    runs = []
    for precision in args.precision:
        for round_ in range(args.rounds):
            for side, python in (("a", args.python_a), ("b", args.python_b)):
                done = subprocess.run([python, __file__, "--child", str(args.model_dir), precision,
                                       str(args.resolution), str(args.reps)],
                                      capture_output=True, text=True, check=True)
                row = {"side": side, "round": round_, **json.loads(done.stdout.splitlines()[-1])}
                runs.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(runs, args.precision)
    print(json.dumps(summary, indent=2))
    print("\n".join(table(runs, args.precision)))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "resolution": args.resolution,
                                         "runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
