"""lorabooth: personalise text-to-image diffusion models with DreamBooth LoRA.

Python API (what the CLI calls)::

    from lorabooth import TrainConfig, train, generate
    run = train(TrainConfig(model="tiny", instance_dir="photos/", instance_prompt="a photo of sks dog"))
    images = generate(run, ["a photo of sks dog on the beach"], unet_scales=[0, 1])

Importing the package loads no torch: the functions come from their modules
(`training`, `drawing`, `evaluation.runner`) on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# A hub lookup that cannot connect must fail fast, not hang: cap huggingface_hub's
# timeouts unless the user set their own. Here, because huggingface_hub reads
# them when first imported, by whichever lorabooth module imports diffusers first.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

# name -> module that defines it
_API = {"UserError": "core.errors", "train": "training.loop", "generate": "generation",
        "evaluate": "evaluation.runner", "prepare": "photos.prepare", "run": "commands",
        **dict.fromkeys(("TrainConfig", "PrepareConfig", "GenerateConfig", "EvaluateConfig",
                         "IdentifierConfig", "InspectConfig", "ConvertConfig", "MergeConfig",
                         "FuseConfig", "SweepConfig", "DemoConfig", "PretrainConfig",
                         "ClaimsConfig", "TuneConfig", "TuneStudyConfig", "UiConfig"), "config")}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lorabooth' has no attribute {name!r}")
    module = _API[name]
    if module in ("training.loop", "generation", "evaluation.runner"):
        module = _import_quietly(module)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def _import_quietly(module: str) -> str:
    """Import a module that loads transformers with its warnings off:
    torchvision is absent by design (it cannot sit beside the CPU torch
    wheel) and transformers announces its PIL fallback, which users need not
    see."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        importlib.import_module(f".{module}", __name__)
    finally:
        hf_logging.set_verbosity(verbosity)
    return module
