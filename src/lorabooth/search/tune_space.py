"""The search space of `lorabooth tune`: its defaults, `--space FILE.toml`
(narrow a range, restrict or fix a choice), and one trial's draw from it.

A parameter given one value is fixed: it is not an Optuna parameter at all,
so the sampler spends nothing on it and a study searched with it free can be
continued with it fixed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..config import TrainConfig, _check_scalar, choices, unknown_key
from ..core.errors import UserError
from ..core.fileio import load_toml

PRIOR_CHOICES = choices(TrainConfig, "prior_preservation")
RANKS = (2, 4, 8)
SCALE_NAMES = ("unet_scale", "text_scale", "guidance")  # inference settings, not train options


@dataclass(frozen=True)
class Range:
    """A float drawn between ``low`` and ``high`` (log-uniformly with ``log``)."""
    low: float
    high: float
    log: bool = False


Domain = Union[Range, tuple]  # a tuple: the choices


@dataclass(frozen=True)
class Scales:
    """The inference settings a trial is evaluated at."""
    unet_scale: float
    text_scale: float
    guidance: float


def default_space(steps: list[int], guidance: tuple[float, float] = (3.0, 7.0)
                  ) -> dict[str, Domain]:
    """Every searched parameter in the order it is drawn (the order keeps a
    seeded study's draws the same); ``guidance``: the range of guidance
    scales (the model family's: SD's 3-7 by default)."""
    return {"lr": Range(1e-4, 2e-3, log=True), "steps": tuple(steps), "rank": RANKS,
            "prior_preservation": PRIOR_CHOICES,
            "prior_loss_weight": Range(0.1, 1.0, log=True),
            "train_text_encoder": (False, True), "train_token": (False, True),
            "unet_scale": Range(0.5, 1.0), "text_scale": Range(0.5, 1.0),
            "guidance": Range(*guidance)}


def fixed(domain: Domain) -> bool:
    return domain.low == domain.high if isinstance(domain, Range) else len(domain) == 1


def suggest(trial: Any, space: dict[str, Domain]) -> tuple[dict[str, Any], Scales]:
    """TrainConfig overrides and inference scales for one trial (``trial``
    is an ``optuna.Trial``, or a ``FixedTrial`` in tests). The text-encoder
    scale is drawn only when the text encoder is trained: for a LoRA without
    text layers it would change nothing, and TPE would learn noise from it."""
    values: dict[str, Any] = {}
    for name, domain in space.items():
        if name == "text_scale" and not values["train_text_encoder"]:
            continue
        if fixed(domain):
            values[name] = domain.low if isinstance(domain, Range) else domain[0]
        elif isinstance(domain, Range):
            values[name] = trial.suggest_float(name, domain.low, domain.high, log=domain.log)
        else:
            values[name] = trial.suggest_categorical(name, list(domain))
    scales = Scales(values.pop("unet_scale"), values.pop("text_scale", 1.0), values.pop("guidance"))
    return values, scales


def load_space(file: str, steps: list[int], guidance: tuple[float, float] = (3.0, 7.0)
               ) -> dict[str, Domain]:
    """The default space with ``file``'s entries in place of the defaults;
    a bad entry is one line naming the file and the key."""
    space = default_space(steps, guidance)
    if not file:
        return space
    where = f"--space {file}"
    entries = load_toml(file, "--space")
    for key, value in entries.items():
        if key not in space:
            raise unknown_key(key, space, where)
        space[key] = _domain(key, value, space[key], where)
        _check_values(key, space[key], f"{where}: `{key}`")
    return space


def _domain(key: str, value: Any, default: Domain, file: str) -> Domain:
    """One entry: a range ``{low, high, log}`` or one number for a float
    parameter; a list of choices or one choice for the others."""
    where = f"{file}: `{key}`"
    if isinstance(default, Range):
        if isinstance(value, dict):
            for key in value:
                if key not in ("low", "high", "log"):
                    raise unknown_key(key, ("low", "high", "log"), where)
            if "low" not in value or "high" not in value:
                raise UserError(f"{where}: a range needs both `low` and `high` (got {value!r})")
            low, high = (_number(value[k], where) for k in ("low", "high"))
            log = _check_scalar(bool, "log", value.get("log", False), where)
            if low > high:
                raise UserError(f"{where}: low {low:g} is above high {high:g}")
            if log and low <= 0:
                raise UserError(f"{where}: a log range needs low > 0 (got {low:g})")
            return Range(low, high, log)
        if isinstance(value, list):
            raise UserError(f"{where}: a float parameter takes {{low = …, high = …, log = …}} or "
                            f"one number, not a list (got {value!r})")
        number = _number(value, where)
        return Range(number, number)
    choices = value if isinstance(value, list) else [value]
    if not choices:
        raise UserError(f"{where}: give at least one choice")
    return tuple(_check_scalar(type(default[0]), key, v, file) for v in choices)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number (got {value!r})")
    return float(value)


def _check_values(key: str, domain: Domain, where: str) -> None:
    """The values the train options accept, checked by TrainConfig itself
    (endpoints of a range, every choice) before any trial starts."""
    values = (domain.low, domain.high) if isinstance(domain, Range) else domain
    if key == "prior_preservation":
        bad = [v for v in values if v not in PRIOR_CHOICES]
        if bad:
            raise UserError(f"{where}: must be among {', '.join(PRIOR_CHOICES)} (got {bad[0]!r})")
    if key == "guidance" and min(values) < 0:
        raise UserError(f"{where}: the guidance scale must be 0 or more (got {min(values):g})")
    if key in SCALE_NAMES:
        return
    for value in values:
        try:
            TrainConfig(model="tiny", instance_dir=".", instance_prompt="a photo of sks dog",
                        class_prompt="a photo of a dog", output=".", **{key: value})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def distributions(space: dict[str, Domain]) -> dict[str, Any]:
    """The Optuna distribution of every parameter the space searches."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: FloatDistribution(d.low, d.high, log=d.log) if isinstance(d, Range)
            else CategoricalDistribution(list(d)) for name, d in space.items() if not fixed(d)}


def check_study_fits(trials: list[Any], space: dict[str, Domain], where: str) -> None:
    """Optuna refuses, mid-trial, to draw a parameter from other choices (or
    a linear range where it had a log one) than the study's earlier trials:
    say so before anything runs."""
    from optuna.distributions import check_distribution_compatibility

    drawn: dict[str, Any] = {}
    for t in trials:
        drawn.update(t.distributions)
    for name, new in distributions(space).items():
        if name in drawn:
            try:
                check_distribution_compatibility(drawn[name], new)
            except ValueError:
                raise UserError(f"{where}: `{name}`: the study drew it from {_shown(drawn[name])}; "
                                "continuing it needs the same choices (and log setting), or a "
                                "new --out/--storage") from None


def _shown(d: Any) -> str:
    if hasattr(d, "choices"):
        return f"the choices {list(d.choices)}"
    return f"a {'log ' if d.log else ''}range"
