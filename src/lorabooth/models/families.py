"""Model families: what differs between Stable Diffusion 1.x, SDXL, FLUX.1
and FLUX.2 [klein], one object each, so the training loop and drawing call
the family instead of branching on the architecture.

A family says which text encoders the model has (diffusers' names), how a
batch of token ids becomes the UNet's conditioning, which pipeline draws, and
whether the VAE must stay fp32. SDXL also conditions on the pooled text
embedding of its second encoder and on "micro-conditioning" time ids
(original size, crop top-left, target size; Podell et al., 2023, sec. 2.2),
which ``time_ids`` computes from a photo's size and crop box.

The FLUX families are flow-matching transformers (``flow`` is True): the
denoiser (BaseModel's ``unet`` slot, diffusers' ``transformer``) reads packed
latent tokens, position ids and a timestep in [0, 1] (``predict``), their
text windows differ in length per encoder (``tokenize``), and their latents
are normalised otherwise (``to_flow_latents``; the arithmetic in
flux_latents.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..formats import sdxl as names  # the families' names, one vocabulary
from . import flux_latents as lat

Box = tuple[float, float, float, float]  # left, top, right, bottom in the photo's pixels


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser reads beside the noisy latents, one row per latent:
    ``hidden`` (B, L, D) text states (L = 77 for CLIP, 512 for FLUX's T5 and
    Qwen3); SDXL adds ``pooled`` (B, P), encoder 2's projected text
    embedding, and ``time_ids`` (B, 6); FLUX.1 adds ``pooled`` (B, 768),
    CLIP's pooled output."""

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


def time_ids(size: tuple[int, int], box: Box, target: int | tuple[int, int]
             ) -> tuple[float, ...]:
    """SDXL's micro-conditioning of one training image: (original height,
    original width, crop top, crop left, target height, target width).

    ``size`` (width, height) is the photo's, ``box`` the part of it the
    training image shows before the centre crop the loader makes to the
    target's aspect (``prepare``'s crop box, or the whole photo); ``target``
    the training size, (width, height) or one side of a square. As in SDXL's
    data pipeline the crop is counted in the pixels of the photo scaled so
    that the crop is the target's size; a box reaching past the photo
    (reflection padding) cut nothing there: 0."""
    width, height = size
    left, top, right, bottom = box
    tw, th = (target, target) if isinstance(target, int) else target
    aspect = tw / th  # the crop's width and height in the photo's pixels (square: the short side)
    cw, ch = min(right - left, (bottom - top) * aspect), min(bottom - top, (right - left) / aspect)
    scale = tw / cw
    crop_top = max(0.0, top + (bottom - top - ch) / 2) * scale
    crop_left = max(0.0, left + (right - left - cw) / 2) * scale
    return (float(height), float(width), float(round(crop_top)), float(round(crop_left)),
            float(th), float(tw))


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
    flow: bool  # a flow-matching transformer (FLUX): ``predict`` instead of ``unet_inputs``
    lora_encoders: tuple[str, ...]  # those --train-text-encoder puts LoRA on
    guidance: float  # the guidance scale drawing uses when the user gives none
    resolution: int  # the native image side in pixels of the family's published models
    guidance_range: tuple[float, float]  # what `tune` searches by default
    # train options the family refuses (training/setup.check_family_options),
    # which `tune`'s search keeps off
    frozen: tuple[str, ...]

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        """Prompts -> token ids (P, rows, L) that ``encode`` reads."""

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        """Token ids (B, len(encoders), 77) -> the text part of the conditioning."""

    def unet_inputs(self, context: Conditioning) -> dict:
        """The UNet's keyword arguments beside the noisy latents and timesteps."""

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor,
                context: Conditioning, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's prediction for noisy latents (B, C, h, w) at the
        model's time ``t`` (B,), in the latents' shape."""

    def pipeline(self, components: dict, scheduler):
        """A drawing pipeline over these modules (no copies)."""

    def model_latents(self, vae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map from the VAE's latents to the denoiser's, holding only the
        VAE's constants (so the VAE itself can be freed once latents are cached)."""

    def sampler(self, noise_scheduler):
        """The scheduler that draws, built from the training one's config."""

    def draw_options(self, pipe) -> dict:
        """What a drawing call passes beside the prompt, so the pipeline reads
        the prompt as training does (a flow family's text window)."""


