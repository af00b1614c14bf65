"""One batch's loss: noise the latents by the family's forward process,
predict, compare with the process's target under the DreamBooth objective
and its levers (min-SNR, the frozen model's prior targets, masks)."""

from __future__ import annotations

import torch

from ..models.families import Conditioning
from .masks import MaskedLoss
from .noising import Denoiser
from .objective import dreambooth_loss, with_prior_target


def step_loss(denoiser: Denoiser, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, context: Conditioning, n_instance: int,
              prior_weight: float, prior_target: torch.Tensor | None = None,
              snr_gamma: float = 0.0, masked: MaskedLoss | None = None):
    """The DreamBooth loss of one batch (instance rows first): noise the
    latents at ``timesteps`` by the family's forward process, predict under
    the rows' conditioning ``context``, compare with the process's target
    (epsilon, v or the flow's velocity); ``prior_target`` (the frozen model's
    prediction) replaces it for the class rows when given; ``snr_gamma`` > 0
    weighs the rows by min-SNR-gamma (by each row's timestep, the
    model-prior rows too); ``masked`` weighs the instance rows' pixels by
    their masks (and adds the masked prior)."""
    noising = denoiser.noising
    noisy = noising.noisy(latents, noise, timesteps)
    target = noising.target(latents, noise, timesteps)
    if prior_target is not None:
        target = with_prior_target(target.to(prior_target.device), n_instance, prior_target)
    weights = noising.weights(timesteps, snr_gamma)
    pred = denoiser(noisy, timesteps, context)
    total, instance, prior = dreambooth_loss(
        pred, target.to(pred.device), n_instance, prior_weight, weights,
        None if masked is None else masked.pixel_weights)
    if masked is not None and masked.prior_weight:
        total = total + masked.prior_weight * masked.prior_loss(pred, noisy, timesteps, context)
    return total, instance, prior
