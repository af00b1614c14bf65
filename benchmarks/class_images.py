"""Class-image drawing (prior preservation) at SD 1.5's size, lorabooth beside
diffusers' train_dreambooth_lora.py, like for like.

Each side draws class images for "a photo of a ball" into an empty folder as
its trainer does before training, and is stopped once they are written. Both
draw the same work: from the same model copy (common.model_view: its UNet's
sample_size makes the reference draw at RESOLUTION, which it otherwise
ignores for class images, and its scheduler is DPM-Solver++, which the
reference takes from the folder), 50 sampler steps (the reference's fixed
pipeline default; lorabooth `--class-draw-steps 50`), guidance 7.5, the same
batch (`--batch`, 4 by default: the reference's default --sample_batch_size),
in the same precision (lorabooth `--mixed-precision`, the reference
`--prior_generation_precision`). The rate is the time from the progress
bar's first appearance to its last update over the images drawn (loading
excluded); the time for 100 class images is that rate projected.

    python benchmarks/class_images.py [--resolution 128] [--count 4] [--batch 4]
        [--precision fp32 bf16] [--reference SCRIPT --reference-python PY] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (
    DEFAULT_MODEL_DIR,
    PHOTOS,
    machine,
    model_dir,
    model_view,
    run_child,
    warm_page_cache,
)

CLASS_PROMPT = "a photo of a ball"
DRAW_STEPS = 50


def _rate(child, done_at: int, images: int) -> dict:
    if done_at not in child.ticks:
        raise RuntimeError(f"the class images were not all drawn:\n{child.tail}")
    per_image = (child.ticks[done_at] - child.ticks[0]) / images
    return {"images": images, "s_per_image": round(per_image, 2),
            "projected_100_images_min": round(100 * per_image / 60, 1),
            "to_first_image_s": round(child.ticks[0], 1), "peak_rss_gb": round(child.peak_rss_gb, 2),
            "ticks": child.ticks}


def ours(model: Path, resolution: int, count: int, batch: int, precision: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-class-ours-"))
    child = run_child(
        [sys.executable, "-m", "lorabooth", "train", "--model", str(model),
         "--instance-dir", str(PHOTOS), "--instance-prompt", "a photo of sks ball",
         "--class-prompt", CLASS_PROMPT, "--prior-preservation", "--num-class-images", str(count),
         "--class-draw-steps", str(DRAW_STEPS), "--class-draw-batch", str(batch),
         "--mixed-precision", {"fp32": "no"}.get(precision, precision),
         "--resolution", str(resolution), "--steps", "1", "--output", str(out / "run")],
        bar=r"class images:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", stop_when=lambda t: count in t)
    return _rate(child, count, count)


def reference(script: Path, python: str, model: Path, resolution: int, count: int,
              batch: int, precision: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-class-ref-"))
    batches = -(-count // batch)
    child = run_child(
        [python, str(script), "--pretrained_model_name_or_path", str(model),
         "--instance_data_dir", str(PHOTOS), "--instance_prompt", "a photo of sks ball",
         "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
         "--class_data_dir", str(out / "class"), "--num_class_images", str(count),
         "--sample_batch_size", str(batch), "--prior_generation_precision", precision,
         "--resolution", str(resolution), "--max_train_steps", "1",
         "--output_dir", str(out / "run"), "--seed", "0"],
        bar=r"Generating class images:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", cwd=out,
        stop_when=lambda t: batches in t)
    return _rate(child, batches, count)  # its bar counts batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="class images each side draws")
    parser.add_argument("--batch", type=int, default=4, help="class images per batch, both sides")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--reference", type=Path, help="train_dreambooth_lora.py")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()

    base = model_dir(args.model_dir)
    model = model_view(base, args.resolution, base.parent)
    warm_page_cache(model)
    meta = {"machine": machine(), "resolution": args.resolution, "sampler": "DPM-Solver++",
            "draw_steps": DRAW_STEPS, "batch": args.batch, "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    rows = {}
    for precision in args.precision:
        if args.reference:
            rows[f"reference {precision}"] = reference(args.reference, args.reference_python,
                                                       model, args.resolution, args.count, args.batch,
                                                       precision)
            print(json.dumps({"run": f"reference {precision}", **rows[f"reference {precision}"]}),
                  flush=True)
        rows[f"lorabooth {precision}"] = ours(model, args.resolution, args.count, args.batch,
                                                       precision)
        print(json.dumps({"run": f"lorabooth {precision}", **rows[f"lorabooth {precision}"]}),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    print("\n".join(table(rows)))


def table(rows: dict) -> list[str]:
    """RESULTS.md's table of the saved runs (tests/test_docs_data.py renders it again)."""
    lines = ["| run | images timed | s/image | vs reference (same work, same precision) "
             "| 100 class images (projected) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        ref = rows.get(f"reference {name.split()[1]}")
        ratio = f"{ref['s_per_image'] / r['s_per_image']:.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['images']} | {r['s_per_image']:.1f} | {ratio} "
                     f"| {r['projected_100_images_min']:.0f} min |")
    return lines

if __name__ == "__main__":
    main()
