"""Image and text embedders that score generated images: DINO (subject
identity), CLIP image (CLIP-I) and CLIP text (CLIP-T), through transformers.

A judge is just a callable: images -> (N, D) tensor, or prompts -> (N, D).
The toy world plugs its own in through the same ``Judges`` record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..core.errors import UserError

ImageEmbedder = Callable[[list[Image.Image]], torch.Tensor]
TextEmbedder = Callable[[list[str]], torch.Tensor]


@dataclass
class Judges:
    identity: ImageEmbedder  # DINO's role: how close to the subject
    image: ImageEmbedder  # CLIP-I
    text_image: ImageEmbedder  # the image side of CLIP-T (same space as ``text``)
    text: TextEmbedder  # CLIP-T's prompt side
    names: dict[str, str]


def resolve(name: str, option: str) -> Path:
    """A local folder, or a hub id found in the local cache (downloaded only
    when online); anything else fails fast in one line."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from ..models.loading import resolve_hub

    if path.exists() or name.count("/") != 1:
        raise UserError(f"{option} {name}: no such model folder, and not a hub id")
    try:
        return resolve_hub(name)
    except UserError as e:
        raise UserError(str(e).replace("--model", option, 1)) from None


def _as_tensor(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pixel_batches(processor, images: list[Image.Image], batch: int):
    for i in range(0, len(images), batch):
        yield processor(images=[im.convert("RGB") for im in images[i : i + batch]],
                        return_tensors="pt").pixel_values


def dino_embedder(name: str, batch: int = 16) -> ImageEmbedder:
    from transformers import AutoImageProcessor, AutoModel

    path = resolve(name, "--dino")
    model = AutoModel.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)

    @torch.inference_mode()
    def embed(images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([model(pixel_values=px).last_hidden_state[:, 0]  # the CLS token
                          for px in _pixel_batches(processor, images, batch)]).float()

    return embed


def clip_embedders(name: str, batch: int = 16) -> tuple[ImageEmbedder, TextEmbedder]:
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    path = resolve(name, "--clip")
    model = CLIPModel.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)

    @torch.inference_mode()
    def images_fn(images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([_as_tensor(model.get_image_features(pixel_values=px))
                          for px in _pixel_batches(processor, images, batch)]).float()

    @torch.inference_mode()
    def texts_fn(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        return _as_tensor(model.get_text_features(**ids)).float()

    return images_fn, texts_fn


def default_judges(dino: str, clip: str) -> Judges:
    clip_image, clip_text = clip_embedders(clip)
    return Judges(identity=dino_embedder(dino), image=clip_image, text_image=clip_image,
                  text=clip_text, names={"dino": dino, "clip": clip})
