"""The seed's headline on a CUDA GPU: SD 1.5's architecture at 512 px, 300
steps, batch 1, with and without prior preservation, lorabooth beside
diffusers' train_dreambooth_lora.py in the same precision.

    python benchmarks/gpu_headline.py [--reference PATH/train_dreambooth_lora.py
        --reference-python VENV/bin/python] [--precision bf16] [--out DIR]
    python benchmarks/gpu_headline.py --tiny     # CPU: the `tiny` model, 32 px, 2 steps

Like for like: both train the same model folder (`sd15-random`, random
weights at SD 1.5's size, saved once), UNet LoRA rank 4, constant lr 5e-4,
batch 1, the same mixed precision (`--mixed-precision` / `--mixed_precision`),
text embeddings computed once on both sides (the reference's
`--pre_compute_text_embeddings`, what lorabooth always does). With prior
preservation both draw their class images in that precision (the reference's
`--prior_generation_precision`) at the training resolution with DPM-Solver++,
50 steps, batch 4: the model folder this script trains is a copy whose UNet
`sample_size` matches the resolution (the reference draws at the model's own
size) and whose scheduler is DPM-Solver++ (the reference draws with the
folder's scheduler, 50 steps); lorabooth gets `--class-draw-steps 50`.

Run it from the repository root with lorabooth importable (installed, or
PYTHONPATH=src); the reference runs under --reference-python. Each run is a
child process under `peak_memory.py` (which also records that child's torch
build); step time is read from its progress bar by this script's clock
(steady: from the first update after step 1 to the last), total time is
launch to exit, peak GPU memory is torch's peak reserved by the caching
allocator. Writes OUT/headline.md and one
OUT/<arm>.json per run. Without --reference the reference arms are skipped,
and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    BENCH_DIR,
    PHOTOS,
    machine,
    model_dir,
    model_view,
    run_child,
    warm_page_cache,
)

HERE = Path(__file__).resolve().parent
PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"
HEADLINE = {"model": "sd15-random", "resolution": 512, "steps": 300, "num_class_images": 100,
            "precision": "bf16"}
TINY = {"model": "tiny", "resolution": 32, "steps": 2, "num_class_images": 2, "precision": "no"}
DRAW_STEPS, DRAW_BATCH = 50, 4  # the reference's pipeline default steps; its --sample_batch_size
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}
BARS = {"lorabooth": r"train:\s+\d+%\|[^|]*\|\s*(\d+)/\d+",
        "reference": r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the tiny model, 32 px, 2 steps, 2 class images")
    parser.add_argument("--reference", type=Path, help="a fetched train_dreambooth_lora.py")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="the python of the reference's own venv")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"],
                        help="mixed precision on both sides (default bf16; --tiny: no, fp32)")
    parser.add_argument("--model", help="built-in model saved as a folder once (default sd15-random)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--num-class-images", type=int)
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR,
                        help="where model folders are kept (default $LORABOOTH_BENCH_DIR)")
    parser.add_argument("--out", type=Path, help="default benchmarks/data/gpu_headline[-tiny]")
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else HEADLINE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reference and not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file")
    args.out = args.out or HERE / "data" / ("gpu_headline-tiny" if args.tiny else "gpu_headline")
    return args


def lorabooth_cmd(args, model: Path, out: Path, prior: bool) -> list[str]:
    cmd = ["-m", "lorabooth", "train", "--model", str(model), "--instance-dir", str(PHOTOS),
           "--instance-prompt", PROMPT, "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--batch-size", "1", "--rank", "4", "--lr", "5e-4",
           "--mixed-precision", args.precision, "--output", str(out / "run")]
    if prior:
        cmd += ["--prior-preservation", "--class-prompt", CLASS_PROMPT,
                "--num-class-images", str(args.num_class_images),
                "--class-draw-steps", str(DRAW_STEPS), "--class-draw-batch", str(DRAW_BATCH)]
    return cmd


def reference_cmd(args, model: Path, out: Path, prior: bool) -> list[str]:
    cmd = [str(args.reference), "--pretrained_model_name_or_path", str(model),
           "--instance_data_dir", str(PHOTOS), "--instance_prompt", PROMPT,
           "--resolution", str(args.resolution), "--train_batch_size", "1",
           "--max_train_steps", str(args.steps), "--rank", "4", "--learning_rate", "5e-4",
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
           "--mixed_precision", args.precision, "--pre_compute_text_embeddings",
           "--output_dir", str(out / "run")]
    if prior:
        cmd += ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
                "--class_data_dir", str(out / "class"),
                "--num_class_images", str(args.num_class_images),
                "--sample_batch_size", str(DRAW_BATCH),
                "--prior_generation_precision", {"no": "fp32"}.get(args.precision, args.precision)]
    return cmd


def steady_s_per_step(ticks: dict[int, float], steps: int) -> tuple[float, str]:
    """Seconds per step from the progress bar's stamped updates: from the
    first update at or after step 1 to the last one; a bar too quick to
    print between its first and last update gives the mean over all steps,
    the first included (the method is recorded beside the figure)."""
    done = sorted(n for n in ticks if n >= 1)
    if len(done) >= 2:
        return (ticks[done[-1]] - ticks[done[0]]) / (done[-1] - done[0]), "steady (after step 1)"
    if done and 0 in ticks:
        return (ticks[done[-1]] - ticks[0]) / done[-1], "mean over all steps (first included)"
    return math.nan, "no progress bar seen"


def run_arm(args, trainer: str, prior: bool, model: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"headline-{trainer}-"))
    peak_file = work / "peak.json"
    make = lorabooth_cmd if trainer == "lorabooth" else reference_cmd
    python = sys.executable if trainer == "lorabooth" else args.reference_python
    child = run_child([python, str(HERE / "peak_memory.py"), str(peak_file),
                       *make(args, model, work, prior)], bar=BARS[trainer], cwd=work)
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
    s_per_step, method = steady_s_per_step(child.ticks, args.steps)
    row = {"trainer": trainer, "prior_preservation": prior, "precision": args.precision,
           "model": args.model, "resolution": args.resolution, "steps": args.steps,
           "num_class_images": args.num_class_images if prior else 0,
           "s_per_step": s_per_step, "s_per_step_method": method,
           "to_first_step_s": child.to_first_step_s(), "total_s": child.wall_s,
           "peak_gpu_reserved_gb": peak.get("peak_gpu_reserved_gb"),
           "peak_gpu_allocated_gb": peak.get("peak_gpu_allocated_gb"), "gpu": peak.get("gpu"),
           "torch": peak.get("torch"),
           "peak_rss_gb": child.peak_rss_gb, "progress_ticks": child.ticks}
    shutil.rmtree(work, ignore_errors=True)
    return row


def arm_name(trainer: str, prior: bool) -> str:
    return f"{trainer}-{'prior' if prior else 'plain'}"


def _gb(value) -> str:
    return "-" if value is None else f"{value:.2f} GB"


def table(rows: dict[str, dict], meta: dict, skipped: str | None) -> str:
    lines = [f"# Headline: {meta['model']}, {meta['resolution']} px, {meta['steps']} steps, "
             f"batch 1, {PRECISION_NAMES[meta['precision']]}", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`.", "",
             "| arm | prior preservation | s/step | how | to first step | total | "
             "peak GPU (reserved) | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        prior = f"yes ({r['num_class_images']} class images)" if r["prior_preservation"] else "no"
        lines.append(f"| {name} | {prior} | {r['s_per_step']:.3f} | {r['s_per_step_method']} "
                     f"| {r['to_first_step_s']:.1f} s | {r['total_s']:.1f} s "
                     f"| {_gb(r['peak_gpu_reserved_gb'])} | {r['peak_rss_gb']:.2f} GB |")
    if skipped:
        lines += ["", skipped]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    base = model_dir(args.bench_dir / args.model, args.model)
    model = model_view(base, args.resolution, args.bench_dir)
    warm_page_cache(model)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "model": args.model, "resolution": args.resolution,
            "steps": args.steps, "precision": args.precision,
            "command": " ".join(["python benchmarks/gpu_headline.py", *(argv or sys.argv[1:])])}
    trainers = ["lorabooth"] + (["reference"] if args.reference else [])
    skipped = None if args.reference else (
        "Reference arms skipped: no --reference given (a fetched train_dreambooth_lora.py "
        "and --reference-python, the python of its own venv).")
    rows = {}
    for trainer in trainers:
        for prior in (False, True):
            name = arm_name(trainer, prior)
            rows[name] = run_arm(args, trainer, prior, model)
            (args.out / f"{name}.json").write_text(json.dumps({**meta, "arm": name, **rows[name]},
                                                              indent=2) + "\n")
            print(json.dumps({"arm": name, "s_per_step": rows[name]["s_per_step"],
                              "total_s": round(rows[name]["total_s"], 1)}), flush=True)
    (args.out / "headline.md").write_text(table(rows, meta, skipped))
    print(table(rows, meta, skipped))


if __name__ == "__main__":
    main()
