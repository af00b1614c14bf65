"""`lorabooth sweep`: grids of runs, resumable, a report a browser renders."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import CHROMIUM_FLAGS, chromium_dom
from lorabooth.commands.cli import main
from lorabooth.config import TrainConfig
from lorabooth.core.errors import UserError
from lorabooth.search.sweep import (
    check_size,
    config_hash,
    expand,
    load_sweep,
    run_state,
    run_sweep,
)

SWEEP = """
[base]
model = "tiny"
instance_dir = "{photos}"
instance_prompt = "a photo of sks dog"
steps = 2
save_format = "diffusers"
output = "{out}"

[train.grid]
lr = [1e-4, 5e-4]
train_text_encoder = [false, true]

[generate]
prompts = ["a photo of sks dog <script>alert(1)</script>"]
seeds = [0, 1]
steps = 2

[generate.grid]
unet_scale = [0.0, 0.5, 1.0]
guidance = [3.0, 7.5]
"""


def _write(tmp_path, photos, text=SWEEP):
    f = tmp_path / "sweep.toml"
    f.write_text(text.format(photos=photos, out=tmp_path / "sweep"))
    return f


def test_expand_names_and_hashes(tmp_path, photos):
    sweep = load_sweep(_write(tmp_path, photos))
    runs = expand(sweep)
    assert [n.rsplit("-", 1)[0] for n, _ in runs] == ["lr=0.0001,train_text_encoder=false",
                                                      "lr=0.0001,train_text_encoder=true",
                                                      "lr=0.0005,train_text_encoder=false",
                                                      "lr=0.0005,train_text_encoder=true"]
    assert all(n.rsplit("-", 1)[1] == config_hash(c)[:8] for n, c in runs)
    assert all(isinstance(c, TrainConfig) and c.steps == 2 for _, c in runs)
    assert runs[3][1].output == str(tmp_path / "sweep" / runs[3][0])
    hashes = {config_hash(c) for _, c in runs}
    assert len(hashes) == 4
    assert len(sweep.settings("tiny")) == 6


def test_run_names_are_unique_and_stay_in_the_sweep_folder(tmp_path, photos):
    """Values that print alike under :g, and a path value walking up with
    `..`, each get their own folder under the sweep output."""
    text = SWEEP.replace("lr = [1e-4, 5e-4]", "lr = [0.0005, 0.00050000001]").replace(
        "train_text_encoder = [false, true]",
        f'instance_dir = ["{photos}", "../{photos.name}/../{photos.name}"]')
    runs = expand(load_sweep(_write(tmp_path, photos, text)))
    outputs = [Path(c.output) for _, c in runs]
    assert len(set(outputs)) == 4
    root = (tmp_path / "sweep").resolve()
    assert all(o.parent == tmp_path / "sweep" and o.resolve().parent == root for o in outputs)
    assert all("/" not in name and name.startswith("lr=0.0005") for name, _ in runs)


def test_a_grid_above_the_cap_needs_yes(tmp_path, photos):
    text = SWEEP.replace("lr = [1e-4, 5e-4]", f"seed = {list(range(501))}")
    sweep = load_sweep(_write(tmp_path, photos, text))
    with pytest.raises(UserError, match="1002 training runs"):
        check_size(sweep, yes=False)
    check_size(sweep, yes=True)
    check_size(load_sweep(_write(tmp_path, photos)), yes=False)


def test_the_same_point_twice_is_refused(tmp_path, photos):
    text = SWEEP.replace("lr = [1e-4, 5e-4]", "lr = [5e-4, 0.0005]")
    with pytest.raises(UserError, match="two runs have the same settings"):
        expand(load_sweep(_write(tmp_path, photos, text)))


@pytest.mark.parametrize("bad,needle", [
    ("[base]\nlearning_rate = 1\n", "unknown key `learning_rate`"),
    ("[train.grid]\nlr = 0.1\n", "`lr` must be a non-empty list"),
    ("[train.grid]\nrank = [4, \"x\"]\n", "`rank` must be an integer"),
    ("[generate.grid]\nunet_scal = [1]\n", "did you mean `unet_scale`"),
    ("[generat]\nprompts = [\"x\"]\n", "did you mean `generate`"),
    ("[evaluate]\nreal = 3\n", "`real` must be a string"),
])
def test_bad_sweep_files_name_the_key(tmp_path, bad, needle, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('[generate]\nprompts = ["x"]\n' + bad if "[generate" not in bad else bad)
    with pytest.raises(UserError, match=re.escape(needle)):
        load_sweep(f)
    assert main(["sweep", str(f)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_evaluate_table_shares_evaluates_options_and_reads_prompts_file(tmp_path, photos):
    """[evaluate] is evaluate's shared option block: `prompts` as the
    command's --prompts, `prompts_file` (its older key) read alike, not both."""
    from lorabooth.config import EvaluateConfig, evaluate_options

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {0} {1}\n")
    tables = {key: SWEEP + f'[evaluate]\nreal = "{{photos}}"\n{key} = "{prompts}"\n'
                          'images_per_prompt = 3\nkind = "object"\n'
              for key in ("prompts", "prompts_file")}
    a, b = (load_sweep(_write(tmp_path, photos, t)).evaluate for t in tables.values())
    assert a == b and a.prompts == str(prompts)
    assert EvaluateConfig(run="r", real=str(photos), **evaluate_options(a)) == EvaluateConfig(
        run="r", real=str(photos), prompts=str(prompts), images_per_prompt=3, kind="object")
    both = tables["prompts"] + f'prompts_file = "{prompts}"\n'
    with pytest.raises(UserError, match="`prompts` and `prompts_file` are one option"):
        load_sweep(_write(tmp_path, photos, both))


