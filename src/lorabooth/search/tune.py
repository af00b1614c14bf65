"""`lorabooth tune PHOTOS`: search the training settings and inference
scales with Optuna, three objectives at once: fidelity to the subject up,
prompt following up, drift of the bare class towards the subject (PRES)
down. Each trial is a `train` run plus an `evaluate` of it; the study lives
in an RDB (OUT/study.db, SQLite, by default, or --storage URL), so a second
`tune` on the same folder continues it and reruns no finished trial.

Several workers may share a study (`--workers N` here, more `tune`s on the
same --storage elsewhere): a RUNNING trial is left alone while its process
beats (Optuna's heartbeat); one silent for two beats belongs to a process
that died, so Optuna fails it and queues its settings again, once."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import tomli_w

from ..config import EvaluateConfig, TrainConfig, evaluate_options, to_toml_dict
from ..core.errors import UserError
from ..core.fileio import write_text
from .tune_pruning import Pruning, validation_study
from .tune_report import write_outputs
from .tune_space import RANKS, Scales, check_study_fits, load_space, suggest  # noqa: F401
from .tune_workers import class_images_once, run_workers, start_worker

log = logging.getLogger(__name__)
STUDY = "lorabooth-tune"  # fixed: every `tune` on the same storage continues it
OBJECTIVES = ("fidelity", "clip_t", "pres")
DIRECTIONS = ("maximize", "maximize", "minimize")
MAX_PRUNED_PER_TRIAL = 3  # pruned trials per --budget before a worker gives up looking
VALIDATION_IMAGES = 4  # per validation under the pruner: enough to average a judge's noise
# SQLite lets one writer in at a time; the others wait this long (seconds)
# instead of failing at once with "database is locked".
SQLITE_TIMEOUT = 60


@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Optuna's heartbeat, its retry callback and TPE's constant liar are
    marked experimental; the warning says nothing a user can act on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_options(url: str, heartbeat: int) -> dict[str, Any]:
    """RDBStorage's options: the heartbeat (a trial silent for two beats is
    failed and retried once) and, for SQLite, a wait for the write lock."""
    import optuna

    with _experimental_ok():
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    sqlite = url.startswith("sqlite")
    return {"engine_kwargs": {"connect_args": {"timeout": SQLITE_TIMEOUT}} if sqlite else {},
            "heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat,
            "heartbeat_stale_trial_callback": retry}


def open_storage(url: str, heartbeat: int = 60) -> Any:
    """An Optuna RDB storage, or one line naming --storage."""
    import optuna

    try:
        with _experimental_ok():
            return optuna.storages.RDBStorage(url, **storage_options(url, heartbeat))
    except Exception as e:  # sqlalchemy: bad URL, missing driver, unreachable server
        why = " ".join(str(e).split("(Background on this error")[0].split())[:200]
        raise UserError(f"--storage {_shown(url)}: cannot open ({why or type(e).__name__})"
                        ) from None


def _shown(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even parseable: nothing to hide
        return url


def storage_url(c: Any) -> str:
    return c.storage or f"sqlite:///{(Path(c.out) / 'study.db').resolve()}"


def load_study(storage: Any) -> Any:
    """The study, created or continued (several workers may create it at
    once: Optuna lets one win and the others load it)."""
    import optuna

    return optuna.create_study(storage=storage, study_name=STUDY, directions=list(DIRECTIONS),
                               load_if_exists=True)


def sampler_seed(seed: int, trials: int, worker: int) -> int:
    """A fresh TPE seed for each trial a worker starts: moved on by the
    trials so far (a continued study does not draw its first points again)
    and by the worker (two workers that look at once draw apart)."""
    return seed + trials + 1_000_003 * worker


def retry_interrupted(study: Any) -> int:
    """Trials stopped by Ctrl-C (Optuna marks them FAIL; the objective notes
    "interrupted") get their settings queued again, once each; returns how
    many. A dead process's RUNNING trial is the heartbeat's job."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    todo = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number not in retried and t.user_attrs.get("interrupted")]
    for t in todo:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.warning("trial %d was interrupted: its settings are tried again", t.number)
    return len(todo)


