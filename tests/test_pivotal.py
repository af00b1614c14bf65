"""Pivotal tuning (--train-token): the identifier's input-embedding rows
trained beside the LoRA, saved in its files, loaded back by lorabooth and by
plain diffusers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_outputs
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import lora_metadata, read_lora
from lorabooth.adapters.pivotal import (
    BUNDLE_PREFIX,
    EMB_PREFIX,
    TokenVectors,
    diffusers_lines,
    embedding_keys,
    split_embeddings,
    substitute_rows,
)
from lorabooth.core.errors import UserError
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.models.families import Conditioning
from lorabooth.models.loading import build_tiny, pipeline_from_parts

PROMPT, CLASS = "a photo of sks dog", "a photo of a dog"


def _sks_id() -> int:
    tokenizer = build_tiny().tokenizer
    return tokenizer("sks", add_special_tokens=False).input_ids[0]


# -- the maths, on tiny tensors --------------------------------------------

def test_substitute_rows_replaces_only_the_trained_tokens():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 7, 9, 7], [9, 1, 2, 3]])              # (B=2, T=4)
    embedded = torch.randn(2, 4, 3)                               # (B, T, D=3)
    token_ids = torch.tensor([7, 9])                              # K=2 trained tokens
    vectors = torch.randn(2, 3, requires_grad=True)               # (K, D)
    out = substitute_rows(embedded, ids, token_ids, vectors)
    hit = (ids == 7) | (ids == 9)
    assert torch.equal(out[~hit], embedded[~hit])                 # bit-identical elsewhere
    assert torch.equal(out[ids == 7], vectors[0].detach().expand(2, 3))
    assert torch.equal(out[ids == 9], vectors[1].detach().expand(2, 3))
    # the gradient of a row sums over the positions that use it, nothing else
    weights = torch.randn(2, 4, 3)
    (out * weights).sum().backward()
    assert torch.allclose(vectors.grad[0], weights[ids == 7].sum(0))
    assert torch.allclose(vectors.grad[1], weights[ids == 9].sum(0))


def test_token_vectors_by_word_follows_each_words_pieces():
    ids = {"ab": [7, 9], "c": [9]}
    module = TokenVectors(ids, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # rows of 7, 9
    words = module.by_word()
    assert torch.equal(words["ab"], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert torch.equal(words["c"], torch.tensor([[2.0, 2.0]]))


def test_file_keys_round_trip_in_both_spellings():
    embeddings = {"sks": torch.ones(1, 4)}
    lora = {"unet.x.lora.down.weight": torch.zeros(2, 2)}
    for layout, key in (("diffusers", EMB_PREFIX + "sks"),
                        ("kohya", BUNDLE_PREFIX + "sks.string_to_param.*")):
        keys = embedding_keys(embeddings, layout)
        assert list(keys) == [key]
        back_lora, back = split_embeddings({**lora, **keys})
        assert back_lora.keys() == lora.keys() and torch.equal(back["sks"], embeddings["sks"])


# -- runs on the tiny model --------------------------------------------------

def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt=PROMPT, class_prompt=CLASS,
                steps=3, seed=0, lr=1e-2, lr_token=1e-2, train_token=True, output=str(out))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, session_photos):
    """Token + UNet LoRA, text encoder frozen, prior preservation, both files."""
    out = tmp_path_factory.mktemp("pivotal") / "run"
    return train(_config(session_photos, out, prior_preservation=True, num_class_images=2,
                         class_draw_steps=2, save_format="both"))


def _rows(run, name=WEIGHT_NAME):
    return split_embeddings(read_lora(run / name)[0])[1]


def test_the_rows_train_and_nothing_else_in_the_matrix_changes(photos, tmp_path, on_finish):
    seen = {}
    on_finish(lambda config, base, modules: seen.update(
        matrix=base.text_encoder.get_input_embeddings().weight.detach().clone(),
        token=modules["token"]))
    run = train(_config(photos, tmp_path / "r", train_text_encoder=True, steps=2))
    original = build_tiny().text_encoder.get_input_embeddings().weight
    assert torch.equal(seen["matrix"], original)  # the matrix itself is never trained
    sks = _sks_id()
    assert seen["token"].token_ids == [sks]
    saved = _rows(run)["sks"]
    assert saved.shape == (1, original.shape[1])
    assert not torch.allclose(saved[0], original[sks])  # the text encoder ran: it moved
    # lorabooth's loader: every other row bit-identical, the identifier's row the file's
    from lorabooth.formats.layouts import load_into_pipeline

    pipe = pipeline_from_parts(build_tiny())
    assert load_into_pipeline(pipe, run)  # a text-encoder LoRA too
    loaded = pipe.text_encoder.get_input_embeddings().weight
    others = torch.arange(len(original)) != sks
    assert torch.equal(loaded[others], original[others]) and torch.equal(loaded[sks], saved[0])


def test_class_embeddings_stay_cached_unless_they_hold_the_token():
    from lorabooth.adapters.pivotal import setup_token
    from lorabooth.training.batches import Examples
    from lorabooth.training.setup import use_token

    tiny = build_tiny()
    ids = tiny.tokenizer([PROMPT, CLASS, "a photo of sks"], padding="max_length",
                         return_tensors="pt").input_ids
    token = setup_token(tiny.tokenizer, tiny.text_encoder, ["sks"])

    class Unwrap:
        unwrap_model = staticmethod(lambda m: m)

    for class_ids, cached in ((ids[1:2], True), (ids[2:3], False)):
        cache = Conditioning(torch.zeros(1, 77, 32))
        examples = Examples(instance_mean=[torch.zeros(1)], instance_std=[torch.zeros(1)],
                            instance_bucket=[(64, 64)], class_mean=None, class_std=None,
                            instance_embedding=Conditioning(torch.zeros(1, 77, 32)),
                            class_embedding=cache, instance_ids=ids[:1, None],
                            class_ids=class_ids[:, None], model_latents=lambda x: x)
        base = build_tiny()
        use_token(Unwrap(), base, {"unet": None, "token": token}, examples)
        assert examples.instance_embedding is None and examples.encoders == [base.text_encoder]
        assert (examples.class_embedding is cache) is cached


def test_recorded_in_metadata_config_and_card(token_run):
    meta = lora_metadata(token_run)
    assert meta["train_token"] is True and meta["lr_token"] == 1e-2
    assert meta["trained_tokens"] == {"sks": [_sks_id()]}
    from lorabooth.config import build_config

    again = build_config(TrainConfig, token_run / "config.toml", {})
    assert again.train_token and again.lr_token == 1e-2
    card = (token_run / "README.md").read_text()
    assert "| trained token embedding (pivotal tuning) | yes: sks, learning rate 0.01 |" in card
    assert json.loads(read_lora(token_run / KOHYA_WEIGHT_NAME)[1]["lorabooth.train_token"])


def test_train_token_off_records_false_and_saves_no_rows(trained_run):
    assert lora_metadata(trained_run)["train_token"] is False
    assert not _rows(trained_run)
    assert "| trained token embedding (pivotal tuning) | no |" in (
        trained_run / "README.md").read_text()


def _card_lines(run) -> str:
    """The model card's Python lines after the pipeline is built, before it draws."""
    card = (run / "README.md").read_text()
    block = card.split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].startswith("pipe = StableDiffusionPipeline.from_pretrained(")
    assert block[-1].startswith("image = pipe(")
    return "\n".join(block[1:-1])


