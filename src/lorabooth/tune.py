"""`lorabooth tune PHOTOS`: search the training settings and inference
scales with Optuna, three objectives at once: fidelity to the subject up,
prompt following up, drift of the bare class towards the subject (PRES)
down. Each trial is a `train` run plus an `evaluate` of it; the study lives
in an RDB (OUT/study.db, SQLite, by default), so a second `tune` on the same
folder continues it and reruns no finished trial.

One `tune` process per study at a time: a trial still RUNNING when one
starts is from a process that died, so it is marked failed and its
settings tried again."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .config import TrainConfig, to_toml_dict
from .errors import UserError
from .fileio import write_text
from .tune_pruning import Pruning, validation_study
from .tune_report import completed, write_outputs

log = logging.getLogger(__name__)
STUDY = "lorabooth-tune"  # fixed: every `tune` on the same storage continues it
OBJECTIVES = ("fidelity", "clip_t", "pres")
DIRECTIONS = ("maximize", "maximize", "minimize")
PRIOR_CHOICES = ("off", "images", "model")
RANKS = (2, 4, 8)
MAX_PRUNED_PER_TRIAL = 3  # pruned trials per --budget before tune gives up looking
VALIDATION_IMAGES = 4  # per validation under the pruner: enough to average a judge's noise


@dataclass(frozen=True)
class Scales:
    """The inference settings a trial is evaluated at."""
    unet_scale: float
    guidance: float


def suggest(trial: Any, steps_choices: list[int]) -> tuple[dict[str, Any], Scales]:
    """The search space: TrainConfig overrides and inference scales for one
    trial (``trial`` is an ``optuna.Trial``, or a ``FixedTrial`` in tests)."""
    overrides = {
        "lr": trial.suggest_float("lr", 1e-4, 2e-3, log=True),
        "steps": trial.suggest_categorical("steps", list(steps_choices)),
        "rank": trial.suggest_categorical("rank", list(RANKS)),
        "prior_preservation": trial.suggest_categorical("prior_preservation",
                                                        list(PRIOR_CHOICES)),
        "prior_loss_weight": trial.suggest_float("prior_loss_weight", 0.1, 1.0, log=True),
        "train_text_encoder": trial.suggest_categorical("train_text_encoder", [False, True]),
        "train_token": trial.suggest_categorical("train_token", [False, True]),
    }
    scales = Scales(trial.suggest_float("unet_scale", 0.5, 1.0),
                    trial.suggest_float("guidance", 3.0, 7.0))
    return overrides, scales


def open_storage(url: str) -> Any:
    """An Optuna RDB storage, or one line naming --storage."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
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


def load_study(storage: Any, seed: int) -> Any:
    """The study, created or continued. The sampler's seed moves on with the
    number of trials so far, so a continued study does not draw its first
    points again."""
    import optuna

    probe = optuna.create_study(storage=storage, study_name=STUDY, directions=list(DIRECTIONS),
                                load_if_exists=True)
    sampler = optuna.samplers.TPESampler(seed=seed + len(probe.trials))
    return optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler)


def retry_interrupted(study: Any, storage: Any) -> int:
    """Trials whose process died (still RUNNING) or was interrupted (Ctrl-C:
    Optuna marks them FAIL) are failed and their settings queued again, once
    each; returns how many."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    todo = [t for t in study.get_trials(deepcopy=False)
            if t.number not in retried and (t.state == TrialState.RUNNING or (
                t.state == TrialState.FAIL and t.user_attrs.get("interrupted")))]
    for t in todo:
        if t.state == TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.warning("trial %d was interrupted: its settings are tried again", t.number)
    return len(todo)


def _judges(c: Any) -> Any:
    """Built once for every trial: the toy world's judges, or DINO and CLIP."""
    if c.judges == "toy":
        from .models import toy_model_dir
        from .toyworld.judges import ToyJudge

        return ToyJudge.load(toy_model_dir() / "judges.safetensors").judges()
    from .evaluation.embedders import default_judges

    return default_judges(c.dino, c.clip)


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


def _objective(c: Any, judges: Any, twins: Any | None) -> Any:
    import optuna

    from .evaluation.metrics import mean_pairwise
    from .evaluation.runner import evaluate, real_images_of
    from .training import train

    real: list = []  # the photos' identity embeddings, on the first validation

    def fidelity(images: list) -> float:  # as evaluate scores it ("dino")
        if not real:
            real.append(judges.identity(real_images_of(c.photos)))
        return mean_pairwise(judges.identity(images), real[0])

    def objective(trial: Any) -> tuple[float, float, float]:
        overrides, scales = suggest(trial, c.steps)
        run = Path(c.out) / "trials" / f"{trial.number:04d}"
        if run.exists():  # left by a study this storage no longer holds
            shutil.rmtree(run)
        trial.set_user_attr("run", run.relative_to(c.out).as_posix())  # OUT may move
        trial.set_user_attr("settings", {**overrides, "unet_scale": scales.unet_scale,
                                         "guidance": scales.guidance})
        pruning = Pruning(twins, trial, fidelity) if twins is not None else None
        tick = time.process_time()
        try:
            train(trial_config(c, overrides, run, pruning is not None), on_validation=pruning)
            result = evaluate(run, c.photos, class_noun=c.class_noun, kind=c.kind,
                              prompts_file=c.prompts or None,
                              images_per_prompt=c.images_per_prompt, seed=c.seed,
                              unet_scale=scales.unet_scale, guidance=scales.guidance,
                              steps=c.sample_steps, judges=judges, pres_images=c.pres_images,
                              out=run / "eval")
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


def tune(c: Any) -> Path:
    """Run the study until it holds ``c.budget`` completed trials (pruned
    ones do not count), then
    write OUT/report.md, OUT/pareto.svg and OUT/best/ (and its own options
to OUT/tune.toml); returns the report."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(c.out)
    if not Path(c.photos).is_dir():
        raise UserError(f"{c.photos}: no such folder of photos")
    storage = open_storage(c.storage) if c.storage else None  # refused before any write
    judges = _judges(c)  # a missing DINO/CLIP model, too
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tune.toml", tomli_w.dumps(to_toml_dict(c)))  # `tune PHOTOS --config` reruns it
    storage = storage or open_storage(f"sqlite:///{(out / 'study.db').resolve()}")
    study = load_study(storage, c.seed)
    retry_interrupted(study, storage)
    objective = _objective(c, judges, validation_study(storage, c.pruner))
    ended: list[Any] = []  # this process's trials' end states
    while (done := len(completed(study))) < c.budget:
        log.info("trial %d of %d", done + 1, c.budget)
        study.optimize(objective, n_trials=1, callbacks=[lambda _, t: ended.append(t.state)])
        if (failed := ended.count(TrialState.FAIL)) >= c.budget:  # a score was NaN
            raise UserError(f"--budget {c.budget}: stopped after {failed} trials that "
                            "gave no scores (NaN)")
        if (pruned := ended.count(TrialState.PRUNED)) >= MAX_PRUNED_PER_TRIAL * c.budget:
            log.warning("stopped after %d pruned trials: the pruner finds nearly every trial "
                        "behind the first ones (--pruner none turns it off)", pruned)
            break
    return write_outputs(study, out)
