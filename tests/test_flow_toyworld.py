"""The flow-matching toy world (issue 27 §5): `toyworld flow-pretrain` makes
a FLUX.2 [klein] folder that lorabooth loads, LoRA-trains and draws with,
and the shipped `flow-toy` model follows the prompt's class."""

import json

import numpy as np
import pytest
import torch

from lorabooth.commands.cli import main
from lorabooth.toyworld.world import CLASSES

# as tests/test_toyworld.py asks of the UNet toy model
BASE_MIN_CLASS = 0.6


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    """A pretraining of a few steps (seconds), the shipped toy judges copied."""
    from lorabooth.models.loading import toy_model_dir
    from lorabooth.toyworld.flow_pretrain import flow_pretrain

    out = tmp_path_factory.mktemp("flow") / "model"
    return flow_pretrain(out, seed=3, images=64, vae_steps=2, vae_batch=4, text_steps=2,
                         steps=2, batch=4, judges_from=str(toy_model_dir()),
                         eval_per_prompt=1, eval_steps=2)


def test_the_toy_bpe_keeps_every_caption_word_one_token():
    from lorabooth.models.loading import clip_tokenizer
    from lorabooth.toyworld.flow_pretrain import caption_words, flow_tokenizer
    from lorabooth.toyworld.pretrain import rare_words

    words = rare_words(clip_tokenizer())
    tokenizer = flow_tokenizer(words)
    for word in ("sks", *CLASSES, "purple", "striped", "snow", *words):
        assert len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1, word
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert set(caption_words()) >= set(CLASSES) and len(tokenizer) < 1024
    # any other text still tokenises (byte-level), in Qwen's chat template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a zebra"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text.startswith("<|im_start|>user\na zebra") and tokenizer(text).input_ids


def test_flow_pretrain_writes_a_flux2_folder_and_records_its_figures(flow_folder):
    from lorabooth.models.loading import load_base, model_family

    assert model_family(str(flow_folder)) == "flux2"
    base = load_base(str(flow_folder))
    assert base.family.name == "flux2" and base.family.flow
    assert type(base.unet).__name__ == "Flux2Transformer2DModel"
    assert type(base.text_encoder).__name__ == "Qwen3ForCausalLM"
    assert base.vae.bn.running_var.min() > 0  # the latent statistics were set
    record = json.loads((flow_folder / "toyworld.json").read_text())
    assert record["seed"] == 3 and record["transformer_steps"] == 2
    assert record["text_window"] == 32 and record["family"] == "flux2"
    assert record["text_lr_beside_transformer"] == 3e-4
    assert 0 <= record["draws_cls_accuracy"] <= 1 and record["draws"] == len(CLASSES)
    assert record["vae_psnr_db_held_out"] > 0
    assert (flow_folder / "judges.safetensors").is_file()