def test_plain_diffusers_loads_the_file_with_the_cards_lines(token_run):
    """The README's lines, run literally on a plain diffusers pipeline, give
    the text encoder lorabooth's own loader gives; both differ from the base."""
    from lorabooth.formats.layouts import load_into_pipeline

    ours = pipeline_from_parts(build_tiny())
    load_into_pipeline(ours, token_run)
    theirs = pipeline_from_parts(build_tiny())
    exec(_card_lines(token_run), {"pipe": theirs})  # noqa: S102 - the card's own text
    base_unet, base_text = tiny_outputs(pipeline_from_parts(build_tiny()))
    (u1, t1), (u2, t2) = tiny_outputs(ours), tiny_outputs(theirs)
    assert torch.equal(t1, t2) and torch.equal(u1, u2)
    assert not torch.allclose(t1, base_text, atol=1e-4)  # the trained row acts
    assert not torch.allclose(u1, base_unet, atol=1e-4)  # and the LoRA


def test_kohya_file_loads_in_lorabooth_and_with_its_diffusers_lines(token_run):
    from lorabooth.formats.layouts import load_into_pipeline

    reference = pipeline_from_parts(build_tiny())
    load_into_pipeline(reference, token_run / WEIGHT_NAME)
    ours = pipeline_from_parts(build_tiny())
    load_into_pipeline(ours, token_run / KOHYA_WEIGHT_NAME)
    theirs = pipeline_from_parts(build_tiny())
    lines = "import torch\nfrom safetensors.torch import load_file\n" + diffusers_lines(
        str(token_run), ["sks"], kohya=True)
    exec(lines, {"pipe": theirs})  # noqa: S102 - what a kohya-only run's card prints
    want = tiny_outputs(reference)
    for pipe in (ours, theirs):
        got = tiny_outputs(pipe)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])


