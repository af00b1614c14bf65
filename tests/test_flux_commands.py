"""The commands around training on the flow-matching families (issue 27 §2):
evaluate, sweep, tune, the page, prepare and identifier on tiny-flux2 (FLUX.2
[klein], Qwen3's byte-level BPE in a chat template) and tiny-flux (FLUX.1,
CLIP and T5's unigram), and the guidance each family draws with when the
user gives none."""

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError

FAMILY_GUIDANCE = {"tiny-flux2": 4.0, "tiny-flux": 3.5}


@pytest.fixture(scope="module")
def flux_photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("fluxcmd") / "photos")


@pytest.fixture(scope="module")
def flux_runs(flux_photos, tmp_path_factory):
    """One 2-step run of each tiny FLUX model at 32 px."""
    root = tmp_path_factory.mktemp("fluxruns")
    return {model: train(TrainConfig(
        model=model, instance_dir=str(flux_photos), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", steps=2, seed=0, resolution=32, lr=1e-2,
        output=str(root / model))) for model in FAMILY_GUIDANCE}


@pytest.fixture
def one_prompt(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a {0} {1} on the beach\n")
    return str(f)


# --- guidance --------------------------------------------------------------
@pytest.mark.parametrize("model", sorted(FAMILY_GUIDANCE))
def test_generate_draws_at_the_familys_guidance_when_given_none(flux_runs, model, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", str(flux_runs[model]), "--prompt", "a photo of sks dog",
                 "--num-images", "1", "--steps", "2", "--width", "32", "--height", "32",
                 "--output", str(out)]) == 0
    [png] = sorted(p for p in out.rglob("*.png") if p.name != "grid.png")
    fields = json.loads(Image.open(png).text["lorabooth"])
    assert fields["guidance"] == FAMILY_GUIDANCE[model]
    assert png.name.startswith(f"u1_t1_g{FAMILY_GUIDANCE[model]:g}_")


def test_sd_still_draws_at_7_5_and_a_given_guidance_wins(trained_run, tmp_path):
    from lorabooth.config import EvaluateConfig, GenerateConfig, SweepGenerate

    out = tmp_path / "gen"
    assert main(["generate", str(trained_run), "--prompt", "a photo of sks dog", "--num-images",
                 "1", "--steps", "2", "--output", str(out)]) == 0
    assert [p.name.split("_s")[0] for p in out.rglob("u*.png")] == ["u1_t1_g7.5"]
    given = tmp_path / "given"
    assert main(["generate", str(trained_run), "--prompt", "a photo of sks dog", "--num-images",
                 "1", "--steps", "2", "--guidance", "2", "--output", str(given)]) == 0
    assert [p.name.split("_s")[0] for p in given.rglob("u*.png")] == ["u1_t1_g2"]
    # each option's help says what a missing guidance means
    for cls in (GenerateConfig, EvaluateConfig, SweepGenerate):
        from dataclasses import fields

        help_text = {f.name: f.metadata["help"] for f in fields(cls)}["guidance"]
        assert "4 for FLUX.2 [klein]" in help_text and "3.5 for FLUX.1 [dev]" in help_text