def test_the_flow_toy_folder_lora_trains_and_draws(flow_folder, tmp_path):
    from helpers import make_photos
    from lorabooth import TrainConfig, train
    from lorabooth.generation import Setting, draw, load_pipeline

    run = train(TrainConfig(
        model=str(flow_folder), instance_dir=str(make_photos(tmp_path / "photos")),
        instance_prompt="a photo of sks ball", steps=2, seed=0, resolution=32, lr=5e-2,
        output=str(tmp_path / "run")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    pipe, has_text = load_pipeline(run)
    read = []  # the text tokens the transformer reads while drawing
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: read.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    zero, one = (draw(pipe, has_text, "a photo of sks ball", Setting(scale, 1.0, 4.0), [0], 2,
                      size=(32, 32))[0] for scale in (0.0, 1.0))
    assert zero.size == (32, 32)
    assert read and set(read) == {32}  # the window training read, not the pipeline's 512
    assert not np.array_equal(np.asarray(zero), np.asarray(one))  # the LoRA is drawn with


def test_the_toy_model_declares_its_text_window_and_every_reader_keeps_it(flow_folder):
    from lorabooth.models.loading import load_base, pipeline_from_parts

    base = load_base(str(flow_folder))
    assert base.tokenizer.model_max_length == 32
    assert base.family.tokenize([base.tokenizer], ["a photo of sks ball"]).shape == (1, 2, 32)
    assert base.family.draw_options(pipeline_from_parts(base)) == {"max_sequence_length": 32}
    for model in ("tiny-flux2", "tiny-flux"):  # FLUX's own window
        base = load_base(model)
        assert base.family.draw_options(pipeline_from_parts(base)) == {"max_sequence_length": 512}
    assert load_base("tiny").family.draw_options(None) == {}


def test_init_continues_an_earlier_model(flow_folder, tmp_path):
    from safetensors.torch import load_file

    from lorabooth.toyworld.flow_pretrain import flow_pretrain

    out = flow_pretrain(tmp_path / "more", seed=4, images=32, steps=1, batch=2,
                        init=str(flow_folder), text_lr=0.0, eval_per_prompt=1, eval_steps=1)
    record = json.loads((out / "toyworld.json").read_text())
    assert record["init"]["folder"] == str(flow_folder) and record["transformer_steps"] == 1
    assert "vae_steps" not in record and record["text_lr_beside_transformer"] == 0
    # the VAE and (at --text-lr 0) the text encoder were kept
    for part in ("vae", "text_encoder"):
        [old] = (flow_folder / part).glob("*.safetensors")
        [new] = (out / part).glob("*.safetensors")
        assert all(torch.equal(v, load_file(new)[k]) for k, v in load_file(old).items())
    assert (out / "judges.safetensors").read_bytes() == (
        flow_folder / "judges.safetensors").read_bytes()
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())[
        "model_max_length"] == 32


def test_flow_pretrain_command_refuses_bad_options_in_one_line(tmp_path, capsys):
    assert main(["toyworld", "flow-pretrain", "--out", str(tmp_path / "m"),
                 "--steps", "-1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["toyworld", "flow-pretrain", "--out", str(tmp_path / "m"),
                 "--init", str(tmp_path)]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["toyworld", "flow-pretrain", "--out", str(tmp_path / "m"),
                 "--judges-from", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def flow_toy():
    from lorabooth.models.loading import flow_toy_model_dir, load_base
    from lorabooth.toyworld.judges import ToyJudge

    if not (flow_toy_model_dir() / "transformer").is_dir():
        pytest.skip("the flow toy model is not shipped yet in src/lorabooth/assets/flow_toy "
                    "(make it with `lorabooth toyworld flow-pretrain`)")
    return load_base("flow-toy"), ToyJudge.load(flow_toy_model_dir() / "judges.safetensors")


def test_shipped_flow_toy_loads_offline_within_the_size_budget(flow_toy, no_network):
    from lorabooth.models.loading import flow_toy_model_dir, model_family

    base, _ = flow_toy
    assert base.native_resolution == 32 and model_family("flow-toy") == "flux2"
    size = sum(p.stat().st_size for p in flow_toy_model_dir().rglob("*") if p.is_file())
    assert size < 28e6 and no_network == []
    record = json.loads((flow_toy_model_dir() / "toyworld.json").read_text())
    assert record["command"].startswith("lorabooth toyworld flow-pretrain")


def test_shipped_flow_toy_draws_the_prompts_class(flow_toy):
    from lorabooth.toyworld.flow_pretrain import class_accuracy

    base, judge = flow_toy
    accuracy = class_accuracy(base, judge, per_prompt=8)
    assert accuracy["draws_cls_accuracy"] >= BASE_MIN_CLASS, accuracy


def test_flow_claims_page_names_its_model_its_levers_and_its_data():
    """`toyworld claims --model flow-toy`'s page: the rows that apply to a
    frozen text encoder, every claim by the verdict rule, the levers' table,
    and links to its per-seed data in the folder of its own name."""
    import random

    from lorabooth.evaluation.verdict import compare
    from lorabooth.toyworld.claims import FLOW_LEVERS, FLOW_VARIANTS, TOY_TRAIN, Study
    from lorabooth.toyworld.claims_report import render_flow_claims

    rng = random.Random(0)
    keys = ("fidelity", "subject_rate", "context_acc", "pres", "div", "class_colour_entropy",
            "red_other_classes")
    names = ["base"] + [v.name for v in FLOW_VARIANTS + FLOW_LEVERS]
    results = {n: [{k: rng.random() for k in keys} for _ in range(3)] for n in names}
    results["train_seconds"] = {n: [1.0, 2.0, 3.0] for n in names}
    record = {"command": "lorabooth toyworld flow-pretrain --out X", "total_seconds": 5,
              "draws_class_accuracy": 0.71, "draws_context_accuracy": 0.66}
    text = render_flow_claims(results, record, Study(out=None, guidance=4.0), FLOW_VARIANTS,
                              FLOW_LEVERS, TOY_TRAIN, "toyworld-flow")
    assert "flow-pretrain --out X" in text and "class 0.71" in text and "guidance 4" in text
    fid = compare([r["fidelity"] for r in results["unet"]], [r["fidelity"] for r in results["base"]])
    assert f"1. **Fidelity** (LoRA - base): {fid.text()}" in text
    levers = text.split("### The levers")[1]
    assert all(v.title in levers for v in FLOW_LEVERS)
    assert "on transformer LoRA + prior" in levers and "UNet" not in levers
    assert not any(v.train.get("train_text_encoder") or v.train.get("train_token")
                   or v.train.get("snr_gamma") for v in FLOW_VARIANTS + FLOW_LEVERS)
    assert "](toyworld-flow/claims_per_seed.json)" in text


def test_flow_claims_write_their_own_page_by_default():
    from lorabooth.config.toyworld import ClaimsConfig

    assert ClaimsConfig().report == "docs/toyworld.md"
    assert ClaimsConfig(model="flow-toy").report == "docs/toyworld-flow.md"
    assert ClaimsConfig(model="flow-toy", report="x.md").report == "x.md"
