"""DoRA (`--adapter dora`): peft's weight-decomposed LoRA, trained, saved in
the one spelling plain diffusers loads, and refused where it cannot be
written or combined correctly."""

import json
import logging

import pytest
import tomli_w
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from helpers import tiny_outputs
from lorabooth.adapters.lora import (
    KOHYA_WEIGHT_NAME,
    WEIGHT_NAME,
    add_unet_lora,
    freeze_all_but_lora,
    lora_metadata,
    lora_parameters,
    read_lora,
)
from lorabooth.commands.cli import main
from lorabooth.config import TrainConfig, build_config, to_toml_dict
from lorabooth.formats.layouts import convert_file, read_as_peft
from lorabooth.models.loading import build_tiny, pipeline_from_parts
from lorabooth.training.runfiles import check_resume_config

PROMPT = "a photo of sks dog"


def dora_weight(w, a, b, m, scale):
    """DoRA's merged weight (Liu et al. 2024): the LoRA-updated weight, each
    output row (the axis of `m`) normalised and rescaled by its magnitude.
    w (out, in), a (r, in), b (out, r), m (out,)."""
    v = w + scale * b @ a
    return m[:, None] * v / v.norm(dim=1, keepdim=True)


def test_peft_dora_layer_is_the_row_normalised_weight():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True,
                                       init_lora_weights="gaussian"), layer)
    lin = layer[0]
    w = lin.base_layer.weight.detach()
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), x @ w.T, atol=1e-6)  # a no-op at init: m = ||w|| per row
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        lin.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 2, 5))
    merged = dora_weight(w, lin.lora_A["default"].weight, lin.lora_B["default"].weight,
                         lin.lora_magnitude_vector["default"].weight, 4 / 2).detach()
    assert torch.allclose(layer(x), x @ merged.T, atol=1e-5)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, session_photos):
    """A DoRA run on UNet and text encoder, alpha != rank, from a TOML file
    plus a command-line option; ``ours`` holds the trained model's outputs
    and the names of its trained parameters."""
    import lorabooth.training.loop as t

    tmp = tmp_path_factory.mktemp("dora")
    (tmp / "c.toml").write_text(f'adapter = "dora"\ninstance_dir = "{session_photos}"\n'
                                f'instance_prompt = "{PROMPT}"\nsteps = 3\nlr = 0.02\n'
                                f'lr_text = 0.02\nrank = 2\nalpha = 4\nresolution = 32\n'
                                f'checkpoint_every = 2\n')
    ours, real = {}, t._finish

    def spy(config, base, output, modules, resolution, *whole):
        ours["outputs"] = tiny_outputs(pipeline_from_parts(base))
        ours["trained"] = {n for m in modules.values() for n, p in m.named_parameters()
                           if p.requires_grad}
        real(config, base, output, modules, resolution, *whole)

    with pytest.MonkeyPatch.context() as mp, _logs() as said:
        mp.setattr(t, "_finish", spy)
        code = main(["train", "--config", str(tmp / "c.toml"), "--train-text-encoder",
                     "--output", str(tmp / "run")])
    assert code == 0
    ours["log"] = said
    return tmp / "run", ours


class _logs:
    def __enter__(self):
        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = lambda r: self.records.append(r.getMessage())
        logging.getLogger("lorabooth").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc):
        logging.getLogger("lorabooth").removeHandler(self.handler)


def test_dora_trains_its_magnitudes_and_records_the_option(dora_run):
    run, ours = dora_run
    magnitudes = {n for n in ours["trained"] if "lora_magnitude_vector" in n}
    assert any(n.startswith("encoder.") or "text" in n for n in magnitudes)  # text encoder too
    assert len(magnitudes) == 48 + 20 and all("lora_" in n for n in ours["trained"])
    assert build_config(TrainConfig, run / "config.toml", {}).adapter == "dora"
    assert "| adapter | dora |" in (run / "README.md").read_text()
    assert lora_metadata(run)["adapter"] == "dora"
    assert not (run / KOHYA_WEIGHT_NAME).exists()  # save_format both -> diffusers only
    assert sum("--adapter dora: writing the diffusers file only" in m for m in ours["log"]) == 1
    checkpoint, _ = read_lora(run / "checkpoints" / "step-000002" / "lora.safetensors")
    assert len([k for k in checkpoint if "lora_magnitude_vector" in k]) == 68  # resume keeps them


def test_dora_magnitudes_moved_from_the_base_row_norms(dora_run):
    run, _ = dora_run
    tensors, _ = read_lora(run / WEIGHT_NAME)
    base = build_tiny().unet.state_dict()
    key = next(k for k in tensors if k.endswith("attn2.to_k.lora_magnitude_vector.weight"))
    module = key.removeprefix("unet.").removesuffix(".lora_magnitude_vector.weight")
    norms = base[module + ".weight"].norm(dim=1)
    assert tensors[key].shape == norms.shape and not torch.allclose(tensors[key], norms)


def test_plain_diffusers_loads_the_dora_file_exactly(dora_run):
    run, ours = dora_run
    pipe = pipeline_from_parts(build_tiny())
    StableDiffusionPipeline.load_lora_weights(pipe, str(run), weight_name=WEIGHT_NAME)
    assert pipe.unet.peft_config["default_0"].use_dora
    unet, text = tiny_outputs(pipe)
    base_unet, base_text = tiny_outputs(pipeline_from_parts(build_tiny()))
    assert not torch.allclose(unet, base_unet, atol=1e-4)
    assert not torch.allclose(text, base_text, atol=1e-4)
    assert torch.allclose(unet, ours["outputs"][0], atol=1e-5)
    assert torch.allclose(text, ours["outputs"][1], atol=1e-5)


