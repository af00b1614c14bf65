"""The typed config tree: one frozen dataclass per command, validated on
construction, loaded from TOML and overridden from the command line.

Every field has a default and help text (peft's habit); ``__post_init__``
checks values and the error names the option as the user typed it. The
machinery is in ``fields``; each area's configs in their own module
(``train``, ``prepare``, ``generate``, ``formats``, ``search``,
``toyworld``); everything is re-exported here.

    from lorabooth import GenerateConfig, run
    run(GenerateConfig(run="runs/dog", prompt=["a photo of sks dog on the beach"]))
"""

from __future__ import annotations

from .fields import (
    _check_scalar,
    _help,
    bad,
    build_config,
    build_section,
    check_keys,
    check_numbers,
    choices,
    config_keys,
    config_of,
    field_default,
    field_kind,
    one_of,
    option_name,
    require,
    to_argv,
    to_toml_dict,
    unknown_key,
)
from .formats import LAYOUTS, ConvertConfig, FuseConfig, InspectConfig, MergeConfig
from .generate import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    JUDGES,
    SCHEDULERS,
    EvaluateConfig,
    EvaluateOptions,
    GenerateConfig,
    evaluate_options,
)
from .prepare import CROPS, IdentifierConfig, PrepareConfig
from .search import (
    MAX_HEARTBEAT,
    MAX_TRIALS,
    MAX_WORKERS,
    SweepConfig,
    SweepEvaluate,
    SweepGenerate,
    TuneConfig,
)
from .toyworld import (
    ClaimsConfig,
    DemoConfig,
    FlowPretrainConfig,
    PretrainConfig,
    TuneStudyConfig,
)
from .train import (
    ADAPTERS,
    MIXED_PRECISIONS,
    PRIOR_MODES,
    RESUME_NEUTRAL,
    SAVE_FORMATS,
    SWEEP_NEUTRAL,
    TRAIN_CEILINGS,
    TrainConfig,
    check_adapter,
    prior_mode,
)
from .ui import UiConfig

__all__ = [
    "ADAPTERS", "CROPS", "DEFAULT_CLIP", "DEFAULT_DINO", "JUDGES", "LAYOUTS", "SAVE_FORMATS",
    "SCHEDULERS", "MAX_HEARTBEAT", "MAX_TRIALS",
    "MAX_WORKERS", "MIXED_PRECISIONS", "PRIOR_MODES", "RESUME_NEUTRAL", "SWEEP_NEUTRAL",
    "TRAIN_CEILINGS",
    "ClaimsConfig", "ConvertConfig", "DemoConfig", "EvaluateConfig", "EvaluateOptions",
    "FuseConfig",
    "GenerateConfig", "IdentifierConfig", "InspectConfig", "MergeConfig", "PrepareConfig",
    "FlowPretrainConfig", "PretrainConfig", "SweepConfig", "SweepEvaluate", "SweepGenerate", "TrainConfig",
    "TuneConfig", "TuneStudyConfig", "UiConfig",
    "_check_scalar", "_help", "bad", "build_config", "build_section", "check_adapter",
    "check_keys", "check_numbers", "choices", "config_keys", "config_of", "evaluate_options",
    "field_default",
    "field_kind", "one_of",
    "option_name", "prior_mode", "require", "to_argv", "to_toml_dict", "unknown_key",
]