def adopt_silent_trials(storage: Any, grace: int) -> int:
    """RUNNING trials that never beat (their process was killed between
    creating the trial and its first beat, or they come from a tune without
    heartbeats) would stay RUNNING for ever: once such a trial is older than
    the grace period, beat for it once, so that it turns stale like any
    dead worker's trial. A live worker beats within moments of starting a
    trial, so none of its trials is ever adopted."""
    from sqlalchemy import text as sql

    before = datetime.now() - timedelta(seconds=grace)  # Optuna stores local naive start times
    with storage.engine.connect() as db:
        ids = db.execute(sql(
            "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h "
            "ON h.trial_id = t.trial_id WHERE t.study_id = :study AND t.state = 'RUNNING' "
            "AND h.trial_id IS NULL AND t.datetime_start < :before"),
            {"study": storage.get_study_id_from_name(STUDY), "before": before}).scalars().all()
    for trial_id in ids:
        storage.record_heartbeat(trial_id)
    return len(ids)


def _judges(c: Any) -> Any:
    """Built once for every trial: the judges named by --judges, or DINO and CLIP."""
    from ..evaluation.judges import load_judges

    return load_judges(c.judges, c.dino, c.clip)


def trial_config(c: Any, overrides: dict[str, Any], run: Path, pruning: bool = False
                 ) -> TrainConfig:
    """The `train` options of one trial; the class images (drawn by the base
    model, the same for every trial) are shared in OUT/class_images. Under
    the pruner it draws the instance prompt every ``c.prune_every`` steps."""
    instance_prompt = f"a photo of sks {c.class_noun}"
    validation = dict(validation_prompt=instance_prompt, validation_every=c.prune_every,
                      validation_images=VALIDATION_IMAGES) if pruning else {}
    return TrainConfig(model=c.model, instance_dir=c.photos, instance_prompt=instance_prompt,
                       class_prompt=f"a photo of a {c.class_noun}",
                       class_dir=str(Path(c.out) / "class_images")
                       if overrides.get("prior_preservation") == "images" else "",
                       num_class_images=c.num_class_images, class_draw_steps=c.sample_steps,
                       resolution=c.resolution, seed=c.seed, save_format="diffusers",
                       output=str(run), **validation, **overrides)


def _objective(c: Any, judges: Any, space: dict[str, Any], twins: Any | None) -> Any:
    import optuna

    from ..evaluation.metrics import mean_pairwise
    from ..evaluation.runner import evaluate, real_images_of
    from ..training.loop import train
    from ..training.prior import missing_indices

    real: list = []  # the photos' identity embeddings, on the first validation

    def fidelity(images: list) -> float:  # as evaluate scores it ("dino")
        if not real:
            real.append(judges.identity(real_images_of(c.photos)))
        return mean_pairwise(judges.identity(images), real[0])

    def objective(trial: Any) -> tuple[float, float, float]:
        overrides, scales = suggest(trial, space)
        run = Path(c.out) / "trials" / f"{trial.number:04d}"
        if run.exists():  # left by a study this storage no longer holds
            shutil.rmtree(run)
        trial.set_user_attr("run", run.relative_to(c.out).as_posix())  # OUT may move
        trial.set_user_attr("settings", {**overrides, **scales.__dict__})
        pruning = Pruning(twins, trial, fidelity) if twins is not None else None
        tick = time.process_time()
        try:
            config = trial_config(c, overrides, run, pruning is not None)
            with (class_images_once(config.class_path, lambda: missing_indices(
                    config.class_path, c.num_class_images)) if config.prior_images else nullcontext()):
                train(config, on_validation=pruning)
            result = evaluate(EvaluateConfig(
                run=str(run), real=c.photos, seed=c.seed, unet_scale=scales.unet_scale,
                text_scale=scales.text_scale, guidance=scales.guidance, steps=c.sample_steps,
                out=str(run / "eval"), **evaluate_options(c)), judges=judges)
        except KeyboardInterrupt:  # Optuna fails the trial; the next tune retries it
            trial.set_user_attr("interrupted", True)
            raise
        except optuna.TrialPruned:
            trial.set_user_attr("cpu_s", round(time.process_time() - tick, 2))
            log.info("trial %d pruned at step %d", trial.number, trial.user_attrs["pruned_at"])
            raise
        except BaseException:
            if pruning is not None:
                pruning.abandon()
            raise
        trial.set_user_attr("cpu_s", round(time.process_time() - tick, 2))
        row = result["rows"]["lorabooth"]
        scores = {"fidelity": row["dino"]["mean"], "clip_t": row["clip_t"]["mean"],
                  "pres": row["pres"]["mean"]}
        trial.set_user_attr("scores", scores)
        if pruning is not None:
            pruning.finish(scores["fidelity"])
        log.info("trial %d: fidelity %.4f, CLIP-T %.4f, PRES %.4f", trial.number,
                 *(scores[k] for k in OBJECTIVES))
        return tuple(scores[k] for k in OBJECTIVES)

    return objective


