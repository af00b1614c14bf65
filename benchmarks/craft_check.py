"""Each part of issue 29 trained on the real architectures: `lorabooth train`
on `sd15-random` and `sdxl-random` (Stable Diffusion 1.5's and SDXL 1.0's
exact UNet, VAE and text encoders with random weights), 2 steps at 256 px
in bf16, once per part, then every key of the written file checked against
ComfyUI's and AUTOMATIC1111's rules for that architecture (`inspect`).

The tests run the same parts on the built-in tiny models; this shows the
real layer names and shapes take them too (a bucket's size conditioning,
a mask at SDXL's latent grid, LoKr/LoHa factors of a 1280-wide layer,
LoCon on the ResNets' convolutions), which a tiny model cannot.

    PYTHONPATH=src python benchmarks/craft_check.py --json benchmarks/data/craft_check.json
    PYTHONPATH=src python benchmarks/craft_check.py --report benchmarks/data/craft_check.json

Photos: 4 non-square pictures (2 landscape, 2 portrait, so --buckets makes
two buckets), each with a mask beside it (an ellipse, `NAME.mask.png`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from common import machine

MODELS = ("sd15-random", "sdxl-random")
# part -> the train options that turn it on
PARTS = {
    "buckets": ["--buckets"],
    "masked loss + masked prior": ["--masked-loss", "--masked-prior-weight", "1"],
    "LoCon (--targets all)": ["--targets", "all"],
    "attention + MLP (--targets attn-mlp)": ["--targets", "attn-mlp"],
    "LoKr": ["--adapter", "lokr"],
    "LoHa": ["--adapter", "loha"],
    "snapshots (--save-every 1)": ["--save-every", "1"],
    "schedules (cosine, warmup 1, accumulation 2, max grad norm 0.5)": [
        "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--gradient-accumulation", "2",
        "--max-grad-norm", "0.5"],
}
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers (LoRA) or peft (LoCon, LoKr, LoHa)
KOHYA = "lora_kohya.safetensors"  # what ComfyUI and AUTOMATIC1111 read


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(384, 256), (360, 240), (256, 384), (240, 360)]):
        im = Image.new("RGB", size, (40 + 50 * i, 130, 200 - 40 * i))
        w, h = size
        ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4),
                                   fill=(220, 60 + 30 * i, 40))
        im.save(folder / f"photo_{i}.png")
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((w // 5, h // 5, 4 * w // 5, 4 * h // 5), fill=255)
        mask.save(folder / f"photo_{i}.mask.png")
    return folder


def train(model: str, options: list[str], data: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "lorabooth", "train", "--model", model,
               "--instance-dir", str(data), "--instance-prompt", "a photo of sks dog",
               "--resolution", "256", "--steps", "2", "--mixed-precision", "bf16",
               "--seed", "0", "--save-format", "both", "--output", str(out), *options]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"command": " ".join(["lorabooth"] + command[3:]).replace(str(data), "PHOTOS")
           .replace(str(out), "OUT"), "exit": done.returncode,
           "seconds": round(time.perf_counter() - t0, 1)}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row["losses"] = [round(m["loss"], 5) for m in metrics]
    row["finite"] = all(math.isfinite(m["loss"]) for m in metrics)
    row["snapshots"] = sorted(p.name for p in (out / "snapshots").glob("step-*")) \
        if (out / "snapshots").is_dir() else []
    row["keys"] = _keys(out / WEIGHTS)
    return row | clients(model, out / KOHYA)


def _keys(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return len(list(f.keys()))


def clients(model: str, file: Path) -> dict:
    """The kohya file's keys and modules, and the keys each client would not
    load, found in a child process: the check builds the base's module
    names from the model (SDXL's: 9 GB), which must not stay resident
    beside the next training."""
    done = subprocess.run([sys.executable, __file__, "--clients", model, str(file)],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clients_here(model: str, file: Path) -> dict:
    from lorabooth.formats.inspection import inspect_lora, names_for_model

    names, label = names_for_model(file, model)
    summary = inspect_lora(file, names, label)
    return {"kohya_layout": summary.layout, "kohya_keys": _keys(file),
            "modules": sum(g[0] for g in summary.groups.values()),
            "unloaded": {client: len(k) for client, k in summary.unloaded.items()},
            "checked_against": summary.checked_against, "unchecked": summary.unchecked}


def measure(models: tuple[str, ...], parts: list[str]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = photos(Path(tmp) / "photos")
        for model in models:
            for k, part in enumerate(parts):
                row = {"model": model, "part": part} | train(model, PARTS[part], data,
                                                              Path(tmp) / f"{model}-{k}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"command": " ".join(["python", "benchmarks/craft_check.py"] + sys.argv[1:]),
            "machine": machine(), "rows": rows}


def report(record: dict) -> str:
    lines = ["| model | part | exit | losses (2 steps) | keys (diffusers/peft file) | keys "
             "(kohya file) | modules | kohya keys a client would not load | snapshots | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        unloaded = ", ".join(f"{c} {v}" for c, v in r.get("unloaded", {}).items()) or "–"
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])) or r.get("error", "")
        lines.append(f"| {r['model']} | {r['part']} | {r['exit']} | {losses} | "
                     f"{r.get('keys', '–')} | {r.get('kohya_keys', '–')} | {r.get('modules', '–')} | "
                     f"{unloaded} | "
                     f"{len(r.get('snapshots', []))} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the record here")
    p.add_argument("--report", type=Path, help="print the table of an earlier record")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--parts", default=";".join(PARTS), help="names of PARTS, ';'-separated")
    p.add_argument("--clients", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clients:
        print(json.dumps(_clients_here(args.clients[0], Path(args.clients[1]))))
        return 0
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    record = measure(tuple(args.models.split(",")), args.parts.split(";"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(report(record))
    return 0 if all(r["exit"] == 0 and r.get("finite") and "unloaded" in r
                    and not any(r["unloaded"].values())
                    for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
