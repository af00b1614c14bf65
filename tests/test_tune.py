"""`lorabooth tune`: an Optuna study of train + evaluate trials, kept in
an RDB so a second run continues it; on the tiny model and tiny judges,
which exercise the machinery, not the scores."""

from __future__ import annotations

import re
import shutil

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState
from safetensors.torch import load_file

from helpers import chromium_dom, tune_argv
from lorabooth.commands import TuneConfig
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.search.tune import RANKS, STUDY, suggest
from lorabooth.search.tune_report import recommend
from lorabooth.search.tune_space import default_space

TWO_LENGTHS = dict(steps="2,3", sample_steps="2")  # the choices of default_space([2, 3])
BEAT = ("--heartbeat", "1")  # a trial whose process died is stale after 2 s, not 2 min


def _study(out):
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")


def test_suggest_covers_the_space():
    params = {"lr": 3e-4, "steps": 7, "rank": 8, "prior_preservation": "model",
              "prior_loss_weight": 0.5, "train_text_encoder": True, "train_token": False,
              "unet_scale": 0.75, "text_scale": 0.6, "guidance": 4.0}
    overrides, scales = suggest(FixedTrial(params), default_space([7, 9]))
    assert overrides == {k: params[k] for k in list(params)[:7]}
    assert (scales.unet_scale, scales.text_scale, scales.guidance) == (0.75, 0.6, 4.0)
    study = optuna.create_study(directions=["maximize"] * 3)
    text_scales = set()
    for _ in range(20):
        trial = study.ask()
        overrides, scales = suggest(trial, default_space([7, 9]))
        assert 1e-4 <= overrides["lr"] <= 2e-3 and overrides["rank"] in RANKS
        assert overrides["steps"] in (7, 9) and 0.1 <= overrides["prior_loss_weight"] <= 1
        assert 0.5 <= scales.unet_scale <= 1 and 3 <= scales.guidance <= 7
        # the text-encoder scale is drawn only for a LoRA with text layers
        assert ("text_scale" in trial.params) == overrides["train_text_encoder"]
        if overrides["train_text_encoder"]:
            assert 0.5 <= scales.text_scale <= 1
            text_scales.add(scales.text_scale)
        else:
            assert scales.text_scale == 1.0
        study.tell(trial, [0.0, 0.0, 0.0])
    assert len(text_scales) > 1


def test_recommend_takes_the_highest_fidelity_among_tame_pareto_trials():
    def t(number, fid, clip, pres):
        return optuna.trial.create_trial(values=[fid, clip, pres], state=TrialState.COMPLETE)

    trials = [t(0, 0.9, 0.2, 0.9), t(1, 0.7, 0.2, 0.3), t(2, 0.6, 0.3, 0.1), t(3, 0.5, 0.1, 0.5),
              t(4, 0.4, 0.1, 0.6)]
    front = trials[:3]
    assert recommend(trials, front) is trials[1]  # trial 0 drifts above the median PRES 0.5
    assert recommend(trials, []) is None


