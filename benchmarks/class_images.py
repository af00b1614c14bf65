"""Class-image drawing (prior preservation) at SD 1.5's size, lorabooth beside
diffusers' train_dreambooth_lora.py.

Each side draws class images for "a photo of a ball" into an empty folder as
its trainer does before training, and is stopped once they are written. The
rate is images per second between the progress bar's first and last update
(loading excluded); the time for 100 class images is that rate projected.

lorabooth: at the training resolution (256 px here), DPM-Solver++ 25 steps,
batch 4, guidance 7.5, under inference_mode. The reference: the model's own
resolution (512 px) whatever --resolution says, the folder's PNDM scheduler
at 50 steps, guidance 7.5, --sample_batch_size images per batch.

    python benchmarks/class_images.py [--count 8] [--reference SCRIPT
        --reference-python PY --reference-count 1 --reference-batch 1]
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
    run_child,
    warm_page_cache,
)

CLASS_PROMPT = "a photo of a ball"


def _rate(child, count: int) -> dict:
    done = max(child.ticks)
    if done < count:
        raise RuntimeError(f"only {done} of {count} class images were drawn:\n{child.tail}")
    seconds = child.ticks[done] - child.ticks[0]
    per_image = seconds / done
    return {"images": done, "s_per_image": round(per_image, 2),
            "images_per_s": round(1 / per_image, 4),
            "projected_100_images_min": round(100 * per_image / 60, 1),
            "to_first_image_s": round(child.ticks[0], 1), "peak_rss_gb": round(child.peak_rss_gb, 2)}


def ours(model: Path, count: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-class-ours-"))
    child = run_child(
        [sys.executable, "-m", "lorabooth", "train", "--model", str(model),
         "--instance-dir", str(PHOTOS), "--instance-prompt", "a photo of sks ball",
         "--class-prompt", CLASS_PROMPT, "--prior-preservation", "--num-class-images", str(count),
         "--resolution", "256", "--steps", "1", "--output", str(out), *extra],
        bar=r"class images:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", stop_when=lambda t: count in t)
    return _rate(child, count)


def reference(script: Path, python: str, model: Path, count: int, batch: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-class-ref-"))
    child = run_child(
        [python, str(script), "--pretrained_model_name_or_path", str(model),
         "--instance_data_dir", str(PHOTOS), "--instance_prompt", "a photo of sks ball",
         "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
         "--class_data_dir", str(out / "class"), "--num_class_images", str(count),
         "--sample_batch_size", str(batch), "--resolution", "256", "--max_train_steps", "1",
         "--output_dir", str(out), "--seed", "0"],
        bar=r"Generating class images:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", cwd=out,
        stop_when=lambda t: count // batch in t)
    row = _rate(child, count // batch)  # its bar counts batches
    per_image = row["s_per_image"] / batch
    row.update(images=count, s_per_image=round(per_image, 2), images_per_s=round(1 / per_image, 4),
               projected_100_images_min=round(100 * per_image / 60, 1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8, help="class images lorabooth draws")
    parser.add_argument("--bf16", action="store_true", help="also lorabooth under bf16")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--reference", type=Path, help="train_dreambooth_lora.py")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--reference-count", type=int, default=1)
    parser.add_argument("--reference-batch", type=int, default=1)
    args = parser.parse_args()

    model = model_dir(args.model_dir)
    warm_page_cache(model)
    print(json.dumps({"machine": machine()}), flush=True)
    rows = {"lorabooth fp32": ours(model, args.count, [])}
    print(json.dumps({"run": "lorabooth fp32", **rows["lorabooth fp32"]}), flush=True)
    if args.bf16:
        rows["lorabooth bf16"] = ours(model, args.count, ["--mixed-precision", "bf16"])
        print(json.dumps({"run": "lorabooth bf16", **rows["lorabooth bf16"]}), flush=True)
    if args.reference:
        rows["reference fp32"] = reference(args.reference, args.reference_python, model,
                                           args.reference_count, args.reference_batch)
        print(json.dumps({"run": "reference fp32", **rows["reference fp32"]}), flush=True)
    ref = rows.get("reference fp32")
    print("\n| run | images timed | s/image | vs reference | 100 class images (projected) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = f"{ref['s_per_image'] / r['s_per_image']:.1f}x" if ref else "-"
        print(f"| {name} | {r['images']} | {r['s_per_image']:.1f} | {ratio} "
              f"| {r['projected_100_images_min']:.0f} min |")


if __name__ == "__main__":
    main()