def test_sweep_end_to_end_then_nothing_to_do(tmp_path, photos, monkeypatch, caplog):
    f = _write(tmp_path, photos)
    report = run_sweep(f)
    out = tmp_path / "sweep"
    runs = expand(load_sweep(f))
    for name, config in runs:
        assert run_state(config) == "done"
        assert (out / name / "sweep" / "00-a-photo-of-sks-dog-script-alert-1-script" / "grid.png").is_file()
    assert (out / "grids" / "00-a-photo-of-sks-dog-script-alert-1-script.png").is_file()
    page = report.read_text()
    for name, _ in runs:
        assert name in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "http://" not in page and "https://" not in page
    for kind in ("raw", "smooth"):  # loss curves: per run one faint raw, one smoothed path
        titles = re.findall(rf'<path class="{kind}" [^>]*><title>([^<]*)</title>', page)
        assert titles == [name for name, _ in runs], kind

    # a second invocation trains nothing, loads no model, draws nothing and
    # leaves every LoRA and image it made the first time as it was
    import lorabooth.generation as ev
    import lorabooth.search.sweep as sw
    import lorabooth.training.loop
    trained, loaded, drawn = [], [], []
    monkeypatch.setattr(lorabooth.training.loop, "train",
                        lambda c: trained.append(c))
    monkeypatch.setattr(sw, "load_pipeline", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(ev, "draw", lambda *a, **k: drawn.append(a) or [])
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.name == "pytorch_lora_weights.safetensors" or p.name.startswith("seed")}
    assert len(made) == 4 + 4 * 6 * 2  # 4 LoRAs; 6 settings x 2 seeds per run
    caplog.set_level("INFO", logger="lorabooth")
    run_sweep(f)
    assert trained == [] and loaded == [] and drawn == []
    assert {p: p.stat().st_mtime_ns for p in made} == made
    skipped = [r.getMessage() for r in caplog.records if "finished before: skipped" in r.getMessage()]
    assert len(skipped) == len(runs)

    # an interrupted run (checkpoints, no weights) is resumed, a changed one retrained
    name, config = runs[0]
    (out / name / "pytorch_lora_weights.safetensors").unlink()
    (out / name / "checkpoints").mkdir(exist_ok=True)
    assert run_state(config) == "resume"
    (out / runs[1][0] / "sweep_hash.txt").write_text("other settings\n")
    assert run_state(runs[1][1]) == "new"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_a_real_browser(tmp_path, photos):
    text = SWEEP.replace("lr = [1e-4, 5e-4]", "lr = [5e-4]").replace(
        "train_text_encoder = [false, true]", "")
    report = run_sweep(_write(tmp_path, photos, text))
    shot = tmp_path / "shot.png"
    dom = chromium_dom(report, tmp_path / "profile")
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 2, dom[:500]
    assert dom.count('class="smooth"') == dom.count('class="raw"') == 1  # the loss-curve SVG
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=600)  # a hang guard, not a speed limit
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1200, 1600) and len(set(im.convert("RGB").getdata())) > 50