# --- evaluate ----------------------------------------------------------------
@pytest.mark.parametrize("model", sorted(FAMILY_GUIDANCE))
def test_evaluate_scores_a_flux_run(flux_runs, flux_photos, tiny_judges, one_prompt, model,
                                    tmp_path):
    dino, clip = tiny_judges
    out = tmp_path / "eval"
    assert main(["evaluate", str(flux_runs[model]), "--real", str(flux_photos), "--prompts",
                 one_prompt, "--images-per-prompt", "2", "--pres-images", "1", "--steps", "2",
                 "--dino", dino, "--clip", clip, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guidance"] == FAMILY_GUIDANCE[model]
    row = metrics["rows"]["lorabooth"]
    assert all(-1 <= row[m]["mean"] <= 1 for m in ("dino", "clip_i", "clip_t", "pres"))
    assert f"guidance {FAMILY_GUIDANCE[model]:g}" in (out / "report.md").read_text()


# --- sweep -------------------------------------------------------------------
def test_a_sweep_over_both_flux_families(flux_photos, tmp_path):
    """Two runs (one per family) trained, drawn at their own guidance, one report."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
[base]
instance_dir = "{flux_photos}"
instance_prompt = "a photo of sks dog"
class_prompt = "a photo of a dog"
steps = 1
resolution = 32
output = "{tmp_path / 'runs'}"

[train.grid]
model = ["tiny-flux2", "tiny-flux"]

[generate]
prompts = ["a photo of sks dog"]
seeds = [0]
steps = 2
""")
    assert main(["sweep", str(sweep)]) == 0
    runs = sorted((tmp_path / "runs").glob("model=*"))
    assert len(runs) == 2 and (tmp_path / "runs" / "report.html").is_file()
    for run in runs:
        model = run.name.split("=", 1)[1].rsplit("-", 1)[0]
        drawn = [p.parent.name for p in (run / "sweep").rglob("seed0.png")]
        assert drawn and all(f"_g{FAMILY_GUIDANCE[model]:g}_" in d for d in drawn), drawn


# --- tune --------------------------------------------------------------------
def test_the_search_space_of_a_flux_model(tmp_path):
    from lorabooth.search.tune import space_for_model
    from lorabooth.search.tune_space import Range, load_space

    for model, (low, high) in {"tiny-flux2": (2.5, 5.5), "tiny-flux": (2.0, 5.0)}.items():
        from lorabooth.models.loading import family_of_model

        space = space_for_model(load_space("", [1], family_of_model(model).guidance_range), model)
        assert space["guidance"] == Range(low, high)
        assert low < FAMILY_GUIDANCE[model] < high
        assert space["train_token"] == (False,)
        # FLUX.2's Qwen3 takes no LoRA; FLUX.1's CLIP-L does, so the search may train it
        assert (space["train_text_encoder"] == (False,)) == (model == "tiny-flux2")
    sd = load_space("", [1])
    assert sd["guidance"] == Range(3.0, 7.0) and space_for_model(sd, "tiny") is sd


def test_tune_two_trials_on_tiny_flux2(flux_photos, tiny_judges, one_prompt, tmp_path):
    from helpers import tune_argv

    out = tmp_path / "tune"
    assert main(tune_argv(flux_photos, out, tiny_judges, one_prompt, "--model", "tiny-flux2",
                          "--budget", "2", "--pruner", "none", "--pres-images", "1")) == 0
    assert (out / "report.md").is_file()
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        config = (trial / "config.toml").read_text()
        assert 'model = "tiny-flux2"' in config and "train_text_encoder = false" in config
        guidance = json.loads((trial / "eval" / "metrics.json").read_text())["guidance"]
        assert 2.5 <= guidance <= 5.5


# --- the page ----------------------------------------------------------------
def test_the_page_trains_and_draws_tiny_flux2(tmp_path, capsys):
    import sys

    from lorabooth.ui import handlers as h
    from lorabooth.ui.jobs import JobQueue
    from lorabooth.ui.workspace import Workspace
    from test_ui import FAKE, wait_idle

    ws = Workspace.open(tmp_path / "ws")
    make_photos(ws.root / "photos")
    queue = JobQueue(ws, launcher=[sys.executable, "-c", FAKE, "lorabooth"])
    values = {"model": "tiny-flux2", "instance_dir": "photos",
              "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
              "steps": 1, "output": "runs/a", "resolution": 32}
    with pytest.raises(UserError, match="^train text encoder: tiny-flux2 \\(flux2\\) cannot take"):
        h.start_training(ws, queue, {**values, "train_text_encoder": True})
    assert not (ws.root / "runs" / "a").exists()  # refused before anything is written
    job = h.start_training(ws, queue, values)
    wait_idle(queue)
    assert main(job.argv) == 0, capsys.readouterr().err
    # the draw tab's guidance 0: none given, the family's own
    [draw] = h.start_drawing(ws, queue, ["runs/a"], "a photo of sks dog", "1", "1", 0, 0, 1, 2)
    assert "--guidance" not in draw.argv
    wait_idle(queue)
    assert main(draw.argv + ["--width", "32", "--height", "32"]) == 0
    assert [p.name.split("_s")[0] for p in Path(draw.folder).rglob("u*.png")] == ["u1_t1_g4"]


# --- prepare -----------------------------------------------------------------
def test_prepare_sizes_the_set_for_the_model(tmp_path):
    from lorabooth.models.loading import model_resolution

    photos = make_photos(tmp_path / "photos")
    assert main(["prepare", str(photos), str(tmp_path / "out"), "--model", "tiny-flux2"]) == 0
    kept = json.loads((tmp_path / "out" / "prepare.json").read_text())
    sizes = {Image.open(tmp_path / "out" / e["output"]).size for e in kept["files"] if e["kept"]}
    assert sizes == {(32, 32)} and kept["config"]["resolution"] == 32  # tiny-flux2's own
    # the real architectures by their family, no weights built
    assert [model_resolution(m) for m in ("flux2-klein-random", "flux-random", "sd15-random",
                                         "sdxl-random")] == [1024, 1024, 512, 1024]


def test_prepare_refuses_a_model_that_is_nowhere(tmp_path, capsys):
    photos = make_photos(tmp_path / "photos")
    assert main(["prepare", str(photos), str(tmp_path / "out"), "--model", "./no/such"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model ./no/such: no such model folder or file" in err[0]
    assert not (tmp_path / "out").exists()


# --- identifier and the prompt checks ---------------------------------------
def _bpe_with(words: list[str]):
    """A Qwen-class byte-level BPE trained on the fixed text and ``words``."""
    import json as js

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    from lorabooth.models.flux_tokenizers import FIXED_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(FIXED_TEXT + ["a " + " ".join(words)] * 3, trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = js.loads(tok.to_str())["model"]
    return Qwen2TokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def _unigram_with(words: dict[str, float]):
    from transformers import T5TokenizerFast

    from lorabooth.models.flux_tokenizers import _unigram

    vocab = list(_unigram()) + [("\u2581" + w, score) for w, score in words.items()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def test_rare_single_tokens_of_a_byte_level_bpe():
    from lorabooth.photos.identifier import candidates, single_token, word_pieces

    tok = _bpe_with(["zwx", "qyv"])
    found = candidates(tok)
    assert {c.token for c in found} == {"zwx", "qyv"}
    for c in found:
        assert word_pieces(tok, c.token) == ["\u0120" + c.token] == tok.tokenize(" " + c.token)
        assert single_token(tok, c.token) == c.id and c.kind == "BPE merge"
        assert "BPE merge #" in c.why
    assert [c.merge_rank for c in found] == sorted((c.merge_rank for c in found), reverse=True)


def test_rare_single_tokens_of_a_unigram_model_rarest_first():
    from lorabooth.photos.identifier import candidates

    tok = _unigram_with({"zwx": -9.0, "qyv": -12.0, "dog": -13.0})  # dog: common English
    found = candidates(tok)
    assert [c.token for c in found] == ["qyv", "zwx"]  # the less probable first
    assert all(c.kind == "unigram piece" and tok.tokenize(c.token) == ["\u2581" + c.token]
               for c in found)


def test_identifier_cli_on_the_flux_tokenizers(capsys, caplog):
    assert main(["identifier", "--model", "tiny-flux", "--check", "a photo of zwx dog"]) == 0
    out = capsys.readouterr()
    assert "tokens (CLIPTokenizer)" in out.out and "tokens (T5Tokenizer)" in out.out
    assert "\u2581dog" in out.out and "dog</w>" in out.out
    assert "splits into 4 tokens ['\u2581', 'z', 'w', 'x'] by T5Tokenizer" in caplog.text
    assert "by CLIPTokenizer" in caplog.text
    assert main(["identifier", "--model", "tiny-flux2", "--check", "a photo of sks dog"]) == 0
    assert "\u0120sks" in capsys.readouterr().out
    # the tiny BPE learned only common words: one line, exit 2
    assert main(["identifier", "--model", "tiny-flux2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no rare 1-3 letter word" in err[0]


def test_flux2s_window_counts_the_chat_template():
    """Qwen3 reads the prompt inside its chat template, 512 tokens of it:
    the prompt is truncated once it and the whole template pass 512, the
    identifier cut once the template's head and the prompt up to it do;
    T5's window holds the prompt and its end token."""
    from lorabooth.models.flux_tokenizers import qwen_tokenizer, t5_tokenizer
    from lorabooth.models.tokenwindow import check_prompt, fit

    qwen, t5 = qwen_tokenizer(), t5_tokenizer()
    template = len(qwen(qwen.apply_chat_template(
        [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True,
        enable_thinking=False)).input_ids) - 1  # every token but the prompt's one
    head = len(qwen("<|im_start|>user\n").input_ids)
    assert template > head > 1

    def prompt(n):  # n + 1 tokens: "a", then n - 1 times " a", then " sks"
        return "a" + " a" * (n - 1) + " sks"

    assert not fit([qwen], prompt(512 - template - 1), ["sks"]).truncated
    tail = fit([qwen], prompt(512 - template), ["sks"])
    assert tail.truncated and tail.cut == () and tail.total == 513  # the template's tail
    assert fit([qwen], prompt(511 - head), ["sks"]).cut == ()
    last = fit([qwen], prompt(512 - head), ["sks"])
    assert last.cut == ("sks",) and last.window == 512
    assert fit([t5], "a " * 510 + "sks", ["sks"]).cut == ()
    assert fit([t5], "a " * 511 + "sks", ["sks"]).cut == ("sks",)
    with pytest.raises(UserError, match="falls past the text encoder's 512-token window"):
        check_prompt([qwen], prompt(600), ["sks"], "--prompt")
