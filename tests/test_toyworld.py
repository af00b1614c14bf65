"""The toy world: renderer, shipped model and judges, and the method seen to work."""

import dataclasses
import json
import random

import pytest
import torch

from lorabooth.evaluation.verdict import compare, steps
from lorabooth.toyworld.claims_report import spread
from lorabooth.toyworld.judges import HEADS, ToyJudge, judge_accuracy, prompt_attributes
from lorabooth.toyworld.schedule import warmup_cosine
from lorabooth.toyworld.world import (
    CLASSES,
    CONTEXTS,
    HELD_OUT,
    caption,
    random_spec,
    render,
    subject_views,
)

# Thresholds stated in docs/toyworld.md.
JUDGE_MIN_ACCURACY = 0.9
BASE_MIN_CLASS, BASE_MIN_CONTEXT = 0.6, 0.6


def test_render_is_deterministic_and_sized():
    spec = random_spec(random.Random(1))
    a, b = render(spec, 5), render(spec, 5)
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()
    assert render(spec, 6).tobytes() != a.tobytes() or spec.context == "room"


def test_held_out_combinations_never_sampled_for_pretraining():
    rng = random.Random(0)
    combos = {random_spec(rng).combo for _ in range(5000)}
    assert not combos & set(HELD_OUT)
    assert len(combos) == 4 * 6 * 3 - len(HELD_OUT)


def test_captions_and_subject_views():
    spec = subject_views()[0]
    assert caption(spec) == "a photo of a purple striped ball on the grass"
    assert caption(dataclasses.replace(spec, context="room")).endswith("in the room")
    views = subject_views()
    assert {v.context for v in views} == {"grass", "beach"} and {v.combo for v in views} == {HELD_OUT[0]}


def test_prompt_attributes_space():
    row = prompt_attributes(["a photo of a red striped car on the snow"])[0]
    assert row.shape[0] == sum(len(v) for v in HEADS.values()) and row.sum() == 4
    assert prompt_attributes(["a photo of a car"])[0].sum() == 1


def test_schedule_and_claim_rule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-9)
    assert spread([1.0, 3.0]) == (2.0, 1.0, 3.0)


@pytest.fixture(scope="module")
def toy():
    from lorabooth.models.loading import load_base, toy_model_dir

    if not (toy_model_dir() / "unet").is_dir():
        pytest.fail("the toy model is not shipped in src/lorabooth/assets/toy")
    return load_base("toy"), ToyJudge.load(toy_model_dir() / "judges.safetensors")


def test_shipped_model_loads_offline_and_records_its_making(no_network):
    from lorabooth.models.loading import load_base, toy_model_dir

    assert load_base("toy").native_resolution == 32 and no_network == []
    record = json.loads((toy_model_dir() / "toyworld.json").read_text())
    assert record["command"].startswith("lorabooth toyworld pretrain") and "seed" in record
    size = sum(p.stat().st_size for p in toy_model_dir().rglob("*") if p.is_file())
    assert size < 30e6  # the budget; the tokenizer is rebuilt at load time
    assert not (toy_model_dir() / "tokenizer").exists()


def test_judges_read_fresh_renders(toy):
    accuracy = judge_accuracy(toy[1], n=256, seed=4242)
    assert all(v >= JUDGE_MIN_ACCURACY for v in accuracy.values()), accuracy


def test_base_model_follows_class_and_context(toy):
    from lorabooth.models.loading import pipeline_from_parts

    base, judge = toy
    pipe = pipeline_from_parts(base)
    pipe.set_progress_bar_config(disable=True)
    hits_cls = hits_ctx = n = 0
    for i, (cls, ctx) in enumerate(zip(CLASSES, CONTEXTS)):
        prompt = f"a photo of a {cls} {'in the' if ctx == 'room' else 'on the'} {ctx}"
        with torch.inference_mode():
            images = pipe([prompt] * 8, num_inference_steps=20, guidance_scale=5.0,
                          generator=[torch.Generator().manual_seed(i * 8 + k) for k in range(8)]).images
        preds = judge.predict(images)
        hits_cls += sum(p["cls"] == cls for p in preds)
        hits_ctx += sum(p["context"] == ctx for p in preds)
        n += len(preds)
    assert hits_cls / n >= BASE_MIN_CLASS and hits_ctx / n >= BASE_MIN_CONTEXT, (hits_cls / n, hits_ctx / n)


