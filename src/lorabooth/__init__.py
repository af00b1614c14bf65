"""lorabooth: personalise text-to-image diffusion models with DreamBooth LoRA.

Python API (what the CLI calls)::

    from lorabooth import TrainConfig, train, generate
    run = train(TrainConfig(model="tiny", instance_dir="photos/", instance_prompt="a photo of sks dog"))
    images = generate(run, ["a photo of sks dog on the beach"], unet_scales=[0, 1])
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import UserError  # noqa: E402


def train(config: "TrainConfig"):
    """Train a DreamBooth LoRA; returns the run folder (a ``Path``)."""
    from .train import train as _train

    return _train(config)


def generate(run, prompts, **kwargs):
    """Draw with a trained LoRA; returns the list of PIL images. See
    :func:`lorabooth.generate.generate` for the keyword arguments."""
    from .generate import generate as _generate

    return _generate(run, prompts, **kwargs)


__all__ = ["TrainConfig", "UserError", "train", "generate", "__version__"]
