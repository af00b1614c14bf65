"""FLUX.1 and FLUX.2 [klein] LoRA files (lorabooth.formats.flux): the
diffusers file and kohya's fused-qkv file of a LoRA on a tiny transformer
round-trip exactly, the fused file applied as the clients apply it equals
the separate LoRAs, and diffusers' own loaders read both files into the
same model output as the peft model's."""

import pytest
import torch
from peft import LoraConfig

from lorabooth.adapters.lora import read_lora
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.flux import FLUX1, FLUX2, from_bfl_kohya, target_modules
from lorabooth.formats.layouts import convert_file, module_lora, read_as_peft, save_lora

RANK, ALPHA = 4, 6.5  # alpha / rank not a power of two: a dropped alpha would show


def tiny_transformer(family: str):
    """diffusers' own test configs (tests/models/transformers)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    torch.manual_seed(0)
    if family == FLUX1:
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8])
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4])


def inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = 3 if family == FLUX1 else 4
    out = {"hidden_states": torch.randn(1, 16, 4, generator=g),
           "encoder_hidden_states": torch.randn(1, 8, 32 if family == FLUX1 else 16, generator=g),
           "timestep": torch.tensor([0.5]), "img_ids": torch.randn(16, ids, generator=g),
           "txt_ids": torch.zeros(8, ids), "return_dict": False}
    if family == FLUX1:
        out["pooled_projections"] = torch.randn(1, 32, generator=g)
    else:
        out["guidance"] = torch.tensor([3.0])
    return out


def with_lora(family: str, mlp: bool = False, targets: str | None = None):
    model = tiny_transformer(family)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                 target_modules=targets or target_modules(family, mlp)))
    torch.manual_seed(2)
    with torch.no_grad():  # random A and B: an untrained B of zeros would hide a swap
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=[(FLUX1, False), (FLUX1, True), (FLUX2, False),
                                        (FLUX2, True)], ids=["flux1", "flux1-mlp", "flux2",
                                                              "flux2-mlp"])
def run(request, tmp_path_factory):
    family, mlp = request.param
    model = with_lora(family, mlp)
    folder = tmp_path_factory.mktemp(family)
    save_lora(folder, model, None, {}, ("diffusers", "kohya"), family=family)
    return family, model, folder


def test_targets_are_the_attention_projections_and_optionally_the_mlps(run):
    family, model, _ = run
    modules = {k.rsplit(".lora_", 1)[0] for k in module_lora(model, "transformer")}
    assert "transformer.transformer_blocks.0.attn.add_v_proj" in modules
    assert "transformer.transformer_blocks.0.attn.to_out.0" in modules
    single = {m.split("single_transformer_blocks.0.")[1] for m in modules if "single_" in m}
    mlp = "transformer.transformer_blocks.0.ff_context." + (
        "net.2" if family == FLUX1 else "linear_out") in modules
    if family == FLUX1:
        assert single == ({"attn.to_q", "attn.to_k", "attn.to_v"}
                          | ({"proj_mlp", "proj_out"} if mlp else set()))
    else:
        assert single == {"attn.to_qkv_mlp_proj", "attn.to_out"}


def test_kohya_names_are_bfl_names_over_the_fused_weights(run):
    family, _, folder = run
    kohya, header = read_lora(folder / KOHYA_WEIGHT_NAME)
    modules = {k.split(".")[0] for k in kohya}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
            "lora_unet_single_blocks_0_linear1"} <= modules
    assert header["lorabooth.family"] == f'"{family}"' or header["lorabooth.family"] == family
    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert qkv.shape == (3 * RANK, 32)  # rank concatenation
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * ALPHA
    assert float(kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == ALPHA
    linear1 = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape[0] == (7 * 32 if family == FLUX1 else 9 * 32)


def test_both_files_read_back_exactly(run, tmp_path):
    family, model, folder = run
    want = module_lora(model, "transformer")
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        peft, rank, alpha, _ = read_as_peft(folder / name)
        assert (rank, alpha) == (RANK, ALPHA), name
        assert set(peft) == set(want), name
        assert all(torch.equal(peft[k], want[k]) for k in want), name
    # convert: kohya -> diffusers -> kohya, bit for bit
    back = convert_file(folder / KOHYA_WEIGHT_NAME, tmp_path / "d.safetensors", "diffusers")
    again = convert_file(back, tmp_path / "k.safetensors", "kohya")
    first, second = read_lora(folder / KOHYA_WEIGHT_NAME)[0], read_lora(again)[0]
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert read_lora(back)[1]["lorabooth.family"].strip('"') == family


def _bfl_weights(family: str, model) -> dict[str, torch.Tensor]:
    """The tiny model's fused weights as BFL stores them (no LoRA)."""
    sd = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
          if "lora_" not in k}
    d, s = "transformer_blocks.0.attn.", "single_transformer_blocks.0."
    out = {"double_blocks.0.img_attn.qkv": torch.cat([sd[d + f"to_{p}.weight"] for p in "qkv"]),
           "double_blocks.0.txt_attn.qkv": torch.cat([sd[d + f"add_{p}_proj.weight"] for p in "qkv"]),
           "double_blocks.0.img_attn.proj": sd[d + "to_out.0.weight"]}
    out["single_blocks.0.linear1"] = (
        torch.cat([sd[s + f"attn.to_{p}.weight"] for p in "qkv"] + [sd[s + "proj_mlp.weight"]])
        if family == FLUX1 else sd[s + "attn.to_qkv_mlp_proj.weight"])
    return out


