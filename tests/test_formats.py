"""LoRA layouts for the UIs users run: kohya <-> diffusers <-> peft."""

import json
from functools import reduce

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_outputs
from lorabooth.adapters.lora import read_lora
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.layouts import convert_file, detect_layout, read_as_peft
from lorabooth.models.loading import build_tiny, pipeline_from_parts


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trips_are_exact(trained_run, tmp_path):
    original, _ = read_lora(trained_run / WEIGHT_NAME)
    kohya = convert_file(trained_run / WEIGHT_NAME, tmp_path / "k.safetensors", "kohya")
    back = convert_file(kohya, tmp_path / "d.safetensors", "diffusers")
    assert _equal(read_lora(back)[0], original)
    again = convert_file(back, tmp_path / "k2.safetensors", "kohya")
    assert _equal(read_lora(again)[0], read_lora(kohya)[0])
    peft = convert_file(kohya, tmp_path / "p.safetensors", "peft")
    assert detect_layout(read_lora(peft)[0], "p") == "peft"
    assert _equal(read_lora(convert_file(peft, tmp_path / "d2.safetensors", "diffusers"))[0],
                  original)


def test_kohya_layout_alpha_and_metadata(trained_run):
    tensors, header = read_lora(trained_run / KOHYA_WEIGHT_NAME)  # written by train (both)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors) and not any("lora_te1_" in k for k in tensors)
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {8.0}  # the run's alpha, not its rank (4)
    assert header["ss_network_dim"] == "4" and float(header["ss_network_alpha"]) == 8.0
    assert header["ss_sd_model_name"] == "tiny" and header["ss_max_train_steps"] == "4"
    assert json.loads(header["lorabooth.instance_prompt"]) == "a photo of sks dog"


def test_kohya_file_acts_like_the_diffusers_file_in_diffusers(trained_run):
    a = pipeline_from_parts(build_tiny())
    a.load_lora_weights(str(trained_run), weight_name=WEIGHT_NAME)
    b = pipeline_from_parts(build_tiny())
    b.load_lora_weights(str(trained_run), weight_name=KOHYA_WEIGHT_NAME)
    (ua, ta), (ub, tb) = tiny_outputs(a), tiny_outputs(b)
    base_u, _ = tiny_outputs(pipeline_from_parts(build_tiny()))
    assert not torch.allclose(ua, base_u, atol=1e-5)
    assert torch.allclose(ua, ub, atol=1e-6) and torch.allclose(ta, tb, atol=1e-6)


def test_save_format_options(photos, tmp_path):
    from lorabooth import TrainConfig, train
    from lorabooth.generation import generate

    run = train(TrainConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog",
                            steps=1, save_format="kohya", output=str(tmp_path / "k")))
    assert (run / KOHYA_WEIGHT_NAME).is_file() and not (run / WEIGHT_NAME).exists()
    assert len(generate(run, ["a dog"], num_images=1, steps=2)) == 1  # generate reads it
    run = train(TrainConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog",
                            steps=1, save_format="diffusers", output=str(tmp_path / "d")))
    assert (run / WEIGHT_NAME).is_file() and not (run / KOHYA_WEIGHT_NAME).exists()


