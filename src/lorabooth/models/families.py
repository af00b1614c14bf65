"""Model families: what differs between Stable Diffusion 1.x and SDXL, one
object each, so the training loop and drawing call the family instead of
branching on the architecture.

A family says which text encoders the model has (diffusers' names), how a
batch of token ids becomes the UNet's conditioning, which pipeline draws, and
whether the VAE must stay fp32. SDXL also conditions on the pooled text
embedding of its second encoder and on "micro-conditioning" time ids
(original size, crop top-left, target size; Podell et al., 2023, sec. 2.2),
which ``time_ids`` computes from a photo's size and crop box.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from ..formats import sdxl as names  # the families' names, one vocabulary

Box = tuple[float, float, float, float]  # left, top, right, bottom in the photo's pixels


@dataclass(frozen=True)
class Conditioning:
    """What the UNet reads beside the noisy latents, one row per latent:
    ``hidden`` (B, 77, D) text states; SDXL adds ``pooled`` (B, P), encoder
    2's projected text embedding, and ``time_ids`` (B, 6)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if t is None else fn(t)
                              for t in (self.hidden, self.pooled, self.time_ids)))

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda t: t.to(device))

    def cpu_float(self) -> Conditioning:
        return self._map(lambda t: t.float().cpu())

    def rows(self, index) -> Conditioning:
        return self._map(lambda t: t[index])

    def expand(self, n: int) -> Conditioning:
        """One row repeated ``n`` times: (1, ...) -> (n, ...)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Rows marked in ``mask`` (B,) taken from ``other`` (one row, broadcast)."""
        def pick(t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.view(-1, *[1] * (t.ndim - 1)).to(t.device), o.to(t.device), t)
        return Conditioning(pick(self.hidden, other.hidden),
                            None if self.pooled is None else pick(self.pooled, other.pooled),
                            self.time_ids)

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        return Conditioning(self.hidden, self.pooled, time_ids.to(self.hidden.device))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        def join(ts):
            return None if ts[0] is None else torch.cat(ts)
        return Conditioning(join([p.hidden for p in parts]), join([p.pooled for p in parts]),
                            join([p.time_ids for p in parts]))


def time_ids(size: tuple[int, int], box: Box, resolution: int) -> tuple[float, ...]:
    """SDXL's micro-conditioning of one training image: (original height,
    original width, crop top, crop left, target height, target width).

    ``size`` (width, height) is the photo's, ``box`` the part of it the
    training image shows before the square centre crop the loader makes
    (``prepare``'s crop box, or the whole photo). As in SDXL's data pipeline
    the crop is counted in the pixels of the photo scaled so that the square
    is ``resolution`` wide; a box reaching past the photo (reflection
    padding) cut nothing there: 0."""
    width, height = size
    left, top, right, bottom = box
    side = min(right - left, bottom - top)
    scale = resolution / side
    crop_top = max(0.0, top + (bottom - top - side) / 2) * scale
    crop_left = max(0.0, left + (right - left - side) / 2) * scale
    return (float(height), float(width), float(round(crop_top)), float(round(crop_left)),
            float(resolution), float(resolution))


def fp32_decode(vae: torch.nn.Module) -> None:
    """Make ``vae.decode`` run in fp32 whatever autocast is on: SDXL's VAE
    overflows to inf/NaN in fp16 (its config's ``force_upcast``), and the
    pipeline only upcasts a VAE whose weights are fp16, not fp16 autocast
    over fp32 weights (training's validation and class images)."""
    if getattr(vae, "_fp32_decode", False):  # a second pipeline over the same VAE
        return
    decode = vae.decode

    @functools.wraps(decode)
    def exact(z: torch.Tensor, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = exact
    vae._fp32_decode = True


class Family(Protocol):
    name: str
    encoders: tuple[str, ...]  # diffusers' component names of the text encoders
    pipeline_name: str  # the diffusers class that draws (for the run's README)

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        """Token ids (B, len(encoders), 77) -> the text part of the conditioning."""

    def unet_inputs(self, context: Conditioning) -> dict:
        """The UNet's keyword arguments beside the noisy latents and timesteps."""

    def pipeline(self, components: dict, scheduler):
        """A drawing pipeline over these modules (no copies)."""


class SD1Family:
    """Stable Diffusion 1.x (and the built-in tiny, toy, sd15-random)."""

    name = names.SD  # "sd1"
    encoders = ("text_encoder",)
    pipeline_name = "StableDiffusionPipeline"

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        return Conditioning(encoders[0](ids[:, 0])[0])

    def unet_inputs(self, context: Conditioning) -> dict:
        return {"encoder_hidden_states": context.hidden}

    def pipeline(self, components: dict, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class SDXLFamily:
    """Stable Diffusion XL: CLIP-L and OpenCLIP-bigG, their penultimate hidden
    states side by side, encoder 2's pooled projection and the time ids as
    extra UNet inputs (what StableDiffusionXLPipeline.encode_prompt does)."""

    name = names.SDXL  # "sdxl"
    encoders = ("text_encoder", "text_encoder_2")
    pipeline_name = "StableDiffusionXLPipeline"

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        outputs = [encoder(ids[:, i], output_hidden_states=True)
                   for i, encoder in enumerate(encoders)]
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)  # (B, 77, D1 + D2)
        return Conditioning(hidden, outputs[-1][0])  # [0]: text_embeds, (B, P)

    def unet_inputs(self, context: Conditioning) -> dict:
        return {"encoder_hidden_states": context.hidden,
                "added_cond_kwargs": {"text_embeds": context.pooled,
                                      "time_ids": context.time_ids}}

    def pipeline(self, components: dict, scheduler):
        from diffusers import StableDiffusionXLPipeline

        fp32_decode(components["vae"])
        return StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"],
            text_encoder_2=components["text_encoder_2"], tokenizer=components["tokenizer"],
            tokenizer_2=components["tokenizer_2"], unet=components["unet"],
            scheduler=scheduler, add_watermarker=False)


FAMILIES: dict[str, Family] = {f.name: f for f in (SD1Family(), SDXLFamily())}


def encode_prompts(family: Family, tokenizers: list, encoders: list[torch.nn.Module],
                   prompts: list[str]) -> Conditioning:
    """Frozen text conditioning of fixed prompts, on the CPU in fp32: (P, ...)."""
    ids = tokenize_all(tokenizers, prompts)
    with torch.inference_mode():
        return family.encode(encoders, ids.to(encoders[0].device)).cpu_float()


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def tokenize_all(tokenizers: list, prompts: list[str]) -> torch.Tensor:
    """(P, number of tokenizers, 77) token ids, one tokenizer per text encoder."""
    return torch.stack([tokenize(t, prompts) for t in tokenizers], dim=1)