def space_for_model(space: dict[str, Any], model: str) -> dict[str, Any]:
    """The options ``model``'s family refuses (`train` does: SDXL's two
    text encoders take no trained token yet, FLUX's cached text embeddings
    neither a token nor a text-encoder LoRA) are kept off by the search."""
    from ..models.loading import family_of_model

    family = family_of_model(model)
    for key in family.frozen:
        if space.get(key) != (False,):
            log.info("--model %s is %s: the search keeps --%s off", model, family.name,
                     key.replace("_", "-"))
            space = {**space, key: (False,)}
    return space


def tune(c: Any) -> Path:
    """Run the study until it holds ``c.budget`` completed trials (with
    ``c.workers`` processes; pruned trials do not count), then write
    OUT/report.md, report.html, pareto.svg, front.png and best/ (and its own
    options to OUT/tune.toml); returns the report."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(c.out)
    if not Path(c.photos).is_dir():
        raise UserError(f"{c.photos}: no such folder of photos")
    from ..models.loading import family_of_model

    # refused before any write; the guidance searched around the family's own
    space = space_for_model(load_space(c.space, c.steps, family_of_model(c.model).guidance_range),
                            c.model)
    url = storage_url(c)
    storage = open_storage(url, c.heartbeat) if c.storage or (out / "study.db").exists() else None
    if storage is not None:
        check_study_fits(load_study(storage).get_trials(deepcopy=False), space,
                         f"--space {c.space}" if c.space else "--steps")
    judges = _judges(c)  # a missing DINO/CLIP model, too
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tune.toml", tomli_w.dumps(to_toml_dict(c)))  # `tune PHOTOS --config` reruns it
    storage = storage or open_storage(url, c.heartbeat)
    retry_interrupted(load_study(storage))
    if c.workers == 1:
        work(c, storage, space, judges)
    else:
        del judges  # loaded to refuse a missing model before any write; each worker loads its own
        run_workers(c.workers, _worker, (c, space, url))
    return write_outputs(load_study(storage), out)


def _worker(c: Any, space: dict[str, Any], url: str, worker: int, env: dict[str, str]) -> None:
    """One spawned worker: its own storage connection, judges and loop."""
    start_worker(worker, env)
    try:
        work(c, open_storage(url, c.heartbeat), space, _judges(c), worker)
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def work(c: Any, storage: Any, space: dict[str, Any], judges: Any, worker: int = 0) -> None:
    """Start trials until the study holds ``c.budget`` completed ones. A
    trial is started only while completed + running ones are fewer than the
    budget; otherwise this worker waits for the running ones, which either
    complete or, their worker dead, turn stale and come back as a retry.
    Two workers checking at the same moment may both start one: with N
    workers the study may end with up to N - 1 trials above the budget."""
    import optuna
    from optuna.trial import TrialState

    study = load_study(storage)
    objective = _objective(c, judges, space, validation_study(storage, c.pruner, c.prune_percentile))
    ended: list[Any] = []  # this worker's trials' end states
    while True:
        with _experimental_ok():
            optuna.storages.fail_stale_trials(study)  # optimize does it too, but not while we wait
        adopt_silent_trials(storage, 2 * c.heartbeat)
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        done = states[TrialState.COMPLETE]
        if done >= c.budget:
            return
        if done + states[TrialState.RUNNING] >= c.budget:
            time.sleep(min(c.heartbeat, 5))
            continue
        log.info("trial %d of %d", done + 1, c.budget)
        with _experimental_ok():
            study.sampler = optuna.samplers.TPESampler(
                seed=sampler_seed(c.seed, len(trials), worker), constant_liar=True)
        study.optimize(objective, n_trials=1, callbacks=[lambda _, t: ended.append(t.state)])
        if (failed := ended.count(TrialState.FAIL)) >= c.budget:  # a score was NaN
            raise UserError(f"--budget {c.budget}: stopped after {failed} trials that "
                            "gave no scores (NaN)")
        if (pruned := ended.count(TrialState.PRUNED)) >= MAX_PRUNED_PER_TRIAL * c.budget:
            log.warning("stopped after %d pruned trials: the pruner finds nearly every trial "
                        "behind the first ones (--pruner none turns it off)", pruned)
            return