def test_bad_files_one_line(tmp_path, trained_run, capsys):
    (tmp_path / "x.safetensors").write_text("not safetensors at all")
    save_file({"model.layer.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    tensors, _ = read_lora(trained_run / WEIGHT_NAME)
    key = next(k for k in tensors if k.endswith("lora.down.weight"))
    save_file({**tensors, key: torch.zeros(3, tensors[key].shape[1])}, tmp_path / "rank.safetensors")
    kohya, _ = read_lora(trained_run / KOHYA_WEIGHT_NAME)
    kkey = next(k for k in kohya if k.endswith(".lora_down.weight"))
    save_file({**kohya, kkey: torch.zeros(3, kohya[kkey].shape[1])}, tmp_path / "krank.safetensors")
    for name, needle in [("x", "not a readable safetensors"), ("other", "no known LoRA layout"),
                         ("rank", "rank mismatch"), ("krank", "rank mismatch")]:
        code = main(["convert", str(tmp_path / f"{name}.safetensors"), str(tmp_path / "o"),
                     "--to", "kohya"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    with pytest.raises(UserError, match="--to"):
        convert_file(trained_run / WEIGHT_NAME, tmp_path / "o.safetensors", "ckpt")


def test_files_carry_the_clients_text_encoder_names(trained_run):
    """Whatever transformers is installed: `text_model` in every text key."""
    diffusers, _ = read_lora(trained_run / WEIGHT_NAME)
    kohya, _ = read_lora(trained_run / KOHYA_WEIGHT_NAME)
    text = [k for k in diffusers if k.startswith("text_encoder")]
    assert text and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text)
    assert all(".processor.to_" in k for k in diffusers if k.startswith("unet."))
    kohya_text = [k for k in kohya if k.startswith("lora_te")]
    assert kohya_text and all(k.startswith("lora_te_text_model_encoder_layers_")
                              for k in kohya_text)


def _trained_text_output(trained_run):
    """The text encoder with the file's tensors put in by peft directly
    (no diffusers loader): what every loader must reproduce."""
    from peft import set_peft_model_state_dict

    from lorabooth.adapters.lora import add_text_lora
    from lorabooth.formats.layouts import read_as_peft

    tiny = build_tiny()
    add_text_lora(tiny.text_encoder, rank=4, alpha=8)
    peft, _, _, _ = read_as_peft(trained_run / WEIGHT_NAME)
    prefix = "text_encoder." + ("" if any(n.startswith("text_model.") for n, _ in
                                          tiny.text_encoder.named_modules()) else "text_model.")
    result = set_peft_model_state_dict(
        tiny.text_encoder, {k.removeprefix(prefix): v for k, v in peft.items()
                            if k.startswith("text_encoder")})
    assert not result.unexpected_keys
    return tiny_outputs(pipeline_from_parts(tiny))[1]


def test_diffusers_loads_both_files_and_the_text_lora_acts(trained_run):
    expected = _trained_text_output(trained_run)
    _, base_text = tiny_outputs(pipeline_from_parts(build_tiny()))
    assert not torch.allclose(expected, base_text, atol=1e-4)
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = pipeline_from_parts(build_tiny())
        pipe.load_lora_weights(str(trained_run), weight_name=name)  # plain diffusers
        assert torch.allclose(tiny_outputs(pipe)[1], expected, atol=1e-5), name


def test_old_spelling_reads_as_the_new(trained_run, tmp_path):
    from lorabooth.formats.layouts import load_into_pipeline, read_as_peft

    tensors, header = read_lora(trained_run / WEIGHT_NAME)
    old = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()}
    save_file(old, tmp_path / "old.safetensors", metadata=header)
    new_peft, old_peft = read_as_peft(trained_run / WEIGHT_NAME)[0], read_as_peft(
        tmp_path / "old.safetensors")[0]
    assert _equal(new_peft, old_peft)
    repaired = convert_file(tmp_path / "old.safetensors", tmp_path / "new.safetensors", "diffusers")
    assert _equal(read_lora(repaired)[0], tensors)
    pipe = pipeline_from_parts(build_tiny())
    assert load_into_pipeline(pipe, tmp_path / "old.safetensors")  # text part found
    assert torch.allclose(tiny_outputs(pipe)[1], _trained_text_output(trained_run), atol=1e-5)


def test_an_sd_header_as_every_lorabooth_wrote_it_still_reads(trained_run, tmp_path):
    """The family key of an SD 1.x LoRA holds "sd", as in every file lorabooth
    has written, while the code names the family "sd1" (models/families.py):
    the file still says "sd", reads as sd1 even where its shapes alone would
    say SDXL, and fuses onto an SD 1.x base (which model_family calls sd1)."""
    from lorabooth.formats.sdxl import FAMILY_KEY, family_of
    from lorabooth.models.families import FAMILIES

    tensors, header = read_lora(trained_run / WEIGHT_NAME)
    assert header[FAMILY_KEY] == "sd"  # what users' files hold: unchanged
    assert family_of(tensors, header) == "sd1" and "sd1" in FAMILIES
    # cross-attention of SDXL's width: the shapes say SDXL, the header decides
    wide = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
            torch.zeros(4, 2048)}
    assert family_of(wide, None) == "sdxl"
    for said, family in (('"sd"', "sd1"), ("sd", "sd1"), ('"sd1"', "sd1"), ('"sdxl"', "sdxl")):
        assert family_of(wide, {FAMILY_KEY: said}) == family, said
    assert main(["fuse", str(trained_run), "--model", "tiny", "--out", str(tmp_path / "f")]) == 0


def test_partial_loading_is_never_silent(trained_run, tmp_path, caplog):
    from lorabooth.formats.layouts import load_into_pipeline

    tensors, header = read_lora(trained_run / WEIGHT_NAME)
    stray = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    extra = {**tensors, f"{stray}.down.weight": torch.zeros(4, 32),
             f"{stray}.up.weight": torch.zeros(32, 4)}
    save_file(extra, tmp_path / "extra.safetensors", metadata=header)
    with caplog.at_level("WARNING", logger="lorabooth"):
        load_into_pipeline(pipeline_from_parts(build_tiny()), tmp_path / "extra.safetensors")
    assert "1 of its modules not loaded" in caplog.text and "down_blocks.7" in caplog.text
    caplog.clear()
    # a text part that fits no module: diffusers would still create adapter
    # layers (without weights) on every text projection
    wrong = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    wrong.update({"text_encoder.nowhere.q_proj.lora_linear_layer.down.weight": torch.zeros(4, 32),
                  "text_encoder.nowhere.q_proj.lora_linear_layer.up.weight": torch.zeros(32, 4)})
    save_file(wrong, tmp_path / "wrong.safetensors", metadata=header)
    with caplog.at_level("WARNING", logger="lorabooth"):
        load_into_pipeline(pipeline_from_parts(build_tiny()), tmp_path / "wrong.safetensors")
    assert "created without weights in the file" in caplog.text
    nothing = {"unet.x.processor.to_q_lora.down.weight": torch.zeros(4, 32),
               "unet.x.processor.to_q_lora.up.weight": torch.zeros(32, 4)}
    save_file(nothing, tmp_path / "nothing.safetensors")
    with pytest.raises(UserError, match="fit this base model"):
        load_into_pipeline(pipeline_from_parts(build_tiny()), tmp_path / "nothing.safetensors")


# SDXL: diffusers' own file in, kohya's sd-scripts names out, and back exactly.


def test_sdxl_round_trips_are_exact(sdxl_lora, tmp_path):
    ours = convert_file(sdxl_lora, tmp_path / "d.safetensors", "diffusers")
    kohya = convert_file(ours, tmp_path / "k.safetensors", "kohya")
    back = convert_file(kohya, tmp_path / "d2.safetensors", "diffusers")
    assert _equal(read_lora(back)[0], read_lora(ours)[0])
    assert _equal(read_lora(convert_file(back, tmp_path / "k2.safetensors", "kohya"))[0],
                  read_lora(kohya)[0])
    peft = convert_file(kohya, tmp_path / "p.safetensors", "peft")
    assert _equal(read_as_peft(peft)[0], read_as_peft(sdxl_lora)[0])
    # diffusers' file spells encoder 1 the transformers-5 way; ours as the clients do
    assert any(k.startswith("text_encoder.encoder.") for k in read_lora(sdxl_lora)[0])
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in read_lora(ours)[0])