def test_the_fused_file_as_the_clients_apply_it_equals_the_separate_loras(run):
    """W + up @ down * alpha / rank(down) on BFL's fused weight (ComfyUI,
    sd-scripts) against the merged diffusers model's separate weights."""
    family, model, folder = run
    kohya, _ = read_lora(folder / KOHYA_WEIGHT_NAME)
    base = _bfl_weights(family, model)
    model.fuse_lora()  # merge: the base layers now hold W + B @ A * alpha / r
    try:
        merged = _bfl_weights(family, model)
    finally:
        model.unfuse_lora()
    for bfl, weight in base.items():
        name = "lora_unet_" + bfl.replace(".", "_")
        down, up = kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"]
        applied = weight + up @ down * (float(kohya[name + ".alpha"]) / down.shape[0])
        torch.testing.assert_close(applied, merged[bfl], rtol=1e-5, atol=1e-5, msg=bfl)


def _pipeline(family: str, transformer):
    from diffusers import Flux2KleinPipeline, FluxPipeline

    if family == FLUX1:
        return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                              transformer=transformer)


@pytest.mark.parametrize("family", [FLUX1, FLUX2])
@pytest.mark.parametrize("name", [WEIGHT_NAME, KOHYA_WEIGHT_NAME])
def test_diffusers_loads_both_files_into_the_peft_models_output(family, name, tmp_path):
    """diffusers' own loader (FluxPipeline / Flux2KleinPipeline
    .load_lora_weights). Its FLUX.1 kohya reader splits single-block
    `linear1` at FLUX.1 [dev]'s width (3072) only, so on the tiny model the
    FLUX.1 kohya file is checked with double-block LoRAs."""
    targets = (r"transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|"
               r"add_k_proj|add_v_proj|to_add_out)"
               if family == FLUX1 and name == KOHYA_WEIGHT_NAME else None)
    model = with_lora(family, targets=targets)
    save_lora(tmp_path, model, None, {}, ("diffusers", "kohya"), family=family)
    with torch.no_grad():
        want = model(**inputs(family))[0]
    pipe = _pipeline(family, tiny_transformer(family))
    pipe.load_lora_weights(str(tmp_path), weight_name=name, adapter_name="x")
    held = {k.rsplit(".lora_", 1)[0] for k in module_lora(pipe.transformer, "transformer", "x")}
    assert held == {k.rsplit(".lora_", 1)[0] for k in module_lora(model, "transformer")}
    with torch.no_grad():
        got = pipe.transformer(**inputs(family))[0]
        base = tiny_transformer(family)(**inputs(family))[0]
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_fused_lora_that_separate_loras_cannot_hold_is_refused():
    """A rank-8 dense LoRA on qkv beside rank-4 modules: one line, no guess."""
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(8, 32, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 8, generator=g),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 32, generator=g),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 4, generator=g)}
    with pytest.raises(UserError, match="rank-8 LoRA on the fused weight"):
        from_bfl_kohya(FLUX1, tensors, "f.safetensors")
    # sd-scripts' own dense qkv of the file's rank: parts share the down, exactly
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = torch.randn(4, 32, generator=g)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(96, 4, generator=g)
    peft, alpha = from_bfl_kohya(FLUX1, tensors, "f.safetensors")
    assert alpha == 4.0
    a, b = (peft[f"transformer.transformer_blocks.0.attn.to_k.lora_{x}.weight"] for x in "AB")
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    down = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert torch.equal(b @ a, (up @ down)[32:64])


