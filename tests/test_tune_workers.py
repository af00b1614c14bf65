"""`tune` with several workers on one study (SQLite and a real PostgreSQL),
liveness by heartbeat, and the search-space file. The runs use the tiny
model, one or two training steps and tiny judges: they exercise the
machinery, not the scores."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import tune_argv
from lorabooth.commands.cli import main
from lorabooth.core.errors import UserError
from lorabooth.search.tune import (
    SQLITE_TIMEOUT,
    STUDY,
    adopt_silent_trials,
    load_study,
    open_storage,
    sampler_seed,
)
from lorabooth.search.tune_space import Range, check_study_fits, default_space, load_space, suggest
from lorabooth.search.tune_workers import class_images_once, visible_gpus, worker_env


def test_workers_get_a_gpu_each_round_robin_and_a_share_of_the_cores():
    assert [worker_env(i, 3, ["0", "1"], 16)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == \
        ["0", "1", "0"]
    assert worker_env(0, 2, [], 2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert worker_env(1, 4, [], 16)["OMP_NUM_THREADS"] == "4"
    assert worker_env(0, 4, [], 2)["OMP_NUM_THREADS"] == "1"  # never 0 threads
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(0, 2, [], 8)
    # the parent's own CUDA_VISIBLE_DEVICES: workers pick among those GPUs
    assert visible_gpus("2,3", 2) == ["2", "3"] and visible_gpus(None, 2) == ["0", "1"]
    assert visible_gpus("", 0) == [] and visible_gpus(None, 0) == []
    assert len({sampler_seed(0, 5, w) for w in range(4)}) == 4


def test_sqlite_storage_waits_for_the_write_lock_and_beats(tmp_path):
    """Several workers write one SQLite file: a connection waits up to a
    minute for the write lock instead of failing at once."""
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=7)
    with storage.engine.connect() as db:
        assert db.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_TIMEOUT * 1000
    assert (storage.heartbeat_interval, storage.grace_period) == (7, 14)
    assert storage.heartbeat_stale_trial_callback._max_retry == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_running_trial_that_never_beat_gets_one_beat_once_it_is_old(tmp_path):
    """A trial whose process died before its first heartbeat would never
    turn stale: once older than the grace period it gets one beat (and then
    turns stale like any dead worker's); a trial that beats is left alone."""
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1)
    study = load_study(storage)
    study.ask()  # silent
    storage.record_heartbeat(study.ask()._trial_id)
    assert adopt_silent_trials(storage, grace=3600) == 0  # too young: its owner may be starting
    assert adopt_silent_trials(storage, grace=0) == 1
    assert adopt_silent_trials(storage, grace=0) == 0  # beaten once, not kept alive