def test_sdxl_kohya_names_are_sd_scripts_names(sdxl_lora, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya

    kohya, header = read_lora(convert_file(sdxl_lora, tmp_path / "k.safetensors", "kohya"))
    modules = {k.split(".")[0] for k in kohya}
    # tiny UNet: 12 transformer blocks x 2 attentions x 4 projections; 5 layers x 4 per
    # encoder (lorabooth.models.sdxl_architecture.build_tiny_sdxl)
    assert len(modules) == 96 + 20 + 20 and len(kohya) == 3 * len(modules)
    assert sum(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules) == 20
    assert sum(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules) == 20
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                             "lora_unet_output_blocks_")) for m in unet)
    # down_blocks.1.attentions.0, mid_block.attentions.0, up_blocks.0.attentions.2
    for module in ("input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                   "middle_block_1_transformer_blocks_0_attn1_to_out_0",
                   "output_blocks_2_1_transformer_blocks_1_attn1_to_v"):
        assert f"lora_unet_{module}" in unet, module
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    assert header["lorabooth.family"] == "sdxl"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"  # as sd-scripts marks SDXL
    # what diffusers' converter alone writes: the diffusers block names
    theirs = convert_state_dict_to_kohya(read_as_peft(sdxl_lora)[0])
    assert any(k.startswith("lora_unet_down_blocks_1_") for k in theirs)


