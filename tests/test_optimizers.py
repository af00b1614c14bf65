"""--optimizer, --lr-scheduler and --gradient-accumulation: each optimizer
resumes to the uninterrupted run's file, the schedules' learning rates are
diffusers' curves as the loop logs them, and N accumulated batches of one
equal one batch of N."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lorabooth.training.loop as T
from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME


def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                steps=4, seed=1, lr=1e-2, resolution=32, output=str(out))
    return TrainConfig(**{**base, **kw})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def _killed_after(monkeypatch, step: int) -> None:
    """The next run stops dead after ``step`` (its checkpoints written)."""
    real = T._maybe_checkpoint

    def dying(run, done):
        real(run, done)
        if done == step:
            raise Killed
    monkeypatch.setattr(T, "_maybe_checkpoint", dying)


RESUMED = {
    "adamw8bit": dict(optimizer="adamw8bit"),
    "adafactor": dict(optimizer="adafactor"),
    "prodigy": dict(optimizer="prodigy", lr=1.0),
    "schedulefree": dict(optimizer="schedulefree", lr_warmup_steps=2),
    "cosine": dict(lr_scheduler="cosine", lr_warmup_steps=1),
    "accumulation": dict(gradient_accumulation=2, lr_scheduler="linear"),
    "text encoder": dict(optimizer="prodigy", lr=1.0, lr_text=1.0, train_text_encoder=True,
                         batch_size=2),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_each_resumes_to_the_uninterrupted_file(case, photos, tmp_path, monkeypatch):
    """A run killed after step 3 and resumed from its step-2 checkpoint
    (optimizer state, schedule position, accumulation boundary) ends with the
    file, losses and learning rates of the run that was never stopped."""
    kw = dict(checkpoint_every=2, **RESUMED[case])
    full = train(_config(photos, tmp_path / "full", **kw))
    part = _config(photos, tmp_path / "part", resume=True, **kw)
    with monkeypatch.context() as m:
        _killed_after(m, 3)
        with pytest.raises(Killed):
            train(part)
    assert not (tmp_path / "part" / WEIGHT_NAME).exists()
    resumed = train(part)
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (case, k)
    moved = [k for k in a if "lora_B" in k or "lora.up" in k or "lora_up" in k]
    assert moved and all(a[k].abs().sum() > 0 for k in moved), case  # it did train
    for key in ("loss", "lr", "lr_text", "prodigy_d"):
        got, want = ([r.get(key) for r in _metrics(run)] for run in (resumed, full))
        assert got == (want if None in want else pytest.approx(want)), (case, key)
    card = (full / "README.md").read_text()
    assert f"| {kw.get('optimizer', 'adamw')}, {kw.get('lr_scheduler', 'constant')} " in card
    config = (full / "config.toml").read_text()
    assert f'optimizer = "{kw.get("optimizer", "adamw")}"' in config


def _cosine(step, warmup, steps):  # diffusers' get_cosine_schedule_with_warmup, written out
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def test_the_logged_learning_rates_follow_the_schedule(photos, tmp_path):
    """Each metrics line holds the rate its step used: warmup from 0, then
    the cosine to 0, the text encoder's on the same curve."""
    run = train(_config(photos, tmp_path / "r", steps=6, lr_scheduler="cosine",
                        lr_warmup_steps=2, train_text_encoder=True, lr_text=1e-3))
    rows = _metrics(run)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * _cosine(s, 2, 6) for s in range(6)])
    assert [r["lr_text"] for r in rows] == pytest.approx(
        [1e-3 * _cosine(s, 2, 6) for s in range(6)])
    assert rows[0]["lr"] == 0 and rows[2]["lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize("name, expected", [
    ("linear", [0, 0.5, 1, 2 / 3, 1 / 3, 0]),
    ("polynomial", [0, 0.5, 1, 4 / 9, 1 / 9, 0]),  # power 2, to diffusers' lr_end 1e-7
    ("constant_with_warmup", [0, 0.5, 1, 1, 1, 1]),
    ("constant", [1] * 6),
])
def test_schedule_factors(name, expected):
    from lorabooth.training.optimizers import build_optimizer, build_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer("adamw", [{"params": [p], "lr": 0.1}], 0.1)
    scheduler = build_scheduler(name, optimizer, 0 if name == "constant" else 2, 5, power=2.0)
    got = []
    for _ in range(6):
        got.append(scheduler.get_last_lr()[0] / 0.1)
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx(expected, abs=1e-5)


