"""The training form, generated from `TrainConfig`: one widget per field with
its help text and default, so a new option appears in the page by itself,
and the values back into a validated `TrainConfig` whose paths all lie in
the workspace."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from ..config import TrainConfig, check_keys, choices, field_default, field_kind
from ..core.errors import UserError
from ..models.loading import BUILTIN_MODELS
from .workspace import Workspace

# The options most runs set; the rest are folded under "Advanced".
BASIC = ("model", "instance_dir", "instance_prompt", "class_prompt", "prior_preservation",
         "steps", "rank", "lr", "train_text_encoder", "validation_prompt", "validation_every",
         "checkpoint_every", "output")
# Fields the page owns: --resume is its Resume button, --force never silently,
# --overwrite never (the page refuses an output that holds a run).
HIDDEN = ("resume", "force", "overwrite")
# Fields that name files or folders: confined to the workspace.
PATHS = ("instance_dir", "class_dir", "output", "model_config")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class FormField:
    name: str
    kind: type  # str, int, float or bool
    default: Any
    help: str
    advanced: bool
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


def form_fields(defaults: dict[str, Any] | None = None) -> list[FormField]:
    """Every TrainConfig field the page shows, in the config's order;
    ``defaults`` overrides a dataclass default (the server's --model)."""
    defaults = defaults or {}
    out = []
    for f in fields(TrainConfig):
        if f.name in HIDDEN:
            continue
        kind, many, _ = field_kind(TrainConfig, f.name)
        assert not many, f"TrainConfig.{f.name}: the form has no list widget"
        out.append(FormField(f.name, kind, defaults.get(f.name, field_default(f)),
                             f.metadata["help"], f.name not in BASIC, choices(TrainConfig, f.name)))
    return out


def _model(ws: Workspace, value: str) -> str:
    """A built-in name, a model folder in the workspace, or a hub id (read
    from the local cache: the page itself never downloads)."""
    if value in BUILTIN_MODELS:
        return value
    try:
        folder = ws.path(value, "model")
        if folder.is_dir():
            return str(folder)
    except UserError:
        if not _HUB_ID.match(value):
            raise
    if _HUB_ID.match(value):
        return value
    raise UserError(f"model {value!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), "
                    f"a model folder in the workspace, or a hub id")


def config_from_form(ws: Workspace, values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from the form's values (names as in the config); types
    checked as a TOML file's are, paths resolved inside the workspace."""
    clean: dict[str, Any] = {}
    for f in form_fields():
        if f.name not in values or values[f.name] is None:
            continue
        value = values[f.name]
        if f.kind is int and isinstance(value, float) and value == int(value):
            value = int(value)  # number boxes hand back floats
        if f.kind is str:
            value = str(value).strip()
        clean[f.name] = value
    for key in PATHS:
        if clean.get(key):
            clean[key] = str(ws.path(clean[key], key))
    if clean.get("model"):
        clean["model"] = _model(ws, clean["model"])
    if not clean.get("output"):
        raise UserError("output: is required: a run folder in the workspace")
    config = TrainConfig(**check_keys(TrainConfig, clean, "train form"))
    refuse_frozen(config)
    return config


def refuse_frozen(config: TrainConfig) -> None:
    """An option the model's family cannot take (FLUX: a text-encoder LoRA,
    a trained token; SDXL: a trained token), refused in the form before
    anything is queued, as `train` would refuse it."""
    from ..models.loading import family_of_model

    family = family_of_model(config.model)
    for key in family.frozen:
        if getattr(config, key):
            raise UserError(f"{key.replace('_', ' ')}: {config.model} ({family.name}) cannot "
                            f"take it; untick it")
