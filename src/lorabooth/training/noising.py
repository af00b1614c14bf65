"""The forward process a model family trains on, one object each: which
timesteps a step draws, how the latents are noised there, what the model
should predict, and how the rows are weighted.

``DDPMNoising``: Stable Diffusion's discrete schedule (SD 1.x, SDXL),
epsilon or v-prediction, min-SNR-gamma. ``FlowNoising``: rectified flow
(FLUX.1, FLUX.2): x_t = (1 - sigma) x0 + sigma noise, the target the
velocity noise - x0, timesteps drawn by a density over [0, 1] (uniform,
logit-normal, mode; SD3 paper, Esser et al. 2024, sec. 3.1) mapped onto the
scheduler's shifted sigmas, as diffusers' FLUX trainers do, and the loss
weighted by diffusers' ``compute_loss_weighting_for_sd3``. Every random draw
comes from the generator passed in (a resumed run replays it).
``step_loss``: one batch's DreamBooth loss under a ``Denoiser``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.families import Conditioning, Family
from .objective import (
    diffusion_target,
    flow_target,
    min_snr_weights,
)


class DDPMNoising:
    """Stable Diffusion's DDPM schedule: integer timesteps in
    [0, num_train_timesteps), ``scheduler.add_noise``, epsilon or v target."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=rng)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion_target(noise, latents, t, self.scheduler.alphas_cumprod,
                                self.prediction_type)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the UNet reads: the integer timestep itself."""
        return t

    def weights(self, t: torch.Tensor, snr_gamma: float) -> torch.Tensor | None:
        """Per-row loss weights (B,), or None for the plain mean."""
        if not snr_gamma:
            return None
        return min_snr_weights(t, self.scheduler.alphas_cumprod, snr_gamma, self.prediction_type)


class FlowNoising:
    """Rectified flow over a ``FlowMatchEulerDiscreteScheduler``'s training
    schedule (a fresh one from its config: its ``shift`` applied, as diffusers'
    trainers read ``scheduler.sigmas``). Timesteps are sigma x 1000; the
    denoiser reads ``t / 1000``.

    ``image_seq_len``: with a scheduler that shifts by resolution at drawing
    time (``use_dynamic_shifting``, FLUX), shift the training sigmas the same
    way (mu from the image's token count, the scheduler's own ``time_shift``),
    so training sees the noise levels drawing at that size visits, as
    SimpleTuner's and ai-toolkit's auto shift do; None keeps the unshifted
    schedule (diffusers' FLUX scripts)."""

    def __init__(self, scheduler, sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29,
                 image_seq_len: int | None = None) -> None:
        fresh = type(scheduler).from_config(scheduler.config)
        self.steps = int(fresh.config.num_train_timesteps)
        self.sampling = sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.sigmas = fresh.sigmas[:self.steps].float()  # (steps,), from 1 down
        if image_seq_len and getattr(fresh.config, "use_dynamic_shifting", False):
            self.sigmas = fresh.time_shift(resolution_mu(fresh.config, image_seq_len), 1.0,
                                           self.sigmas).float()
        self.timesteps = self.sigmas * self.steps

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.sampling, n, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, generator=rng)
        index = (u * self.steps).long().clamp(max=self.steps - 1)
        return self.timesteps[index]

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the transformer reads: sigma, t / 1000 in [0, 1]."""
        return t.float() / self.steps

    def sigma(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """sigma of each row's timestep, shaped to broadcast: (B, 1, ...)."""
        s = t.float().cpu() / self.steps
        return s.view(-1, *[1] * (ndim - 1))

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, latents.ndim).to(latents.device, latents.dtype)
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_target(noise, latents)

    def weights(self, t: torch.Tensor, snr_gamma: float) -> torch.Tensor | None:
        """The SD3 weighting of the scheme (1 for the densities above: they
        shape the draw, not the loss); min-SNR is refused in the config."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        w = compute_loss_weighting_for_sd3(self.sampling, self.sigma(t, 1).flatten())
        return None if torch.all(w == 1) else w.float()


Noising = DDPMNoising | FlowNoising


def resolution_mu(config, image_seq_len: int) -> float:
    """FLUX's resolution shift: mu linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the
    pipelines compute it when they draw."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                           config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def is_flow(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def noising_for(scheduler, sampling: str = "logit_normal",
                image_seq_len: int | None = None) -> Noising:
    """The forward process of a base model's training scheduler."""
    if is_flow(scheduler):
        return FlowNoising(scheduler, sampling, image_seq_len=image_seq_len)
    return DDPMNoising(scheduler)


@dataclass
class Denoiser:
    """The trained model under its family's process: noisy latents at the
    process's timesteps and a conditioning in, the family's prediction out
    (the UNet's epsilon/v, or the transformer's velocity, unpacked to the
    latents' shape). ``module`` is the UNet or transformer (as accelerate
    prepared it for the loss; unwrapped for the image-free prior's teacher);
    ``guidance``: the value FLUX.1 [dev]'s guidance embedding reads."""

    module: torch.nn.Module
    family: Family
    noising: Noising
    guidance: float | None = None

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, context: Conditioning) -> torch.Tensor:
        device = context.hidden.device
        return self.family.predict(self.module, noisy.to(device),
                                   self.noising.model_time(t).to(device), context, self.guidance)

    def over(self, module: torch.nn.Module) -> Denoiser:
        """The same, calling ``module`` (e.g. the unwrapped one)."""
        return Denoiser(module, self.family, self.noising, self.guidance)
