"""lorabooth: personalise text-to-image diffusion models with DreamBooth LoRA.

Python API (what the CLI calls)::

    from lorabooth import TrainConfig, train, generate
    run = train(TrainConfig(model="tiny", instance_dir="photos/", instance_prompt="a photo of sks dog"))
    images = generate(run, ["a photo of sks dog on the beach"], unet_scales=[0, 1])
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import UserError  # noqa: E402

# Imported eagerly on purpose: the submodules share the functions' names, and
# importing them lazily would rebind `lorabooth.train` to the module.
# torchvision is absent by design (it cannot sit beside the CPU torch wheel);
# transformers announces its PIL fallback on import, which users need not see.
from transformers.utils import logging as _hf_logging  # noqa: E402

_verbosity = _hf_logging.get_verbosity()
_hf_logging.set_verbosity_error()
from .evaluate import evaluate  # noqa: E402
from .generate import generate  # noqa: E402
from .train import train  # noqa: E402

_hf_logging.set_verbosity(_verbosity)

__all__ = ["TrainConfig", "UserError", "train", "generate", "evaluate", "__version__"]
