"""The run folder: created and checked before any work, the effective config
written first, the model card written last."""

from __future__ import annotations

import os
from pathlib import Path

import tomli_w

from . import __version__
from .config import TrainConfig, to_toml_dict
from .errors import UserError
from .io import write_text


def prepare_output(config: TrainConfig, main: bool) -> Path:
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {output}: cannot create the folder ({e.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: folder is not writable")
    if main:
        write_text(output / "config.toml", tomli_w.dumps(to_toml_dict(config)))
    return output


def model_card(config: TrainConfig, resolution: int) -> str:
    text_encoder = "UNet and text encoder" if config.train_text_encoder else "UNet"
    prior = (f"yes: {config.num_class_images} images of '{config.class_prompt}', "
             f"weight {config.prior_loss_weight}" if config.prior_preservation else "no")
    return f"""---
base_model: {config.model}
library_name: diffusers
tags: [text-to-image, diffusers, lora, dreambooth, lorabooth]
instance_prompt: {config.instance_prompt!r}
---
# DreamBooth LoRA: {config.instance_prompt}

LoRA adapters for `{config.model}`, trained by lorabooth {__version__}.

| setting | value |
|---|---|
| instance prompt | {config.instance_prompt} |
| LoRA on | {text_encoder} |
| rank / alpha | {config.rank} / {config.lora_alpha:g} |
| steps, batch size | {config.steps}, {config.batch_size} |
| learning rates (UNet / text) | {config.lr:g} / {config.lr_text:g} |
| resolution | {resolution} px |
| prior preservation | {prior} |
| mixed precision | {config.mixed_precision} |
| seed | {config.seed} |

## Use it
```
lorabooth generate {config.output} --prompt "{config.instance_prompt} on the beach" \\
    --unet-scale 0,0.5,1 --text-scale 1 --guidance 7.5
```
or in diffusers:
```python
pipe = StableDiffusionPipeline.from_pretrained("{config.model}")
pipe.load_lora_weights("{config.output}")
image = pipe("{config.instance_prompt} on the beach").images[0]
```

Files: `pytorch_lora_weights.safetensors` (diffusers layout, metadata in its
header), `config.toml` (the exact settings; `lorabooth train --config` reruns
it), `metrics.jsonl` (loss per step), `samples/` (validation images).
"""