def test_the_comfyui_rules_name_flux_as_comfyui_does():
    """Known places, from `flux_to_diffusers` and `model_lora_keys_unet`."""
    from lorabooth.formats.clients import comfyui_flux_key_map, flux_names

    names = flux_names(tiny_transformer(FLUX1))
    assert names.weights["diffusion_model.single_blocks.0.linear1.weight"] == (7 * 32, 32)
    key_map = comfyui_flux_key_map(names, 1, 1)
    qkv = "diffusion_model.double_blocks.0.txt_attn.qkv.weight"
    assert key_map["lora_unet_double_blocks_0_txt_attn_qkv"] == qkv
    assert key_map["transformer.transformer_blocks.0.attn.add_v_proj"] == (qkv, (0, 64, 32))
    assert key_map["transformer.single_transformer_blocks.0.proj_mlp"] == (
        "diffusion_model.single_blocks.0.linear1.weight", (0, 96, 128))
    names2 = flux_names(tiny_transformer(FLUX2))
    assert names2.weights["diffusion_model.single_blocks.0.linear1.weight"] == (9 * 32, 32)
    assert "diffusion_model.double_blocks.0.img_mod.lin.weight" not in names2.weights


def test_every_key_of_both_files_maps_to_a_weight_under_comfyuis_rules(run):
    from lorabooth.formats.clients import flux_names, unloaded_by_client

    family, model, folder = run
    names = flux_names(tiny_transformer(family))
    counts = {}
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        tensors, _ = read_lora(folder / name)
        assert unloaded_by_client(tensors, names) == {"ComfyUI": []}, name
        counts[name] = len(tensors)
    mlp = any("proj_mlp" in k or "ff.linear_in" in k for k in module_lora(model, "transformer"))
    # diffusers: 2 keys per module; kohya: 3 per fused or plain BFL module
    modules = {(FLUX1, False): (8 + 3, 4 + 1), (FLUX1, True): (12 + 5, 8 + 2),
               (FLUX2, False): (8 + 2, 4 + 2), (FLUX2, True): (12 + 2, 8 + 2)}[family, mlp]
    assert counts == {WEIGHT_NAME: 2 * modules[0], KOHYA_WEIGHT_NAME: 3 * modules[1]}
    # a shape the model does not have is what ComfyUI would not merge
    tensors, _ = read_lora(folder / KOHYA_WEIGHT_NAME)
    key = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    tensors[key] = tensors[key][:64]
    assert key in unloaded_by_client(tensors, names)["ComfyUI"]


def test_inspect_checks_flux_files_against_the_model(run):
    from lorabooth.formats.clients import model_names
    from lorabooth.formats.inspection import check_summary, inspect_lora, render

    family, _, folder = run
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        summary = inspect_lora(folder / name, model_names(tiny_transformer(family), None), "tiny")
        text = render(summary)
        assert summary.unloaded == {"ComfyUI": []} and "every key maps to a weight" in text
        assert summary.architecture == {FLUX1: "FLUX.1", FLUX2: "FLUX.2 [klein]"}[family]
        assert all(rank == RANK and alpha == ALPHA for _, rank, alpha in summary.groups.values())
        assert "transformer, 0 text encoder" in text
        check_summary(summary)