def test_default_is_todays_adamw_and_constant_schedule():
    from lorabooth.training.setup import setup_optimizer

    module = torch.nn.Linear(2, 2)
    module.lora_A = torch.nn.Linear(2, 1)  # what lora_parameters picks by name
    config = TrainConfig(instance_dir=".", instance_prompt="a photo of sks dog")
    optimizer, scheduler = setup_optimizer(config, {"unet": module})
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"], group["foreach"]
            ) == (5e-4, (0.9, 0.999), 1e-2, 1e-8, True)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert [scheduler.lr_lambdas[0](s) for s in (0, 1, 10**5)] == [1, 1, 1]


def test_accumulated_batches_equal_one_batch(tmp_path, monkeypatch):
    """Batch 4 against 4 accumulated batches of 1 that are its rows (the
    per-example draws taken from the batch-4 run: a batch draws its noise
    for all rows at once, so a run of batches of 1 draws other numbers).
    The gradient each optimizer step applies, clipped to a norm that bites,
    and the saved LoRA are the same within float tolerance."""
    photos = make_photos(tmp_path / "photos", 4)
    batches, grads = [], {"one": [], "accumulated": []}
    real_next = T._next_batch

    def recording(run):
        batches.append(real_next(run))
        return batches[-1]

    def rows(run):  # batch s's rows, one at a time, under this run's own model
        for b in list(batches):
            for j in range(len(b.idx)):
                bucket = run.examples.instance_bucket[b.idx[j]]
                yield T._Batch(idx=[b.idx[j]], cidx=[], denoiser=run.denoisers[bucket],
                               latents=b.latents[j:j + 1], noise=b.noise[j:j + 1],
                               timesteps=b.timesteps[j:j + 1], dropped=b.dropped[j:j + 1])

    def run(name, **kw):
        def hook(optimizer, args, kwargs):
            grads[name].append(torch.cat([p.grad.flatten() for g in optimizer.param_groups
                                          for p in g["params"]]).clone())
        handle = register_optimizer_step_pre_hook(hook)
        try:
            return train(_config(photos, tmp_path / name, steps=3, max_grad_norm=0.005, **kw))
        finally:
            handle.remove()

    with monkeypatch.context() as m:
        m.setattr(T, "_next_batch", recording)
        one = run("one", batch_size=4)
    replay = None

    def replaying(run):
        nonlocal replay
        replay = replay or rows(run)
        return next(replay)

    with monkeypatch.context() as m:
        m.setattr(T, "_next_batch", replaying)
        accumulated = run("accumulated", batch_size=1, gradient_accumulation=4)
    assert len(grads["one"]) == len(grads["accumulated"]) == 3  # one per optimizer step
    for g1, g4 in zip(grads["one"], grads["accumulated"]):
        assert g1.norm() == pytest.approx(0.005, rel=1e-4)  # clipping was on
        # float32 summation order, grown by the Adam steps before: within
        # 1e-4 of the step's largest gradient element
        assert torch.allclose(g1, g4, rtol=1e-4, atol=1e-4 * g1.abs().max().item())
    # the files within 3% of one step's lr: Adam divides each element's step
    # by that element's gradient size, so where a gradient is ~0 its last
    # bits (summed in another order) move the weight by a visible fraction of lr
    a, b = load_file(one / WEIGHT_NAME), load_file(accumulated / WEIGHT_NAME)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=3e-4), k
    assert [r["loss"] for r in _metrics(one)] == pytest.approx(
        [r["loss"] for r in _metrics(accumulated)], rel=1e-5)


