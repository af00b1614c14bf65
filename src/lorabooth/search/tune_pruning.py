"""`tune`'s pruner: stop a trial that is clearly behind after a fraction of
its steps, judged by the fidelity of the images drawn at each validation.

Optuna's pruners read intermediate values, which a multi-objective trial
cannot report (``Trial.report`` raises NotImplementedError). So each trial
of the study gets a twin in a single-objective study beside it in the same
storage ("lorabooth-tune/validation"): the twin reports the validation
fidelity at each validation step and Optuna's PercentilePruner decides on
it; the twin's final value is the trial's evaluated fidelity, which is what
later trials are compared against."""

from __future__ import annotations

from typing import Any, Callable

from PIL.Image import Image

VALIDATION_STUDY = "lorabooth-tune/validation"
# Optuna's percentile compares with finished trials only, the pruner's
# survivors, so the bar rises as a study goes on. Measured on the toy world
# (docs/tune.md, 3 tune seeds, budget 8): the bottom quarter from the first
# validation pruned 11, 24 and 15 trials (55-68% of the planned steps not
# trained; one search stopped at its cap of 3 x budget); the bottom tenth
# from the second validation, with 4 finished trials at that step, pruned
# none. The default is the measured quarter.
PERCENTILE = 25.0
STARTUP_TRIALS = 4


def make_pruner(name: str, percentile: float) -> Any:
    import optuna

    assert name == "percentile", name
    return optuna.pruners.PercentilePruner(percentile, n_startup_trials=STARTUP_TRIALS)


def validation_study(storage: Any, pruner: str, percentile: float = PERCENTILE) -> Any | None:
    """The twin study (created or continued), or None when not pruning."""
    import optuna

    if pruner == "none":
        return None
    return optuna.create_study(storage=storage, study_name=VALIDATION_STUDY,
                               direction="maximize", load_if_exists=True,
                               pruner=make_pruner(pruner, percentile))


class Pruning:
    """The ``on_validation`` callback of one trial's training: scores the
    validation images, reports on the twin, raises ``optuna.TrialPruned``
    when the pruner says so."""

    def __init__(self, twins: Any, trial: Any, fidelity: Callable[[list[Image]], float]):
        self.twins, self.trial, self.fidelity = twins, trial, fidelity
        self.twin = twins.ask()
        self.twin.set_user_attr("trial", trial.number)
        self.curve: list[list[float]] = []  # [step, score]: as JSON storage returns it

    def __call__(self, step: int, images: list[Image]) -> None:
        import optuna
        from optuna.trial import TrialState

        score = self.fidelity(images)
        self.curve.append([step, score])
        self.trial.set_user_attr("validation", self.curve)
        self.twin.report(score, step)
        if self.twin.should_prune():
            self.twins.tell(self.twin, state=TrialState.PRUNED)
            self.trial.set_user_attr("pruned_at", step)
            raise optuna.TrialPruned(f"validation fidelity {score:.3f} at step {step} is "
                                     "behind the finished trials")

    def finish(self, fidelity: float) -> None:
        self.twins.tell(self.twin, fidelity)

    def abandon(self) -> None:
        """The trial failed: so does its twin (a failed twin is never compared)."""
        from optuna.trial import TrialState

        self.twins.tell(self.twin, state=TrialState.FAIL)


def steps_saved(trials: list[Any]) -> tuple[int, int]:
    """(training steps the pruner saved, steps the trials would have trained
    without it), over finished and pruned trials."""
    saved = sum(t.user_attrs["settings"]["steps"] - t.user_attrs["pruned_at"]
                for t in trials if "pruned_at" in t.user_attrs)
    planned = sum(t.user_attrs["settings"]["steps"] for t in trials
                  if "settings" in t.user_attrs)
    return saved, planned
