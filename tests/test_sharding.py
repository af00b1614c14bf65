"""FSDP for real: `accelerate launch --config_file examples/fsdp.yaml` with two
CPU processes (gloo), the denoiser sharded by torch's fully_shard (FSDP2).

What must hold: sharding changes where the weights live, not the
arithmetic. Each process draws the same streams as under DDP (``seed + rank``)
and the gradient is averaged over the two, so the sharded run trains the
data-parallel run's LoRA (tests/test_dataparallel.py pins that one against
the ranks' own losses), up to the order of float additions (reduce-scatter
against all-reduce: about 1e-7 here, where 3 steps move the weights by 1e-3).
The run uses --prior-preservation model, so the adapter is switched off and
on around a frozen forward of the sharded denoiser every step.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from lorabooth import TrainConfig, train
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME
from lorabooth.training.sharding import REFUSED, check_sharded, full_trainable
from test_dataparallel import BASE, TIMEOUT, _env, _free_port

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fsdp.yaml"
PRIOR = ["--prior-preservation", "model", "--class-prompt", "a photo of a dog"]


def _run(head: list[str], args: list[str]) -> str:
    """Run a 2-process launch to its end; returns its stderr (the ranks' log)."""
    proc = subprocess.Popen([*head, "-m", "lorabooth", "train", *BASE, *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the launch hung: {err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    return err


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_trains_the_data_parallel_lora(photos, tmp_path):
    args = ["--instance-dir", str(photos), "--steps", "3", "--batch-size", "1", *PRIOR]
    sharded, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    log = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port())], [*args, "--output", str(sharded)])
    # sharded for real: each process holds half the denoiser (the tiny UNet's 1.45 M)
    assert log.count("FSDP: unet's 1.45 M parameters sharded over 2 processes, 0.73 M in "
                     "this one") == 2, log[-3000:]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(_free_port())],
         [*args, "--output", str(ddp)])

    x, y = load_file(sharded / WEIGHT_NAME), load_file(ddp / WEIGHT_NAME)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], rtol=0, atol=1e-6), (k, (x[k] - y[k]).abs().max())
    for a, b in zip(_metrics(sharded), _metrics(ddp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    # step 1: the LoRA's B is zero, so the frozen (adapter off) prediction the
    # prior rows target is the trained (adapter on) one: the toggle works sharded
    assert _metrics(sharded)[0]["loss_prior"] < 1e-9
    # the file is the one-process run's kind: the same tensors by name and shape
    one = train(TrainConfig(model="tiny", instance_dir=str(photos), resolution=64, steps=1,
                            instance_prompt="a photo of sks dog", seed=0,
                            prior_preservation="model", class_prompt="a photo of a dog",
                            output=str(tmp_path / "one")))
    alone = load_file(one / WEIGHT_NAME)
    assert {k: v.shape for k, v in alone.items()} == {k: v.shape for k, v in x.items()}
    assert (sharded / "lora_kohya.safetensors").is_file()


def _sharded(version: int = 2) -> SimpleNamespace:
    """What check_sharded reads of an accelerator under FSDP."""
    plugin = SimpleNamespace(fsdp_version=version)
    return SimpleNamespace(distributed_type=DistributedType.FSDP,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def _config(photos, **kw) -> TrainConfig:
    return TrainConfig(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                       output=str(photos.parent / "run"), **kw)


@pytest.mark.parametrize("field, value", [
    ("checkpoint_every", 2), ("resume", True), ("ema_decay", 0.9),
    ("validation_prompt", "a photo of sks dog"), ("train_text_encoder", True),
    ("train_token", True)])
def test_a_sharded_run_refuses_what_needs_one_process_whole(photos, field, value):
    assert field in REFUSED
    config = _config(photos, **{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag}: not under FSDP"):
        check_sharded(config, _sharded())
    check_sharded(config, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP: fine


def test_a_sharded_run_refuses_fsdp1_and_class_images_it_would_draw(photos, tmp_path):
    check_sharded(_config(photos), _sharded())  # the plain run goes
    with pytest.raises(UserError, match="fsdp_version: 2"):
        check_sharded(_config(photos), _sharded(version=1))
    classes = tmp_path / "classes"
    config = _config(photos, prior_preservation="images", class_prompt="a photo of a dog",
                     class_dir=str(classes), num_class_images=2)
    with pytest.raises(UserError, match=f"^--class-dir {classes}: under FSDP"):
        check_sharded(config, _sharded())


def test_the_gathered_lora_is_what_the_file_holds():
    """``full_trainable`` of a model that is not sharded is its trainable
    parameters as they are; the file written from them (``states=``) is the
    file written from the module, and it is read from them, not the module."""
    from lorabooth.adapters.lora import UNET_TARGETS, add_unet_lora, freeze_all_but_lora
    from lorabooth.formats.layouts import module_lora
    from lorabooth.models.loading import build_tiny

    unet = build_tiny().unet
    add_unet_lora(unet, 4, 4.0, False, UNET_TARGETS)
    freeze_all_but_lora(unet)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: a file of zeros would match anything
    whole = full_trainable({"unet": unet})["unet"]
    assert whole.keys() == {n for n, p in unet.named_parameters() if p.requires_grad}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in whole.values())
    own, gathered = module_lora(unet, "unet"), module_lora(unet, "unet", state=whole)
    assert own.keys() == gathered.keys() and len(own) > 0
    assert all(torch.equal(own[k], gathered[k]) for k in own)
    key = next(k for k in whole if "lora_B" in k)
    whole[key] = whole[key] + 1
    changed = module_lora(unet, "unet", state=whole)
    assert sum(not torch.equal(own[k], changed[k]) for k in own) == 1
