"""--adapter lokr|loha: peft's LoKr and LoHa, written in the LyCORIS key
layout ComfyUI and AUTOMATIC1111 read, each client's weight equal to peft's."""

import pytest
import torch

from helpers import tiny_outputs
from lorabooth.adapters.lora import TARGETS, add_text_lora, add_unet_lora, read_lora
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.clients import model_names, sd15_names, unloaded_by_client
from lorabooth.formats.layouts import convert_file, read_as_peft, save_lora
from lorabooth.formats.lycoris import modules as lycoris_modules
from lorabooth.models.loading import build_tiny, pipeline_from_parts


def comfyui_delta(parts: dict, alpha, shape) -> torch.Tensor:
    """ComfyUI's `calculate_weight` (comfy/weight_adapter/lokr.py, loha.py)
    and AUTOMATIC1111's `calc_updown` + `calc_scale` (network_lokr.py,
    network_hada.py, network.py), re-derived from their source: the weight a
    client adds at strength 1."""
    if "hada_w1_a" in parts:
        dim = parts["hada_w1_b"].shape[0]
        diff = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    else:
        dim = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            dim = parts["lokr_w1_b"].shape[0]
            w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts.get("lokr_w2")
        if w2 is None:
            dim = parts["lokr_w2_b"].shape[0]
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        diff = torch.kron(w1, w2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * diff.reshape(shape)


def _trained_looking(kind: str, alpha: float = 6.0, seed: int = 0):
    """The tiny model with ``kind`` on every UNet target (--targets all) and
    the text encoder, every adapter tensor random and non-zero."""
    base = build_tiny()
    add_unet_lora(base.unet, 4, alpha, False, TARGETS["all"], kind)
    add_text_lora(base.text_encoder, 4, alpha, False, kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (base.unet, base.text_encoder):
            for name, p in module.named_parameters():
                if "lokr_" in name or "hada_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base


@pytest.fixture(scope="module", params=["lokr", "loha"])
def lycoris_files(request, tmp_path_factory):
    kind = request.param
    base = _trained_looking(kind)
    folder = tmp_path_factory.mktemp(kind)
    save_lora(folder, base.unet, base.text_encoder, {}, ("diffusers", "kohya"))
    return kind, base, folder


def _layers(base):
    from peft.tuners.lycoris_utils import LycorisLayer

    for part, module in (("lora_unet_", base.unet), ("lora_te_", base.text_encoder)):
        for name, layer in module.named_modules():
            if isinstance(layer, LycorisLayer):
                yield part, name, layer


def test_every_clients_weight_is_peft_weight(lycoris_files):
    kind, base, folder = lycoris_files
    kohya, _ = read_lora(folder / KOHYA_WEIGHT_NAME)
    modules = lycoris_modules(kohya)
    checked, whole = 0, 0
    for prefix, name, layer in _layers(base):
        module = prefix + name.replace(".", "_")
        module = module.replace("lora_te_encoder_", "lora_te_text_model_encoder_")
        parts = modules[module]
        alpha = float(kohya[module + ".alpha"])
        ours = layer.get_delta_weight("default")
        theirs = comfyui_delta(parts, alpha, layer.get_base_layer().weight.shape)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7)
        checked += 1
        whole += "lokr_w1" in parts and "lokr_w2" in parts
    assert checked == len(modules) > 40
    if kind == "lokr":  # narrow layers: w1 and w2 whole, the scale folded into w1
        assert 0 < whole < checked


def test_every_key_loads_in_both_clients(lycoris_files):
    kind, _, folder = lycoris_files
    plain = build_tiny()
    names = model_names(plain.unet, plain.text_encoder)
    kohya, header = read_lora(folder / KOHYA_WEIGHT_NAME)
    assert unloaded_by_client(list(kohya), names) == {"ComfyUI": [], "AUTOMATIC1111": []}
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert any(k.startswith(conv + (".lokr_" if kind == "lokr" else ".hada_")) for k in kohya)
    # a module missing a matrix is no module type in AUTOMATIC1111 and no LoHa in ComfyUI
    broken = [k for k in kohya if not k.endswith(("w2_b", "lokr_w2"))]
    assert unloaded_by_client(broken, names)["AUTOMATIC1111"]


def test_lycoris_names_on_sd15_load_in_both_clients():
    """The key rules on SD 1.5's own names: LyCORIS parts after kohya names."""
    keys = []
    for module in ("lora_unet_down_blocks_0_resnets_0_conv1",
                   "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
                   "lora_te_text_model_encoder_layers_11_self_attn_v_proj"):
        keys += [f"{module}.{p}" for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha")]
    assert unloaded_by_client(keys, sd15_names()) == {"ComfyUI": [], "AUTOMATIC1111": []}


def test_generate_loads_the_diffusers_file_exactly(lycoris_files):
    """The diffusers file (peft's state dict) through lorabooth's loader: the
    pipeline computes what the trained modules computed."""
    from lorabooth.adapters.lora import fused, set_scales
    from lorabooth.formats.layouts import load_into_pipeline

    kind, base, folder = lycoris_files
    expected = tiny_outputs(pipeline_from_parts(base))
    pipe = pipeline_from_parts(build_tiny())
    plain = tiny_outputs(pipe)
    parts = load_into_pipeline(pipe, folder)
    assert parts == ("text_encoder",)
    set_scales(pipe, 1.0, 1.0, parts)
    for got, want, before in zip(tiny_outputs(pipe), expected, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, before)
    with fused(pipe, 1.0, 1.0, parts):  # generate draws fused
        for got, want in zip(tiny_outputs(pipe), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    set_scales(pipe, 0.0, 0.0, parts)
    for got, before in zip(tiny_outputs(pipe), plain):
        torch.testing.assert_close(got, before)


def test_reading_and_converting(lycoris_files, tmp_path, capsys):
    from lorabooth.commands.cli import main

    kind, _, folder = lycoris_files
    peft, rank, alpha, _ = read_as_peft(folder / WEIGHT_NAME)
    assert (rank, alpha) == (4, 6.0)
    again = convert_file(folder / WEIGHT_NAME, tmp_path / "k.safetensors", "kohya")
    assert read_lora(again)[0].keys() == read_lora(folder / KOHYA_WEIGHT_NAME)[0].keys()
    with pytest.raises(UserError, match="kohya"):
        convert_file(folder / KOHYA_WEIGHT_NAME, tmp_path / "d.safetensors", "diffusers")
    assert main(["inspect", str(folder / KOHYA_WEIGHT_NAME), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI (tiny): every key maps to a weight" in out
    assert "AUTOMATIC1111 (tiny): every key maps to a weight" in out
    # the module table counts LyCORIS modules as it counts LoRA ones
    from lorabooth.formats.lycoris import modules

    found = modules(read_lora(folder / KOHYA_WEIGHT_NAME)[0])
    unet = sum(m.startswith("lora_unet") for m in found)
    assert unet and f"modules: {unet} UNet, {len(found) - unet} text encoder" in out


@pytest.fixture(scope="module", params=["lokr", "loha"])
def lycoris_run(request, tmp_path_factory, session_photos):
    """A bf16 run of ``kind`` on every UNet target and the text encoder, 3
    steps with a checkpoint at 2; ``trained``: its trained parameters' dtypes."""
    import lorabooth.training.loop as t
    from lorabooth import TrainConfig, train

    kind, seen, real = request.param, {}, t._finish

    def spy(config, base, output, modules, resolution, *whole):
        seen["dtypes"] = {p.dtype for m in modules.values() for p in m.parameters()
                          if p.requires_grad}
        seen["frozen"] = {p.dtype for p in modules["unet"].parameters() if not p.requires_grad}
        real(config, base, output, modules, resolution, *whole)

    config = TrainConfig(
        model="tiny", instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
        steps=3, lr=1e-2, lr_text=1e-2, rank=2, alpha=4, resolution=32, adapter=kind,
        targets="all", train_text_encoder=True, mixed_precision="bf16", checkpoint_every=2,
        output=str(tmp_path_factory.mktemp(kind) / "run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(t, "_finish", spy)
        run = train(config)
    return kind, config, run, seen


def test_a_lycoris_run_trains_fp32_factors_and_records_its_options(lycoris_run):
    from lorabooth.adapters.lora import lora_metadata

    kind, _, run, seen = lycoris_run
    assert seen["dtypes"] == {torch.float32} and seen["frozen"] == {torch.bfloat16}
    peft, rank, alpha, header = read_as_peft(run / WEIGHT_NAME)
    assert (rank, alpha) == (2, 4.0)
    assert all(v.dtype == torch.float32 for v in peft.values())
    # the factor peft starts at zero has moved: the adapter is no longer a no-op
    zero = "lokr_w1" if kind == "lokr" else "hada_w2_a"
    assert any(k.endswith(zero) and v.abs().sum() > 0 for k, v in peft.items())
    assert lora_metadata(run)["adapter"] == kind and header["lorabooth.targets"] == '"all"'
    card = (run / "README.md").read_text()
    assert f"| adapter | {kind} |" in card and "| adapter targets | all |" in card
    assert "load_into_pipeline(pipe, " in card and "load_lora_weights" not in card
    assert f'adapter = "{kind}"' in (run / "config.toml").read_text()
    kohya, meta = read_lora(run / KOHYA_WEIGHT_NAME)
    plain = build_tiny()
    names = model_names(plain.unet, plain.text_encoder)
    assert unloaded_by_client(list(kohya), names) == {"ComfyUI": [], "AUTOMATIC1111": []}
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{kind}"' in meta["ss_network_args"]


def test_a_lycoris_run_resumes_exactly(lycoris_run, tmp_path):
    """Killed after step 2 (its checkpoint), resumed to 3: the same factors."""
    import shutil

    from lorabooth import TrainConfig, train

    kind, config, run, _ = lycoris_run
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(run / "checkpoints" / "step-000002", part / "checkpoints" / "step-000002")
    shutil.copy(run / "config.toml", part / "config.toml")
    resumed = train(TrainConfig(**{**vars(config), "output": str(part), "resume": True}))
    a, b = read_lora(run / WEIGHT_NAME)[0], read_lora(resumed / WEIGHT_NAME)[0]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(UserError, match="--targets"):
        train(TrainConfig(**{**vars(config), "output": str(part), "resume": True,
                             "targets": "attn", "steps": 4, "force": True}))


@pytest.mark.parametrize("change, option", [
    ({"blocks_to_swap": 1}, "--blocks-to-swap"), ({"base_precision": "int8"}, "--base-precision")])
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_options_lycoris_cannot_take_are_refused_in_one_line(kind, change, option):
    from lorabooth import TrainConfig

    with pytest.raises(UserError, match=f"{option}: does not work with --adapter {kind}") as e:
        TrainConfig(instance_dir="x", instance_prompt="a sks dog", adapter=kind, **change)
    assert "\n" not in str(e.value)


def test_flux_refuses_lycoris_before_training():
    from types import SimpleNamespace

    from lorabooth import TrainConfig
    from lorabooth.models.families import FAMILIES
    from lorabooth.training.setup import check_family_options

    config = TrainConfig(instance_dir="x", instance_prompt="a sks dog", adapter="lokr",
                         model="tiny-flux")
    base = SimpleNamespace(family=FAMILIES["flux1"])
    with pytest.raises(UserError, match="--adapter lokr: not supported for tiny-flux"):
        check_family_options(config, base)


def test_merge_refuses_lycoris_files(lycoris_files, tmp_path):
    from lorabooth.formats.merging import merge

    kind, _, folder = lycoris_files
    with pytest.raises(UserError, match="adapter cannot be merged"):
        merge([str(folder / WEIGHT_NAME), str(folder / WEIGHT_NAME)], [0.5, 0.5],
              out=str(tmp_path / "m.safetensors"))


def test_fuse_bakes_the_lycoris_weights_in(lycoris_run, tmp_path):
    """fuse: peft merges LoKr/LoHa into the base weights and removes the
    layers; the fused UNet computes what the loaded adapter computed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from lorabooth.adapters.lora import set_scales
    from lorabooth.formats.merging import fuse
    from lorabooth.generation import load_pipeline

    _, _, run, _ = lycoris_run
    pipe, parts = load_pipeline(run)
    set_scales(pipe, 1.0, 1.0, parts)
    want = tiny_outputs(pipe)
    out = fuse(run, tmp_path / "fused")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not any("lokr_" in k or "hada_" in k for k in unet.state_dict())
    pipe.unet = unet
    pipe.text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder")
    for got, expected in zip(tiny_outputs(pipe), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