def test_schedulefree_saves_its_averaged_weights(photos, tmp_path, on_finish):
    """The file holds the evaluation point (the optimizer in eval mode when
    it is written); a validation in between restores the training point bit
    for bit, so a run with validations ends with the same file."""
    modes = []
    on_finish(lambda config, base, modules: modes.extend(
        g["train_mode"] for g in seen[-1].param_groups))
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer))
    try:
        plain = train(_config(photos, tmp_path / "plain", optimizer="schedulefree"))
        validated = train(_config(photos, tmp_path / "validated", optimizer="schedulefree",
                                  validation_prompt="a photo of sks dog", validation_every=2))
    finally:
        handle.remove()
    assert modes == [False, False]
    optimizer = seen[-1]
    trained = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
    optimizer.train()  # the training point differs from what was saved
    assert any(not torch.equal(p, trained[id(p)]) for g in optimizer.param_groups
               for p in g["params"])
    a, b = load_file(plain / WEIGHT_NAME), load_file(validated / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, says", [
    (["--lr-warmup-steps", "5"], "--lr-warmup-steps: must be between 0 and --steps (2)"),
    (["--gradient-accumulation", "0"], "--gradient-accumulation: must be at least 1"),
    (["--lr-warmup-steps", "1"], "the constant schedule has no warmup"),
    (["--optimizer", "schedulefree", "--lr-scheduler", "cosine"],
     "--lr-scheduler: --optimizer schedulefree replaces the schedule"),
    (["--optimizer", "schedulefree", "--ema-decay", "0.9"], "--ema-decay: --optimizer schedulefree"),
    (["--lr-scheduler", "polynomial", "--lr-power", "0"], "--lr-power: must be a positive"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--gradient-accumulation", "257"], "--gradient-accumulation: at most 256"),
    (["--optimizer", "prodigy", "--train-text-encoder", "--lr-text", "0.5"],
     "--lr-text: --optimizer prodigy takes one learning rate"),
])
def test_bad_values_are_one_line(args, says, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                 "--steps", "2", "--output", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert "Traceback" not in err and not out.exists()


def test_prodigy_learning_rates():
    kw = dict(instance_dir=".", instance_prompt="a photo of sks dog", optimizer="prodigy")
    config = TrainConfig(**kw)
    assert (config.lr, config.lr_text, config.lr_token) == (1.0, 1.0, 1.0)
    assert TrainConfig(**kw, lr=0.5, lr_text=0.25).lr_text == 0.25  # given values stay
    assert TrainConfig(**kw, lr=0.5).lr == 0.5
    assert TrainConfig(instance_dir=".", instance_prompt="x").lr == 5e-4


def test_the_optional_libraries_load_only_when_chosen():
    """The CLI starts without any of them; the training loop loads the
    optimizers' own libraries only when one is chosen (peft itself imports
    bitsandbytes and torchao once they are installed)."""
    import subprocess
    import sys

    code = ("import sys, lorabooth.commands.cli; {}"
            "print(sorted(m for m in ('bitsandbytes', 'prodigyopt', 'schedulefree', 'torchao') "
            "if m in sys.modules))")
    for before, absent in (("", ("bitsandbytes", "prodigyopt", "schedulefree", "torchao")),
                           ("import lorabooth.training.loop; ", ("prodigyopt", "schedulefree"))):
        p = subprocess.run([sys.executable, "-c", code.format(before)], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and p.stdout.startswith("["), p.stderr[-2000:]
        assert not [m for m in absent if repr(m) in p.stdout], (before, p.stdout)


def test_resume_refuses_another_optimizer_even_with_force(photos, tmp_path, monkeypatch):
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        _killed_after(m, 2)
        with pytest.raises(Killed):
            train(_config(photos, out, checkpoint_every=1))
    with pytest.raises(UserError, match="cannot be loaded across a change of --optimizer"):
        train(_config(photos, out, checkpoint_every=1, resume=True, force=True,
                      optimizer="adamw8bit"))
