"""Nothing lost, nothing confusing: kills at any point, locks, faults."""

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorabooth.training.loop as T
import lorabooth.training.steploss as S
from lorabooth import TrainConfig, train
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME
from lorabooth.training.checkpoint import latest_checkpoint, verify


def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                class_prompt="a photo of a dog", prior_preservation=True, num_class_images=4,
                class_draw_steps=2, class_draw_batch=1, steps=6, checkpoint_every=2, lr=1e-2,
                seed=3, output=str(out))
    return TrainConfig(**{**base, **kw})


# Each kill point: which function to patch in the child, and on which call to
# die (after writing half of what it was asked to write, where it writes).
KILLS = {
    "drawing class images": ("lorabooth.training.prior", "save_png", 3, "png"),
    "mid-training": ("lorabooth.training.steploss", "dreambooth_loss", 5, None),
    "writing a checkpoint": ("torch", "save", 2, "bytes"),  # the 2nd checkpoint (step 4)
    "writing the final weights": ("lorabooth.formats.layouts", "save_file", 1, "bytes"),
}

CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    from pathlib import Path
    module_name, attr, when, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import lorabooth.training.loop  # noqa: F401  (so every module below is loaded)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == when:
            if kind != "None":
                target = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f")
                Path(str(target) + ".partial" if kind == "png" else str(target)).write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, attr, dying)
    from lorabooth.commands.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _cli_args(config: TrainConfig) -> list[str]:
    return ["train", "--model", "tiny", "--instance-dir", config.instance_dir,
            "--instance-prompt", config.instance_prompt, "--class-prompt", config.class_prompt,
            "--prior-preservation", "--num-class-images", "4", "--class-draw-steps", "2",
            "--class-draw-batch", "1", "--steps", "6", "--checkpoint-every", "2", "--lr", "0.01",
            "--seed", "3", "--output", config.output]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, session_photos):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_config(session_photos, out))
    return load_file(out / WEIGHT_NAME)


