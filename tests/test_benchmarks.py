"""benchmarks/gpu_headline.py: its --tiny mode runs on the CPU and writes the
table and one JSON per run; the pieces that make it like for like (the model
copy the class images are drawn from, the step-time reading) do what they say.
No figure is compared with a time limit: only that each is there and positive."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import gpu_headline  # noqa: E402

ARMS = ["lorabooth-plain", "lorabooth-prior"]
# FLUX.1's transformer class at a size built in milliseconds
SMALL_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One --tiny run in a subprocess, as a person would start it. The test
    session's TQDM_DISABLE=1 is left in on purpose: the step times are read
    from the trainers' bars, which must not be silenced by it."""
    tmp = tmp_path_factory.mktemp("headline")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(BENCH / "gpu_headline.py"), "--tiny",
                           "--bench-dir", str(tmp / "models"), "--out", str(tmp / "out")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "out"


def test_tiny_mode_writes_a_table_row_per_arm(tiny_run):
    text = (tiny_run / "headline.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| lorabooth-")]
    assert [row.split("|")[1].strip() for row in rows] == ARMS
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        s_per_step, first, total, rss = (float(cells[2]), float(cells[4].split()[0]),
                                         float(cells[5].split()[0]), float(cells[7].split()[0]))
        assert min(s_per_step, first, total, rss) > 0, row
        assert cells[6] == "-"  # no GPU: no GPU peak, said as such
    assert "Reference arms skipped: no --reference given" in text
    assert "| reference-" not in text


def test_tiny_mode_writes_raw_json_per_arm(tiny_run):
    assert sorted(p.name for p in tiny_run.glob("*.json")) == [f"{a}.json" for a in ARMS]
    for arm in ARMS:
        data = json.loads((tiny_run / f"{arm}.json").read_text())
        assert data["arm"] == arm and data["trainer"] == "lorabooth"
        assert (data["model"], data["resolution"], data["steps"]) == ("tiny", 32, 2)
        for key in ("s_per_step", "to_first_step_s", "total_s", "peak_rss_gb"):
            assert isinstance(data[key], float) and math.isfinite(data[key]) and data[key] > 0, key
        assert data["prior_preservation"] == (arm == "lorabooth-prior")
        assert data["num_class_images"] == (2 if data["prior_preservation"] else 0)
        assert max(int(n) for n in data["progress_ticks"]) == 2  # the bar reached the last step
        assert "torch" in data["machine"] and "--tiny" in data["command"]
        assert data["torch"].split("+")[0][0].isdigit()  # the child's own torch build


