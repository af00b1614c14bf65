import csv

import pytest

from helpers import strict_loads
from lorabooth import evaluate
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.evaluation.embedders import Judges
from lorabooth.evaluation.report import COLUMNS


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a {0} {1} in the jungle\na {0} {1} on the beach\n")
    return str(f)


def test_full_table_with_baselines(trained_run, session_photos, tiny_judges, prompts_file,
                                   tmp_path, monkeypatch):
    dino, clip = tiny_judges
    out = tmp_path / "eval"
    result = evaluate(trained_run, str(session_photos), prompts_file=prompts_file,
                      images_per_prompt=2, steps=2, out=out, baselines=True, dino=dino,
                      clip=clip, pres_images=2)
    assert result["identifier"] == "sks" and result["class_noun"] == "dog"
    assert list(result["rows"]) == ["base model (no LoRA)", "lorabooth", "real images"]
    for row in ("base model (no LoRA)", "lorabooth"):
        for metric in ("dino", "clip_i", "clip_t", "pres", "div"):
            stat = result["rows"][row][metric]
            assert -1 <= stat["mean"] <= 1 and stat["std"] >= 0, (row, metric)
    assert result["rows"]["real images"]["dino"]["n"] == 3  # leave-one-out per photo
    saved = strict_loads((out / "metrics.json").read_text())
    assert saved["rows"]["real images"]["clip_t"] == {"mean": None, "std": None, "n": 0}
    assert saved["rows"]["lorabooth"]["dino"]["mean"] == pytest.approx(
        result["rows"]["lorabooth"]["dino"]["mean"])
    rows = list(csv.DictReader((out / "per_prompt.csv").open()))
    assert len(rows) == 4 and rows[0]["prompt"] == "a sks dog in the jungle"
    report = (out / "report.md").read_text()
    for _, title in COLUMNS:
        assert title in report
    assert "| lorabooth |" in report and "DreamBooth, Stable Diffusion (paper)" in report
    assert "0.668" in report and "with the identifier removed" in report
    assert "LPIPS" in report
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "00-a-dog-in-the-jungle.png", "01-a-dog-on-the-beach.png"]

    # a second evaluation (here with CLIP as the identity judge too) draws nothing
    import lorabooth.generation
    from lorabooth.evaluation.embedders import clip_embedders

    calls = []
    monkeypatch.setattr(lorabooth.generation, "draw", lambda *a, **k: calls.append(a) or [])
    clip_image, clip_text = clip_embedders(clip)
    other = Judges(identity=clip_image, image=clip_image, text_image=clip_image, text=clip_text,
                   names={"dino": clip, "clip": clip})
    again = evaluate(trained_run, str(session_photos), prompts_file=prompts_file,
                     images_per_prompt=2, steps=2, out=out, baselines=True, judges=other,
                     pres_images=2)
    assert calls == []
    assert again["rows"]["lorabooth"]["clip_i"]["mean"] == pytest.approx(
        result["rows"]["lorabooth"]["clip_i"]["mean"])
    assert again["rows"]["lorabooth"]["dino"]["mean"] != pytest.approx(
        result["rows"]["lorabooth"]["dino"]["mean"])  # the new identity judge was used


def test_identifier_dropped_for_clip_t():
    from lorabooth.evaluation.runner import load_prompts

    live = load_prompts("live", None, "sks", "dog")
    assert len(live) == 25 and live[0].full == "a sks dog in the jungle"
    assert live[0].clean == "a dog in the jungle"
    assert len(load_prompts("object", None, "sks", "toy")) == 25


