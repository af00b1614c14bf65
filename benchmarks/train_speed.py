"""Training speed and memory at Stable Diffusion 1.5's real size, lorabooth
beside diffusers' train_dreambooth_lora.py, one after the other, each
precision against the reference in the same precision.

Both train on the same SD 1.5-architecture folder (random weights, built once
from configs, see common.model_dir; `--model` picks another built-in) and
the same photos, at 256 px (`--resolution`), batch 1,
UNet LoRA rank 4, constant lr 5e-4, no prior preservation. The reference
runs with its own `--pre_compute_text_embeddings` (lorabooth always caches
the prompt embeddings) and, for a setting, the same `--mixed_precision` and
`--gradient_checkpointing`. Each side is timed
from its progress bar by this script's clock (steady s/step: the median gap
between updates after the first step; time to the first step: launch until
the bar appears) and its peak RSS comes from the kernel.

    python benchmarks/train_speed.py [--steps 8] [--settings fp32 bf16 fp32-gc]
        [--reference train_dreambooth_lora.py --reference-python VENV/bin/python]
        [--build-factor build_factor.json]   # ratios net of the torch build too
        [--json OUT.json]                     # every run's figures and bar stamps
    python benchmarks/train_speed.py --report OUT.json [--build-factor B.json]   # table only
        [--reference-peak-rss-gb 5.96]   # a recorded figure, when the reference cannot run
        [--model sdxl-random --resolution 512]   # another built-in, saved as a folder once

Fetch the reference as ../shared/REFERENCE.md says, into a folder outside the
project, with its own venv; never commit it. The two venvs carry different
torch builds: benchmarks/build_factor.py times the same UNet step in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (
    BENCH_DIR,
    PHOTOS,
    machine,
    model_dir,
    run_child,
    warm_page_cache,
)

PROMPT = "a photo of sks ball"
SETTINGS = {  # name -> (extra lorabooth options, the reference's same options)
    "fp32": ([], []),
    "bf16": (["--mixed-precision", "bf16"], ["--mixed_precision", "bf16"]),
    "fp32-gc": (["--gradient-checkpointing"], ["--gradient_checkpointing"]),
    "bf16-gc": (["--mixed-precision", "bf16", "--gradient-checkpointing"],
                ["--mixed_precision", "bf16", "--gradient_checkpointing"]),
}


def ours(model: Path, steps: int, resolution: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    child = run_child(
        [sys.executable, "-m", "lorabooth", "train", "--model", str(model),
         "--instance-dir", str(PHOTOS), "--instance-prompt", PROMPT, "--resolution", str(resolution),
         "--steps", str(steps), "--batch-size", "1", "--rank", "4", "--lr", "5e-4",
         "--save-format", "diffusers", "--output", str(out), *extra],
        bar=r"train:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")
    logged = [json.loads(line)["s_per_step"]
              for line in (out / "metrics.jsonl").read_text().splitlines()]
    return _row(child, logged_median=sorted(logged[1:])[len(logged[1:]) // 2])


def reference(script: Path, python: str, model: Path, steps: int, resolution: int,
              extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    child = run_child(
        [python, str(script), "--pretrained_model_name_or_path", str(model),
         "--instance_data_dir", str(PHOTOS), "--instance_prompt", PROMPT,
         "--resolution", str(resolution),
         "--train_batch_size", "1", "--max_train_steps", str(steps), "--rank", "4",
         "--learning_rate", "5e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
         "--output_dir", str(out), "--seed", "0", "--pre_compute_text_embeddings", *extra],
        bar=r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", cwd=out)
    return _row(child)


def _row(child, **extra) -> dict:
    return {"steady_s_per_step": round(child.steady_s_per_step(), 3),
            "to_first_step_s": round(child.to_first_step_s(), 1), "wall_s": round(child.wall_s, 1),
            "peak_rss_gb": round(child.peak_rss_gb, 2), "ticks": child.ticks, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16"], choices=SETTINGS)
    parser.add_argument("--model", default="sd15-random",
                        help="the built-in model to save as a folder and train on")
    parser.add_argument("--model-dir", type=Path, help="where that folder is kept "
                        "(default: $LORABOOTH_BENCH_DIR or ~/.cache/lorabooth/bench, then MODEL)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--reference", type=Path, help="train_dreambooth_lora.py")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="the python of the reference's own venv")
    parser.add_argument("--reference-peak-rss-gb", type=float,
                        help="without --reference: a recorded reference peak to compare with")
    parser.add_argument("--build-factor", type=Path,
                        help="build_factor.py's JSON: ratios also net of the torch build")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--report", type=Path, help="run nothing: print the table of a saved "
                        "--json (with --build-factor, net of that measurement)")
    args = parser.parse_args()
    if args.report:
        factors = json.loads(args.build_factor.read_text())["summary"] if args.build_factor else {}
        print("\n".join(table(json.loads(args.report.read_text())["runs"],
                               args.reference_peak_rss_gb, factors)))
        return

    model = model_dir(args.model_dir or BENCH_DIR / args.model, args.model)
    warm_page_cache(model)
    meta = {"machine": machine(), "model": args.model, "steps": args.steps,
            "resolution": args.resolution, "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    rows = {}
    for name in args.settings:  # the reference, then lorabooth, one setting after the other
        ours_extra, reference_extra = SETTINGS[name]
        if args.reference:
            rows[f"reference {name}"] = reference(args.reference, args.reference_python, model,
                                                  args.steps, args.resolution, reference_extra)
            print(json.dumps({"run": f"reference {name}", **rows[f"reference {name}"]}), flush=True)
        rows[f"lorabooth {name}"] = ours(model, args.steps, args.resolution, ours_extra)
        print(json.dumps({"run": f"lorabooth {name}", **rows[f"lorabooth {name}"]}), flush=True)
    factors = (json.loads(args.build_factor.read_text())["summary"] if args.build_factor else {})
    if args.json:
        args.json.write_text(json.dumps({**meta, "runs": rows, "build_factor": factors},
                                        indent=2) + "\n")
    print("\n".join(table(rows, args.reference_peak_rss_gb, factors)))


def table(rows: dict, recorded_peak_gb: float | None, factors: dict) -> list[str]:
    """Markdown rows, each lorabooth setting against the reference in the
    same setting; RSS against that run, or else the recorded reference peak
    (then there is no speed to compare: times drift). With build factors
    (the reference's torch build over ours on the same UNet step), the speed
    ratio is also given net of the build."""
    lines = []
    if not any(name.startswith("reference") for name in rows) and recorded_peak_gb:
        lines += ["", f"(RSS vs the recorded reference fp32 peak, {recorded_peak_gb:.2f} GB)"]
    lines += ["", "| run | steady s/step | speed vs reference (same precision) | net of the torch "
              "build | to first step | peak RSS | RSS vs reference |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        setting = name.split(" ", 1)[1]
        ref = rows.get(f"reference {setting}")
        ratio = ref["steady_s_per_step"] / r["steady_s_per_step"] if ref else None
        speed = f"{ratio:.2f}x" if ratio else "-"
        factor = factors.get(setting.removesuffix("-gc"), {}).get("factor_b_over_a")
        net = (f"{ratio / factor:.2f}x (build {factor:.2f}x)"
               if ratio and factor and r is not ref else "-")
        ref_gb = ref["peak_rss_gb"] if ref else recorded_peak_gb
        mem = f"{r['peak_rss_gb'] / ref_gb:.2f}x" if ref_gb else "-"
        lines.append(f"| {name} | {r['steady_s_per_step']:.2f} | {speed} | {net} "
                     f"| {r['to_first_step_s']:.1f} s | {r['peak_rss_gb']:.2f} GB | {mem} |")
    return lines

if __name__ == "__main__":
    main()