class SD1Family:
    """Stable Diffusion 1.x (and the built-in tiny, toy, sd15-random)."""

    name = names.SD  # "sd1"
    encoders = ("text_encoder",)
    lora_encoders = encoders
    pipeline_name = "StableDiffusionPipeline"
    flow = False
    guidance = 7.5  # what lorabooth has always drawn SD with
    resolution = 512  # SD 1.x's native size
    guidance_range = (3.0, 7.0)
    frozen: tuple[str, ...] = ()

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        return tokenize_all(tokenizers, prompts)

    def sampler(self, noise_scheduler):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)

    def draw_options(self, pipe) -> dict:
        return {}  # the pipeline reads CLIP's 77 tokens, as training

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        return Conditioning(encoders[0](ids[:, 0])[0])

    def unet_inputs(self, context: Conditioning) -> dict:
        return {"encoder_hidden_states": context.hidden}

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor,
                context: Conditioning, guidance: float | None = None) -> torch.Tensor:
        """The UNet's prediction (epsilon or v) at integer timesteps ``t``."""
        return denoiser(latents, t, **self.unet_inputs(context)).sample

    def model_latents(self, vae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(torch.mul, other=float(vae.config.scaling_factor))

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
    lora_encoders = encoders
    pipeline_name = "StableDiffusionXLPipeline"
    flow = False
    guidance = 7.5  # as SD 1.x here (the pipeline's own default is 5.0)
    resolution = 1024
    guidance_range = (3.0, 7.0)
    frozen = ("train_token",)  # two text encoders: no trained token rows yet
    tokenize = SD1Family.tokenize
    sampler = SD1Family.sampler
    draw_options = SD1Family.draw_options
    predict = SD1Family.predict
    model_latents = SD1Family.model_latents

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


class Flux2Family:
    """FLUX.2 [klein]: one text encoder (Qwen3) reading the prompt in its chat
    template, its hidden states of layers 9, 18 and 27 side by side (B, 512,
    3 x 2560), as Flux2KleinPipeline.encode_prompt; no pooled embedding; the
    latents patchified and standardised by the VAE's batch-norm statistics."""

    name = "flux2"
    encoders = ("text_encoder",)
    lora_encoders = ()  # Qwen3, a 4 B language model: its embeddings are cached, it stays frozen
    pipeline_name = "Flux2KleinPipeline"
    flow = True
    guidance = 4.0  # Flux2KleinPipeline's default guidance_scale
    guidance_range = (2.5, 5.5)
    frozen = ("train_text_encoder", "train_token")  # the text embeddings are cached
    layers = (9, 18, 27)  # the pipeline's text_encoder_out_layers
    max_length = 512  # the pipeline's max_sequence_length
    resolution = 1024

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        """(P, 2, 512): row 0 the chat-templated prompt's ids, row 1 its
        attention mask (Qwen3 pads with a token that may not be masked out
        by id alone, so the mask travels with the ids)."""
        tokenizer = tokenizers[0]
        texts = [chat_text(tokenizer, p) for p in prompts]
        out = tokenizer(texts, padding="max_length", truncation=True,
                        max_length=text_window(tokenizer, self.max_length), return_tensors="pt")
        return torch.stack([out.input_ids, out.attention_mask], dim=1)

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        out = encoders[0](input_ids=ids[:, 0], attention_mask=ids[:, 1],
                          output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in self.layers], dim=2)  # (B, L, 3, D)
        return Conditioning(hidden.flatten(2))  # (B, L, 3D)

    def to_flow_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (B, C, H, W) -> the flow's (B, 4C, H/2, W/2)."""
        return lat.flux2_normalize(z, *_bn_stats(vae))

    def from_flow_latents(self, vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return lat.flux2_denormalize(x, *_bn_stats(vae))

    def model_latents(self, vae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        mean, std = (t.detach().float().cpu().clone() for t in _bn_stats(vae))
        return functools.partial(lat.flux2_normalize, mean=mean, std=std)

    def denoiser_inputs(self, context: Conditioning, latents: torch.Tensor,
                        sigmas: torch.Tensor, guidance: torch.Tensor | None = None) -> dict:
        """Flux2Transformer2DModel's keyword arguments for flow latents
        (B, C, h, w) at ``sigmas`` (B,) in [0, 1]."""
        _, _, h, w = latents.shape
        device = context.hidden.device
        return {"hidden_states": lat.pack_flat(latents), "timestep": sigmas,
                "encoder_hidden_states": context.hidden, "guidance": guidance,
                "txt_ids": lat.flux2_text_ids(context.hidden.shape[1]).to(device),
                "img_ids": lat.flux2_image_ids(h, w).to(device)}

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
                context: Conditioning, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's velocity prediction in the latents' shape (B, C, h, w)."""
        return _predict(self, denoiser, latents, sigmas, context, guidance, lat.unpack_flat)

    def pipeline(self, components: dict, scheduler):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(
            scheduler=scheduler, vae=components["vae"], text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"], transformer=components["unet"])

    def sampler(self, noise_scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def draw_options(self, pipe) -> dict:
        return {"max_sequence_length": text_window(pipe.tokenizer, self.max_length)}


class Flux1Family:
    """FLUX.1: CLIP-L's pooled output (B, 768) and T5-XXL's last hidden
    states (B, 512, 4096), as FluxPipeline.encode_prompt (CLIP is diffusers'
    text_encoder, T5 text_encoder_2); [dev]'s guidance embedding; latents
    shifted and scaled, packed in 2 x 2 patches."""

    name = "flux1"
    encoders = ("text_encoder", "text_encoder_2")
    lora_encoders = ("text_encoder",)  # CLIP-L, as kohya's sd-scripts trains by default; T5 frozen
    pipeline_name = "FluxPipeline"
    flow = True
    guidance = 3.5  # FLUX.1 [dev]'s distilled guidance (FluxPipeline's default)
    guidance_range = (2.0, 5.0)
    frozen = ("train_token",)  # --train-text-encoder trains CLIP-L
    clip_length = 77
    max_length = 512  # T5's window (FLUX.1 [dev]; [schnell] reads 256)
    # what [dev]'s guidance embedding reads while training (diffusers' FLUX
    # trainer's default; the transformers without the embedding ignore it)
    train_guidance = 3.5
    resolution = 1024

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        """(P, 2, 512): row 0 CLIP's 77 ids (then its padding, never read),
        row 1 T5's 512."""
        clip = tokenize(tokenizers[0], prompts)  # (P, 77)
        t5 = tokenizers[1](prompts, padding="max_length",
                           max_length=text_window(tokenizers[1], self.max_length),
                           truncation=True, return_tensors="pt").input_ids
        clip = torch.nn.functional.pad(clip, (0, t5.shape[1] - clip.shape[1]),
                                       value=tokenizers[0].pad_token_id)
        return torch.stack([clip, t5], dim=1)

    def encode(self, encoders: list[torch.nn.Module], ids: torch.Tensor) -> Conditioning:
        pooled = encoders[0](ids[:, 0, :self.clip_length], output_hidden_states=False).pooler_output
        hidden = encoders[1](ids[:, 1], output_hidden_states=False)[0]  # (B, 512, D)
        return Conditioning(hidden, pooled)

    def to_flow_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return lat.flux1_normalize(z, vae.config.shift_factor, vae.config.scaling_factor)

    def from_flow_latents(self, vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return lat.flux1_denormalize(x, vae.config.shift_factor, vae.config.scaling_factor)

    def model_latents(self, vae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(lat.flux1_normalize, shift=float(vae.config.shift_factor),
                                 scale=float(vae.config.scaling_factor))

    def denoiser_inputs(self, context: Conditioning, latents: torch.Tensor,
                        sigmas: torch.Tensor, guidance: torch.Tensor | None = None) -> dict:
        """FluxTransformer2DModel's keyword arguments for flow latents
        (B, C, h, w) at ``sigmas`` (B,) in [0, 1]; ``guidance`` (B,) for
        [dev]'s guidance embedding."""
        _, _, h, w = latents.shape
        device = context.hidden.device
        return {"hidden_states": lat.pack_patches(latents), "timestep": sigmas,
                "encoder_hidden_states": context.hidden, "pooled_projections": context.pooled,
                "guidance": guidance,
                "txt_ids": lat.flux1_text_ids(context.hidden.shape[1]).to(device),
                "img_ids": lat.flux1_image_ids(h, w).to(device)}

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
                context: Conditioning, guidance: float | None = None) -> torch.Tensor:
        return _predict(self, denoiser, latents, sigmas, context, guidance, lat.unpack_patches)

    def pipeline(self, components: dict, scheduler):
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=scheduler, vae=components["vae"], text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"], text_encoder_2=components["text_encoder_2"],
            tokenizer_2=components["tokenizer_2"], transformer=components["unet"])

    sampler = Flux2Family.sampler

    def draw_options(self, pipe) -> dict:
        return {"max_sequence_length": text_window(pipe.tokenizer_2, self.max_length)}


def _bn_stats(vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's VAE: the mean and standard deviation of its patchified latents."""
    return vae.bn.running_mean, torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)


def _predict(family, denoiser: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
             context: Conditioning, guidance: float | None, unpack) -> torch.Tensor:
    """Pack, call the transformer, unpack: (B, C, h, w) in, (B, C, h, w) out.
    ``guidance`` reaches a denoiser with a guidance embedding only (FLUX.1
    [dev]); the others ignore it, as their pipelines do."""
    b, _, h, w = latents.shape
    g = None
    # data-parallel training hands in the transformer wrapped (DDP's .module)
    if getattr(getattr(denoiser, "module", denoiser).config, "guidance_embeds", False):
        if guidance is None:
            raise ValueError("this transformer embeds the guidance scale: pass guidance")
        g = torch.full((b,), float(guidance), device=latents.device)
    out = denoiser(**family.denoiser_inputs(context, latents, sigmas.to(latents.device), g),
                   return_dict=False)[0]
    return unpack(out, h, w)


FAMILIES: dict[str, Family] = {f.name: f for f in (SD1Family(), SDXLFamily(), Flux2Family(),
                                                   Flux1Family())}


def encode_prompts(family: Family, tokenizers: list, encoders: list[torch.nn.Module],
                   prompts: list[str]) -> Conditioning:
    """Frozen text conditioning of fixed prompts, on the CPU in fp32: (P, ...)."""
    ids = family.tokenize(tokenizers, prompts)
    with torch.inference_mode():
        return family.encode(encoders, ids.to(encoders[0].device)).cpu_float()


def encoder_text(tokenizer, prompt: str) -> str:
    """The text a tokenizer reads for ``prompt``: a tokenizer with a chat
    template (FLUX.2's Qwen3) reads it as the user's message of a chat with
    thinking switched off, as Flux2KleinPipeline builds it; the others the
    prompt itself."""
    return chat_text(tokenizer, prompt) if getattr(tokenizer, "chat_template", None) else prompt


def chat_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def text_window(tokenizer, longest: int) -> int:
    """The tokens a flow family's long text encoder reads: the family's
    window (the pipeline's max_sequence_length), or fewer where the model's
    tokenizer says so (the flow toy model reads 32)."""
    return min(longest, int(tokenizer.model_max_length))


def family_of(pipe) -> Family:
    """The family whose pipeline ``pipe`` is (its class, or a subclass of it)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for family in FAMILIES.values():
        if family.pipeline_name in names:
            return family
    raise ValueError(f"no model family draws with {type(pipe).__name__}")


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def tokenize_all(tokenizers: list, prompts: list[str]) -> torch.Tensor:
    """(P, number of tokenizers, 77) token ids, one tokenizer per text encoder."""
    return torch.stack([tokenize(t, prompts) for t in tokenizers], dim=1)