@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_gives_the_uninterrupted_weights(point, reference, session_photos,
                                                             tmp_path):
    module, attr, when, kind = KILLS[point]
    config = _config(session_photos, tmp_path / "run")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = subprocess.run([sys.executable, str(script), module, attr, str(when), str(kind),
                        *_cli_args(config)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == -9, p.stderr[-2000:]  # really killed
    assert not (tmp_path / "run" / WEIGHT_NAME).exists() or point == "writing the final weights"
    resumed = train(TrainConfig(**{**config.__dict__, "resume": True}))  # takes over the stale lock
    got = load_file(resumed / WEIGHT_NAME)
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.allclose(got[k], reference[k], atol=1e-6), (point, k)
    leftovers = [p.name for p in resumed.rglob(".*") if p.name != ".lock"]
    assert leftovers == [], leftovers
    assert len(list((resumed / "class_images").glob("*.png"))) == 4


def test_second_writer_is_stopped_and_stale_lock_taken_over(photos, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(UserError, match=f"another lorabooth process \\(pid {sleeper.pid}\\)"):
            train(_config(photos, out, steps=1, prior_preservation=False))
    finally:
        sleeper.kill()
        sleeper.wait()
    train(_config(photos, out, steps=1, prior_preservation=False))  # the pid is dead now
    assert (out / WEIGHT_NAME).is_file() and not (out / ".lock").exists()


def test_resume_with_other_settings_names_them(photos, tmp_path):
    out = tmp_path / "run"
    train(_config(photos, out, steps=2, prior_preservation=False))
    with pytest.raises(UserError) as e:
        train(_config(photos, out, steps=4, prior_preservation=False, resume=True, lr=5e-3,
                      rank=8))
    assert "--lr 0.01 -> 0.005" in str(e.value) and "--rank 4 -> 8" in str(e.value)
    assert "--force" in str(e.value)
    train(_config(photos, out, steps=4, prior_preservation=False, resume=True, lr=5e-3,
                  force=True))


def test_resume_skips_a_checkpoint_that_does_not_verify(photos, tmp_path, caplog):
    out = tmp_path / "run"
    train(_config(photos, out, steps=5, prior_preservation=False))
    newest = out / "checkpoints" / "step-000004"
    assert verify(newest)
    data = bytearray((newest / "lora.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newest / "lora.safetensors").write_bytes(bytes(data))
    assert not verify(newest)
    assert latest_checkpoint(out) == out / "checkpoints" / "step-000002"
    assert any("does not verify" in r.getMessage() for r in caplog.records)


def test_nan_stops_at_that_step_and_keeps_the_last_good_checkpoint(photos, tmp_path, monkeypatch):
    real = S.dreambooth_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        total, inst, prior = real(*args, **kwargs)
        return (total * float("nan"), inst, prior) if calls["n"] == 3 else (total, inst, prior)

    monkeypatch.setattr(S, "dreambooth_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(_config(photos, out, prior_preservation=False, mixed_precision="fp16"))
    msg = str(e.value)
    assert msg.startswith("step 3: the loss is nan") and "Lower --lr" in msg
    assert "bf16 instead of fp16" in msg and "step-000002" in msg
    assert verify(out / "checkpoints" / "step-000002") and not (out / WEIGHT_NAME).exists()


def test_inf_in_the_weights_is_caught(photos, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def bad_step(self, *a, **k):
        out = real_step(self, *a, **k)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", bad_step)
    with pytest.raises(UserError, match="step 1: the LoRA weights hold NaN or inf"):
        train(_config(photos, tmp_path / "run", prior_preservation=False))


def test_out_of_memory_is_one_line_of_advice(photos, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(T, "text_context", oom)
    with pytest.raises(UserError, match="out of memory; lower --batch-size"):
        train(_config(photos, tmp_path / "run", prior_preservation=False))
    monkeypatch.setattr(T, "text_context", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(UserError, match="out of memory"):
        train(_config(photos, tmp_path / "run2", prior_preservation=False))
    # the CPU allocator's failure is a plain RuntimeError; any other one is a bug, not advice
    for message, raised in (("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                             "1099511627776 bytes", UserError), ("shapes do not match", RuntimeError)):
        monkeypatch.setattr(T, "text_context",
                            lambda *a, m=message, **k: (_ for _ in ()).throw(RuntimeError(m)))
        with pytest.raises(raised, match="out of memory" if raised is UserError else message):
            train(_config(photos, tmp_path / "run3", prior_preservation=False))


def test_disk_full_while_checkpointing_keeps_the_previous_one(photos, tmp_path, monkeypatch):
    import lorabooth.training.checkpoint as ck
    real = ck.torch.save
    calls = {"n": 0}

    def full(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(_config(photos, out, prior_preservation=False))
    assert "step 4: could not write the checkpoint (No space left on device)" in str(e.value)
    assert "step-000002 is intact" in str(e.value)
    assert verify(out / "checkpoints" / "step-000002")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nothing_written_outside_output_and_class_dir(photos, tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    before = _tree_digest(photos)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "lorabooth", "train", "--model", "tiny",
                        "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                        "--class-prompt", "a photo of a dog", "--prior-preservation",
                        "--num-class-images", "2", "--class-draw-steps", "2", "--steps", "2",
                        "--class-dir", str(tmp_path / "cls"), "--output", str(tmp_path / "out")],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert list(cwd.iterdir()) == [] and list(home.rglob("*")) == []
    assert _tree_digest(photos) == before  # the photos are never modified
    assert sorted(q.name for q in tmp_path.iterdir()) == ["cls", "cwd", "home", "out", "photos"]


def test_resume_reads_a_run_saved_when_prior_preservation_was_a_bool(tmp_path):
    import tomli_w

    from lorabooth.config import to_toml_dict
    from lorabooth.training.runfiles import check_resume_config

    config = _config(tmp_path / "photos", tmp_path, resume=True)  # prior_preservation=True
    old = {**to_toml_dict(config), "prior_preservation": True}  # as runs before the modes wrote it
    (tmp_path / "config.toml").write_text(tomli_w.dumps(old))
    check_resume_config(tmp_path, config)  # "images" is what true meant: no change
    with pytest.raises(UserError, match="--prior-preservation 'images' -> 'model'"):
        check_resume_config(tmp_path, _config(tmp_path / "photos", tmp_path, resume=True,
                                              prior_preservation="model"))