def test_tune_writes_the_study_continues_and_retries_an_interrupted_trial(
        photos, tiny_judges, prompts, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_argv(photos, out, tiny_judges, prompts, "--budget", "2", *BEAT,
                          **TWO_LENGTHS)) == 0
    study = _study(out)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        assert set(t.user_attrs["scores"]) == {"fidelity", "clip_t", "pres"}
        assert t.values == [t.user_attrs["scores"][k] for k in ("fidelity", "clip_t", "pres")]
        assert t.user_attrs["run"] == f"trials/{t.number:04d}"
        assert (out / t.user_attrs["run"] / "pytorch_lora_weights.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "## Pareto front" in report and "Rule: the highest fidelity" in report
    assert len(re.findall(r"^\| \d+ \|", report, re.M)) == len(study.best_trials) + 1
    assert (out / "pareto.svg").read_text().startswith("<svg")
    assert load_file(out / "best" / "pytorch_lora_weights.safetensors")
    assert 'instance_prompt = "a photo of sks dog"' in (out / "best" / "config.toml").read_text()

    # a second tune with --budget 3 adds exactly one trial and reruns none
    made = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*.safetensors")}
    assert main(["tune", str(photos), "--config", str(out / "tune.toml"), "--budget", "3"]) == 0
    study = _study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert {p: p.stat().st_mtime_ns for p in made} == made
    assert study.trials[2].params != study.trials[0].params  # the sampler moved on

    # a trial left RUNNING that never beat (its process killed at once) is
    # failed and its settings tried again
    stale = study.ask()
    suggest(stale, default_space([2, 3]))
    assert main(tune_argv(photos, out, tiny_judges, prompts, "--budget", "4", *BEAT,
                          **TWO_LENGTHS)) == 0
    study = _study(out)
    assert study.trials[stale.number].state == TrialState.FAIL
    retry = study.trials[-1]
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[stale.number].params
    assert retry.system_attrs["failed_trial"] == stale.number  # Optuna's heartbeat retry
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4


@pytest.mark.parametrize("storage", ["nosuchdb://x/y", "not a url",
                                     "postgresql://user:secret@localhost/db"])
def test_bad_storage_is_one_line_and_writes_nothing(photos, tmp_path, storage, capsys):
    out = tmp_path / "tune"
    assert main(["tune", str(photos), "--class-noun", "dog", "--out", str(out),
                 "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--storage" in err and "secret" not in err
    assert not out.exists()


@pytest.mark.parametrize("change, fragment", [
    ({"budget": 0}, "--budget"), ({"class_noun": ""}, "--class-noun: is required"),
    ({"class_noun": "dog\n"}, "--class-noun"), ({"steps": [0]}, "--steps"),
    ({"steps": []}, "--steps"), ({"steps": [2.5]}, "--steps: whole numbers"), ({"judges": "x"}, "--judges"),
    ({"pruner": "median"}, "--pruner"), ({"prune_every": 0}, "--prune-every"),
    ({"prune_percentile": 100.0}, "--prune-percentile"),
    ({"images_per_prompt": 1}, "--images-per-prompt")])
def test_bad_options_name_the_option(photos, change, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        TuneConfig(**{"photos": str(photos), "class_noun": "dog", **change})


def test_a_trial_stopped_by_ctrl_c_is_retried_once(photos, tmp_path, monkeypatch):
    """Optuna marks a trial interrupted by Ctrl-C FAIL, not RUNNING: tune
    notes it and the next tune retries its settings (scores faked here)."""
    import lorabooth.evaluation.runner
    import lorabooth.training.loop
    from lorabooth.search.tune import tune

    trained = []

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    def fake_train(config, **kwargs):
        trained.append(config)

    def fake_evaluate(*args, **kwargs):
        stat = {"mean": 0.5, "std": 0.0, "n": 1}
        return {"rows": {"lorabooth": {"dino": stat, "clip_t": stat, "pres": stat}}}

    monkeypatch.setattr(lorabooth.evaluation.runner, "evaluate", fake_evaluate)
    monkeypatch.setattr(lorabooth.training.loop, "train", interrupted)
    config = TuneConfig(photos=str(photos), class_noun="dog", out=str(tmp_path / "t"), budget=1,
                        judges="toy")
    monkeypatch.setattr("lorabooth.search.tune._judges", lambda c: None)
    monkeypatch.setattr("lorabooth.search.tune.write_outputs", lambda study, out: out)
    with pytest.raises(KeyboardInterrupt):
        tune(config)
    monkeypatch.setattr(lorabooth.training.loop, "train", fake_train)
    tune(config)
    study = _study(tmp_path / "t")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].params == study.trials[0].params
    assert study.trials[1].user_attrs["retry_of"] == 0
    tune(TuneConfig(**{**config.__dict__, "budget": 2}))  # retried once, not again
    assert [t.state for t in _study(tmp_path / "t").trials][2:] == [TrialState.COMPLETE]
    assert "retry_of" not in _study(tmp_path / "t").trials[2].user_attrs
    assert len(trained) == 2


# `lorabooth ARGV` whose trial 1, once started, says so on stdout and never
# finishes: the test kills it at that event, with no clock to race.
STOP_IN_TRIAL_1 = """
import sys, threading
from pathlib import Path
import lorabooth.training.loop as L
from lorabooth.commands.cli import main
real = L.train
def train(config, **kwargs):
    if Path(config.output).name == "0001":
        print("trial 1 started", flush=True)
        threading.Event().wait()
    return real(config, **kwargs)
L.train = train
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_tune_process_leaves_a_running_trial_that_is_retried(
        photos, tiny_judges, prompts, tmp_path, no_network_env):
    """SIGKILL once trial 1 has started (trial 0 is complete): trial 1 stays
    RUNNING in study.db and its heartbeat stops; the next tune waits until it
    is stale, fails it and retries its settings once. Trial 0 is neither lost
    nor run again."""
    import select
    import sqlite3
    import subprocess
    import sys

    env, _ = no_network_env
    out = tmp_path / "tune"
    argv = tune_argv(photos, out, tiny_judges, prompts, "--budget", "5", *BEAT)
    proc = subprocess.Popen([sys.executable, "-c", STOP_IN_TRIAL_1, *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        select.select([proc.stdout], [], [], 900)  # a hang guard only; the line is the event
        said = proc.stdout.readline()  # "" if the process ended first
    finally:
        proc.kill()  # SIGKILL; a no-op once the process has been reaped
        proc.wait()
    assert said == "trial 1 started\n", (said, proc.returncode)
    with sqlite3.connect(out / "study.db") as db:
        states = [s for (s,) in db.execute(  # the pruner's twin study lives there too
            "SELECT t.state FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? ORDER BY t.number", (STUDY,))]
    assert states == ["COMPLETE", "RUNNING"]
    first = out / "trials" / "0000" / "pytorch_lora_weights.safetensors"
    made = first.stat().st_mtime_ns
    assert main(tune_argv(photos, out, tiny_judges, prompts, "--budget", "2", *BEAT)) == 0
    study = _study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                               TrialState.COMPLETE]
    assert study.trials[2].params == study.trials[1].params
    assert study.trials[2].system_attrs["failed_trial"] == 1  # Optuna's heartbeat retry
    assert first.stat().st_mtime_ns == made


def test_trials_without_scores_stop_the_study_in_one_line(photos, tmp_path, monkeypatch):
    import lorabooth.evaluation.runner
    import lorabooth.training.loop
    from lorabooth.search.tune import tune

    nan = {"mean": float("nan"), "std": 0.0, "n": 1}
    monkeypatch.setattr(lorabooth.training.loop, "train", lambda config, **kwargs: None)
    monkeypatch.setattr(lorabooth.evaluation.runner, "evaluate", lambda *a, **k: {
        "rows": {"lorabooth": {"dino": nan, "clip_t": nan, "pres": nan}}})
    monkeypatch.setattr("lorabooth.search.tune._judges", lambda c: None)
    config = TuneConfig(photos=str(photos), class_noun="dog", out=str(tmp_path / "t"), budget=2)
    with pytest.raises(UserError, match=r"--budget 2: stopped after 2 trials that gave no scores"):
        tune(config)
    assert [t.state for t in _study(tmp_path / "t").trials] == [TrialState.FAIL] * 2


def test_the_percentile_pruner_stops_a_trial_clearly_behind_at_the_same_step():
    """Real Optuna pruner on the twin study: after four finished trials, a
    validation score in their bottom quarter at the same step prunes."""
    from lorabooth.search.tune_pruning import STARTUP_TRIALS, Pruning, validation_study

    storage = optuna.storages.InMemoryStorage()
    twins = validation_study(storage, "percentile")
    main_study = optuna.create_study(storage=storage, directions=["maximize"] * 3)

    def run(score: float) -> optuna.trial.Trial:
        trial = main_study.ask()
        pruning = Pruning(twins, trial, lambda images: score)
        pruning(50, [])
        pruning(100, [])
        pruning.finish(score)
        return trial

    assert validation_study(storage, "none") is None
    for score in (0.8, 0.7, 0.9, 0.85)[:STARTUP_TRIALS]:
        run(score)
    behind = main_study.ask()
    with pytest.raises(optuna.TrialPruned, match="step 50"):
        Pruning(twins, behind, lambda images: 0.1)(50, [])
    assert behind.user_attrs["pruned_at"] == 50 and behind.user_attrs["validation"] == [[50, 0.1]]
    assert twins.trials[-1].state == TrialState.PRUNED
    ahead = run(0.95)  # not behind: runs to the end
    assert "pruned_at" not in ahead.user_attrs
    assert twins.trials[-1].state == TrialState.COMPLETE and twins.trials[-1].value == 0.95


def test_a_pruned_trial_stops_training_and_the_report_counts_what_it_saved(
        photos, tiny_judges, prompts, tmp_path, monkeypatch):
    """The whole path with a pruner that prunes every odd twin at its first
    validation: the trial's training stops there, it is PRUNED in the study,
    does not count towards --budget, and both reports say what it saved."""
    import lorabooth.search.tune_pruning

    class OddTwins(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number % 2 == 1

    monkeypatch.setattr(lorabooth.search.tune_pruning, "make_pruner", lambda name, percentile: OddTwins())
    out = tmp_path / "tune <b>&"
    assert main(tune_argv(photos, out, tiny_judges, prompts, "--budget", "2", "--prune-every", "2",
                          *BEAT, steps="4", sample_steps="2")) == 0
    study = _study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.COMPLETE]
    pruned = study.trials[1]
    assert pruned.user_attrs["pruned_at"] == 2
    lines = (out / pruned.user_attrs["run"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # trained 2 of its 4 steps
    samples = sorted(p.name for p in (out / pruned.user_attrs["run"] / "samples").iterdir())
    assert samples == ["step-000002-1.png", "step-000002-2.png", "step-000002-3.png",
                       "step-000002.png"]
    assert all(len(t.user_attrs["validation"]) == 1 for t in study.trials)
    assert "1 trials pruned (1 at step 2): 2 of 12 planned training steps not trained (17%)" \
        in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "2 of 12 planned" in page and "tune &lt;b&gt;&amp;" in page and "<b>&" not in page
    assert re.findall(r'src="([^"]{5})', page) == ["data:"] * page.count(" src=")
    assert page.count('<tr class="recommended">') == 1
    assert (out / "front.png").is_file() and "![the Pareto front's images](front.png)" in \
        (out / "report.md").read_text()
    if shutil.which("chromium"):  # the page in a real browser: every image decodes
        dom = chromium_dom(out / "report.html", tmp_path / "profile")
        assert 'data-images-loaded="1/1"' in dom and "tune &lt;b&gt;&amp;" in dom, dom[:500]


def test_the_pareto_plot_colours_by_clip_t_and_marks_the_front():
    from lorabooth.search.tune_report import pareto_svg

    svg = pareto_svg([("trial 0", 0.2, 0.8, 0.30, "front"), ("trial 1", 0.5, 0.6, 0.20, "other"),
                      ("trial <2>", 0.1, 0.7, 0.25, "recommended")])
    assert '<circle cx="' in svg and 'fill="#440154"><title>trial 1 (other)' in svg  # lowest CLIP-T
    assert 'fill="#fde725"><title>trial 0 (front)' in svg and "<rect" in svg  # highest, a square
    assert "<polygon" in svg and "trial &lt;2&gt; (recommended)" in svg
    assert pareto_svg([]) == "<p>No completed trials.</p>"


def test_an_sdxl_search_keeps_the_trained_token_off(tmp_path):
    from lorabooth.models.loading import model_family, save_base
    from lorabooth.search.tune import space_for_model

    space = default_space([2, 3])
    assert space_for_model(space, "tiny") is space
    fixed = space_for_model(space, "tiny-sdxl")
    assert fixed["train_token"] == (False,) and {k: v for k, v in fixed.items() if k != "train_token"} \
        == {k: v for k, v in space.items() if k != "train_token"}
    overrides, _ = suggest(optuna.create_study(directions=["maximize"] * 3).ask(), fixed)
    assert overrides["train_token"] is False
    assert model_family("owner/name") is None and model_family("sd15-random") == "sd1"
    from lorabooth.models.loading import load_base
    assert model_family(str(save_base(load_base("tiny-sdxl"), tmp_path / "xl"))) == "sdxl"