def test_prior_preservation_grid_takes_the_old_bools_and_the_modes(tmp_path, photos):
    text = SWEEP.replace('steps = 2\nsave', 'steps = 2\nclass_prompt = "a photo of a dog"\nsave', 1)
    text = text.replace("lr = [1e-4, 5e-4]\ntrain_text_encoder = [false, true]",
                        'prior_preservation = [false, true, "model"]')
    runs = expand(load_sweep(_write(tmp_path, photos, text)))
    assert [c.prior_preservation for _, c in runs] == ["off", "images", "model"]
    assert [n.rsplit("-", 1)[0] for n, _ in runs] == [
        "prior_preservation=false", "prior_preservation=true", "prior_preservation=model"]
    bad = text.replace('"model"]', '"modle"]')
    with pytest.raises(UserError, match="--prior-preservation: must be one of off, images, model"):
        expand(load_sweep(_write(tmp_path, photos, bad)))


NEGATIVE_SWEEP = """
[base]
model = "tiny"
instance_dir = "{photos}"
instance_prompt = "a photo of sks dog"
steps = 1
save_format = "diffusers"
output = "{out}"

[train.grid]
lr = [1e-4]

[generate]
prompts = ["a photo of sks dog"]
seeds = [0]
steps = 2
negative_prompt = "NEGATIVE"
"""


def test_generate_negative_prompt_reaches_the_drawing_and_the_cache(tmp_path, photos, monkeypatch):
    """[generate] negative_prompt is drawn with, and a changed one is drawn
    afresh rather than read from the images cached under the old one."""
    import lorabooth.generation as ev

    real, negatives = ev.draw, []

    def spy(*args, **kwargs):
        negatives.append(args[6] if len(args) > 6 else kwargs.get("negative_prompt"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "draw", spy)
    f = _write(tmp_path, photos, NEGATIVE_SWEEP.replace("NEGATIVE", "blurry"))
    run_sweep(f)
    assert negatives == ["blurry"]
    f = _write(tmp_path, photos, NEGATIVE_SWEEP.replace("NEGATIVE", "cartoon"))
    run_sweep(f)
    assert negatives == ["blurry", "cartoon"]
    run_sweep(f)  # the same again: cached
    assert negatives == ["blurry", "cartoon"]


def test_a_prompt_whose_identifier_falls_past_the_window_is_refused(tmp_path, photos):
    """[generate] prompts go through the same token-window check as generate's."""
    long = "a photo of " + "very " * 90 + "sks dog"
    text = NEGATIVE_SWEEP.replace('prompts = ["a photo of sks dog"]', f'prompts = ["{long}"]')
    with pytest.raises(UserError, match=r"\[generate\] prompts: the identifier 'sks' falls past"):
        run_sweep(_write(tmp_path, photos, text.replace("NEGATIVE", "blurry")))


def test_evaluate_snapshots_scores_every_run_and_the_report_plots_each(tmp_path, photos,
                                                                         monkeypatch):
    """[evaluate] snapshots: refused before training when a run saves none;
    each run scored again with --snapshots, its curves and kept step in the
    report, rebuilt from its snapshots.json (a doctored one is one line)."""
    import json

    import lorabooth.evaluation.runner as runner
    from lorabooth.search import sweep_report

    table = '\n[evaluate]\nreal = "{photos}"\nsnapshots = true\n'
    sweep = load_sweep(_write(tmp_path, photos, SWEEP + table))
    with pytest.raises(UserError, match=r"\[evaluate\] snapshots: run .* saves none; set save_every"):
        run_sweep(sweep.source)
    seen = []
    monkeypatch.setattr(runner, "evaluate", lambda config, judges=None: seen.append(config) or {})
    monkeypatch.setattr("lorabooth.evaluation.judges.load_judges", lambda *a: None)
    from lorabooth.search.sweep import _evaluate

    _evaluate(sweep, tmp_path / "r")
    assert [c.snapshots for c in seen] == [False, True]
    results = [{"name": f"run-{i}", "run": tmp_path / f"r{i}"} for i in range(3)]
    rows = [{"step": s, "dino": d, "clip_i": 0.5, "clip_t": 0.3, "pres": p, "div": 0.2}
            for s, d, p in ((1, 0.4, 0.5), (2, 0.6, 0.4))]
    for i, text in enumerate([json.dumps({"rows": rows, "recommended_step": 2}),
                              json.dumps({"rows": [{"step": "<b>x"}]})]):
        (tmp_path / f"r{i}" / "eval").mkdir(parents=True)
        (tmp_path / f"r{i}" / "eval" / "snapshots.json").write_text(text)
    page = sweep_report.step_curves(results)
    assert "run-0: keep step 2</h3>" in page and page.count("<svg") == 1
    assert "run-1: its eval/snapshots.json could not be read" in page and "<b>" not in page
    assert "run-2" not in page  # scored without snapshots: no section
    assert sweep_report.step_curves(results[2:]) == ""