def test_space_file_narrows_fixes_and_replaces_steps(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text('lr = {low = 1e-4, high = 1e-3, log = true}\nsteps = [100, 200]\n'
                 'prior_preservation = ["model"]\nguidance = 5\ntrain_text_encoder = true\n')
    space = load_space(str(f), [1, 2, 3])
    assert space["lr"] == Range(1e-4, 1e-3, True) and space["steps"] == (100, 200)
    assert space["guidance"] == Range(5.0, 5.0) and space["rank"] == default_space([1])["rank"]
    study = optuna.create_study(directions=["maximize"] * 3)
    for _ in range(5):
        trial = study.ask()
        overrides, scales = suggest(trial, space)
        assert 1e-4 <= overrides["lr"] <= 1e-3 and overrides["steps"] in (100, 200)
        assert overrides["prior_preservation"] == "model" and scales.guidance == 5.0
        assert overrides["train_text_encoder"] is True and 0.5 <= scales.text_scale <= 1
        # a fixed parameter is no Optuna parameter: nothing to search, nothing to clash
        assert {"prior_preservation", "guidance", "train_text_encoder"}.isdisjoint(trial.params)
        study.tell(trial, [0.0, 0.0, 0.0])
    assert load_space("", [1, 2]) == default_space([1, 2])


@pytest.mark.parametrize("content, fragment", [
    ("lerning_rate = 1e-4\n", "`lerning_rate`"),
    ("lr = {low = 1e-3, high = 1e-4}\n", "`lr`: low 0.001 is above high 0.0001"),
    ("lr = [1e-4, 1e-3]\n", "`lr`: a float parameter takes"),
    ("lr = {low = 1e-4}\n", "`lr`: a range needs both `low` and `high`"),
    ("lr = {low = 1e-4, high = 1e-3, step = 2}\n", "`lr`: unknown key `step`"),
    ("lr = {low = 0.0, high = 1e-3, log = true}\n", "`lr`: a log range needs low > 0"),
    ("lr = {low = -1.0, high = 1e-3}\n", "`lr`: --lr: must be a positive number"),
    ("guidance = nan\n", "`guidance`: expected a finite number"),
    ("steps = [100, 2.5]\n", "`steps` must be an integer"),
    ("steps = []\n", "`steps`: give at least one choice"),
    ("steps = [0]\n", "`steps`: --steps: must be at least 1"),
    ("prior_preservation = [\"sometimes\"]\n", "`prior_preservation`: must be among"),
    ("train_token = \"yes\"\n", "`train_token` must be true or false"),
    ("lr = \n", "not valid TOML"),
])
def test_a_bad_space_file_is_one_line_naming_the_file_and_key(tmp_path, content, fragment):
    f = tmp_path / "space.toml"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        load_space(str(f), [1])
    assert str(e.value).startswith(f"--space {f}") and fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra, fragment", [
    (["--space", "{tmp}/space.toml"], "--space {tmp}/space.toml: unknown key `lerning_rate`"),
    (["--space", "{tmp}/none.toml"], "--space {tmp}/none.toml: no such file"),
    (["--storage", "postgresql://u@127.0.0.1:1/db"], "--storage postgresql://u@127.0.0.1:1/db: "
                                                     "cannot open"),
    (["--workers", "0"], "--workers: must be between 1 and"),
    (["--heartbeat", "0"], "--heartbeat: must be between 1 and"),
])
def test_bad_tune_input_is_one_line_and_creates_no_out(photos, tmp_path, capsys, extra, fragment):
    (tmp_path / "space.toml").write_text("lerning_rate = 1e-4\n")
    out = tmp_path / "tune"
    argv = ["tune", str(photos), "--class-noun", "dog", "--out", str(out),
            *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment.replace("{tmp}", str(tmp_path)) in err
    assert not out.exists()


def test_a_continued_study_refuses_a_space_optuna_would_refuse_mid_trial():
    study = optuna.create_study(directions=["maximize"] * 3)
    for _ in range(2):
        trial = study.ask()
        suggest(trial, default_space([2, 3]))
        study.tell(trial, [0.0, 0.0, 0.0])
    trials = study.get_trials()
    check_study_fits(trials, default_space([2, 3]), "--steps")
    check_study_fits(trials, {**default_space([2, 3]), "steps": (3,)}, "--steps")  # fixed: fine
    check_study_fits(trials, {**default_space([2, 3]), "lr": Range(2e-4, 3e-4, True)}, "x")
    with pytest.raises(UserError, match=r"--steps: `steps`: the study drew it from the choices "
                                        r"\[2, 3\]"):
        check_study_fits(trials, default_space([2, 4]), "--steps")
    with pytest.raises(UserError, match="`lr`: the study drew it from a log range"):
        check_study_fits(trials, {**default_space([2, 3]), "lr": Range(1e-4, 1e-3)}, "x")


def test_class_images_are_drawn_by_one_trial_the_others_wait(tmp_path):
    """The first trial that finds images missing holds the lock while it
    draws (and trains); one that finds them present holds nothing."""
    import fcntl
    import threading

    folder = tmp_path / "out" / "class_images"
    lock = folder.parent / ".class_images.lock"
    held = []

    def someone_holds() -> bool:
        with open(lock, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def probe() -> None:  # flock is per open file: another thread's attempt sees the holder
        result = []
        t = threading.Thread(target=lambda: result.append(someone_holds()))
        t.start()
        t.join()
        held.append(result[0])

    with class_images_once(folder, lambda: [0]):
        probe()
    with class_images_once(folder, lambda: []):
        probe()
    assert held == [True, False]


def _trained_by(err: str) -> dict[int, list[str]]:
    """Trial number -> the workers whose log says they scored it."""
    runs: dict[int, list[str]] = {}
    # not anchored at a line's start: the other worker's progress bar (written
    # with \r, no newline) may precede a log line on the shared stderr
    for worker, number in re.findall(r"lorabooth worker (\d+): trial (\d+): fidelity", err):
        runs.setdefault(int(number), []).append(worker)
    return runs


def _two_workers(photos, out, judges, prompts, env, space, *extra):
    """`tune --workers 2 --budget 2` in a subprocess; its stderr."""
    proc = subprocess.run([sys.executable, "-m", "lorabooth",
                           *tune_argv(photos, out, judges, prompts, "--workers", "2", "--budget", "2",
                                  "--space", str(space), *extra)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _check_each_trial_ran_once(study, out, err):
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # two workers may both start a trial at the same moment: at most one above the budget
    assert 2 <= len(done) <= 3 and all(t.state != TrialState.RUNNING for t in study.trials)
    runs = _trained_by(err)
    assert sorted(runs) == sorted(t.number for t in done)
    assert all(len(workers) == 1 for workers in runs.values()), runs
    assert len({t.user_attrs["run"] for t in done}) == len(done)
    assert len({str(sorted(t.params.items())) for t in done}) == len(done)  # drawn apart
    for t in done:
        assert (out / t.user_attrs["run"] / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(photos, tiny_judges, prompts, tmp_path,
                                            no_network_env):
    """Every trial is trained by one worker only, and the shared class images
    are drawn once (both trials use them: --space fixes the prior)."""
    env, _ = no_network_env
    space = tmp_path / "space.toml"
    space.write_text('prior_preservation = "images"\ntrain_text_encoder = false\n')
    out = tmp_path / "tune"
    err = _two_workers(photos, out, tiny_judges, prompts, env, space, "--heartbeat", "10")
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    _check_each_trial_ran_once(study, out, err)
    assert err.count("drawing 1 class images") == 1
    assert len(list((out / "class_images").glob("*.png"))) == 1
    assert {t.user_attrs["settings"]["prior_preservation"] for t in study.trials} == {"images"}


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own, on a Unix socket in a temporary
    folder, started by the test and removed after it; skipped (with the
    reason) where there is no server to start."""
    pytest.importorskip("psycopg", reason="no psycopg: pip install 'lorabooth[postgresql]'")
    missing = [b for b in ("initdb", "pg_ctl", "createdb") if not shutil.which(b)]
    if missing:
        pytest.skip(f"no PostgreSQL binaries ({', '.join(missing)}): scripts/ensure-postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start PostgreSQL as another user")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to start the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lorabooth-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def pg(*argv: str) -> None:
        subprocess.run([*as_user, *argv], check=True, capture_output=True)

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
           f"-p {port} -k {root} -c listen_addresses=''")
        pg("createdb", "-h", str(root), "-p", str(port), "-U", "postgres", "tune")
        yield f"postgresql://postgres@/tune?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:  # the socket file's name; no TCP listener is opened
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(photos, tiny_judges, prompts, tmp_path,
                                                no_network_env, postgres_url):
    env, _ = no_network_env  # the server is on a Unix socket: no network connection is made
    space = tmp_path / "space.toml"
    space.write_text('prior_preservation = "off"\ntrain_text_encoder = false\n')
    out = tmp_path / "tune"
    err = _two_workers(photos, out, tiny_judges, prompts, env, space, "--heartbeat", "10",
                       "--storage", postgres_url)
    assert not (out / "study.db").exists()
    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    _check_each_trial_ran_once(study, out, err)