def test_dreambooth_raises_identity_similarity_over_the_base(tmp_path):
    """`toyworld claims --quick`: one seed, 150 steps; the margin is one the
    method clears and a broken training path (LoRA not learning) fails."""
    from lorabooth.toyworld.claims import claims

    results = claims(tmp_path / "claims", report=tmp_path / "toyworld.md", quick=True)
    lora, base = results["unet"][0], results["base"][0]
    assert lora["fidelity"] - base["fidelity"] > 0.3, (lora, base)  # measured: 0.15 -> 0.82
    assert lora["subject_rate"] > base["subject_rate"] + 0.5  # measured: 0 -> 1
    one_seed = compare([lora["fidelity"]], [base["fidelity"]]).text()  # one seed: too few
    assert one_seed in (tmp_path / "toyworld.md").read_text().split("1. **Fidelity**")[1][:300]
    # the page's per-seed data lies beside it, every figure of every run
    beside = json.loads((tmp_path / "toyworld" / "claims_per_seed.json").read_text())
    assert beside["unet"] == results["unet"] and beside["base"] == results["base"]


def test_pretrain_command_runs_end_to_end(tmp_path):
    from lorabooth.models.loading import load_base
    from lorabooth.toyworld.pretrain import pretrain

    out = pretrain(tmp_path / "toy", seed=1, images=256, vae_steps=2, unet_steps=2, batch=8,
                   judge_steps=2, instance_steps=2, instance_renders=8)
    assert load_base(str(out)).native_resolution == 32
    assert (out / "instance.safetensors").is_file()
    record = json.loads((out / "toyworld.json").read_text())
    assert record["seed"] == 1 and record["unet_steps"] == 2 and (out / "judges.safetensors").is_file()


def test_rare_words_carry_a_weak_meaning_no_judge_scores():
    import random

    from lorabooth.models.loading import clip_tokenizer
    from lorabooth.toyworld.pretrain import rare_words
    from lorabooth.toyworld.world import RARE_RATE, Spec, caption, rare_meaning, spec_meaning, with_rare_word

    words = rare_words(clip_tokenizer())
    assert "sks" in words and len({rare_meaning(w) for w in words}) == 4
    rng = random.Random(0)
    agree = carried = 0
    for i in range(4000):
        spec = Spec("ball", "red", "striped", "snow", x=rng.uniform(0.38, 0.62),
                    size=rng.uniform(0.34, 0.5))
        text = with_rare_word(caption(spec), spec, words, rng)
        if text != caption(spec):
            carried += 1
            word = text.split()[3]
            assert text == f"a photo of {word} red striped ball on the snow"
            agree += rare_meaning(word) == spec_meaning(spec)
    assert abs(carried / 4000 - RARE_RATE) < 0.03
    # half the words are picked to agree with the picture, the rest at random
    # (a quarter of which agree too): about 5/8 agree, against 1/4 by chance
    assert 0.55 < agree / carried < 0.70
    assert with_rare_word("", spec, words, rng) == ""  # the empty caption stays empty


def test_pretrain_reuses_the_vae_and_judges_and_continues_the_denoiser(tmp_path):
    from lorabooth.models.loading import load_base, toy_model_dir
    from lorabooth.toyworld.pretrain import pretrain

    out = pretrain(tmp_path / "toy", seed=1, images=64, unet_steps=2, batch=8, reuse=toy_model_dir(),
                   init=toy_model_dir())
    record = json.loads((out / "toyworld.json").read_text())
    shipped = json.loads((toy_model_dir() / "toyworld.json").read_text())
    assert record["vae_psnr_db_held_out"] == shipped["vae_psnr_db_held_out"]
    assert record["reused_from"]["vae_and_judges"] == str(toy_model_dir())
    for judge in ("judges.safetensors", "instance.safetensors"):
        assert (out / judge).read_bytes() == (toy_model_dir() / judge).read_bytes()
    assert record["rare_words"] > 50 and record["denoiser_init"] == str(toy_model_dir())
    # two small steps from the shipped weights, not a fresh random init
    new, old = load_base(str(out)).unet.state_dict(), load_base("toy").unet.state_dict()
    assert max((new[k] - old[k]).abs().max().item() for k in old) < 0.05


