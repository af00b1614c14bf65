"""--base-precision: the frozen base stored quantised (int8/fp8 through
torchao, nf4 through bitsandbytes) under an fp32 LoRA; the file it saves is
the same kind as a bf16 run's and loads on the unquantised base."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lorabooth.adapters.lora import add_unet_lora, freeze_all_but_lora, lora_metadata
from lorabooth.commands.cli import main
from lorabooth.config import TrainConfig
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME
from lorabooth.models import quantise
from lorabooth.models.loading import build_tiny, load_base, save_base
from lorabooth.models.quantise import (
    frozen_bytes,
    is_plain_linear,
    keep_out_of_ddp,
    quantise_base,
    quantise_module,
)
from lorabooth.training import loop
from lorabooth.training.runfiles import check_resume_config

PROMPT = "a photo of sks dog"


def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt=PROMPT, steps=2, seed=0,
                mixed_precision="bf16", output=str(out))
    return TrainConfig(**{**base, **kw})


def _plain_linears(module) -> int:
    """Unquantised Linears of the base (the LoRA's own are plain)."""
    return sum(is_plain_linear(m) for n, m in module.named_modules() if "lora_" not in n)


def test_frozen_bytes_shrink_with_the_precision():
    sizes = {}
    for precision in ("fp32", "bf16", "int8", "nf4"):
        unet = build_tiny().unet
        if precision != "fp32":
            unet.to(torch.bfloat16)
        quantise_module(unet, precision)
        sizes[precision] = frozen_bytes(unet)
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert sizes["bf16"] * 2 == sizes["fp32"]
    params = sum(p.numel() for p in build_tiny().unet.parameters())
    assert sizes["fp32"] == 4 * params
    # the LoRA's weights are not frozen: they are left out
    unet = build_tiny().unet
    add_unet_lora(unet, 4, 4.0)
    assert frozen_bytes(unet) == sizes["fp32"]


@pytest.mark.parametrize("precision,tolerance", [("int8", 0.02), ("fp8", 0.1), ("nf4", 0.15)])
def test_a_quantised_linear_computes_its_weight_and_follows_autocast(precision, tolerance):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).to(torch.bfloat16)
    x = torch.randn(5, 64)
    want = x @ model[0].weight.float().T + model[0].bias.float()
    assert quantise_module(model, precision) == 1
    assert not is_plain_linear(model[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)  # an fp32 input, as autocast hands a plain Linear
    assert got.dtype == torch.bfloat16  # what the next bf16 layer expects
    assert ((got.float() - want).norm() / want.norm()).item() < tolerance
    assert quantise_module(model, precision) == 0  # nothing plain is left to quantise


@pytest.mark.parametrize("precision", ["int8", "fp8", "nf4"])
def test_the_backward_keeps_the_quantised_weight_not_a_dequantised_copy(precision):
    """What autograd keeps of a quantised Linear for the backward is its
    input, not a bf16 copy of its weight (torchao's own dispatch kept one per
    layer: a whole bf16 copy of the base's Linears by the end of a forward);
    the input's gradient is still x's through the dequantised weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=True)).to(torch.bfloat16)
    model.requires_grad_(False)
    plain = model[0].weight.detach().clone()
    quantise_module(model, precision)
    saved = []
    x = torch.randn(4, 512, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = model(x)
    assert sum(saved) < plain.numel() * plain.element_size() / 10  # measured: 0 against 512 kB
    g = torch.randn_like(y)
    y.backward(g)
    want = g.float() @ plain.float()
    assert ((x.grad.float() - want).norm() / want.norm()).item() < 0.15


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_peft_trains_lora_and_dora_on_the_quantised_unet(precision):
    for dora in (False, True):
        unet = build_tiny().unet.to(torch.bfloat16)
        quantise_module(unet, precision)
        add_unet_lora(unet, 4, 4.0, dora)
        freeze_all_but_lora(unet)
        x = torch.randn(1, 4, 32, 32, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, torch.tensor([10]), torch.randn(1, 77, 32, dtype=torch.bfloat16)).sample
        out.float().pow(2).mean().backward()
        trained = [p for n, p in unet.named_parameters() if "lora_" in n]
        assert trained and all(p.grad is not None for p in trained)
        assert any("magnitude" in n for n, _ in unet.named_parameters()) == dora


def test_ddp_leaves_the_quantised_weights_alone():
    unet = build_tiny().unet
    keep_out_of_ddp(unet)
    assert not hasattr(unet, "_ddp_params_and_buffers_to_ignore")  # auto: DDP syncs all
    count = quantise_module(unet, "int8")
    add_unet_lora(unet, 4, 4.0)
    ignored = keep_out_of_ddp(unet)._ddp_params_and_buffers_to_ignore
    assert len(ignored) == count and not [n for n in ignored if "lora_" in n]
    assert all(n.endswith(".weight") for n in ignored)


def test_a_denoiser_without_linear_layers_is_refused():
    base = SimpleNamespace(name="convs", unet=torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)))
    with pytest.raises(UserError, match="--base-precision int8: convs's denoiser has no linear"):
        quantise_base(base, "int8", torch.float32, ("unet",))
    quantise_base(base, "auto", torch.float32, ("unet",))  # today's behaviour: nothing checked


def test_a_folder_streams_in_quantised_one_linear_at_a_time(tmp_path, monkeypatch):
    folder = save_base(build_tiny(), tmp_path / "base")
    real = quantise.streamed_quantiser
    most = []

    def spy(precision):
        after = real(precision)
        if after is None:  # auto: nothing to quantise
            return None

        def check(model, key):
            after(model, key)
            most.append(sum(is_plain_linear(m) for m in model.modules()))
        return check
    monkeypatch.setattr(quantise, "streamed_quantiser", spy)
    quantised = load_base(str(folder), unet_dtype=torch.bfloat16, precision="int8").unet
    assert most and max(most) <= 1  # a weight waits for its bias at most, then is quantised
    assert _plain_linears(quantised) == 0
    plain = load_base(str(folder), unet_dtype=torch.bfloat16).unet
    assert frozen_bytes(quantised) < frozen_bytes(plain)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = quantised(x, t, ctx).sample.float(), plain(x, t, ctx).sample.float()
    assert ((a - b).norm() / b.norm()).item() < 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_photos):
    """2-step runs on tiny with the text encoder trained: bf16, int8, nf4."""
    root = tmp_path_factory.mktemp("quantised")
    return {p: loop.train(_config(module_photos, root / p, base_precision=p,
                                  train_text_encoder=True))
            for p in ("auto", "int8", "nf4")}


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_the_lora_file_is_a_bf16_runs_and_draws_on_the_plain_base(runs, precision, tmp_path):
    bf16, run = load_file(runs["auto"] / WEIGHT_NAME), load_file(runs[precision] / WEIGHT_NAME)
    assert run.keys() == bf16.keys()
    assert any(k.startswith("text_encoder.") for k in run)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in run.values())
    assert any(not torch.equal(run[k], bf16[k]) for k in run)  # another base, other steps
    assert lora_metadata(runs[precision])["base_precision"] == precision
    assert "base_precision" not in lora_metadata(runs["auto"])  # unchanged files for others
    assert f'base_precision = "{precision}"' in (runs[precision] / "config.toml").read_text()
    assert f"(--base-precision) | {precision} |" in (runs[precision] / "README.md").read_text()
    out = tmp_path / "gen"  # the normal generate path: the base loads unquantised
    assert main(["generate", str(runs[precision]), "--prompt", PROMPT, "--num-images", "1",
                 "--steps", "2", "--output", str(out)]) == 0
    assert [p for p in out.rglob("*.png") if p.name != "grid.png"]


def test_an_int8_run_resumes_exactly(module_photos, tmp_path):
    kw = dict(base_precision="int8", checkpoint_every=2, lr=1e-2)
    full = loop.train(_config(module_photos, tmp_path / "full", steps=4, **kw))
    loop.train(_config(module_photos, tmp_path / "part", steps=3, **kw))  # checkpoint at 2
    resumed = loop.train(_config(module_photos, tmp_path / "part", steps=4, resume=True, **kw))
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (full, resumed)]
    assert losses[0] == losses[1]
    # the option is part of the settings a resume compares
    with pytest.raises(UserError, match="--base-precision"):
        check_resume_config(resumed, _config(module_photos, resumed, steps=6, resume=True,
                                             checkpoint_every=2, lr=1e-2))


@pytest.mark.parametrize("model,precision", [("tiny-sdxl", "int8"), ("tiny-sdxl", "nf4"),
                                             ("tiny-flux2", "int8"), ("tiny-flux2", "nf4")])
def test_sdxl_and_flux_train_on_a_quantised_base(model, precision, module_photos, tmp_path,
                                                 on_finish):
    seen = {}

    def look(config, base, modules):
        resident = [getattr(base, n) for n in ("unet", *base.family.encoders)
                    if getattr(base, n) is not None]
        seen["plain"] = sum(_plain_linears(m) for m in resident)
        seen["resident"] = len(resident)
        seen["lora"] = {p.dtype for m in modules.values() for n, p in m.named_parameters()
                        if "lora_" in n}
    on_finish(look)
    sdxl = model == "tiny-sdxl"  # its two text encoders trained: resident, quantised under LoRA
    run = loop.train(_config(module_photos, tmp_path / "run", model=model, resolution=32,
                             base_precision=precision, class_prompt="a photo of a dog",
                             train_text_encoder=sdxl))
    assert seen == {"plain": 0, "resident": 3 if sdxl else 1, "lora": {torch.float32}}
    tensors = load_file(run / WEIGHT_NAME)
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.startswith("text_encoder_2.") for k in tensors) == sdxl
    assert lora_metadata(run)["base_precision"] == precision
