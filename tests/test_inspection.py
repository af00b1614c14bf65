"""`lorabooth inspect`: a good file, an old-style file, a foreign file."""

import torch
from safetensors.torch import save_file

from lorabooth.adapters.lora import read_lora
from lorabooth.commands.cli import main
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.inspection import guess_architecture


def _inspect(capsys, *argv):
    code = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_good_file(trained_run, capsys):
    for name in (KOHYA_WEIGHT_NAME, WEIGHT_NAME):
        code, out, err = _inspect(capsys, trained_run / name, "--model", "tiny")
        assert code == 0 and not err, err
        assert f"layout: {'kohya' if name == KOHYA_WEIGHT_NAME else 'diffusers'}" in out
        assert "modules: 48 UNet, 20 text encoder" in out
        assert "text_encoder: 20 modules, rank 4, alpha 8" in out
        assert "ComfyUI (tiny): every key maps to a weight" in out
        assert "lack `text_model`" not in out
    assert "AUTOMATIC1111 (tiny): every key maps" in _inspect(
        capsys, trained_run / KOHYA_WEIGHT_NAME, "--model", "tiny")[1]


def _old_style(trained_run, tmp_path):
    """The same LoRA as lorabooth wrote it under transformers 5 before the fix."""
    tensors, header = read_lora(trained_run / KOHYA_WEIGHT_NAME)
    old = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    save_file(old, tmp_path / "old.safetensors", metadata=header)
    return tmp_path / "old.safetensors"


def test_old_style_file_is_named_and_convert_repairs_it(trained_run, tmp_path, capsys):
    old = _old_style(trained_run, tmp_path)
    code, out, err = _inspect(capsys, old, "--model", "tiny")
    assert code == 2 and len(err) == 1 and "would not load completely" in err[0]
    assert "60 keys in ComfyUI, 60 keys in AUTOMATIC1111" in err[0]
    assert "60 keys lack `text_model`" in out
    assert "not loaded: lora_te_encoder_layers_0_self_attn_k_proj.alpha" in out
    assert main(["convert", str(old), str(tmp_path / "fixed.safetensors"), "--to", "kohya"]) == 0
    fixed, _ = read_lora(tmp_path / "fixed.safetensors")
    original, _ = read_lora(trained_run / KOHYA_WEIGHT_NAME)
    assert fixed.keys() == original.keys()
    assert all(torch.equal(fixed[k], original[k]) for k in fixed)
    assert _inspect(capsys, tmp_path / "fixed.safetensors", "--model", "tiny")[0] == 0


def _foreign_sd15(path, extra: bool):
    """A kohya file as another trainer writes it for SD 1.5, modules we never
    train (a resnet conv, a CLIP MLP) included."""
    g = torch.Generator().manual_seed(0)
    shapes = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
              "lora_unet_up_blocks_1_resnets_0_conv1": (1280, 2560),
              "lora_te_text_model_encoder_layers_3_mlp_fc1": (3072, 768)}
    if extra:
        shapes["lora_unet_not_a_module"] = (8, 8)
    tensors = {}
    for module, (out, inp) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{module}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{module}.alpha"] = torch.tensor(1.0)
    save_file(tensors, path, metadata={"ss_network_dim": "2"})
    return path


def test_foreign_sd15_file(tmp_path, capsys):
    code, out, err = _inspect(capsys, _foreign_sd15(tmp_path / "f.safetensors", False))
    assert code == 0 and not err, err
    assert "base architecture (guessed): Stable Diffusion 1.x" in out
    assert "ComfyUI (Stable Diffusion 1.5): every key maps" in out
    assert "AUTOMATIC1111 (Stable Diffusion 1.5): every key maps" in out
    assert "meta ss_network_dim: 2" in out and "rank 2, alpha 1" in out
    code, out, err = _inspect(capsys, _foreign_sd15(tmp_path / "g.safetensors", True))
    assert code == 2 and "3 keys in ComfyUI, 3 keys in AUTOMATIC1111" in err[0]
    assert "not loaded: lora_unet_not_a_module.alpha" in out


def test_not_a_lora_and_architecture_guesses(tmp_path, capsys):
    save_file({"model.layer.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    code, _, err = _inspect(capsys, tmp_path / "x.safetensors")
    assert code == 2 and len(err) == 1 and "no known LoRA layout" in err[0]
    width = {"unet.a.attn2.processor.to_k_lora.down.weight": torch.zeros(4, 2048)}
    assert guess_architecture(width) == "SDXL"
    assert guess_architecture({"lora_te2_x.lora_down.weight": torch.zeros(4, 8)}) == "SDXL"
    assert guess_architecture({"lora_unet_a_attn2_to_k.lora_down.weight":
                               torch.zeros(4, 1024)}) == "Stable Diffusion 2.x"


def test_sdxl_files_in_both_layouts(sdxl_lora, tmp_path, capsys):
    from helpers import tiny_sdxl_pipeline
    from lorabooth.formats.layouts import convert_file

    kohya = convert_file(sdxl_lora, tmp_path / "k.safetensors", "kohya")
    ours = convert_file(sdxl_lora, tmp_path / "d.safetensors", "diffusers")
    for path, layout in ((kohya, "kohya"), (ours, "diffusers"), (sdxl_lora, "peft")):
        code, out, err = _inspect(capsys, path)
        assert f"layout: {layout}" in out and "base architecture (guessed): SDXL" in out
        assert "modules: 96 UNet, 40 text encoder" in out
        assert "text encoders with LoRA: text_encoder, text_encoder_2" in out
        assert "text_encoder_2: 20 modules, rank 4, alpha 8" in out
        blocks = "input_blocks" if layout == "kohya" else "down_blocks"
        assert f"unet {blocks}: 32 modules, rank 4, alpha 8" in out
        if path == sdxl_lora:
            # diffusers' own file: ComfyUI has no rule for its peft-spelled UNet
            # keys (192) nor for encoder-1 keys without `text_model` (40)
            assert code == 2 and "232 keys in ComfyUI" in err[0]
        else:
            assert code == 0 and not err, err
            assert "ComfyUI (SDXL 1.0): every key maps to a weight" in out
    assert "AUTOMATIC1111 (SDXL 1.0): every key maps" in _inspect(capsys, kohya)[1]
    folder = tiny_sdxl_pipeline().save_pretrained(tmp_path / "tiny-sdxl") or tmp_path / "tiny-sdxl"
    code, out, _ = _inspect(capsys, kohya, "--model", folder)
    assert code == 0 and f"AUTOMATIC1111 ({folder}): every key maps" in out


def test_sdxl_file_with_sd1_encoder_names_is_caught(sdxl_lora, tmp_path, capsys):
    """kohya's SD 1.x prefix on an SDXL file: AUTOMATIC1111 finds no module for it."""
    from lorabooth.formats.layouts import convert_file

    tensors, header = read_lora(convert_file(sdxl_lora, tmp_path / "k.safetensors", "kohya"))
    save_file({k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items()},
              tmp_path / "bad.safetensors", metadata=header)
    code, out, err = _inspect(capsys, tmp_path / "bad.safetensors")
    assert code == 2 and len(err) == 1 and "60 keys in AUTOMATIC1111" in err[0]
    assert "ComfyUI (SDXL 1.0): every key maps" in out  # ComfyUI takes lora_te_ for clip_l