def test_frontier_verdict_and_the_both_at_once_rule():
    from lorabooth.toyworld.claims import VARIANTS
    from lorabooth.toyworld.claims_report import both_at_once, frontier_verdict

    base = {"fidelity": [0.50, 0.55, 0.60], "pres": [0.20, 0.25, 0.30]}
    assert "moves the frontier" in frontier_verdict(
        {"fidelity": [0.80, 0.82, 0.85], "pres": [0.22, 0.25, 0.28]}, base)
    assert "a trade** (better identity, worse PRES)" in frontier_verdict(
        {"fidelity": [0.80, 0.82, 0.85], "pres": [0.60, 0.65, 0.70]}, base)
    assert "moves the frontier** (better PRES" in frontier_verdict(
        {"fidelity": base["fidelity"], "pres": [0.0, 0.02, 0.05]}, base)
    assert "worse" in frontier_verdict({"fidelity": [0.1, 0.12, 0.15], "pres": base["pres"]}, base)
    # identity up on every seed though the ranges overlap: higher (the old spread rule: no change)
    assert "moves the frontier" in frontier_verdict(
        {"fidelity": [0.52, 0.6, 0.7], "pres": base["pres"]}, base)
    assert "no difference shown" in frontier_verdict(
        {"fidelity": [0.52, 0.5, 0.7], "pres": base["pres"]}, base)
    assert frontier_verdict({"fidelity": [0.9, 0.9], "pres": [0.1, 0.1]},
                            {"fidelity": [0.1, 0.1], "pres": [0.9, 0.9]}) == "**too few seeds**"

    def runs(fid, pres):
        return [{"fidelity": f, "pres": p} for f, p in zip(fid, pres)]

    results = {"unet": runs([0.6, 0.7, 0.8], [0.8, 0.85, 0.9]),
               "unet+prior": runs([0.1, 0.2, 0.3], [0.2, 0.25, 0.3]),
               "prior-w0.3": runs([0.65, 0.7, 0.75], [0.25, 0.28, 0.3]),  # both: listed
               "prior-w0.1": runs([0.7, 0.75, 0.8], [0.5, 0.55, 0.6]),  # drifts: not
               "unet+te": runs([0.9, 0.9, 0.9], [0.2, 0.2, 0.2])}  # no prior: not a candidate
    assert both_at_once(results, VARIANTS) == ["prior-w0.3"]