def test_sgm_names_are_what_diffusers_reads_back_for_all_of_sdxl():
    """Every attention projection of SDXL 1.0's UNet (70 transformer blocks x
    2 attentions x 4 = 560 modules): our SGM name, read by diffusers'
    SGM-to-diffusers renumbering, is its own name."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from lorabooth.formats.sdxl import SDXL_UNET, sdxl_meta_models, sgm_unet_module

    unet, _, _ = sdxl_meta_models()
    modules = [n for n, _ in unet.named_modules()
               if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(modules) == 560
    ours = {f"lora_unet_{sgm_unet_module(m).replace('.', '_')}.lora_down.weight": m
            for m in modules}
    back = _maybe_map_sgm_blocks_to_diffusers(dict.fromkeys(ours, 0), SDXL_UNET)
    # it renumbers the blocks; its key converter then renames them
    words = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"),
             ("output_blocks", "up_blocks"))
    back = sorted(reduce(lambda k, w: k.replace(*w), words, k) for k in back)
    assert back == sorted(f"lora_unet_{m.replace('.', '_')}.lora_down.weight" for m in modules)
    assert sgm_unet_module("down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0") == \
        "input_blocks.8.1.transformer_blocks.9.attn1.to_out.0"


def test_sdxl_kohya_file_acts_like_the_diffusers_file_in_diffusers(sdxl_lora, tmp_path):
    from helpers import tiny_sdxl_outputs, tiny_sdxl_pipeline

    kohya = convert_file(sdxl_lora, tmp_path / "k.safetensors", "kohya")
    base = tiny_sdxl_outputs(tiny_sdxl_pipeline())
    outputs = []
    for path in (sdxl_lora, kohya):
        pipe = tiny_sdxl_pipeline()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # plain diffusers
        outputs.append(tiny_sdxl_outputs(pipe))
    for part, (a, b, b0) in enumerate(zip(*outputs, base)):
        assert not torch.allclose(a, b0, atol=1e-4), part
        assert torch.allclose(a, b, atol=1e-5), (part, (a - b).abs().max())


def test_python_api_loads_a_unet_only_lora_without_library_chatter(session_photos, tmp_path):
    """The README's API example on a UNet-only LoRA: diffusers' "No LoRA keys
    associated to CLIPTextModel found" warning is noise (lorabooth checks a
    partial load itself), silenced for the Python API as for the CLI. In a
    fresh process: diffusers' handler keeps the stderr it first saw."""
    import subprocess
    import sys

    from lorabooth import TrainConfig, train

    run = train(TrainConfig(model="tiny", instance_dir=str(session_photos),
                            instance_prompt="a photo of sks dog", steps=1, seed=0,
                            output=str(tmp_path / "run")))
    code = ("from lorabooth import generate\n"
            f"generate({str(run)!r}, ['a photo of sks dog'], num_images=1, steps=1, "
            f"output={str(tmp_path / 'drawn')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "No LoRA keys" not in r.stderr, r.stderr