def test_model_view_draws_at_the_resolution_with_dpm_and_leaves_the_base_alone(tmp_path):
    base = tmp_path / "base"
    for sub, name, config in (("unet", "config.json", {"sample_size": 64}),
                              ("vae", "config.json", {"block_out_channels": [1, 2, 3, 4]}),
                              ("scheduler", "scheduler_config.json",
                               {"_class_name": "PNDMScheduler"})):
        (base / sub).mkdir(parents=True)
        (base / sub / name).write_text(json.dumps(config))
    (base / "unet" / "weights.bin").write_bytes(b"w" * 10)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    view = common.model_view(base, 128, tmp_path)
    assert json.loads((view / "unet" / "config.json").read_text())["sample_size"] == 16
    scheduler = json.loads((view / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["beta_end"] == 0.012
    assert (view / "unet" / "weights.bin").read_bytes() == b"w" * 10
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before


def test_step_time_from_the_bar():
    # steady: the first update after step 1 to the last, skipped updates allowed
    assert gpu_headline.steady_s_per_step({0: 5.0, 1: 7.0, 4: 10.0, 10: 16.0}, 10) == (
        pytest.approx(1.0), "steady (after step 1)")
    # a bar too quick to print between: the mean over every step
    s, how = gpu_headline.steady_s_per_step({0: 5.0, 4: 13.0}, 4)
    assert s == pytest.approx(2.0) and "first included" in how
    assert math.isnan(gpu_headline.steady_s_per_step({}, 4)[0])


def test_reference_command_is_like_for_like():
    args = gpu_headline.parse_args(["--precision", "bf16", "--reference", __file__])
    cmd = gpu_headline.reference_cmd(args, Path("M"), Path("W"), prior=True)
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[cmd.index("--prior_generation_precision") + 1] == "bf16"
    assert "--pre_compute_text_embeddings" in cmd
    assert (args.resolution, args.steps) == (512, 300)
    ours = gpu_headline.lorabooth_cmd(args, Path("M"), Path("W"), prior=True)
    assert ours[ours.index("--mixed-precision") + 1] == "bf16"
    assert ours[ours.index("--class-draw-steps") + 1] == str(gpu_headline.DRAW_STEPS)
    assert ours[ours.index("--class-draw-batch") + 1] == cmd[cmd.index("--sample_batch_size") + 1]


def test_memory_table_cpu_mode_runs_each_setting_in_its_own_process(tmp_path):
    """benchmarks/memory_table.py --tiny: one row per precision x (no
    checkpointing, checkpointing), each a real step in its own process whose
    frozen weights shrink with the precision."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(BENCH / "memory_table.py"), "--tiny", "--models",
                           "tiny-flux", "--precisions", "bf16", "nf4", "--swap", "--steps", "1",
                           "--json", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["precision"], r["gradient_checkpointing"], r["blocks_to_swap"]) for r in runs] == [
        ("bf16", False, 0), ("bf16", True, 0), ("nf4", False, 0), ("nf4", True, 0)]
    assert all("error" not in r and math.isfinite(r["loss"]) and r["step_s"][0] > 0 for r in runs)
    assert all(r["peak_rss_gb"] > 0 and r["lora_params"] > 0 for r in runs)
    assert runs[2]["frozen_bytes"] < runs[0]["frozen_bytes"]
    assert done.stdout.count("| tiny-flux | 32 |") == 4


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-flux2"])
def test_memory_table_steps_each_family_with_swapped_blocks(model):
    """The step memory_table.py times, in this process: each family's
    latents, conditioning and LoRA, on a quantised base with a block parked."""
    import memory_table

    row = memory_table.step_once(model, 32, "int8", True, 1, 2, "cpu")
    assert (row["model"], row["precision"], row["blocks_to_swap"]) == (model, "int8", 1)
    assert math.isfinite(row["loss"]) and len(row["step_s"]) == 2 and row["lora_params"] > 0


@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4"])
def test_the_full_flux_transformers_are_built_a_layer_at_a_time(precision):
    """memory_table.py builds FLUX.1's 12 B transformer without a bf16 copy
    of it: every layer made from the seeded generator on the meta device's
    shapes, its Linears quantised as they are made. Checked on a small
    config of the same class: no meta tensor left, every Linear in the base
    precision, the same weights from the same seed, a finite forward."""
    from diffusers import FluxTransformer2DModel

    import memory_table
    from lorabooth.models.quantise import frozen_bytes, is_plain_linear

    config = SMALL_FLUX
    one, two = (memory_table.streamed_transformer(FluxTransformer2DModel, config, precision)
                for _ in range(2))
    assert not any(t.is_meta for t in [*one.parameters(), *one.buffers()])
    linears = [m for m in one.modules() if isinstance(m, torch.nn.Linear) or "Linear4bit" in
               type(m).__name__]
    assert linears and all(is_plain_linear(m) == (precision == "bf16") for m in linears)
    assert {p.dtype for p in one.parameters() if p.dim() == 1} == {torch.bfloat16}  # norms, biases
    if precision == "bf16":
        assert all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters()))
    else:
        assert frozen_bytes(one) < frozen_bytes(memory_table.streamed_transformer(
            FluxTransformer2DModel, config, "bf16"))
    with torch.no_grad():
        out = one(hidden_states=torch.randn(1, 4, 16, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 3, 32, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3)).sample
    assert out.shape == (1, 4, 16) and torch.isfinite(out.float()).all()


def test_memory_table_marks_goals_and_failures():
    import memory_table

    row = {"model": "sdxl-random", "resolution": 1024, "gradient_checkpointing": True,
           "blocks_to_swap": 0, "frozen_gb": 2.5, "step_s": [1.0], "peak_rss_gb": 9.0}
    data = {"machine": "m", "torch": "t", "runs": [
        {**row, "precision": "bf16", "peak_gpu_gb": 9.1},
        {**row, "precision": "int8", "peak_gpu_gb": 7.5, "step_s": [1.2]},
        {"model": "flux-random", "resolution": 512, "precision": "nf4",
         "gradient_checkpointing": False, "blocks_to_swap": 0, "error": "CUDA out of memory"}]}
    lines = [line for line in memory_table.table(data).splitlines() if line.startswith("| ")][1:]
    assert "| 9.1 ✗ | 8.0 |" in lines[0] and "| 1.20 | 7.5 ✓ | 8.0 |" in lines[1]
    assert "failed: CUDA out of memory" in lines[2]
    assert memory_table.goal({"model": "flux-random", "resolution": 512, "precision": "int8"}) == 16.0
    assert memory_table.goal({"model": "flux-random", "resolution": 1024, "precision": "int8"}) is None


def test_memory_table_names_why_a_setting_failed():
    import memory_table

    assert memory_table.failure(-9, "warning: x\n") == "killed by SIGKILL (out of host memory?)"
    stderr = ("Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of "
              "memory\n[transformers] a warning printed at exit\n")
    assert memory_table.failure(1, stderr) == "torch.OutOfMemoryError: CUDA out of memory"
    assert memory_table.failure(1, "only a line\n") == "only a line"


def test_memory_table_settings_follow_the_checkpointing_asked():
    import memory_table

    assert memory_table.settings(["m"], [512], ["int8"], [4]) == [
        ("m", 512, "int8", False, 0), ("m", 512, "int8", True, 0), ("m", 512, "int8", True, 4)]
    assert memory_table.settings(["m"], [512], ["bf16", "nf4"], [], (True,)) == [
        ("m", 512, "bf16", True, 0), ("m", 512, "nf4", True, 0)]


def test_the_short_gpu_run_covers_every_goal_and_its_bf16_time():
    import memory_table

    chosen = memory_table.goal_settings()
    assert len(chosen) == len(set(chosen)) == 9
    for model, px, precision in memory_table.GOALS:
        want = ["bf16", "int8", "nf4"] if precision == "*" else ["bf16", precision]
        assert {(model, px, p, True, 0) for p in want} <= set(chosen)


def test_a_layer_built_in_nf4_leaves_no_bf16_copy_behind(monkeypatch):
    """nf4 replaces each Linear with bitsandbytes' layer: while the full
    transformer is built, the bf16 Linears already replaced must be gone
    (FLUX.1's are 24 GB; a build that kept them was killed for memory)."""
    import gc

    from diffusers import FluxTransformer2DModel

    import memory_table
    from lorabooth.models import quantise

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is torch.nn.Linear
                   and not o.weight.is_meta and o.weight.dtype == torch.bfloat16)

    counts, real = [], quantise.quantise_linear
    monkeypatch.setattr(quantise, "quantise_linear",
                        lambda *a: (real(*a), counts.append(alive())))
    config = SMALL_FLUX
    gc.collect()
    before = alive()  # earlier tests' models this process may still hold
    memory_table.streamed_transformer(FluxTransformer2DModel, config, "nf4")
    assert len(counts) > 10 and max(counts) - before <= 1, (before, counts)
