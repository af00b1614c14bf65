import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import PINNED_FIRST_LOSSES, make_photos
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import lora_metadata
from lorabooth.core.errors import UserError
from lorabooth.formats import WEIGHT_NAME


def _config(photos, out, **kw):
    base = dict(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                steps=3, seed=0, output=str(out))
    return TrainConfig(**{**base, **kw})


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_first_losses_are_pinned(photos, tmp_path):
    """torchtune's habit: the loss of a seeded run on the built-in model is a
    known number; a change to the data path, noise, timesteps or loss shows here."""
    run = train(_config(photos, tmp_path / "r", steps=3))
    got = [r["loss"] for r in _losses(run)]
    assert got == pytest.approx(PINNED_FIRST_LOSSES, abs=1e-4), got


def test_prior_term_is_logged_separately(trained_run):
    rows = _losses(trained_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5)
        assert r["lr"] == 1e-2 and r["lr_text"] == 1e-2 and r["s_per_step"] > 0


def test_only_lora_weights_change(photos, tmp_path, on_finish):
    from lorabooth.models.loading import build_tiny

    run = train(_config(photos, tmp_path / "r", steps=2, lr=1e-2, train_text_encoder=True))
    saved = load_file(run / WEIGHT_NAME)
    assert saved and all("lora" in k for k in saved)
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)
    ups = [v for k, v in saved.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # B started at zero and moved

    # the frozen weights inside the trained modules are untouched
    captured = {}
    on_finish(lambda config, base, modules: captured.update(unet={
        k: v.clone() for k, v in modules["unet"].state_dict().items() if "lora_" not in k}))
    train(_config(photos, tmp_path / "r2", steps=2, lr=1e-2))
    reference = build_tiny().unet.state_dict()
    for k, v in captured["unet"].items():
        key = k.replace(".base_layer", "")
        assert torch.equal(v, reference[key]), k


def test_run_folder_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {WEIGHT_NAME, "config.toml", "metrics.jsonl", "README.md", "samples",
            "class_images"} <= names
    meta = lora_metadata(trained_run)
    assert meta["base_model"] == "tiny" and meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["instance_prompt"] == "a photo of sks dog" and meta["steps"] == 4
    assert meta["train_text_encoder"] is True and meta["resolution"] == 64
    assert (trained_run / "samples" / "step-000004.png").is_file()
    assert "a photo of sks dog" in (trained_run / "README.md").read_text()
    assert len(list((trained_run / "class_images").glob("*.png"))) == 2


def test_config_toml_reruns_the_same_settings(trained_run):
    from lorabooth.config import TrainConfig, build_config

    again = build_config(TrainConfig, trained_run / "config.toml", {})
    assert again.alpha == 8 and again.train_text_encoder and again.steps == 4


def test_resume_continues_from_the_checkpoint(photos, tmp_path, caplog):
    caplog.set_level("INFO", logger="lorabooth")
    full = train(_config(photos, tmp_path / "full", steps=6, checkpoint_every=3, lr=1e-2))
    part = _config(photos, tmp_path / "part", steps=6, checkpoint_every=3, lr=1e-2, resume=True)
    caplog.clear()
    train(TrainConfig(**{**part.__dict__, "steps": 4}))  # "killed" after step 4; checkpoint at 3
    # a first run with --resume (as `make demo` does) has nothing to resume and says nothing of it
    said = [r.getMessage().lower().replace(str(tmp_path).lower(), "") for r in caplog.records]
    assert not [m for m in said if "resum" in m or "no checkpoint" in m], said
    assert (tmp_path / "part" / "checkpoints" / "step-000003").is_dir()
    caplog.clear()
    resumed = train(part)
    said = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert len(said) == 1 and "step-000003 (step 3)" in said[0], said
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [r["step"] for r in _losses(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _losses(resumed)] == pytest.approx([r["loss"] for r in _losses(full)])


def test_bad_instance_folders(tmp_path):
    with pytest.raises(UserError, match="--instance-dir .*no such folder"):
        train(_config(tmp_path / "nope", tmp_path / "r"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable images"):
        train(_config(tmp_path / "empty", tmp_path / "r"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("not an image")
    with pytest.raises(UserError, match="no readable images"):
        train(_config(tmp_path / "junk", tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing created before the input is checked


def test_output_that_is_a_file(photos, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--output .*is a file"):
        train(_config(photos, tmp_path / "file"))


def test_v_prediction_model_trains_on_the_velocity(photos, tmp_path, monkeypatch):
    """A v-prediction base (SD 2.x style): every step's loss is the MSE of the
    UNet's prediction against diffusers' own velocity (the scheduler's
    get_velocity), which differs from the MSE against the noise."""
    import torch.nn.functional as F

    import lorabooth.training.loop as t
    from lorabooth.models.loading import build_tiny

    def v_tiny(name, model_config="", unet_dtype=None, precision="auto"):
        base = build_tiny()
        base.noise_scheduler.register_to_config(prediction_type="v_prediction")
        return base

    seen = []
    real_step_loss = t.step_loss

    def spy(denoiser, latents, noise, timesteps, context, n_instance, prior_weight, *levers):
        out = real_step_loss(denoiser, latents, noise, timesteps, context, n_instance,
                             prior_weight, *levers)
        scheduler, unet = denoiser.noising.scheduler, denoiser.module
        with torch.no_grad():  # the same inputs, the target taken from the scheduler
            pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                        context.hidden).sample
            velocity = scheduler.get_velocity(latents, noise, timesteps)
            seen.append((out[0].item(), F.mse_loss(pred, velocity).item(),
                         F.mse_loss(pred, noise).item()))
        return out

    monkeypatch.setattr(t, "load_base", v_tiny)
    monkeypatch.setattr(t, "step_loss", spy)
    run = train(_config(photos, tmp_path / "v", steps=2))
    assert len(seen) == 2
    for loss, against_velocity, against_noise in seen:
        assert loss == pytest.approx(against_velocity, rel=1e-5)
        assert against_velocity != pytest.approx(against_noise, rel=1e-2)
    assert [r["loss"] for r in _losses(run)] == pytest.approx([s[0] for s in seen])


def test_bf16_autocast_keeps_lora_fp32_and_validates_on_schedule(photos, tmp_path, on_finish):
    seen = {}
    on_finish(lambda config, base, modules: seen.update(
        dtypes={p.dtype for p in modules["unet"].parameters() if p.requires_grad}))
    run = train(_config(photos, tmp_path / "bf16", steps=2, mixed_precision="bf16",
                        validation_prompt="a photo of sks dog", validation_every=1))
    assert seen["dtypes"] == {torch.float32}
    assert all(v.dtype == torch.float32 for v in load_file(run / WEIGHT_NAME).values())
    assert all(math.isfinite(r["loss"]) for r in _losses(run))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]


def test_captions_flow_into_the_batches(photos, tmp_path, caplog):
    import lorabooth.training.loop as t
    from lorabooth.models.families import tokenize
    from lorabooth.models.loading import build_tiny
    from lorabooth.training.data import readable_images
    (photos / "photo_0.txt").write_text("a photo of sks dog on a red sofa\n")
    (photos / "photo_1.txt").write_text("a photo of a dog\n")  # forgot the identifier
    config = _config(photos, tmp_path / "r", captions=True, class_prompt="a photo of a dog")
    base = build_tiny()
    paths = readable_images(photos)
    examples = t.setup_examples(config, base, 64, paths, t.instance_captions(config, paths), [])
    want = ["a photo of sks dog on a red sofa", "a photo of a dog", "a photo of sks dog"]
    assert torch.equal(examples.instance_ids, tokenize(base.tokenizer, want)[:, None])  # (N, 1 encoder, 77)
    assert any("photo_1.txt" in r.getMessage() and "lacks the identifier" in r.getMessage()
               for r in caplog.records)
    # the batch for images [2, 0] carries their own captions' embeddings, in order
    context = t.text_context(examples, {"unet": None}, [2, 0], 0, torch.device("cpu")).hidden
    assert torch.equal(context[0], examples.instance_embedding.hidden[2])
    assert not torch.equal(context[0], context[1])
    # without --captions the .txt files are ignored
    plain_config = _config(photos, tmp_path / "r")
    plain = t.setup_examples(plain_config, base, 64, paths,
                              t.instance_captions(plain_config, paths), [])
    assert torch.equal(plain.instance_ids, tokenize(base.tokenizer, ["a photo of sks dog"] * 3)[:, None])


def test_prior_from_the_model_draws_no_images_and_logs_its_loss(photos, tmp_path):
    """--prior-preservation model: no class images drawn or stored, the prior
    term is logged each step and recorded as the mode everywhere."""
    run = train(_config(photos, tmp_path / "r", steps=3, lr=1e-2, lr_text=1e-2,
                        class_prompt="a photo of a dog", prior_preservation="model",
                        train_text_encoder=True, prior_loss_weight=0.5))
    assert not (run / "class_images").exists()
    assert not list(run.rglob("class_*.png"))
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_instance"] + 0.5 * r["loss_prior"], rel=1e-5)
    # step 1: the LoRA starts as a no-op, so it predicts what the frozen model does
    assert rows[0]["loss_prior"] < 1e-8 < rows[-1]["loss_prior"]
    assert lora_metadata(run)["prior_preservation"] == "model"
    assert 'prior_preservation = "model"' in (run / "config.toml").read_text()
    assert "image-free" in (run / "README.md").read_text()


@pytest.mark.parametrize("train_text_encoder, train_token", [(False, False), (True, False),
                                                        (False, True)])
def test_dop_prior_conditions_each_prior_row_on_its_caption_without_the_identifier(
        photos, tmp_path, train_text_encoder, train_token, monkeypatch):
    """--prior-preservation dop: one frozen class row per photo (its caption,
    identifier removed), picked by the batch's photos; the run trains, logs
    its prior term and says so in its card."""
    import lorabooth.training.loop as t
    from lorabooth.models.families import encode_prompts
    from lorabooth.models.loading import build_tiny

    for i, text in enumerate(["sks dog on grass", "a photo of sks dog", "sks dog in snow"]):
        (photos / f"photo_{i}.txt").write_text(text)
    kw = dict(class_prompt="a photo of a dog", prior_preservation="dop", captions=True,
              train_text_encoder=train_text_encoder, train_token=train_token)
    base = build_tiny()
    config = _config(photos, tmp_path / "r", **kw)
    paths = sorted(photos.glob("*.png"))
    examples = t.setup_examples(config, base, 64, paths, t.instance_captions(config, paths), [])
    expected = encode_prompts(base.family, base.tokenizers, base.text_encoders,
                              ["dog on grass", "a photo of dog", "dog in snow"])
    if not train_text_encoder:
        assert torch.equal(examples.class_embedding.hidden, expected.hidden)
    context = t.class_context(examples, [2, 0], 2, torch.device("cpu"))
    assert torch.allclose(context.hidden, expected.hidden[[2, 0]], atol=1e-6)

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return model_prior_rows(*args, **kwargs)

    model_prior_rows = t.model_prior_rows
    monkeypatch.setattr(t, "model_prior_rows", spy)
    run = train(_config(photos, tmp_path / "run", steps=3, lr=1e-2, lr_text=1e-2, **kw))
    assert [c["same_noise"] for c in calls] == [True] * 3
    rows = _losses(run)
    assert rows[0]["loss_prior"] < 1e-8 < rows[-1]["loss_prior"]  # the LoRA starts as a no-op
    assert lora_metadata(run)["prior_preservation"] == "dop"
    assert "differential output preservation" in (run / "README.md").read_text()


def test_prior_from_the_model_resumes_to_the_same_numbers(photos, tmp_path, caplog):
    kw = dict(lr=1e-2, class_prompt="a photo of a dog", prior_preservation="model",
              checkpoint_every=2)
    straight = train(_config(photos, tmp_path / "a", steps=4, **kw))
    out = tmp_path / "b"
    train(_config(photos, out, steps=3, **kw))  # leaves a checkpoint at step 2
    caplog.set_level("INFO", logger="lorabooth")
    resumed = train(_config(photos, out, steps=4, resume=True, **kw))
    assert "(step 2)" in caplog.text  # it did resume: the prior's draws continue the stream
    assert _losses(resumed) == [{**r, "s_per_step": r2["s_per_step"]}
                                for r, r2 in zip(_losses(straight), _losses(resumed))]
    a, b = load_file(straight / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_caption_dropout_swaps_only_the_marked_instance_rows(photos, tmp_path):
    import lorabooth.training.loop as t
    from lorabooth.models.families import encode_prompts, tokenize
    from lorabooth.models.loading import build_tiny

    base = build_tiny()
    paths = sorted(photos.glob("*.png"))
    dropped = torch.tensor([True, False, True])
    for train_text in (False, True):
        config = _config(photos, tmp_path / "r", caption_dropout=0.5, train_text_encoder=train_text,
                         class_prompt="a photo of a dog", prior_preservation=True)
        examples = t.setup_examples(config, base, 64, paths, t.instance_captions(config, paths),
                                     paths[:1])
        if train_text:  # the ids go through the (trained) encoder: look at them directly
            modules = {"text_encoder": lambda ids: (ids,)}
            empty = tokenize(base.tokenizer, [""])
            kept, klass = examples.instance_ids[:, 0], examples.class_ids[:, 0]
        else:
            modules = {"unet": None}
            empty = encode_prompts(base.family, base.tokenizers, base.text_encoders, [""]).hidden
            kept, klass = examples.instance_embedding.hidden, examples.class_embedding.hidden
        context = t.text_context(examples, modules, [2, 0, 1], 2, torch.device("cpu"), dropped).hidden
        assert len(context) == 5
        assert torch.equal(context[0], empty[0]) and torch.equal(context[2], empty[0])
        assert torch.equal(context[1], kept[0])  # row 1 kept image 0's prompt
        assert torch.equal(context[3], klass[0]) and torch.equal(context[4], klass[0])  # never dropped
        assert not torch.equal(kept[0], empty[0])
        off = t.text_context(examples, modules, [2, 0, 1], 2, torch.device("cpu"),
                              torch.zeros(3, dtype=torch.bool)).hidden
        assert torch.equal(off, t.text_context(examples, modules, [2, 0, 1], 2,
                                               torch.device("cpu")).hidden)
    plain = t.setup_examples(_config(photos, tmp_path / "r"), base, 64, paths,
                              [PROMPT] * 3, [])
    assert plain.empty_embedding is None and plain.empty_ids is None  # off: nothing extra cached


PROMPT = "a photo of sks dog"


def test_validation_during_an_ema_run_draws_the_average(photos, tmp_path, monkeypatch):
    """An intermediate sample (and tune's pruner, which scores it) sees the
    weights the run would save, then training goes on from its own."""
    import lorabooth.training.loop as t
    from lorabooth.training.checkpoint import trainable_state

    shadows, drawn, raw = [], [], []
    real_update, real_validate = t.ema_update, t._validate

    def update_spy(shadow, modules, decay, step):
        real_update(shadow, modules, decay, step)
        shadows.append({k: v.clone() for k, v in shadow.items()})
        raw.append({k: v.clone() for k, v in trainable_state(modules).items()})

    def validate_spy(config, base, output, step):
        drawn.append({k: v.clone() for k, v in trainable_state({"unet": base.unet}).items()})
        return real_validate(config, base, output, step)

    monkeypatch.setattr(t, "ema_update", update_spy)
    monkeypatch.setattr(t, "_validate", validate_spy)
    train(_config(photos, tmp_path / "ema-val", steps=2, lr=1e-2, ema_decay=0.5,
                  validation_prompt=PROMPT, validation_every=1, validation_images=1))
    at_step_1 = drawn[0]
    assert at_step_1 and all(torch.equal(v, shadows[0][k]) for k, v in at_step_1.items())
    assert any(not torch.equal(v, raw[0][k]) for k, v in at_step_1.items())


def test_ema_run_saves_the_average_not_the_last_weights(photos, tmp_path, on_finish, monkeypatch):
    import lorabooth.training.loop as t
    from lorabooth.formats.layouts import module_lora, read_as_peft
    from lorabooth.training.checkpoint import trainable_state

    seen = []  # the raw LoRA weights: at the start, then after each step

    def clone(modules):
        return {k: v.clone() for k, v in trainable_state(modules).items()}

    def shadow_spy(modules, decay):
        seen.append(clone(modules))
        return real_shadow(modules, decay)

    def update_spy(shadow, modules, decay, step):
        seen.append(clone(modules))
        real_update(shadow, modules, decay, step)

    real_shadow, real_update = t.ema_shadow, t.ema_update
    monkeypatch.setattr(t, "ema_shadow", shadow_spy)
    monkeypatch.setattr(t, "ema_update", update_spy)
    finished = {}
    on_finish(lambda config, base, modules: finished.update(
        state=clone(modules), unet=module_lora(modules["unet"], "unet")))
    run = train(_config(photos, tmp_path / "ema", steps=2, lr=1e-2, ema_decay=0.5))
    w0, w1, w2 = seen
    d0, d1 = 1 / 10, 2 / 11  # diffusers' warm-up: min(decay, (1 + step) / (10 + step))
    for k, got in finished["state"].items():
        expected = d1 * (d0 * w0[k] + (1 - d0) * w1[k]) + (1 - d1) * w2[k]
        assert torch.allclose(got, expected, atol=1e-7), k
    moved = [k for k in w2 if not torch.allclose(w2[k], finished["state"][k])]
    assert moved  # the last step's weights are not what was saved
    saved, _, _, _ = read_as_peft(run / WEIGHT_NAME)
    assert finished["unet"].keys() <= saved.keys()
    assert all(torch.equal(saved[k], v) for k, v in finished["unet"].items())


def test_all_four_levers_resume_exactly_and_load_in_diffusers(photos, tmp_path, monkeypatch):
    """--snr-gamma, --noise-offset, --caption-dropout and --ema-decay at once,
    with prior preservation and a trained text encoder: each reaches the loop,
    a run killed after step 3 and resumed from its step-2 checkpoint ends with
    the uninterrupted run's file, and plain diffusers loads that file."""
    import lorabooth.training.loop as t
    import lorabooth.training.noising as noising
    from helpers import tiny_outputs
    from lorabooth.models.loading import build_tiny, pipeline_from_parts

    calls = {"offset": [], "dropped": [], "gamma": []}

    def spy(name, real, record, module=t):
        def wrapped(*args):
            out = real(*args)
            calls[name].append(record(args, out))
            return out
        monkeypatch.setattr(module, real.__name__, wrapped)

    spy("offset", t.offset_noise, lambda a, out: (a[1], not torch.equal(out, a[0])))
    spy("dropped", t.caption_dropout, lambda a, out: out.tolist())
    spy("gamma", noising.min_snr_weights, lambda a, out: (a[2], out.tolist()), noising)
    levers = dict(snr_gamma=5.0, noise_offset=0.1, caption_dropout=0.5, ema_decay=0.8,
                  batch_size=2, lr=1e-2, lr_text=1e-2, train_text_encoder=True,
                  prior_preservation=True, class_prompt="a photo of a dog", num_class_images=2,
                  class_dir=str(make_photos(tmp_path / "cls", 2)), resolution=32,
                  steps=4, checkpoint_every=2)
    full = train(_config(photos, tmp_path / "full", **levers))
    assert [c[0] for c in calls["offset"]] == [0.1] * 4 and all(c[1] for c in calls["offset"])
    dropped = [d for row in calls["dropped"] for d in row]
    assert len(dropped) == 8 and 0 < sum(dropped) < 8  # two instance rows a step
    assert len(calls["gamma"]) == 4 and all(g == 5.0 and len(w) == 4 for g, w in calls["gamma"])

    part = _config(photos, tmp_path / "part", resume=True, **levers)
    train(TrainConfig(**{**part.__dict__, "steps": 3}))  # "killed" after step 3
    resumed = train(part)
    a, b = load_file(full / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [r["loss"] for r in _losses(resumed)] == pytest.approx([r["loss"] for r in _losses(full)])

    meta = lora_metadata(full)
    assert (meta["snr_gamma"], meta["noise_offset"], meta["caption_dropout"],
            meta["ema_decay"]) == (5.0, 0.1, 0.5, 0.8)
    assert "| 5, 0.1, 0.5, 0.8 |" in (full / "README.md").read_text()
    pipe = pipeline_from_parts(build_tiny())
    pipe.load_lora_weights(str(full), weight_name=WEIGHT_NAME)  # plain diffusers
    (unet, text), (base_unet, base_text) = tiny_outputs(pipe), tiny_outputs(
        pipeline_from_parts(build_tiny()))
    assert not torch.allclose(unet, base_unet, atol=1e-5)
    assert not torch.allclose(text, base_text, atol=1e-5)


def test_the_levers_combine_and_the_run_draws(tmp_path):
    """The levers came from separate branches: all of them at once (image-free
    prior, text-encoder LoRA, trained token, DoRA, EMA, min-SNR, noise offset,
    caption dropout) train, resume from a checkpoint to the same file, and draw."""
    from lorabooth.generation import generate

    photos = make_photos(tmp_path / "photos")
    levers = dict(prior_preservation="model", train_text_encoder=True, train_token=True,
                  adapter="dora", ema_decay=0.9, snr_gamma=5.0, noise_offset=0.05,
                  caption_dropout=0.5, save_format="diffusers")

    def config(out, steps, **kw):
        return TrainConfig(model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
                           class_prompt="a photo of a dog", steps=steps, resolution=64,
                           output=str(tmp_path / out), checkpoint_every=2, **levers, **kw)

    straight = train(config("straight", 4))
    train(config("resumed", 3))  # leaves its step-2 checkpoint: the resume starts there
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000002"]
    resumed = train(config("resumed", 4, resume=True))
    a, b = load_file(straight / WEIGHT_NAME), load_file(resumed / WEIGHT_NAME)
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    assert any(k.startswith("lorabooth_emb.") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_prior"] is not None and math.isfinite(r["loss"]) for r in losses)
    meta = lora_metadata(straight)
    assert (meta["prior_preservation"], meta["adapter"], meta["train_token"]) == ("model", "dora", True)
    images = generate(straight, ["a photo of sks dog"], num_images=1, steps=2)
    assert len(images) == 1