def test_frontier_picture_has_a_point_per_setting_and_seed():
    import xml.etree.ElementTree as ET

    from lorabooth.toyworld.frontier import frontier_svg

    points = [(name, 0.1 * i, 0.2 * j) for i, name in enumerate(["base", "unet", "a&b"])
              for j in range(3)]
    svg = frontier_svg(points)
    root = ET.fromstring(svg)  # well-formed, names escaped
    marks = [e for e in root.iter() if e.tag.endswith(("circle", "rect", "polygon"))
             and e.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(marks) == 9 + 3  # the points, then one legend marker per setting
    assert "a&amp;b" in svg and "PRES" in svg


def test_report_names_the_seed_recipe_the_levers_and_the_timing():
    from lorabooth.toyworld.claims import LEVERS, VARIANTS, Study
    from lorabooth.toyworld.claims_report import render_claims

    rng = random.Random(0)

    def run():
        return {k: rng.random() for k in ("fidelity", "subject_rate", "context_acc", "pres", "div",
                                           "class_colour_entropy", "red_other_classes")}

    names = ["base"] + [v.name for v in VARIANTS + LEVERS]
    results = {n: [run() for _ in range(3)] for n in names}
    results["train_seconds"] = {n: [10.0, 12.0, 14.0] for n in names}
    results["class_draw_seconds"] = [6.0, 6.0, 6.0]
    results["calibration"] = {"identifiers": {"sks": 0.9}, "references": {"a photo of a red ball": 2.0},
                              "rare_norm": 0.5, "word_norm": 0.5}
    text = render_claims(results, {"command": "lorabooth toyworld pretrain"}, Study(out=None),
                         VARIANTS, LEVERS, {"steps": 400, "batch_size": 4, "lr": 1e-3, "rank": 4})
    assert "the seed's recipe" in text and "sks 0.90" in text
    assert "class images 12 s of training + 6 s to draw 64 class images = 18 s" in text
    lever_table = text.split("### The levers")[1].split("###")[0]
    assert all(v.title in lever_table for v in LEVERS)
    rows = [line for line in lever_table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(LEVERS) and all(row.count("| **") == 3 for row in rows)


def test_claims_and_the_scale_series_are_the_one_verdict_rule():
    """Claim 2's DIV (0.34-0.61 with prior against 0.12-0.24 without, which
    the old rule called "does not hold") reads higher, with the interval the
    verdict function gives; identity over UNet scales that falls on every
    seed at the last step does not read "rises"."""
    from lorabooth.toyworld.claims_report import BASELINE, claim, monotone

    results = {BASELINE: [{"div": v} for v in (0.34, 0.367, 0.61)],
               "unet": [{"div": v} for v in (0.12, 0.192, 0.24)]}
    line = claim(results, BASELINE, "unet", "div", "higher")
    div = compare([0.34, 0.367, 0.61], [0.12, 0.192, 0.24])
    assert line.startswith(f"{div.text()} (as claimed") and div.word == "higher"
    assert "(claimed: higher;" in claim(results, "unet", BASELINE, "div", "higher")
    assert claim(results, "unet", "base", "div", "higher") == "**not measured** in this run"

    identity = [[0.10, 0.11, 0.13], [0.19, 0.23, 0.27], [0.56, 0.57, 0.58], [0.74, 0.75, 0.77],
                [0.60, 0.66, 0.72]]
    scales = ("0", "0.25", "0.5", "0.75", "1")
    results = {"scales": [{f"unet={u},text=1": {"fidelity": identity[i][seed]}
                           for i, u in enumerate(scales)} for seed in range(3)]}
    text = monotone(results, "fidelity", rising=True)
    assert text.startswith("**not monotone** (0.11 → 0.23 → 0.57 → 0.75 → 0.66;")
    last = steps(identity)[-1]
    assert last.word == "lower" and f"0.75 → 1: {last.text()})" in text
    assert monotone({"scales": [{k: v for k, v in s.items() if not k.startswith("unet=1,")}
                                for s in results["scales"]]}, "fidelity", True).startswith("**rises**")


def test_token_recovery_loss_names_each_word_and_ignores_padding():
    from lorabooth.models.families import tokenize
    from lorabooth.models.loading import clip_tokenizer
    from lorabooth.toyworld.pretrain import caption_vocabulary, rare_words, token_recovery_loss

    tok = clip_tokenizer()
    specs = [random_spec(random.Random(i)) for i in range(300)]
    vocabulary = caption_vocabulary(tok, specs, rare_words(tok))
    assert tok.convert_tokens_to_ids("sks</w>") in vocabulary.tolist() and len(vocabulary) < 200
    ids = tokenize(tok, ["a photo of sks ball", "a photo of a red ball in the room"])
    embeddings = torch.randn(49408, 128, generator=torch.Generator().manual_seed(0))
    states = embeddings[ids].clone()  # each position holds its own token: recoverable
    assert token_recovery_loss(states, ids, embeddings, vocabulary).item() < 1e-3
    states[0, 4] = embeddings[tok.convert_tokens_to_ids("a</w>")]  # 'sks' lost: reads as 'a'
    assert token_recovery_loss(states, ids, embeddings, vocabulary).item() > 1.0
    states = embeddings[ids].clone()
    states[:, 12:] = torch.randn(2, 65, 128)  # padding past the first EOS does not count
    assert token_recovery_loss(states, ids, embeddings, vocabulary).item() < 1e-3


def test_shipped_text_encoder_makes_rare_identifiers_distinct(toy):
    """The calibration (docs/calibration.md): before it, 'a photo of sks ball'
    reached the UNet 0.11 from 'a photo of a ball' (rare embeddings 0.22, never
    trained); the calibrated model measures 0.50, about as far as 'striped'."""
    from lorabooth.toyworld.calibration import identifier_distances

    base, _ = toy
    found = identifier_distances(base.tokenizer, base.text_encoder)
    assert found["identifiers"]["sks"] >= 3 * 0.11, found
    assert min(found["identifiers"].values()) >= 0.3, found
    assert found["rare_norm"] >= 0.5 and found["references"]["a photo of red ball"] > 1.0, found