def test_lorabooth_readers_take_the_dora_file(dora_run, tmp_path, capsys):
    from lorabooth.generation import generate, load_pipeline

    run, ours = dora_run
    pipe, has_text = load_pipeline(run)
    assert has_text
    unet, text = tiny_outputs(pipe)
    assert torch.allclose(unet, ours["outputs"][0], atol=1e-5)
    assert torch.allclose(text, ours["outputs"][1], atol=1e-5)
    assert len(generate(run, ["a dog"], num_images=1, steps=2)) == 1
    assert main(["inspect", str(run / WEIGHT_NAME)]) == 0
    assert "dora" in capsys.readouterr().out


def test_dora_converts_to_peft_and_back(dora_run, tmp_path):
    run, _ = dora_run
    original, header = read_lora(run / WEIGHT_NAME)
    assert json.loads(header["lora_adapter_metadata"])["unet.use_dora"] is True
    peft = convert_file(run / WEIGHT_NAME, tmp_path / "p.safetensors", "peft")
    assert any(k.endswith(".lora_magnitude_vector") for k in read_lora(peft)[0])
    back = convert_file(peft, tmp_path / "d.safetensors", "diffusers")
    again = read_lora(back)[0]
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)
    tensors, rank, alpha, _ = read_as_peft(back)
    assert (rank, alpha) == (2, 4.0)
    assert len([k for k in tensors if k.endswith(".lora_magnitude_vector")]) == 68


def test_fuse_bakes_the_dora_weight_in(dora_run, tmp_path):
    run, ours = dora_run
    assert main(["fuse", str(run), "--out", str(tmp_path / "fused")]) == 0
    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "fused"))
    unet, text = tiny_outputs(fused)
    assert torch.allclose(unet, ours["outputs"][0], atol=1e-4)
    assert torch.allclose(text, ours["outputs"][1], atol=1e-4)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def test_dora_refusals_are_one_line(dora_run, tmp_path, capsys):
    run, _ = dora_run
    src = run / WEIGHT_NAME
    assert main(["convert", str(src), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 2
    line = _one_error(capsys)
    assert str(src) in line and "no kohya export" in line
    assert not (tmp_path / "k.safetensors").exists()
    assert main(["merge", str(run), str(run), "--out", str(tmp_path / "m.safetensors")]) == 2
    line = _one_error(capsys)
    assert str(src) in line and "DoRA adapter cannot be merged" in line
    tensors, _ = read_lora(src)
    kohya = {"lora_unet_a_b.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_a_b.lora_up.weight": torch.zeros(4, 2),
             "lora_unet_a_b.dora_scale": torch.ones(1, 4)}
    save_file(kohya, tmp_path / "kd.safetensors")
    assert main(["convert", str(tmp_path / "kd.safetensors"), str(tmp_path / "o.safetensors"),
                 "--to", "diffusers"]) == 2
    assert "kohya DoRA file (dora_scale)" in _one_error(capsys)


def test_lora_parameters_include_the_magnitude():
    unet = build_tiny().unet
    add_unet_lora(unet, 2, 2.0, dora=True)
    freeze_all_but_lora(unet)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in names) == 48
    assert len(lora_parameters(unet)) == len(names) == 48 * 3


def test_a_run_from_before_the_option_resumes_as_lora(tmp_path, caplog):

    config = TrainConfig(instance_dir="x", instance_prompt=PROMPT, output=str(tmp_path),
                         resume=True)
    old = {k: v for k, v in to_toml_dict(config).items() if k != "adapter"}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(old))
    check_resume_config(tmp_path, config)  # no "--adapter None -> 'lora'" refusal
    assert "--adapter" not in caplog.text
    with pytest.raises(Exception, match="change of --adapter, even with --force"):
        check_resume_config(tmp_path, TrainConfig(**{**vars(config), "adapter": "dora",
                                                     "force": True}))


@pytest.mark.parametrize("fuse", [False, True])
def test_scale_0_is_the_base_model_not_the_trained_magnitudes(dora_run, fuse):
    """peft multiplies only DoRA's low-rank term by the scale; its trained
    magnitudes would still act at 0. lorabooth switches a component at 0 off,
    so each part at 0 is the base model's, the other part the trained one."""
    from contextlib import nullcontext

    from lorabooth.adapters.lora import fused, set_scales
    from lorabooth.generation import load_pipeline

    run, ours = dora_run
    pipe, has_text = load_pipeline(run)
    base_unet, base_text = tiny_outputs(pipeline_from_parts(build_tiny()))
    for unet_scale, text_scale in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)):
        if fuse:
            scaled = fused(pipe, unet_scale, text_scale, has_text)
        else:
            set_scales(pipe, unet_scale, text_scale, has_text)
            scaled = nullcontext()
        with scaled:
            unet, text = tiny_outputs(pipe)
        want_unet = base_unet if unet_scale == 0 else ours["outputs"][0]
        want_text = base_text if text_scale == 0 else ours["outputs"][1]
        assert torch.allclose(unet, want_unet, atol=1e-5), (unet_scale, text_scale)
        assert torch.allclose(text, want_text, atol=1e-5), (unet_scale, text_scale)