def test_custom_judges_through_the_python_api(trained_run, session_photos, prompts_file, tmp_path):
    """The toy world and sweeps plug in any embedding callables. Each figure
    equals the one worked out here from the images evaluate drew (cached on
    disk) and the photos, with CLIP-T against the prompt without the identifier."""
    import torch
    from PIL import Image
    from torch.nn.functional import cosine_similarity

    def colour(images):  # mean colour as an "embedding"
        return torch.stack([torch.tensor(im.convert("RGB").resize((1, 1)).getpixel((0, 0)),
                                         dtype=torch.float) for im in images])

    def letters(prompts):  # a text "embedding" that tells prompts apart
        return torch.tensor([[len(p), p.count("a"), p.count("e")] for p in prompts],
                            dtype=torch.float)

    judges = Judges(identity=colour, image=colour, text_image=colour, text=letters,
                    names={"dino": "colour", "clip": "colour"})
    out = tmp_path / "e"
    result = evaluate(trained_run, str(session_photos), prompts_file=prompts_file,
                      images_per_prompt=2, steps=2, out=out, judges=judges, pres_images=2)

    real = colour([Image.open(p) for p in sorted(session_photos.glob("*.png"))])
    (setting,) = (out / "images").iterdir()  # one row: the LoRA at scale 1
    clip_t, dino = [], []
    for slug, clean in (("00-a-dog-in-the-jungle", "a dog in the jungle"),
                        ("01-a-dog-on-the-beach", "a dog on the beach")):
        drawn = colour([Image.open(setting / slug / f"seed{s}.png") for s in (0, 1)])
        clip_t.append(cosine_similarity(drawn, letters([clean])).mean().item())
        dino.append(torch.stack([cosine_similarity(drawn, r[None]) for r in real]).mean().item())
    row = result["rows"]["lorabooth"]
    assert row["clip_t"]["mean"] == pytest.approx(sum(clip_t) / 2, abs=1e-6)
    assert row["clip_t"]["std"] == pytest.approx(abs(clip_t[0] - clip_t[1]) / 2, abs=1e-6)
    assert row["dino"]["mean"] == pytest.approx(sum(dino) / 2, abs=1e-6)
    assert row["clip_i"]["mean"] == pytest.approx(row["dino"]["mean"], abs=1e-6)  # same judge


def test_missing_metric_model_fails_in_one_line_without_a_network_call(
        trained_run, session_photos, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["evaluate", str(trained_run), "--real", str(session_photos)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--clip openai/clip-vit-base-patch32" in err[0]
    assert no_network == []


def test_bad_evaluate_input(trained_run, tmp_path, tiny_judges):
    with pytest.raises(UserError, match="--real"):
        evaluate(trained_run, str(tmp_path / "none"), dino=tiny_judges[0], clip=tiny_judges[1])
    with pytest.raises(UserError, match="--images-per-prompt"):
        evaluate(trained_run, str(tmp_path), images_per_prompt=1)


def test_a_run_retrained_in_place_is_drawn_afresh(trained_run, session_photos, prompts_file,
                                                  tmp_path, monkeypatch):
    """The image cache is keyed by the LoRA file's contents: new weights in
    the same folder are scored on new images, not on the old run's."""
    import shutil

    import torch
    from safetensors.torch import save_file

    import lorabooth.generation as drawing
    from lorabooth.adapters.lora import read_lora
    from lorabooth.formats import WEIGHT_NAME

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "generated",
                                                                    "eval", "sweep"))
    judges = Judges(identity=_mean_colour, image=_mean_colour, text_image=_mean_colour,
                    text=lambda prompts: torch.ones(len(prompts), 3),
                    names={"dino": "colour", "clip": "colour"})
    real, drawn = drawing.draw, []
    monkeypatch.setattr(drawing, "draw", lambda *a, **k: drawn.append(a[2]) or real(*a, **k))

    def score():
        return evaluate(run, str(session_photos), prompts_file=prompts_file, images_per_prompt=2,
                        steps=2, out=tmp_path / "e", judges=judges, pres_images=2)

    first = score()["rows"]["lorabooth"]["dino"]["mean"]
    n = len(drawn)
    score()
    assert len(drawn) == n  # the same LoRA: every image cached
    tensors, header = read_lora(run / WEIGHT_NAME)  # "retrained": other weights, same folder
    save_file({k: v * 3 for k, v in tensors.items()}, str(run / WEIGHT_NAME), metadata=header)
    again = score()["rows"]["lorabooth"]["dino"]["mean"]
    assert len(drawn) == 2 * n  # every prompt drawn again
    assert again != first


def _mean_colour(images):
    import torch

    return torch.stack([torch.tensor(im.convert("RGB").resize((1, 1)).getpixel((0, 0)),
                                     dtype=torch.float) for im in images])


def test_judges_by_name():
    """`--judges toy` resolves through the one registry the dispatch fills;
    an unknown name is one clear line."""
    import lorabooth.commands  # noqa: F401  registers the toy world's judges
    from lorabooth.evaluation.judges import load_judges, names

    assert "toy" in names()
    assert load_judges("toy", "", "").names["dino"] == "toy identity judge"
    with pytest.raises(UserError, match="judges 'nope': none by that name"):
        load_judges("nope", "", "")