def test_inspect_reports_the_token_and_the_clients_rules_pass(token_run):
    from lorabooth.formats.clients import model_names
    from lorabooth.formats.inspection import check_summary, inspect_lora, render

    tiny = build_tiny()
    names = model_names(tiny.unet, tiny.text_encoder)
    for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        summary = inspect_lora(token_run / name, names, "tiny")
        assert summary.embeddings == {"sks": (1, 32)}
        assert "trained token 'sks': 1 embedding vector(s) of 32" in render(summary)
        check_summary(summary)  # no key left over for the clients


def test_convert_carries_the_rows(token_run, tmp_path):
    from lorabooth.formats.layouts import convert_file, read_as_peft

    rows = _rows(token_run)
    peft = convert_file(token_run / WEIGHT_NAME, tmp_path / "p.safetensors", "peft")
    kohya = convert_file(peft, tmp_path / "k.safetensors", "kohya")
    back = convert_file(kohya, tmp_path / "d.safetensors", "diffusers")
    for path in (peft, kohya, back):
        got = split_embeddings(read_lora(path)[0])[1]
        assert torch.equal(got["sks"], rows["sks"]), path
    assert any(k.startswith(BUNDLE_PREFIX) for k in read_lora(kohya)[0])
    assert read_as_peft(back)[0].keys() == read_as_peft(token_run / WEIGHT_NAME)[0].keys()


def test_merge_carries_one_files_rows_and_refuses_two(token_run, trained_run, tmp_path):
    from lorabooth.formats.merging import merge

    merge([str(token_run), str(trained_run)], None, tmp_path / "m.safetensors")
    assert torch.equal(_rows(tmp_path, "m.safetensors")["sks"], _rows(token_run)["sks"])
    with pytest.raises(UserError, match="both carry trained token embeddings") as e:
        merge([str(token_run), str(token_run)], None, tmp_path / "m2.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "m2.safetensors").exists()


def test_resume_restores_the_trained_rows(photos, tmp_path):
    full = train(_config(photos, tmp_path / "full", steps=4, checkpoint_every=2))
    part = _config(photos, tmp_path / "part", steps=4, checkpoint_every=2, resume=True)
    train(TrainConfig(**{**part.__dict__, "steps": 3}))  # "killed" after step 3; checkpoint at 2
    ckpt = load_file(tmp_path / "part" / "checkpoints" / "step-000002" / "lora.safetensors")
    assert "token/vectors" in ckpt
    resumed = train(part)
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys() and EMB_PREFIX + "sks" in a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_refuses_a_change_of_train_token(photos, tmp_path):
    out = tmp_path / "r"
    train(_config(photos, out, steps=2, checkpoint_every=1, train_token=False))
    with pytest.raises(UserError, match="--train-token"):
        train(_config(photos, out, steps=3, checkpoint_every=1, resume=True, force=True))


def _plain_draw(pipe, seeds, steps=4):
    """What plain diffusers draws for PROMPT (no LoRA calls at all)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe([PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=7.5,
                    generator=generators, output_type="np").images


def test_text_scale_moves_the_rows_from_the_base_to_the_learned(token_run):
    """The rows belong to the adapter: UNet 0 / text 0 draws the untouched
    base model, text 1 puts the learned rows in, text 0.5 half way."""
    from lorabooth.adapters.lora import set_scales
    from lorabooth.generation import Setting, _scheduler, draw, load_pipeline
    from lorabooth.models.loading import load_base

    pipe, has_text = load_pipeline(token_run)
    base = load_base("tiny")
    plain = pipeline_from_parts(base, _scheduler("dpm", base))
    plain.set_progress_bar_config(disable=True)
    zero = draw(pipe, has_text, PROMPT, Setting(0.0, 0.0, 7.5), [0, 1], 4)
    got = [torch.tensor(list(im.getdata())) for im in zero]
    want = [torch.tensor(list(pipe.numpy_to_pil(a)[0].getdata())) for a in _plain_draw(plain, [0, 1])]
    assert all(torch.equal(g, w) for g, w in zip(got, want)), \
        max(int((g - w).abs().max()) for g, w in zip(got, want))

    ids = [_sks_id()]
    weight = pipe.text_encoder.get_input_embeddings().weight
    base_row = base.text_encoder.get_input_embeddings().weight[ids].detach()
    learned = _rows(token_run)["sks"]
    for scale, expected in ((1.0, learned), (0.0, base_row), (0.5, (base_row + learned) / 2)):
        set_scales(pipe, 1.0, scale, has_text)
        assert torch.allclose(weight[ids].detach(), expected, atol=1e-6), scale
    set_scales(pipe, 1.0, 1.0, has_text)
    assert torch.equal(weight[ids].detach(), learned)  # scale 1: exactly the trained rows
